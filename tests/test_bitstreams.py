"""The Vivado scripts in bitstreams/ against the generated Verilog and the host runtime, so
neither side can change alone; and open-source synthesis of the accelerator (sparsa[synth]).

The Vivado flow itself cannot run here (no Vivado); what its scripts rely on is checked: port
names and widths Vivado infers the AXI interfaces from, the IP's VLNV the PYNQ driver binds to,
the register window and the DMA's length register width the driver splits transfers for.
"""

import re
from pathlib import Path

import pytest

from sparsa import protocol
from sparsa.host import jobs
from sparsa.hw.verilog import ACCELERATOR_TOP, accelerator_verilog
from sparsa.synth import ports

BITSTREAMS = Path(__file__).resolve().parent.parent / "bitstreams"
PACKAGE = (BITSTREAMS / "package_ip.tcl").read_text()
OVERLAY = (BITSTREAMS / "build_overlay.tcl").read_text()


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
            expected[name] = width if bits == "W" else int(bits)
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
