"""Test bench of :class:`sparsa.hw.bram.BlockMemory` (either style): a random write and a
random read in every cycle, each read checked against a Python dictionary two cycles after
its address (a read and a write of one word in the same cycle give the old word)."""

import random

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import FallingEdge

from sparsa.sim.accel_tb import settings


@cocotb.test()
async def test_random_access(dut):
    cfg = settings()
    width, depth, cycles = cfg["width"], cfg["depth"], cfg["cycles"]
    rng = random.Random(cfg.get("seed", 0))
    cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
    dut.rst.value = 0
    # A few words written again and again, the rest anywhere: reads hit written words, the
    # word written in the same cycle, and words in every row of blocks.
    hot = [rng.randrange(depth) for _ in range(6)] + [0, depth - 1]

    def address():
        return rng.choice(hot) if rng.random() < 0.6 else rng.randrange(depth)

    words, pending, checked = {}, [], 0
    for cycle in range(cycles):
        await FallingEdge(dut.clk)  # inputs driven here are taken at the next rising edge
        if len(pending) == 2:
            want = pending.pop(0)
            if want is not None:
                got = int(dut.read__data.value)
                assert got == want, f"cycle {cycle}: read {got:#x}, expected {want:#x}"
                checked += 1
        read = address()
        pending.append(words.get(read))  # the word before this cycle's write
        write = rng.random() < 0.5
        dut.read__addr.value = read
        dut.write__en.value = write
        if write:
            where, data = address(), rng.getrandbits(width)
            dut.write__addr.value, dut.write__data.value = where, data
            words[where] = data
    assert checked > cycles // 4, checked  # most reads were of written words
