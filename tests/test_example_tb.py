"""Launches the example testbench (sim/example_tb.py) that docs/verification.md shows."""

from sparsa.sim import runner

BUILD = {"rows": 4, "cols": 4, "stream_width": 32, "max_k": 64, "max_n": 48}


def test_example_testbench(verilator):  # the fixture skips, saying why, without Verilator
    runner.check(runner.accelerator_design(BUILD), "verilator", "sparsa.sim.example_tb",
                 "test_example", {**BUILD, "seed": 1})
