"""A minimal accelerator testbench: the starting point for a new one (see docs/verification.md, "Add a
testbench"). ``make_tb`` resets the design and wraps it in cocotbext-axi bus models;
``tb.gemm`` runs one job through the AXI4-Lite registers and both AXI4-Streams."""

import cocotb
import numpy as np

from sparsa.sim.accel_tb import make_tb
from sparsa.sim.golden import gemm


@cocotb.test()
async def test_example(dut):
    cfg, tb = await make_tb(dut)  # cfg: the settings the pytest launcher passed
    rng = np.random.default_rng(cfg.get("seed", 0))
    a = rng.integers(-128, 128, (10, 20), dtype=np.int8)
    b = rng.integers(-128, 128, (20, 7), dtype=np.int8)
    tb.set_pauses(rng, idle=0.3, backpressure=0.3)  # random stream bubbles
    c, status, error, counters = await tb.gemm(a, b, requant=(1 << 30, 8, 0), relu=True)
    assert np.array_equal(c, gemm(a, b, requant=(1 << 30, 8, 0), relu=True))
    assert error == 0 and counters["MACS"] == 10 * 20 * 7
