# amaranth: UnusedElaboratable=no
"""The processing element in Amaranth's own simulator, against NumPy int32 arithmetic."""

import numpy as np
import pytest
from amaranth.hdl import Fragment
from amaranth.sim import Simulator

from sparsa.hw import ProcessingElement, SystolicArray
from sparsa.hw.pe import LATENCY


def simulate(steps, multiplier="dsp"):
    """Feed ``steps`` ((a, b, first, last) per cycle) to one PE; returns, per step, the
    (acc, result) the step leaves (LATENCY cycles after it) and its ``zero`` flag."""
    pe = ProcessingElement(multiplier)
    seen, zeros = [], []

    async def bench(ctx):
        for a, b, first, last in steps:
            ctx.set(pe.a_in, a)
            ctx.set(pe.b_in, b)
            ctx.set(pe.valid_in, 1)
            ctx.set(pe.first_in, first)
            ctx.set(pe.last_in, last)
            zeros.append(ctx.get(pe.zero))
            await ctx.tick()
            seen.append((ctx.get(pe.acc), ctx.get(pe.result)))
        ctx.set(pe.valid_in, 0)
        for _ in range(LATENCY - 1):
            await ctx.tick()
            seen.append((ctx.get(pe.acc), ctx.get(pe.result)))

    sim = Simulator(pe)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    return [(*values, zero) for values, zero in zip(seen[LATENCY - 1:], zeros)]


def run_tile(a, b):
    steps = [(x, y, k == 0, k == len(a) - 1) for k, (x, y) in enumerate(zip(a, b))]
    return simulate(steps)


@pytest.mark.parametrize("a,b", [
    ([-128], [-128]),
    ([127], [-128]),
    ([-1, -1, -1], [1, 2, 3]),
    ([0, 5, 0, -7], [9, 0, 0, 3]),
    ([-128] * 4, [127] * 4),
])
def test_signed_products(a, b):
    acc, result, _ = run_tile(a, b)[-1]
    want = int(np.dot(np.asarray(a, np.int64), np.asarray(b, np.int64)))
    assert acc == want
    assert result == want


def test_random_dot_products():
    rng = np.random.default_rng(3)
    for _ in range(40):
        depth = int(rng.integers(1, 40))
        a = rng.integers(-128, 128, depth)
        b = rng.integers(-128, 128, depth)
        b[rng.random(depth) < 0.3] = 0
        *_, (acc, result, _) = run_tile(a.tolist(), b.tolist())
        assert result == int(a @ b)


def test_lut_multiplier_matches_on_every_operand_pair():
    """The LUT-multiplier PE's products for all 65536 operand pairs, one k-step tiles."""
    values = np.arange(-128, 128)
    a, b = (grid.reshape(-1) for grid in np.meshgrid(values, values))
    steps = [(int(x), int(y), 1, 1) for x, y in zip(a, b)]
    results = [result for _, result, _ in simulate(steps, multiplier="lut")]
    assert results == (a * b).tolist()


def test_result_holds_while_next_tile_accumulates():
    seen = simulate([(3, 4, 1, 1), (2, 2, 1, 0), (5, 5, 0, 0)])
    assert [result for _, result, _ in seen] == [12, 12, 12]
    assert [acc for acc, _, _ in seen] == [12, 4, 29]


def test_first_restarts_the_sum():
    seen = simulate([(10, 10, 1, 0), (10, 10, 0, 1), (1, 1, 1, 1)])
    assert [result for _, result, _ in seen] == [0, 200, 1]


def test_zero_operand_gates_the_accumulator():
    seen = simulate([(7, 7, 1, 0), (0, 99, 0, 0), (-5, 0, 0, 0), (0, 0, 1, 1)])
    assert [zero for *_, zero in seen] == [0, 1, 1, 1]
    # A zero operand leaves the sum alone; a zero k-step that starts a tile still clears it.
    assert [acc for acc, _, _ in seen] == [49, 49, 49, 0]


def test_accumulator_wraps_like_int32():
    depth = 131_073  # 131073 x 16384 = 2**31 + 16384: one step past INT32_MAX
    pe = ProcessingElement()
    final = {}

    async def bench(ctx):
        ctx.set(pe.valid_in, 1)
        ctx.set(pe.a_in, -128)
        ctx.set(pe.b_in, -128)
        for k in range(depth):
            ctx.set(pe.first_in, k == 0)
            ctx.set(pe.last_in, k == depth - 1)
            await ctx.tick()
        ctx.set(pe.valid_in, 0)
        await ctx.tick().repeat(LATENCY - 1)
        final["result"] = ctx.get(pe.result)

    sim = Simulator(pe)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    want = np.full(depth, 16384, np.int32).sum(dtype=np.int32)  # NumPy's own int32 wrap
    assert final["result"] == int(want) < 0


@pytest.mark.parametrize("rows,cols", [(1, 1), (1, 32), (32, 1), (32, 32), (3, 5)])
def test_array_elaborates_for_every_size(rows, cols):
    fragment = Fragment.get(SystolicArray(rows, cols), None)
    names = [name for _, name, _ in fragment.subfragments]
    assert sum(name.startswith("pe_") for name in names) == rows * cols


@pytest.mark.parametrize("rows,cols,error", [
    (0, 4, "rows must be between 1 and 32, not 0"),
    (4, 33, "cols must be between 1 and 32, not 33"),
    (2.0, 4, "rows must be an int, not float"),
])
def test_array_rejects_bad_sizes(rows, cols, error):
    with pytest.raises((ValueError, TypeError), match=error):
        SystolicArray(rows, cols)


@pytest.mark.parametrize("width", [1, 10, 16, 32, 64, 256])
def test_lowest_set_bit(width):
    """The sequencer's two-level priority encoder against Python on random and edge masks."""
    from sparsa.hw.accelerator import LowestSet

    dut = LowestSet(width)
    rng = np.random.default_rng(width)
    masks = [0, 1, (1 << width) - 1, 1 << (width - 1)]
    masks += [int(rng.integers(0, 2**min(width, 62))) << int(rng.integers(0, max(1, width - 62)))
              for _ in range(60)]
    masks += [sum(1 << int(bit) for bit in rng.choice(width, size=min(width, 2), replace=False))
              for _ in range(30)]

    async def bench(ctx):
        for mask in masks:
            ctx.set(dut.mask, mask)
            if mask == 0:
                assert ctx.get(dut.empty) == 1 and ctx.get(dut.last) == 1, mask
                continue
            lowest = (mask & -mask).bit_length() - 1
            assert ctx.get(dut.empty) == 0, mask
            assert ctx.get(dut.position) == lowest, (hex(mask), ctx.get(dut.position), lowest)
            assert ctx.get(dut.rest) == mask & ~(1 << lowest), hex(mask)
            assert ctx.get(dut.last) == (mask & (mask - 1) == 0), hex(mask)

    sim = Simulator(dut)
    sim.add_testbench(bench)
    sim.run()
