# amaranth: UnusedElaboratable=no
"""The processing element in Amaranth's own simulator, against NumPy int32 arithmetic."""

import numpy as np
import pytest
from amaranth import Const, Module, Signal, signed
from amaranth.hdl import Fragment
from amaranth.sim import Simulator

from sparsa.hw import ProcessingElement, SystolicArray
from sparsa.hw.array import row_groups
from sparsa.hw.pe import ACCUMULATOR, LATENCY, PackedPair, lut_multiply, pair_totals
from sparsa.hw.pipeline import lut_product


JUNK = np.random.default_rng(11)


def set_a(ctx, west, lanes_ports, a, flags=True):
    """Put ``a`` in a random lane of the k-step's group, random values (with their zero
    flags) in the others, and that lane on ``lanes_ports`` (the B operands' ``lane``)."""
    lane = int(JUNK.integers(4))
    values = [int(v) for v in JUNK.integers(-128, 128, 4)]
    values[lane] = a
    ctx.set(west.a, values)
    ctx.set(west.a_zero, sum(int(v == 0 and flags) << n for n, v in enumerate(values)))
    for port in lanes_ports:
        ctx.set(port, lane)


def simulate(steps, multiplier="dsp", flags=True):
    """Feed ``steps`` ((a, b, first, last) per cycle) to one PE; returns, per step, the
    (acc, result) the step leaves (LATENCY cycles after it) and its ``zero`` flag. The
    operands' zero flags are driven from the operands (all low without ``flags``)."""
    pe = ProcessingElement(multiplier)
    seen, zeros = [], []

    async def bench(ctx):
        for a, b, first, last in steps:
            set_a(ctx, pe.west, [pe.north.lane], a, flags)
            ctx.set(pe.north.b, b)
            ctx.set(pe.north.zero, b == 0 and flags)
            ctx.set(pe.west.valid, 1)
            ctx.set(pe.west.first, first)
            ctx.set(pe.west.last, last)
            zeros.append(ctx.get(pe.zero))
            await ctx.tick()
            seen.append((ctx.get(pe.acc), ctx.get(pe.result)))
        ctx.set(pe.west.valid, 0)
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


def operand_sample(seed):
    """(a, b) pairs for the pipelined multipliers: every a against the corner values of b and
    every b against the corner values of a (sign and nibble boundaries), and 4096 random pairs.
    Their arithmetic alone is checked on all 65536 pairs by the combinational tests below."""
    values = np.arange(-128, 128)
    corners = np.array([-128, -127, -65, -64, -16, -9, -8, -1, 0, 1, 7, 8, 15, 16, 64, 126, 127])
    rng = np.random.default_rng(seed)
    a = np.concatenate([np.repeat(values, corners.size), np.tile(corners, values.size),
                        rng.integers(-128, 128, 4096)])
    b = np.concatenate([np.tile(corners, values.size), np.repeat(values, corners.size),
                        rng.integers(-128, 128, 4096)])
    return a, b


def every_pair(m, inputs, outputs, expected):
    """Simulate the combinational ``m`` on every INT8 pair (a, b): ``inputs(a, b)`` gives the
    (signal, value) pairs to drive; returns the pairs whose ``outputs`` (signals) differ from
    ``expected(a, b)`` (a tuple of ints)."""
    values = range(-128, 128)
    wrong = []

    async def bench(ctx):
        for a in values:
            for b in values:
                for signal, value in inputs(a, b):
                    ctx.set(signal, value)
                got = tuple(ctx.get(out) for out in outputs)
                if got != expected(a, b):
                    wrong.append((a, b, got))

    sim = Simulator(m)
    sim.add_testbench(bench)
    sim.run()
    return wrong


def test_lut_multiply_on_every_operand_pair():
    """The LUT multiplier's arithmetic (4x4-bit partial products and the sign correction) on
    all 65536 INT8 pairs."""
    m = Module()
    a, b = Signal(signed(8)), Signal(signed(8))
    product = lut_multiply(m, a, b)
    assert every_pair(m, lambda x, y: [(a, x), (b, y)], [product],
                      lambda x, y: (x * y,)) == []


def test_pair_totals_on_every_operand_pair():
    """A packed pair's product split into its rows' sums, on all 65536 (a1, b) pairs (the low
    product and the borrow it takes) with a0 = a1 + 37 (wrapped), so a0 too meets every b; the
    sums start from accumulators of -2**31 and 2**31 - 1, so the carry into row 0's adder and
    both wraps are exercised."""
    m = Module()
    a0, a1, b = Signal(signed(8)), Signal(signed(8)), Signal(signed(8))
    product = Signal(32)
    m.d.comb += product.eq(((a0 << 16) + a1) * b)
    accs = [Const(-2**31, ACCUMULATOR), Const(2**31 - 1, ACCUMULATOR)]
    totals = pair_totals(m, product, accs, Const(0))

    def wrapped(value):
        return (value + 2**31) % 2**32 - 2**31

    def other(x):
        return (x + 128 + 37) % 256 - 128

    assert every_pair(m, lambda x, y: [(a0, other(x)), (a1, x), (b, y)], totals,
                      lambda x, y: (wrapped(-2**31 + other(x) * y),
                                    wrapped(2**31 - 1 + x * y))) == []


def test_lut_multiplier_pe_on_a_sample_of_operand_pairs():
    """The LUT-multiplier PE through its pipeline, one k-step tiles."""
    a, b = operand_sample(5)
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


def test_zero_operands_without_flags_still_add_zero():
    """The zero flags only gate: with them held low, zero operands go through the multiplier
    and the sums are the same."""
    rng = np.random.default_rng(5)
    a = rng.integers(-128, 128, 30)
    b = rng.integers(-128, 128, 30)
    a[rng.random(30) < 0.4] = 0
    b[rng.random(30) < 0.4] = 0
    steps = [(int(x), int(y), k == 0, k == 29) for k, (x, y) in enumerate(zip(a, b))]
    seen = simulate(steps, flags=False)
    assert not any(zero for *_, zero in seen)
    assert [acc for acc, _, _ in seen] == np.cumsum(a * b).tolist()
    assert seen[-1][1] == int(a @ b)


def test_multiplier_idles_on_skipped_and_empty_k_steps():
    """The multiplier's operand registers load only for a valid k-step with no zero operand,
    and the sums stay right around the steps they hold through."""
    pe = ProcessingElement()
    # (a, b, valid) per cycle, one tile: first on the first cycle, last on the final valid one
    # (a zero k-step, which must add 0, not the held operands' product).
    steps = [(3, 4, 1), (0, 9, 1), (5, 0, 1), (7, 7, 0), (-2, 5, 1), (0, 0, 1), (8, -1, 0)]
    held, sums = [], []

    async def bench(ctx):
        for k, (a, b, valid) in enumerate(steps):
            set_a(ctx, pe.west, [pe.north.lane], a)
            ctx.set(pe.north.b, b)
            ctx.set(pe.north.zero, b == 0)
            ctx.set(pe.west.valid, valid)
            ctx.set(pe.west.first, k == 0)
            ctx.set(pe.west.last, k == len(steps) - 2)
            await ctx.tick()
            held.append(tuple(ctx.get(register) for register in pe.multiplier_inputs))
        ctx.set(pe.west.valid, 0)
        await ctx.tick()  # the operand registers load a cycle after the picked operands
        held.append(tuple(ctx.get(register) for register in pe.multiplier_inputs))
        await ctx.tick().repeat(LATENCY - 1)
        sums.append(ctx.get(pe.result))

    sim = Simulator(pe)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    assert held[1:] == [(3, 4), (3, 4), (3, 4), (3, 4), (-2, 5), (-2, 5), (-2, 5)]
    assert sums == [3 * 4 - 2 * 5]


def test_accumulator_wraps_like_int32():
    depth = 131_073  # 131073 x 16384 = 2**31 + 16384: one step past INT32_MAX
    pe = ProcessingElement()
    final = {}

    async def bench(ctx):
        ctx.set(pe.west.valid, 1)
        set_a(ctx, pe.west, [pe.north.lane], -128)
        ctx.set(pe.north.b, -128)
        for k in range(depth):
            ctx.set(pe.west.first, k == 0)
            ctx.set(pe.west.last, k == depth - 1)
            await ctx.tick()
        ctx.set(pe.west.valid, 0)
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



@pytest.mark.parametrize("width", [1, 3, 4, 5, 8, 13, 16])
def test_lowest_index_on_every_value(width):
    """The picker's lowest-set-bit index tree against Python, on every nonzero value."""
    from sparsa.hw.picker import _lowest_index

    m = Module()
    value, index = Signal(width), Signal(8)
    m.d.comb += index.eq(_lowest_index(value))
    wrong = []

    async def bench(ctx):
        for x in range(1, 2**width):
            ctx.set(value, x)
            if ctx.get(index) != (x & -x).bit_length() - 1:
                wrong.append(x)
    sim = Simulator(m)
    sim.add_testbench(bench)
    sim.run()
    assert not wrong, wrong[:5]

@pytest.mark.parametrize("width", [1, 10, 16, 40, 64, 256])
def test_step_picker(width):
    """The sequencer's k-step picker against Python: every set bit, lowest first, ``last`` on
    the final one, a single ``none`` token for an empty mask; one token per cycle while taken,
    none lost or repeated under random stalls, and a new ``load`` drops the old mask."""
    from sparsa.hw.picker import StepPicker

    dut = StepPicker(width)
    size = min(16, width)

    def groups(mask):  # the group flags the user registers with the mask
        return sum(1 << g for g in range(-(-width // size)) if mask >> (g * size) & 0xFFFF)

    rng = np.random.default_rng(width)
    masks = [0, 1, (1 << width) - 1, 1 << (width - 1)]
    masks += [int(rng.integers(0, 2**min(width, 62))) << int(rng.integers(0, max(1, width - 62)))
              for _ in range(25)]
    masks += [sum(1 << int(bit) for bit in rng.choice(width, size=min(width, 3), replace=False))
              for _ in range(25)]

    async def bench(ctx):
        for number, mask in enumerate(masks):
            ctx.set(dut.mask, mask)
            ctx.set(dut.mask_groups, groups(mask))
            ctx.set(dut.load, 1)
            ctx.set(dut.load_mask, 1)
            await ctx.tick()
            ctx.set(dut.load, 0)
            ctx.set(dut.load_mask, 0)
            ctx.set(dut.mask, 0)
            ctx.set(dut.mask_groups, 0)
            stalls = number % 3 == 1
            want = [bit for bit in range(width) if mask >> bit & 1]
            got, cycles, first_valid = [], 0, None
            while True:
                cycles += 1
                assert cycles < 3 * width + 10, f"mask {mask:#x}: no last token"
                take = ctx.get(dut.valid) and not (stalls and rng.random() < 0.4)
                if ctx.get(dut.valid) and first_valid is None:
                    first_valid = cycles
                ctx.set(dut.take, take)
                if take:
                    token = (ctx.get(dut.position), ctx.get(dut.last), ctx.get(dut.none))
                    got.append(token)
                await ctx.tick()
                if take and token[1]:
                    break
            ctx.set(dut.take, 0)
            # Cycles after the load cycle to the first token: avail, nxt, token (or avail, none).
            assert first_valid == (3 if want else 2), (hex(mask), first_valid)
            if not want:
                assert got == [(0, 1, 1)], got
                continue
            assert [position for position, _, _ in got] == want, hex(mask)
            assert [last for _, last, _ in got] == [0] * (len(want) - 1) + [1], hex(mask)
            assert not any(none for *_, none in got)
            if not stalls:
                assert cycles == len(want) + 2, (hex(mask), cycles)  # no bubble between tokens
            if number % 5 == 2 and len(want) > 2:
                # Abandon: load a mask, let its first token come, then load the next over it.
                ctx.set(dut.mask, mask)
                ctx.set(dut.mask_groups, groups(mask))
                ctx.set(dut.load, 1)
                ctx.set(dut.load_mask, 1)
                await ctx.tick()
                ctx.set(dut.load, 0)
                ctx.set(dut.load_mask, 0)
                await ctx.tick().repeat(3)

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()


def simulate_pair(steps):
    """Feed ``steps`` ((a0, a1, b, first, last) per cycle) to a packed pair (a0 to its first
    row, a1 to its second, each at the lane that comes down with b); returns per step the
    (acc, result, zero) of both rows LATENCY cycles later."""
    pair = PackedPair()
    seen, zeros = [], []

    async def bench(ctx):
        for a0, a1, b, first, last in steps:
            lane = int(JUNK.integers(4))
            for west, a in zip(pair.west, (a0, a1)):
                values = [int(v) for v in JUNK.integers(-128, 128, 4)]
                values[lane] = a
                ctx.set(west.a, values)
                ctx.set(west.a_zero, sum(int(v == 0) << n for n, v in enumerate(values)))
                ctx.set(west.valid, 1)
                ctx.set(west.first, first)
                ctx.set(west.last, last)
            ctx.set(pair.north.lane, lane)
            ctx.set(pair.north.b, b)
            ctx.set(pair.north.zero, b == 0)
            zeros.append((ctx.get(pair.zero[0]), ctx.get(pair.zero[1])))
            await ctx.tick()
            seen.append([(ctx.get(pair.acc[row]), ctx.get(pair.result[row])) for row in (0, 1)])
        for west in pair.west:
            ctx.set(west.valid, 0)
        for _ in range(LATENCY - 1):
            await ctx.tick()
            seen.append([(ctx.get(pair.acc[row]), ctx.get(pair.result[row]))
                         for row in (0, 1)])

    sim = Simulator(pair)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    return [[(*row, zero) for row, zero in zip(rows, zs)]
            for rows, zs in zip(seen[LATENCY - 1:], zeros)]


def test_packed_pair_products_on_a_sample_of_operand_pairs():
    """One-step tiles through the pair's pipeline on the operand sample for (a1, b), with
    a0 = a1 + 37 (wrapped) beside each."""
    a1, b = operand_sample(6)
    a0 = (a1 + 128 + 37) % 256 - 128
    seen = simulate_pair([(int(x), int(y), int(z), 1, 1) for x, y, z in zip(a0, a1, b)])
    assert [rows[0][1] for rows in seen] == (a0 * b).tolist()
    assert [rows[1][1] for rows in seen] == (a1 * b).tolist()


def test_packed_pair_rows_accumulate_and_gate_apart():
    rng = np.random.default_rng(8)
    for _ in range(30):
        depth = int(rng.integers(1, 30))
        a0, a1, b = (rng.integers(-128, 128, depth) for _ in range(3))
        a0[rng.random(depth) < 0.3] = 0
        a1[rng.random(depth) < 0.5] = 0
        b[rng.random(depth) < 0.1] = 0
        steps = [(int(x), int(y), int(z), k == 0, k == depth - 1)
                 for k, (x, y, z) in enumerate(zip(a0, a1, b))]
        seen = simulate_pair(steps)
        assert seen[-1][0][:2] == (int(a0 @ b),) * 2
        assert seen[-1][1][:2] == (int(a1 @ b),) * 2
        assert [rows[0][2] for rows in seen] == ((a0 == 0) | (b == 0)).tolist()
        assert [rows[1][2] for rows in seen] == ((a1 == 0) | (b == 0)).tolist()


def test_row_groups():
    assert row_groups(4) == [[0], [1], [2], [3]]
    assert row_groups(4, dsp_packing=True) == [[0, 1], [2, 3]]
    assert row_groups(5, dsp_packing=True) == [[0, 1], [2, 3], [4]]
    assert row_groups(1, dsp_packing=True) == [[0]]


@pytest.mark.parametrize("a_bits,b_bits", [(4, 4), (9, 7), (1, 1)])
def test_lut_product_multiplies(a_bits, b_bits):
    """The adder-built product of the statistics counters, on every operand pair."""
    m = Module()
    a, b, y = Signal(a_bits), Signal(b_bits), Signal(a_bits + b_bits)
    m.d.comb += y.eq(lut_product(a, b))
    wrong = []

    async def bench(ctx):
        for x in range(2 ** a_bits):
            for z in range(2 ** b_bits):
                ctx.set(a, x)
                ctx.set(b, z)
                if ctx.get(y) != x * z:
                    wrong.append((x, z, ctx.get(y)))

    sim = Simulator(m)
    sim.add_testbench(bench)
    sim.run()
    assert not wrong, wrong[:5]
