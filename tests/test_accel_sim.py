"""The accelerator's generated Verilog under cocotb with cocotbext-axi bus models.

Every job is checked bit-exactly against NumPy (sparsa.sim.golden). Verilator runs the full set
on the default 8x8 / 64-bit build and on two other geometries; Icarus runs a smoke subset.
"""

import pytest

from builds import DEFAULT, ODD
from builds import SMALL as SMALL_K

from sparsa.sim import runner
from sparsa.sim.runner import accelerator_design as design

TB = "sparsa.sim.accel_tb"


@pytest.mark.parametrize("testcase", ["test_registers", "test_directed_jobs", "test_errors",
                                      "test_abandoned_jobs", "test_sparse_patterns",
                                      "test_queued_packets"])
def test_default_build(testcase, verilator):
    runner.check(design(DEFAULT), "verilator", TB, testcase, DEFAULT)


@pytest.mark.parametrize("seed", range(4))
def test_random_default_build(seed, verilator):
    runner.check(design(DEFAULT), "verilator", TB, "test_random_jobs",
                 {**DEFAULT, "seed": seed, "count": 40, "max_dim": 40 if seed else 110})


@pytest.mark.parametrize("cfg", [SMALL_K, ODD], ids=["4x4_w32", "3x5_w16"])
def test_other_geometries(cfg, verilator):
    runner.check(design(cfg), "verilator", TB, "test_directed_jobs", cfg)
    runner.check(design(cfg), "verilator", TB, "test_errors", cfg)
    runner.check(design(cfg), "verilator", TB, "test_random_jobs",
                 {**cfg, "seed": 100 + cfg["rows"], "count": 40, "max_dim": 50})
    runner.check(design(cfg), "verilator", TB, "test_sparse_patterns", {**cfg, "seed": 3})


def test_build_without_sparse_skip(verilator):
    """The comparison build (no schedule skipping) is exact too, and says so in FEATURES."""
    cfg = {**SMALL_K, "sparse_skip": False}
    runner.check(design(cfg), "verilator", TB, "test_registers", cfg)
    runner.check(design(cfg), "verilator", TB, "test_sparse_patterns", cfg)


def test_smoke_icarus(icarus):
    runner.check(design(ODD), "icarus", TB, "test_registers", ODD)
    runner.check(design(ODD), "icarus", TB, "test_random_jobs",
                 {**ODD, "seed": 7, "count": 6, "max_dim": 12})


def test_ecp5_dsp_packed_and_lut_columns(verilator):
    """One build with every kind of element: packed pairs of rows (two MACs per multiplier),
    in the odd fifth row plain PEs that are ECP5 MULT18X18D blocks with their own operand and
    product registers (``dsp="ecp5"``, simulated with sim/mult18x18d.v, as are the
    post-processing multipliers), and a column that multiplies in LUTs; exact with zero
    operands (the DSP's operand registers hold), requantization, and B in both formats."""
    cfg = {**SMALL_K, "rows": 5, "dsp": "ecp5", "lut_columns": 1, "dsp_packing": True}
    runner.check(design(cfg), "verilator", TB, "test_directed_jobs", cfg)
    runner.check(design(cfg), "verilator", TB, "test_sparse_patterns", {**cfg, "seed": 5})
    runner.check(design(cfg), "verilator", TB, "test_random_jobs",
                 {**cfg, "seed": 21, "count": 40, "max_dim": 40})
