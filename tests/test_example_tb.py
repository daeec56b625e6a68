"""Launches the example testbench (sim/example_tb.py) that docs/verification.md shows."""

import pytest

from sparsa.bench import accelerator_design
from sparsa.sim import runner, toolchain

BUILD = {"rows": 4, "cols": 4, "stream_width": 32, "max_k": 64, "max_n": 48}


def test_example_testbench():
    if toolchain.missing("verilator"):
        pytest.skip(toolchain.missing("verilator"))
    runner.check(accelerator_design(BUILD), "verilator", "sparsa.sim.example_tb", "test_example",
                 {**BUILD, "seed": 1})
