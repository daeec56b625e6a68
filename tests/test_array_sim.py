"""The generated array Verilog, simulated with cocotb and checked bit-exactly against NumPy.

Verilator (the default simulator) runs the directed and the randomized tests on a square and an
odd array shape and on a packed one; Icarus runs a smoke subset so the Verilog stays portable
between simulators. (The 4x4 and 8x8 arrays run inside the accelerator's tests,
tests/test_accel_sim.py, which build those shapes anyway.)
"""

import functools

import pytest

from sparsa.hw.verilog import ARRAY_TOP, array_verilog
from sparsa.sim import runner

TB = "sparsa.sim.array_tb"
SHAPES = [(2, 2), (3, 5)]


def design(rows, cols, lut_columns=0, dsp_packing=False):
    key = f"array_{rows}x{cols}" + (f"_lut{lut_columns}" if lut_columns else "") \
        + ("_packed" if dsp_packing else "")
    return runner.Design(key, ARRAY_TOP, functools.partial(
        array_verilog, rows, cols, lut_columns=lut_columns, dsp_packing=dsp_packing))


@pytest.mark.parametrize("rows,cols", SHAPES, ids=[f"{r}x{c}" for r, c in SHAPES])
def test_directed_verilator(rows, cols, verilator):
    runner.check(design(rows, cols), "verilator", TB, "test_directed", {"rows": rows, "cols": cols})


# 2 shapes x 120 tiles = 240 random matrices, K up to 200 and up to 64.
@pytest.mark.parametrize("rows,cols,max_k", [(2, 2, 200), (3, 5, 64)], ids=["2x2", "3x5"])
def test_random_verilator(rows, cols, max_k, verilator):
    runner.check(design(rows, cols), "verilator", TB, "test_random",
                 {"rows": rows, "cols": cols, "count": 120, "max_k": max_k,
                  "seed": rows * 100 + cols, "bubbles": 0.15})


def test_accumulator_wraps_verilator(verilator):
    runner.check(design(2, 2), "verilator", TB, "test_accumulator_wraps", {"rows": 2, "cols": 2})


@pytest.mark.parametrize("rows,cols", [(3, 5), (2, 2)], ids=["3x5", "2x2"])
def test_smoke_icarus(rows, cols, icarus):
    settings = {"rows": rows, "cols": cols}
    runner.check(design(rows, cols), "icarus", TB, "test_directed", settings)
    runner.check(design(rows, cols), "icarus", TB, "test_random",
                 {**settings, "count": 12, "max_k": 12, "seed": 7, "bubbles": 0.2})


def test_dsp_packing_verilator(verilator):
    """Packed pairs of rows (two MACs per multiplier) with B in the group format (each column
    its own lanes), an odd row left single, and LUT columns east of the DSP columns: rows (0,
    1) in pairs in DSP columns 0-4, plain PEs in row 2 and in LUT columns 5 and 6 (the
    accelerator tests run a 5x4 build with pairs, a MULT18X18D row and a LUT column)."""
    build = {"rows": 3, "cols": 7, "lut_columns": 2, "dsp_packing": True}
    packed = design(**build)
    runner.check(packed, "verilator", TB, "test_directed", build)
    runner.check(packed, "verilator", TB, "test_random",
                 {**build, "count": 60, "max_k": 40, "seed": 5, "bubbles": 0.15})
    runner.check(packed, "verilator", TB, "test_accumulator_wraps", build)
