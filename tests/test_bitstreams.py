"""The Vivado scripts in bitstreams/ against the generated Verilog and the host runtime, so
neither side can change alone; and open-source synthesis of the accelerator (sparsa[synth]).

The Vivado flow itself cannot run here (no Vivado); what its scripts rely on is checked: port
names and widths Vivado infers the AXI interfaces from, the IP's VLNV the PYNQ driver binds to,
the register window and the DMA's length register width the driver splits transfers for. Both
scripts also run start to end in a Tcl interpreter whose Vivado commands are stubs that record
each call, so the block design's every connection and address is checked by name.
"""

import re
import shutil
import tkinter
from pathlib import Path

import pytest

from sparsa import protocol
from sparsa.host import jobs
from sparsa.hw.verilog import ACCELERATOR_TOP, accelerator_verilog
from sparsa.synth import ports

BITSTREAMS = Path(__file__).resolve().parent.parent / "bitstreams"
PACKAGE = (BITSTREAMS / "package_ip.tcl").read_text()
OVERLAY = (BITSTREAMS / "build_overlay.tcl").read_text()
VIVADO_VERSION = "2022.1"  # the PYNQ v3.0.1 image's, which the scripts target


def tcl_list(text, variable):
    """The words of ``set <variable> { ... }`` in a Tcl script, as name -> value pairs."""
    match = re.search(rf"^set {variable} \{{(.*?)\}}", text, re.S | re.M)
    assert match, f"no 'set {variable} {{...}}' in the Tcl"
    words = match.group(1).split()
    return dict(zip(words[::2], words[1::2]))


def tcl_value(text, variable):
    match = re.search(rf"^set {variable} (\S+)", text, re.M)
    assert match, f"no 'set {variable} ...' in the Tcl"
    return match.group(1)


@pytest.mark.parametrize("build", [{}, {"rows": 16, "cols": 16, "stream_width": 128},
                                   {"rows": 3, "cols": 5, "stream_width": 16, "max_k": 32,
                                    "max_n": 40}])
def test_tcl_ports_exist_in_generated_verilog(build):
    """Every port the packaging script names exists with its width, and the top level has no
    port the scripts do not know of (an unknown port would be left unconnected)."""
    found = ports(accelerator_verilog(**build), ACCELERATOR_TOP)
    width = build.get("stream_width", 64)
    expected = {}
    for variable in ("axi_lite_ports", "stream_ports", "clock_ports"):
        for name, bits in tcl_list(PACKAGE, variable).items():
            expected[name] = {"W": width, "K": width // 8}.get(bits) or int(bits)
    assert {name: bits for name, (_, bits) in found.items()} == expected
    assert tcl_value(PACKAGE, "top") == ACCELERATOR_TOP


def test_tcl_axi_parameters_match_protocol_and_driver():
    lite = tcl_list(PACKAGE, "axi_lite_ports")
    assert int(lite["s_axi_awaddr"]) == int(lite["s_axi_araddr"]) == protocol.ADDRESS_WIDTH
    assert int(tcl_value(PACKAGE, "register_window")) == 2**protocol.ADDRESS_WIDTH
    vlnv = ":".join(tcl_value(PACKAGE, key) for key in ("vendor", "library", "name", "version"))
    assert vlnv == protocol.IP_VLNV == tcl_value(OVERLAY, "vlnv")
    assert 2**int(tcl_value(OVERLAY, "dma_length_width")) - 1 == jobs.DEFAULT_MAX_TRANSFER
    # The overlay takes its DMA stream width from the IP and connects the interfaces by name.
    for pin in ("sparsa/s_axis", "sparsa/m_axis", "sparsa/s_axi", "sparsa/aclk",
                "sparsa/aresetn"):
        assert pin in OVERLAY, pin
    assert "c_include_sg {0}" in OVERLAY  # simple mode: what sparsa.host.board drives


def test_build_files_are_ignored_by_git():
    ignored = (BITSTREAMS.parent / ".gitignore").read_text().split()
    assert "bitstreams/build/" in ignored


# Vivado's commands as stubs: each call is recorded as a list of words; the getters return a
# token naming what was asked for, so connections can be read back from the calls.
VIVADO_STUBS = r"""
set ::calls {}
proc unknown {args} { lappend ::calls $args; return "" }
proc get_board_parts {args} { return tul.com.tw:pynq-z2:part0:1.0 }
proc create_bd_cell {args} { lappend ::calls [concat create_bd_cell $args]; return [lindex $args end] }
proc get_bd_intf_pins {args} { return [lindex $args end] }
proc get_bd_pins {args} { return [lindex $args end] }
proc get_bd_addr_spaces {args} { return [lindex $args end] }
proc get_bd_addr_segs {args} { return [lindex $args end] }
proc get_bd_cells {args} { return [lindex $args end] }
proc get_files {args} { return [lindex $args end] }
proc make_wrapper {args} { return wrapper.v }
proc get_runs {args} { return impl_1 }
proc get_timing_paths {args} { return [expr {"-hold" in $args ? "hold_path" : "setup_path"}] }
proc report_timing {args} { lappend ::calls [concat report_timing $args]; return "failing paths" }
proc version {args} { return $::vivado }
proc get_property {name args} {
    switch -- $name {
        PROGRESS { return 100% }
        SLACK { return [expr {[lindex $args end] eq "hold_path" ? $::hold : $::setup}] }
        DIRECTORY { return $::run_dir }
        default { return "" }
    }
}
namespace eval ipx {}
proc ipx::current_core {} { return core }
proc ipx::get_bus_interfaces {args} { return [lindex $args 0] }
proc ipx::get_bus_parameters {name args} {
    return [expr {$name eq "POLARITY" ? $::polarity : ""}]
}
proc ipx::add_bus_parameter {args} {
    lappend ::calls [concat ipx::add_bus_parameter $args]; return "[lindex $args 0]_of_[lindex $args 1]"
}
"""


def run_tcl(script, tmp_path, argv=(), polarity="", setup=0.25, hold=0.05,
            vivado=VIVADO_VERSION):
    """Source a copy of ``script`` (under ``tmp_path``/bitstreams, so its build folder is
    there) with Vivado ``vivado`` stubbed, its routed design's worst ``setup`` and ``hold``
    slack given; returns the recorded calls and the Tcl interpreter."""
    folder = tmp_path / "bitstreams"
    folder.mkdir(exist_ok=True)
    shutil.copy(BITSTREAMS / script, folder / script)
    tcl = tkinter.Tcl()
    tcl.eval(VIVADO_STUBS)
    tcl.setvar("run_dir", str(tmp_path / "run"))
    tcl.setvar("polarity", polarity)
    tcl.setvar("setup", str(setup))
    tcl.setvar("hold", str(hold))
    tcl.setvar("vivado", vivado)
    tcl.eval("set argv [list " + " ".join("{" + str(word) + "}" for word in argv) + "]")
    tcl.eval(f"source {{{folder / script}}}")
    calls = [tuple(map(str, tcl.splitlist(call)))
             for call in tcl.splitlist(tcl.eval("string range $::calls 0 end"))]
    return calls, tcl


def overlay_workspace(tmp_path, stream_bits=None):
    """The files build_overlay.tcl reads and copies: a packaged IP, the run's outputs."""
    ip = tmp_path / "bitstreams" / "build" / "ip"
    ip.mkdir(parents=True)
    if stream_bits is not None:
        (ip / "stream_width").write_text(f"{stream_bits}\n")
    overlay_workspace_files(tmp_path)


def overlay_workspace_files(tmp_path):
    """What Vivado would have left for build_overlay.tcl: the packaged IP's component.xml and
    the block design's hardware handoff."""
    ip = tmp_path / "bitstreams" / "build" / "ip"
    (ip / "component.xml").write_text("<component/>")
    (tmp_path / "run").mkdir(exist_ok=True)
    handoff = (tmp_path / "bitstreams" / "build" / "sparsa" / "sparsa.gen" / "sources_1" / "bd"
               / "sparsa" / "hw_handoff")
    handoff.mkdir(parents=True, exist_ok=True)
    (handoff / "sparsa.hwh").write_text("<hwh/>")


def test_block_design_connects_every_interface_clock_and_reset(tmp_path):
    """The overlay's block design, as the script builds it: every bus interface, clock and
    reset connected explicitly (no connection automation), both DMA masters through a
    SmartConnect to HP0, the DMA's streams at the IP's width, every address assigned."""
    overlay_workspace(tmp_path)
    calls, _ = run_tcl("build_overlay.tcl", tmp_path, ["sparsa", 100, 2, 128])
    interfaces = {call[1:] for call in calls if call[0] == "connect_bd_intf_net"}
    assert interfaces == {
        ("ps7/M_AXI_GP0", "axi_periph/S00_AXI"), ("axi_periph/M00_AXI", "sparsa/s_axi"),
        ("axi_periph/M01_AXI", "axi_dma/S_AXI_LITE"), ("axi_dma/M_AXIS_MM2S", "sparsa/s_axis"),
        ("sparsa/m_axis", "axi_dma/S_AXIS_S2MM"), ("axi_dma/M_AXI_MM2S", "axi_mem/S00_AXI"),
        ("axi_dma/M_AXI_S2MM", "axi_mem/S01_AXI"), ("axi_mem/M00_AXI", "ps7/S_AXI_HP0")}
    nets = {call[1]: set(call[2:]) for call in calls if call[0] == "connect_bd_net"}
    assert nets["ps7/FCLK_CLK0"] == {
        "ps7/M_AXI_GP0_ACLK", "ps7/S_AXI_HP0_ACLK", "rst_ps7/slowest_sync_clk",
        "axi_periph/ACLK", "axi_periph/S00_ACLK", "axi_periph/M00_ACLK", "axi_periph/M01_ACLK",
        "axi_mem/aclk", "axi_dma/s_axi_lite_aclk", "axi_dma/m_axi_mm2s_aclk",
        "axi_dma/m_axi_s2mm_aclk", "sparsa/aclk"}
    assert nets["ps7/FCLK_RESET0_N"] == {"rst_ps7/ext_reset_in"}
    assert nets["rst_ps7/interconnect_aresetn"] == {"axi_periph/ARESETN"}
    assert nets["rst_ps7/peripheral_aresetn"] == {
        "axi_periph/S00_ARESETN", "axi_periph/M00_ARESETN", "axi_periph/M01_ARESETN",
        "axi_mem/aresetn", "axi_dma/axi_resetn", "sparsa/aresetn"}
    assert not [call for call in calls if call[0] == "apply_bd_automation"
                and "xilinx.com:bd_rule:axi4" in call]
    cells = {call[-1]: call[call.index("-vlnv") + 1] for call in calls
             if call[0] == "create_bd_cell"}
    assert cells["sparsa"] == protocol.IP_VLNV and cells["axi_mem"].endswith(":smartconnect")
    dma = [call for call in calls if call[0] == "set_property" and call[-1] == "axi_dma"][0]
    settings = dict(zip(dma[2].split()[::2], dma[2].split()[1::2]))
    assert settings["CONFIG.c_m_axis_mm2s_tdata_width"] == "128"
    assert settings["CONFIG.c_s_axis_s2mm_tdata_width"] == "128"
    assert settings["CONFIG.c_include_sg"] == "0"
    addresses = {call[-1]: call[call.index("-target_address_space") + 1] for call in calls
                 if call[0] == "assign_bd_address"}
    block = re.search(r"ipx::add_address_block (\w+)", PACKAGE).group(1)
    assert addresses == {f"sparsa/s_axi/{block}": "ps7/Data",
                         "axi_dma/S_AXI_LITE/Reg": "ps7/Data",
                         "ps7/S_AXI_HP0/HP0_DDR_LOWOCM": "axi_dma/Data_S2MM"}
    spaces = [call[call.index("-target_address_space") + 1] for call in calls
              if call[0] == "assign_bd_address" and call[-1].endswith("HP0_DDR_LOWOCM")]
    assert spaces == ["axi_dma/Data_MM2S", "axi_dma/Data_S2MM"]
    build = tmp_path / "bitstreams" / "build"
    assert ("write_bitstream", "-force", f"{build}/sparsa.bit") in calls
    assert (build / "sparsa.hwh").read_text() == "<hwh/>"
    assert "lmap" not in OVERLAY  # Vivado's Tcl is 8.5


def test_block_design_takes_the_width_the_packaging_wrote(tmp_path):
    overlay_workspace(tmp_path, stream_bits=32)
    calls, _ = run_tcl("build_overlay.tcl", tmp_path)
    dma = [call for call in calls if call[0] == "set_property" and call[-1] == "axi_dma"][0]
    assert "CONFIG.c_m_axis_mm2s_tdata_width 32" in dma[2]


def test_block_design_refuses_a_missing_or_bad_width(tmp_path):
    overlay_workspace(tmp_path)
    with pytest.raises(tkinter.TclError, match="no stream width"):
        run_tcl("build_overlay.tcl", tmp_path)
    with pytest.raises(tkinter.TclError, match="expected a multiple of 8 bits, got '12'"):
        run_tcl("build_overlay.tcl", tmp_path, ["sparsa", 100, 2, 12])


@pytest.mark.parametrize("polarity", ["", "POLARITY"])
def test_packaging_records_the_stream_width_and_guards_polarity(tmp_path, polarity):
    """package_ip.tcl reads the stream width off the generated Verilog and writes it for the
    block design; it adds the reset's POLARITY only where Vivado did not infer one."""
    verilog = tmp_path / "sparsa_accel.v"
    verilog.write_text(accelerator_verilog(rows=4, cols=4, stream_width=32, max_k=64, max_n=48))
    calls, _ = run_tcl("package_ip.tcl", tmp_path, [verilog], polarity)
    ip = tmp_path / "bitstreams" / "build" / "ip"
    assert (ip / "stream_width").read_text().strip() == "32"
    added = [call[1:] for call in calls if call[0] == "ipx::add_bus_parameter"]
    assert added == ([] if polarity else [("POLARITY", "aresetn")]) + [("FREQ_HZ", "aclk")]


@pytest.mark.parametrize("clock", [None, 142.5])
def test_packaging_on_disk_checked_with_the_clock_frequency(tmp_path, clock):
    """The IP is packaged from a project on disk (not in memory), its integrity checked, and
    its clock interface's FREQ_HZ is the clock asked for (default 100 MHz), which the block
    design then takes."""
    verilog = tmp_path / "sparsa_accel.v"
    verilog.write_text(accelerator_verilog(rows=4, cols=4, stream_width=32, max_k=64, max_n=48))
    calls, _ = run_tcl("package_ip.tcl", tmp_path, [verilog] + ([clock] if clock else []))
    names = [call[0] for call in calls]
    project = [call for call in calls if call[0] == "create_project"][0]
    assert "-in_memory" not in project and project[-3:-2] == (
        f"{tmp_path}/bitstreams/build/ip_project",)
    assert names.index("ipx::package_project") < names.index("ipx::check_integrity") \
        < names.index("ipx::save_core") < names.index("close_project")
    assert ("set_property", "value", str(round((clock or 100) * 1e6)), "FREQ_HZ_of_aclk") in calls
    ip = tmp_path / "bitstreams" / "build" / "ip"
    assert float((ip / "clock_mhz").read_text()) == (clock or 100)
    overlay_workspace_files(tmp_path)
    calls, _ = run_tcl("build_overlay.tcl", tmp_path)
    ps = [call for call in calls if call[0] == "set_property" and call[-1] == "ps7"][0]
    assert f"CONFIG.PCW_FPGA0_PERIPHERAL_FREQMHZ {clock or 100}" in ps[2]
    with pytest.raises(tkinter.TclError, match=f"the IP was packaged for {clock or 100} MHz, "
                                               "not '125'"):
        run_tcl("build_overlay.tcl", tmp_path, ["sparsa", 125, 2])


@pytest.mark.parametrize("setup,hold", [(-0.12, 0.05), (0.3, -0.02)])
def test_a_design_that_misses_timing_writes_no_bitstream(tmp_path, monkeypatch, capfd, setup,
                                                         hold):
    """Negative setup or hold slack after routing: the failing paths are printed and the build
    fails without a .bit or .hwh; SPARSA_ALLOW_TIMING_FAILURE=1 writes them, loudly."""
    overlay_workspace(tmp_path, stream_bits=64)
    build = tmp_path / "bitstreams" / "build"
    monkeypatch.delenv("SPARSA_ALLOW_TIMING_FAILURE", raising=False)
    with pytest.raises(tkinter.TclError, match=rf"timing not met at 100 MHz \(setup {setup} ns, "
                                               rf"hold {hold} ns.*no bitstream written"):
        run_tcl("build_overlay.tcl", tmp_path, setup=setup, hold=hold)
    assert "failing paths" in capfd.readouterr().out
    assert not (build / "sparsa.bit").exists() and not (build / "sparsa.hwh").exists()
    monkeypatch.setenv("SPARSA_ALLOW_TIMING_FAILURE", "1")
    calls, _ = run_tcl("build_overlay.tcl", tmp_path, setup=setup, hold=hold)
    assert ("write_bitstream", "-force", f"{build}/sparsa.bit") in calls
    assert "WARNING: timing not met" in capfd.readouterr().out


def test_scripts_name_the_vivado_version_they_target(tmp_path, capfd):
    """Both scripts state the Vivado release they target and warn on another one."""
    overlay_workspace(tmp_path, stream_bits=64)
    run_tcl("build_overlay.tcl", tmp_path)
    assert "WARNING" not in capfd.readouterr().out
    run_tcl("build_overlay.tcl", tmp_path, vivado="2024.2")
    assert ("WARNING: these scripts target Vivado 2022.1 (the PYNQ v3.0.1 image's); this is "
            "Vivado 2024.2") in capfd.readouterr().out
    verilog = tmp_path / "sparsa_accel.v"
    verilog.write_text(accelerator_verilog(rows=4, cols=4, stream_width=32, max_k=64, max_n=48))
    run_tcl("package_ip.tcl", tmp_path, [verilog], vivado="2020.2")
    assert "this is Vivado 2020.2" in capfd.readouterr().out
    assert tcl_value(PACKAGE, "vivado_version") == tcl_value(OVERLAY, "vivado_version") \
        == VIVADO_VERSION


def test_cell_names_are_the_ones_the_driver_and_docs_use():
    """The block design's cells are protocol.IP_CELL and DMA_CELL (PYNQ names the overlay's
    attributes after them); every overlay attribute the docs show is the accelerator's."""
    cells = dict(re.findall(r"create_bd_cell -type ip -vlnv (\S+) (\w+)", OVERLAY))
    assert cells["$vlnv"] == protocol.IP_CELL
    assert cells["xilinx.com:ip:axi_dma"] == protocol.DMA_CELL
    root = BITSTREAMS.parent
    shown = set()
    for path in [root / "README.md", *root.glob("docs/*.md"), BITSTREAMS / "README.md",
                 *root.glob("host/*.py"), *root.glob("notebooks/*.ipynb")]:
        shown |= set(re.findall(r"(?:\bol|\boverlay|Overlay\([^)]*\))\.([a-z_]\w*)\b",
                                path.read_text()))
    overlay_api = {"ip_dict", "download", "is_loaded", "bitfile_name"}
    assert shown - overlay_api == {protocol.IP_CELL}, shown
