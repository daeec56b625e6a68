"""`sparsa verilog` writes Verilog with readable ports that passes `verilator --lint-only -Wall`."""

import re

import pytest

from sparsa import cli
from sparsa.sim import toolchain


@pytest.mark.parametrize("rows,cols", [(8, 8), (3, 5), (1, 1)])
def test_generated_array_is_lint_clean(tmp_path, verilator, rows, cols, capsys):
    out = tmp_path / "sparsa_array.v"
    assert cli.main(["verilog", "--top", "array", "--rows", str(rows), "--cols", str(cols),
                     "-o", str(out), "--lint"]) == 0
    assert "lint-only -Wall: clean" in capsys.readouterr().out
    header = re.search(r"module sparsa_array\(([^)]*)\);", out.read_text())
    ports = {p.strip() for p in header.group(1).split(",")}
    assert ports == {
        "clk", "rst", "valid", "first", "last", "out_valid", "out_row",
        *(f"a__{i}" for i in range(rows)), *(f"b__{j}" for j in range(cols)),
        *(f"a_zero__{i}" for i in range(rows)), *(f"b_zero__{j}" for j in range(cols)),
        *(f"b_lane__{j}" for j in range(cols)), *(f"c__{j}" for j in range(cols)),
    }


SMALL_ARGV = ["--rows", "3", "--cols", "5", "--stream-width", "16", "--max-k", "32",
              "--max-n", "40"]


@pytest.mark.parametrize("argv", [[], SMALL_ARGV, [*SMALL_ARGV, "--dsp", "ecp5"]],
                         ids=["default", "3x5_w16", "3x5_w16_ecp5"])
def test_generated_accelerator_is_lint_clean(tmp_path, verilator, argv, capsys):
    out = tmp_path / "sparsa_accel.v"
    assert cli.main(["verilog", *argv, "-o", str(out), "--lint"]) == 0
    assert "lint-only -Wall: clean" in capsys.readouterr().out
    header = re.search(r"module sparsa_accel\(([^)]*)\);", out.read_text())
    ports = {p.strip() for p in header.group(1).split(",")}
    axi_lite = {f"s_axi_{name}" for name in (
        "awaddr", "awvalid", "awready", "wdata", "wstrb", "wvalid", "wready", "bresp", "bvalid",
        "bready", "araddr", "arvalid", "arready", "rdata", "rresp", "rvalid", "rready")}
    streams = {f"{prefix}_{name}" for prefix in ("s_axis", "m_axis")
               for name in ("tdata", "tvalid", "tready", "tlast", "tkeep")}
    assert ports == {"aclk", "aresetn"} | axi_lite | streams
    # Whole beats out: the DMA's S2MM writes every byte of each beat.
    width = 16 // 8 if argv else 64 // 8
    assert re.search(rf"assign m_axis_tkeep = {width}'h{(1 << width) - 1:x};",
                     out.read_text()), "m_axis_tkeep is not tied to all ones"


def test_lint_reports_real_findings(tmp_path, verilator):
    """The waivers leave -Wall's other checks on: an output nothing drives still fails."""
    bad = tmp_path / "bad.v"
    bad.write_text("module bad(input a, output y, output z);\n  assign y = a;\nendmodule\n")
    ok, report = toolchain.lint(bad)
    assert not ok
    assert "UNDRIVEN" in report


@pytest.mark.parametrize("argv,message", [
    (["verilog", "--rows", "0", "-o", "x.v"], "must be a positive integer, not 0"),
    (["verilog", "--cols", "33", "-o", "x.v"], "must be at most 32, not 33"),
    (["verilog", "--stream-width", "48", "-o", "x.v"], "invalid choice: 48"),
])
def test_cli_rejects_bad_sizes(argv, message, capsys):
    with pytest.raises(SystemExit):
        cli.main(argv)
    assert message in capsys.readouterr().err


def test_ecp5_build_instantiates_its_multipliers(tmp_path):
    """``--dsp ecp5``: every multiplier (64 PEs, 8 lanes x 4 post-processing products) is a
    MULT18X18D with its operand and product registers on, and the operand memories and the B
    masks are DP16KD blocks with their output registers on (A: 128 x 256 bits, a group of four
    k-steps per word, in 15 1K x 18 blocks; B: 8192 x 80 bits, values and lanes, in 40 8K x 2
    blocks; B masks: 32 x 256 bits in 15 1K x 18 blocks); the generic build has neither."""
    out = tmp_path / "accel.v"
    assert cli.main(["verilog", "--dsp", "ecp5", "-o", str(out)]) == 0
    text = out.read_text()
    instances = re.findall(r"MULT18X18D #\((.*?)\) \S+ \(", text, re.S)
    assert len(instances) == 64 + 8 * 4
    for parameters in instances:
        for name in ("REG_INPUTA_CLK", "REG_INPUTB_CLK", "REG_OUTPUT_CLK"):
            assert re.search(rf"\.{name}\(\"CLK0\"\)", parameters), parameters
    blocks = re.findall(r"DP16KD #\((.*?)\) \S+ \(", text, re.S)
    widths = sorted(int(re.search(r"\.DATA_WIDTH_B\(32'd(\d+)\)", b).group(1)) for b in blocks)
    assert widths == [2] * 40 + [18] * (15 + 15)
    assert all('.REGMODE_B("OUTREG")' in parameters for parameters in blocks)
    assert cli.main(["verilog", "-o", str(out)]) == 0
    assert "MULT18X18D" not in out.read_text() and "DP16KD" not in out.read_text()
