"""The operand memory (:class:`sparsa.hw.bram.BlockMemory`) in both styles, simulated: the
generic one (an Amaranth Memory and a register) and the ECP5 one (DP16KD instances with their
output registers, on the model sim/dp16kd.v), each against a Python dictionary."""

import pytest

from sparsa.hw.bram import dp16kd_layout
from sparsa.hw.verilog import MEMORY_TOP, memory_verilog
from sparsa.sim import runner

# (width, depth): the A memory of the default build (1K x 18 blocks), the B memory's (8K x 2),
# and one deeper than a block (three rows of 16K x 1 blocks and the multiplexer after them).
SHAPES = [(64, 512), (64, 8192), (5, 40000)]


def design(width, depth, dsp):
    def generate():
        return runner.with_primitive_models(memory_verilog(width, depth, dsp=dsp), dsp)
    return runner.Design(f"memory_{width}x{depth}_{dsp}", MEMORY_TOP, generate)


def test_dp16kd_layout():
    assert dp16kd_layout(64, 512) == (18, 4, 1)
    assert dp16kd_layout(64, 1024) == (18, 4, 1)
    assert dp16kd_layout(64, 1025) == (9, 8, 1)
    assert dp16kd_layout(64, 8192) == (2, 32, 1)
    assert dp16kd_layout(3, 16384) == (1, 3, 1)
    assert dp16kd_layout(5, 40000) == (1, 5, 3)


# Icarus: a build takes a second where Verilator's takes tens (the accelerator's ECP5 build
# runs the model under Verilator); the generic style on one shape (it is Amaranth's Memory).
CASES = [(64, 512, "generic")] + [(width, depth, "ecp5") for width, depth in SHAPES]


@pytest.mark.parametrize("width,depth,dsp", CASES, ids=[f"{w}x{d}-{s}" for w, d, s in CASES])
def test_memory(width, depth, dsp, icarus):
    runner.check(design(width, depth, dsp), "icarus", "sparsa.sim.memory_tb",
                 "test_random_access", {"width": width, "depth": depth, "cycles": 3000, "seed": 1})
