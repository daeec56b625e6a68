# amaranth: UnusedElaboratable=no
"""The credit-based stream link in Amaranth's simulator: every beat delivered once and in order
under random stalls on both sides, a beat per cycle when neither side waits, ``idle`` only when
everything taken has left."""

import numpy as np
import pytest
from amaranth.sim import Simulator

from sparsa.hw.link import CreditLink


@pytest.mark.parametrize("stages,buffered", [(1, False), (2, False), (2, True), (3, True)])
def test_credit_link(stages, buffered):
    dut = CreditLink(16, stages=stages, buffered=buffered)
    rng = np.random.default_rng(stages * 2 + buffered)
    beats = [int(value) for value in rng.integers(0, 1 << 16, size=400)]
    received, idle_seen, taken = [], [], [0]

    async def source(ctx):
        # The first 200 beats are offered in every cycle, the rest with random bubbles.
        for number, beat in enumerate(beats):
            while number >= 200 and rng.random() < 0.3:
                ctx.set(dut.i.valid, 0)
                await ctx.tick()
            ctx.set(dut.i.valid, 1)
            ctx.set(dut.i.payload, beat)
            await ctx.tick().until(dut.i.ready)
            taken[0] += 1
        ctx.set(dut.i.valid, 0)

    async def sink(ctx):
        cycle, first, last_of_fast = 0, None, None
        while len(received) < len(beats):
            stall = len(received) >= 200 and rng.random() < 0.4
            ctx.set(dut.o.ready, not stall)
            await ctx.delay(1e-8)  # let the source settle this cycle's offer
            idle_seen.append((taken[0] - len(received), ctx.get(dut.idle)))
            if ctx.get(dut.o.valid) and not stall:
                received.append(ctx.get(dut.o.payload))
                first = cycle if first is None else first
                if len(received) == 200:
                    last_of_fast = cycle
            await ctx.tick()
            cycle += 1
        # Full rate while neither side waits: 200 beats in 200 consecutive cycles.
        assert last_of_fast - first == 199, (first, last_of_fast)
        ctx.set(dut.o.ready, 0)
        for _ in range(2 * stages + 4):
            await ctx.tick()
        assert ctx.get(dut.idle)

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(source)
    sim.add_testbench(sink)
    sim.run()
    assert received == beats
    # Never idle while a beat taken has not left; idle again once all have.
    assert not any(idle for in_flight, idle in idle_seen if in_flight)
    assert any(idle for in_flight, idle in idle_seen)
