# amaranth: UnusedElaboratable=no
"""Each stage of the accelerator's core on its own, in Amaranth's simulator, against its
contract (the docstrings of hw/job.py, loader.py, sequencer.py, drain.py, counters.py): the job
checks against the protocol's rules, the loader against a packet of beats, the sequencer's
k-steps against the masks, the drain's packet under backpressure against the NumPy golden model,
the counters against NumPy sums. The whole accelerator is tested in tests/test_accel_sim.py."""

import numpy as np
import pytest
from amaranth import ClockDomain, Elaboratable, Module, Signal
from amaranth.lib.memory import Memory
from amaranth.sim import Simulator

from sparsa.hw.counters import WorkCounters
from sparsa.hw.drain import Drain
from sparsa.hw.job import JobControl, a_bank_words
from sparsa.hw.loader import Loader
from sparsa.hw.sequencer import Sequencer
from sparsa import protocol
from sparsa.protocol import Error, Geometry, Option, pack_input, unpack_output
from sparsa.sim import golden


class WithReset(Elaboratable):
    """``dut`` in a sync domain whose reset the test drives (``rst``)."""

    def __init__(self, dut):
        self.dut, self.rst = dut, Signal()

    def elaborate(self, platform):
        m = Module()
        m.domains.sync = sync = ClockDomain()
        m.d.comb += sync.rst.eq(self.rst)
        m.submodules.dut = self.dut
        return m


def simulate(dut, *benches):
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    for bench in benches:
        sim.add_testbench(bench)
    sim.run()


def tile_slots(k, slots):
    """A job's B memory slots per n-tile: ``slots`` per group of four k-steps, rounded up to
    whole nibbles of the masks (the contract of :mod:`sparsa.hw.job`)."""
    return 4 * -(-slots * -(-k // protocol.GROUP) // 4)


def set_job(ctx, port, geometry, m, k, n, options=0, quant=(0, 0, 0)):
    """The latched job of :func:`sparsa.hw.job.job_layout`, as JobControl gives it."""
    slots = protocol.slots_per_group(options)
    fields = {"m": m, "k": k, "n": n, "bias": bool(options & Option.BIAS),
              "requant": bool(options & Option.REQUANT), "relu": bool(options & Option.RELU),
              "no_skip": bool(options & Option.NO_SKIP),
              "channel_quant": bool(options & Option.CHANNEL_QUANT),
              "groups": bool(options & Option.GROUPS),
              "one_slot": slots == 1, "two_slots": slots == 2,
              "tile_slots": tile_slots(k, slots),
              "mult": quant[0], "shift": quant[1], "zero": quant[2]}
    for name, value in fields.items():
        ctx.set(getattr(port, name), value)


def set_single(ctx, port, geometry, m, k, n):
    ctx.set(port.k, k <= 1)
    ctx.set(port.n, n <= geometry.cols)
    ctx.set(port.m, m <= geometry.rows)
    ctx.set(port.group, k <= 4)
    ctx.set(port.counts, k <= 4 * geometry.beat_bytes)


def set_registers(ctx, port, m, k, n, options=0, quant=(0, 0, 0)):
    for name, value in (("m", m), ("k", k), ("n", n), ("options", options),
                        ("quant_mult", quant[0] & 0xFFFFFFFF), ("quant_shift", quant[1]),
                        ("quant_zero", quant[2] & 0xFFFFFFFF)):
        ctx.set(getattr(port, name), value)


# ---- JobControl ------------------------------------------------------------------------------

def expected_error(geometry, m, k, n, options, shift, zero, groups=True):
    """The protocol's START checks, in its order (sparsa.protocol's module docstring);
    ``groups``: the build has the group format (``FEATURES.GROUPS``)."""
    known = (Option.BIAS | Option.REQUANT | Option.RELU | Option.NO_SKIP | Option.CHANNEL_QUANT
             | Option.GROUPS | Option.STEPS_2 | Option.STEPS_1)
    steps = options & (Option.STEPS_2 | Option.STEPS_1)
    slots = 1 if options & Option.STEPS_1 else 2 if options & Option.STEPS_2 else 4
    if 0 in (m, k, n):
        return Error.ZERO_DIMENSION
    if k > geometry.max_k * 4 // slots:
        return Error.K_TOO_LARGE
    if n > geometry.max_n:
        return Error.N_TOO_LARGE
    if options & ~known or (options & Option.CHANNEL_QUANT and not options & Option.REQUANT):
        return Error.BAD_OPTION
    if options & Option.GROUPS and (options & Option.NO_SKIP or not groups):
        return Error.BAD_OPTION
    if steps and (not options & Option.GROUPS or steps == Option.STEPS_2 | Option.STEPS_1):
        return Error.BAD_OPTION
    if options & Option.REQUANT and (shift > 31 or not -128 <= zero <= 127):
        return Error.BAD_QUANT
    return Error.NONE


@pytest.mark.parametrize("groups", [True, False], ids=["groups", "no_groups"])
def test_job_control_checks_and_status(groups):
    g = Geometry(4, 4, 32, 64, 32)
    rng = np.random.default_rng(1)
    cases = [(1, 1, 1, 0, 0, 0), (0, 5, 5, 0, 0, 0), (5, 65, 5, 0, 0, 0), (5, 64, 33, 0, 0, 0),
             (5, 64, 32, 0x100, 0, 0), (5, 64, 32, Option.GROUPS, 0, 0),
             (5, 65, 32, Option.GROUPS, 0, 0), (5, 128, 32, Option.GROUPS | Option.STEPS_2, 0, 0),
             (5, 129, 32, Option.GROUPS | Option.STEPS_2, 0, 0),
             (5, 256, 32, Option.GROUPS | Option.STEPS_1, 0, 0),
             (5, 257, 32, Option.GROUPS | Option.STEPS_1, 0, 0),
             (5, 255, 32, Option.GROUPS | Option.STEPS_1 | Option.STEPS_2, 0, 0),
             (5, 64, 32, Option.STEPS_2, 0, 0),
             (5, 64, 32, Option.GROUPS | Option.NO_SKIP, 0, 0), (5, 5, 5, Option.CHANNEL_QUANT, 0, 0),
             (5, 5, 5, Option.REQUANT, 32, 0), (5, 5, 5, Option.REQUANT, 31, 128),
             (5, 5, 5, Option.REQUANT, 31, -129), (5, 5, 5, Option.REQUANT | Option.RELU, 31, -128),
             (2**32 - 1, 0, 2**32 - 1, 0xFF, 99, 0)]
    for _ in range(40):
        cases.append((int(rng.choice([0, 1, 4, 5, 2**31])),
                      int(rng.choice([0, 1, 64, 65, 127, 128, 129, 255, 256, 257, 2**32 - 1])),
                      int(rng.choice([0, 1, 4, 32, 33])), int(rng.integers(0, 512)),
                      int(rng.choice([0, 31, 32, 1000])),
                      int(rng.choice([-129, -128, 0, 127, 128]))))
    dut = JobControl(g, groups)
    top = WithReset(dut)
    results = []

    async def bench(ctx):
        for m, k, n, options, shift, zero in cases:
            set_registers(ctx, dut.registers, m, k, n, options, (12345, shift, zero))
            ctx.set(top.rst, 1)  # the core's reset between jobs (START's)
            await ctx.tick()
            ctx.set(top.rst, 0)
            await ctx.tick()  # the checks are two registered stages deep
            ctx.set(dut.start, 1)
            rejected = ctx.get(dut.rejected)
            await ctx.tick()
            ctx.set(dut.start, 0)
            error, closing, busy = ctx.get(dut.error), ctx.get(dut.closing), ctx.get(dut.busy)
            single = tuple(ctx.get(dut.single[field])
                           for field in ("k", "n", "m", "group", "counts"))
            job = (ctx.get(dut.job.m), ctx.get(dut.job.k), ctx.get(dut.job.n),
                   ctx.get(dut.job.groups), ctx.get(dut.job.one_slot),
                   ctx.get(dut.job.two_slots), ctx.get(dut.job.tile_slots))
            results.append((error, rejected, closing, busy, single, job))
            # The status afterwards: the loader's and the drain's events.
            ctx.set(dut.drained, 1)
            await ctx.tick()
            ctx.set(dut.drained, 0)
            assert (ctx.get(dut.busy), ctx.get(dut.done)) == (0, 1)
            ctx.set(dut.tlast_early, 1)
            await ctx.tick()
            ctx.set(dut.tlast_early, 0)
            assert (ctx.get(dut.error), ctx.get(dut.closing)) == (Error.TLAST_EARLY, 1)
            ctx.set(dut.tlast_missing, 1)
            await ctx.tick()
            ctx.set(dut.tlast_missing, 0)
            assert ctx.get(dut.error) == Error.TLAST_MISSING

    simulate(top, bench)
    for (m, k, n, options, shift, zero), (error, rejected, closing, busy, single, job) in zip(
            cases, results):
        want = expected_error(g, m, k, n, options, shift, zero, groups)
        assert error == want, (m, k, n, options, shift, zero)
        assert rejected == closing == (want != Error.NONE)
        assert busy == 1
        assert single == (k <= 1, n <= g.cols, m <= g.rows, k <= 4, k <= 4 * g.beat_bytes)
        if want == Error.NONE:
            slots = protocol.slots_per_group(options)
            assert job == (m, k, n, bool(options & Option.GROUPS), slots == 1, slots == 2,
                           tile_slots(k, slots))
    assert {result[0] for result in results} >= set(Error) - {Error.TLAST_EARLY,
                                                               Error.TLAST_MISSING}


# ---- WorkCounters ----------------------------------------------------------------------------

def test_work_counters_against_numpy():
    rows, cols, max_k, cycles = 4, 8, 64, 600
    rng = np.random.default_rng(2)
    busy = rng.random(cycles) < 0.9
    waiting_panel, waiting_room = rng.random(cycles) < 0.2, rng.random(cycles) < 0.1
    counted = rng.random(cycles) < 0.6
    # A k-step's slot (real rows x real columns) and, a cycle later, its values' zero flags
    # (A's lane by lane, then B's) and B's lanes: random, and set on every value outside the
    # slot (padding is zero).
    rows_real = rng.integers(1, rows + 1, cycles)
    cols_real = rng.integers(1, cols + 1, cycles)
    counted_slot = rows_real * cols_real
    row_padding = (1 << rows) - (1 << rows_real)
    padding = sum(row_padding << (rows * lane) for lane in range(4))
    padding |= ((1 << cols) - (1 << cols_real)) << (4 * rows)
    zeros = rng.integers(0, 1 << (4 * rows + cols), cycles) | np.roll(padding, 1)
    lanes = rng.integers(0, 1 << (2 * cols), cycles)
    advance = rng.random(cycles) < 0.1
    skipped = rng.integers(0, max_k + 1, cycles)
    slot = rng.integers(0, rows * cols + 1, cycles)
    dut = WorkCounters(rows, cols, max_k)
    got = {}

    async def bench(ctx):
        for t in range(cycles + 12):  # inputs, then idle cycles for the pipelines to empty
            live = t < cycles
            for port, values in ((dut.busy, busy), (dut.waiting_panel, waiting_panel),
                                 (dut.waiting_room, waiting_room), (dut.counted, counted),
                                 (dut.counted_slot, counted_slot), (dut.zeros, zeros),
                                 (dut.lanes, lanes),
                                 (dut.advance, advance), (dut.skipped, skipped),
                                 (dut.slot, slot)):
                ctx.set(port, int(values[t]) if live else 0)
            await ctx.tick()
        for name in ("cycles", "stall_in", "stall_out", "macs", "macs_skipped",
                     "ksteps_skipped"):
            got[name] = ctx.get(getattr(dut, name))

    simulate(dut, bench)
    bits = (zeros[:, None] >> np.arange(4 * rows + cols)) & 1
    live_a = rows - bits[:, :4 * rows].reshape(cycles, 4, rows).sum(2)  # per lane
    live_b = 1 - bits[:, 4 * rows:]
    lane_of = (lanes[:, None] >> (2 * np.arange(cols))) & 3  # column j takes A's lane_of[j]
    live_products = (np.take_along_axis(live_a, lane_of, 1) * live_b).sum(1)
    # zeros come a cycle after their counted k-step; skipped a cycle before its advance.
    issued_zeros = counted[:-1] * (counted_slot[:-1] - live_products[1:])
    skipped_before = np.concatenate([[0], skipped[:-1]]) * advance
    assert got == {
        "cycles": int(busy.sum()), "stall_in": int(waiting_panel.sum()),
        "stall_out": int(waiting_room.sum()), "macs": int((counted * counted_slot).sum()),
        "macs_skipped": int(issued_zeros.sum() + (skipped_before * slot).sum()),
        "ksteps_skipped": int(skipped_before.sum()),
    }


# ---- Sequencer -------------------------------------------------------------------------------

class SequencerBench(Elaboratable):
    """A Sequencer with its B mask memory (a block RAM's read and output register)."""

    def __init__(self, geometry, b_masks):
        self.sequencer = Sequencer(geometry)
        self.b_masks = b_masks
        self.geometry = geometry

    def elaborate(self, platform):
        m = Module()
        m.submodules.sequencer = sequencer = self.sequencer
        m.submodules.memory = memory = Memory(shape=self.geometry.max_k,
                                              depth=self.geometry.n_tiles_max,
                                              init=self.b_masks)
        read = memory.read_port()
        m.d.comb += read.addr.eq(sequencer.b_mask.addr)
        m.d.sync += sequencer.b_mask.data.eq(read.data)
        return m


def mask_word(nonzero, max_k, rng, span):
    """A mask register's value: slot s at bit max_k - span + s (span: the job's slots, S x
    ceil(K/4) for S slots per group), stale bits below."""
    low = max_k - span
    stale = int(rng.integers(0, 1 << low)) if low else 0
    return sum(int(bit) << (low + i) for i, bit in enumerate(nonzero)) | stale


@pytest.mark.parametrize("m,k,n,density,slots", [
    (12, 20, 10, 0.5, 4), (8, 7, 12, 0.15, 4), (4, 1, 4, 0.5, 4), (9, 32, 3, 0.9, 4),
    (9, 125, 7, 0.6, 1), (6, 42, 10, 0.3, 2), (5, 64, 3, 0.8, 2)])
def test_sequencer_issues_the_set_bits_of_the_masks(m, k, n, density, slots):
    """The k-steps of the masks' set bits; with ``slots`` per group (the group format with
    OPTIONS.STEPS_*, K up to 4 / slots x max_k) a slot's A word is its group."""
    g = Geometry(4, 4, 32, 32, 12)
    rng = np.random.default_rng(m * k * n)
    m_tiles, n_tiles = g.tiles(m, n)
    span = tile_slots(k, slots)
    a_nonzero = rng.random((2, span)) < density
    b_nonzero = rng.random((g.n_tiles_max, span)) < density
    if slots == 4:  # plain k-steps: the slots past K are clear
        a_nonzero[:, k:] = b_nonzero[:, k:] = False
    b_nonzero[0] = False  # a tile with nothing to issue in every m-tile
    b_masks = [mask_word(b_nonzero[t], g.max_k, rng, span) for t in range(g.n_tiles_max)]
    options = Option.GROUPS | protocol.STEPS_OPTIONS[slots] if slots < 4 else 0
    bench = SequencerBench(g, b_masks)
    dut = bench.sequencer
    steps, freed, tile_ends = [], [], []

    async def drive(ctx):
        set_registers(ctx, dut.registers, m, k, n, options)
        set_job(ctx, dut.job, g, m, k, n, options)
        for bank in range(2):
            ctx.set(dut.a_nonzero[bank], mask_word(a_nonzero[bank], g.max_k, rng, span))
        ctx.set(dut.k_valid, ((1 << span) - 1) << (g.max_k - span))  # as the loader's
        ctx.set(dut.panel_full, 0b11)
        await ctx.tick()
        ctx.set(dut.start, 1)
        await ctx.tick()
        ctx.set(dut.start, 0)
        ctx.set(dut.loading_a, 1)
        pops = []  # cycles at which the drain pops a row
        cycle, skipped_before, ended = 0, None, None
        while cycle < 4000 and (ended is None or cycle < ended + 4):
            ctx.set(dut.popped, cycle in pops)
            issue, first, last, kill = (ctx.get(dut.step.issue), ctx.get(dut.step.first),
                                        ctx.get(dut.step.last), ctx.get(dut.step.kill))
            if ctx.get(dut.advance):
                tile_ends.append((skipped_before, ctx.get(dut.slot)))
            skipped_before = ctx.get(dut.skipped)
            freed.extend(bank for bank in range(2) if ctx.get(dut.free[bank]))
            if ctx.get(dut.job_end):
                assert ended is None, "the job ended twice"
                ended = cycle
            await ctx.tick()
            cycle += 1
            if issue:
                steps.append((first, last, kill, ctx.get(dut.a_addr), ctx.get(dut.b_addr)))
                if last:
                    pops.extend(cycle + 20 + row for row in range(g.rows))
            assert not (issue and ended is not None and cycle > ended + 1), "issued after the end"
        assert ended is not None, "the job never ended"

    simulate(bench, drive)
    # The expected k-steps, tile by tile: m-tiles outer (banks in turns), n-tiles inner.
    want, want_ends = [], []
    for mt in range(m_tiles):
        for nt in range(n_tiles):
            ks = np.flatnonzero(a_nonzero[mt % 2] & b_nonzero[nt])
            rows_real = min(g.rows, m - mt * g.rows)
            cols_real = min(g.cols, n - nt * g.cols)
            want_ends.append((k - len(ks), rows_real * cols_real))
            if len(ks) == 0:
                want.append((1, 1, 1))
                continue
            for index, kk in enumerate(ks):
                want.append((index == 0, index == len(ks) - 1, 0,
                             (mt % 2) * a_bank_words(g, True) + kk // slots, nt * span + kk))
    got = [step[:3] if step[2] else step for step in steps]
    assert got == [tuple(int(v) for v in step) for step in want]
    assert tile_ends == want_ends
    assert freed == [mt % 2 for mt in range(m_tiles)]


# ---- Loader ----------------------------------------------------------------------------------

def beats_of(geometry, packet):
    """A packet's bytes as the beats' TDATA integers."""
    data = packet.reshape(-1, geometry.beat_bytes)
    return [int.from_bytes(row.tobytes(), "little") for row in data]


def run_loader(g, a, b, bias, mult, options, beats, rng, free_delay=5):
    m, k = a.shape
    n = b.shape[1]
    dut = Loader(g)
    seen = {"bias": [], "mult": [], "b": [], "a": [], "b_mask": [], "a_panels": [],
            "early": 0, "missing": 0, "full_writes": 0}

    async def bench(ctx):
        set_registers(ctx, dut.registers, m, k, n, options)
        set_job(ctx, dut.job, g, m, k, n, options)
        set_single(ctx, dut.single, g, m, k, n)
        await ctx.tick()
        ctx.set(dut.start, 1)
        await ctx.tick()
        ctx.set(dut.start, 0)
        index, frees, full_before = 0, {}, 0
        for cycle in range(40 * len(beats) + 100):
            offer = index < len(beats) and rng.random() < 0.7
            ctx.set(dut.input.valid, offer)
            if offer:
                ctx.set(dut.input.payload.data, beats[index][0])
                ctx.set(dut.input.payload.last, beats[index][1])
            ctx.set(dut.free, sum(1 << bank for bank, when in frees.items() if when == cycle))
            taken = offer and ctx.get(dut.input.ready)
            for name in ("bias", "mult", "b", "a", "b_mask"):
                port = getattr(dut, f"{name}_write")
                if ctx.get(port.en):
                    seen[name].append((ctx.get(port.addr), ctx.get(port.data)))
                    bank = ctx.get(port.addr) // a_bank_words(g, True)
                    if name == "a" and full_before >> bank & 1:
                        seen["full_writes"] += 1
            seen["early"] += ctx.get(dut.tlast_early)
            seen["missing"] += ctx.get(dut.tlast_missing)
            full = ctx.get(dut.panel_full)
            for bank in range(2):
                if full >> bank & 1 and bank not in frees:
                    # A panel is complete: its mask, then the sequencer frees it later.
                    seen["a_panels"].append((bank, ctx.get(dut.a_nonzero[bank])))
                    frees[bank] = cycle + free_delay
                if bank in frees and frees[bank] < cycle and not full >> bank & 1:
                    del frees[bank]
            full_before = full
            await ctx.tick()
            index += bool(taken)
        seen["taken"] = index
        seen["k_valid"] = ctx.get(dut.k_valid)

    simulate(dut, bench)
    return seen


@pytest.mark.parametrize("case", ["dense", "groups", "2:4", "one k-step", "2:4 in 2 slots",
                                  "1:4 in 1 slot", "1:4 in 1 slot, K = 55"])
@pytest.mark.parametrize("g", [Geometry(4, 4, 16, 16, 12), Geometry(3, 5, 8, 16, 15),
                               Geometry(2, 2, 64, 16, 12)], ids=str)
def test_loader_writes_every_word_and_mask(g, case):
    """Multi-beat words of every kind (2- and 1-byte beats); in the group format, groups of
    every count, codes that fill the code buffer at every place (5 columns, 8-bit beats: a
    unit of one bit) and that take more than one beat (3 bits x 5 columns), and a uniform
    count (2:4 B). On the 2x2 build with 64-bit beats every word is one beat, so with one
    k-step (plain B) the n-tile walk steps in consecutive cycles, in the column vectors and in
    B. With 2 or 1 slots per group (OPTIONS.STEPS_*) K goes past max_k, up to 4 x max_k."""
    from sparsa.sim import patterns

    groups = case not in ("dense", "one k-step")
    slots = {"2:4 in 2 slots": 2, "1:4 in 1 slot": 1, "1:4 in 1 slot, K = 55": 1}.get(case, 4)
    rng = np.random.default_rng(3)
    # K: three groups and a partial one; 2:4 four whole groups; past max_k with fewer slots
    # (2:4: seven groups, the last of two k-steps, 14 slots: a last nibble of two; 1:4: 16
    # groups, and 14, the last of three k-steps)
    m, n = 10, 9
    k = {"2:4": 16, "one k-step": 1, "2:4 in 2 slots": 2 * g.max_k - 6,
         "1:4 in 1 slot": 4 * g.max_k, "1:4 in 1 slot, K = 55": 55}.get(case, 14)
    a = rng.integers(-128, 128, (m, k), dtype=np.int8)
    b = rng.integers(-128, 128, (k, n), dtype=np.int8)
    if k > 1:
        a[:, 2] = 0
        a[5:, 4] = 0
        a[:, 8:12] = 0  # an all-zero group of A
    if case == "2:4":
        b = patterns.n_of_m(rng, (k, n), 2, 4)
        assert (protocol.group_counts(b, g.cols) == 2).all()
    elif slots < 4:
        b = patterns.n_of_m(rng, (k, n), slots, 4)
        b[:, 3] = 0  # a dead column; in the second n-tile some groups of no step
        b[8:12, 4:] = 0
    elif case == "one k-step":
        b[0, 2:4] = 0
    else:
        b[1] = 0
        b[3, 4:8] = 0
        b[4:8, 4:8] = 0  # a group of no step in the second n-tile (of 4 columns)
        b[8:12] = np.where(rng.random((4, n)) < 0.7, 0, b[8:12])  # fewer steps than k-steps
    bias = rng.integers(-2**31, 2**31, n, dtype=np.int64).astype(np.int32)
    mult = rng.integers(1, 2**31, n, dtype=np.int64).astype(np.int32)
    options = (Option.BIAS | Option.REQUANT | Option.CHANNEL_QUANT | (Option.GROUPS * groups)
               | protocol.STEPS_OPTIONS[slots])
    packet = beats_of(g, pack_input(g, a, b, bias, mult, groups=groups))
    beats = [(data, index == len(packet) - 1) for index, data in enumerate(packet)]
    seen = run_loader(g, a, b, bias, mult, options, beats, rng)
    m_tiles, n_tiles = g.tiles(m, n)
    n_groups = -(-k // 4)
    span = tile_slots(k, slots)
    assert seen["taken"] == len(beats)
    assert seen["early"] == seen["missing"] == seen["full_writes"] == 0

    def vector(values, width):
        padded = np.zeros(n_tiles * g.cols, np.int32)
        padded[:len(values)] = values
        return [int.from_bytes(padded[t * g.cols:(t + 1) * g.cols].astype("<i4").tobytes(),
                               "little") for t in range(n_tiles)]

    assert seen["bias"] == list(enumerate(vector(bias, 32)))
    assert seen["mult"] == list(enumerate(vector(mult, 32)))
    b_pad = np.zeros((4 * n_groups, n_tiles * g.cols), np.int8)
    b_pad[:k, :n] = b
    # B's words: values (cols bytes), then per column the lane of A it multiplies.
    words = {}
    for addr, word in seen["b"]:
        assert addr not in words, f"B slot {addr} written twice"
        values = np.frombuffer((word & ((1 << 8 * g.cols) - 1)).to_bytes(g.cols, "little"),
                               np.int8)
        lanes = [(word >> (8 * g.cols + 2 * j)) & 3 for j in range(g.cols)]
        words[addr] = (values, lanes)
    b_mask_want = []
    for t in range(n_tiles):
        tile = b_pad[:, t * g.cols:(t + 1) * g.cols]
        mask = []
        for group in range(n_groups):
            block = tile[4 * group:4 * group + 4]
            here = [t * span + slots * group + s for s in range(min(slots, k - 4 * group))]
            if not groups:  # k-step by k-step, slot k with lane k % 4
                for s, addr in enumerate(here):
                    values, lanes = words.pop(addr)
                    assert values.tolist() == block[s].tolist() and lanes == [s] * g.cols
                mask += [int(block[s].any()) for s in range(4)]
                continue
            # As many steps as the densest column has nonzeros, and every nonzero in one of
            # them at its lane, each column's lanes distinct.
            steps = int((block != 0).sum(axis=0).max())
            got = np.zeros_like(block)
            for s, addr in enumerate(here[:steps]):
                values, lanes = words.pop(addr)
                for j in range(g.cols):
                    assert values[j] == 0 or got[lanes[j], j] == 0
                    got[lanes[j], j] += values[j]
                mask.append(int(values.any()))
            assert got.tolist() == block.tolist()
            mask += [0] * (slots - min(steps, len(here)))
        b_mask_want.append((t, mask + [0] * (span - len(mask))))  # (a last partial nibble)
    assert words == {}, f"B slots written that are not the job's: {sorted(words)}"
    a_pad = np.zeros((m_tiles * g.rows, 4 * n_groups), np.int8)
    a_pad[:m, :k] = a
    # A's words: a group's four k-steps side by side, lane l at byte l x rows.
    assert [addr for addr, word in seen["a"]] == [(mt % 2) * a_bank_words(g, True) + group
                                                  for mt in range(m_tiles)
                                                  for group in range(n_groups)]
    for (addr, word), (mt, group) in zip(seen["a"], [(mt, group) for mt in range(m_tiles)
                                                      for group in range(n_groups)]):
        for lane in range(4):  # (a_pad's lanes past K are zero)
            got = (word >> (8 * g.rows * lane)) & ((1 << 8 * g.rows) - 1)
            assert got == int.from_bytes(a_pad[mt * g.rows:(mt + 1) * g.rows, 4 * group + lane]
                                         .tobytes(), "little")

    def top_bits(word):
        return [(word >> (g.max_k - span + s)) & 1 for s in range(span)]

    assert [(addr, top_bits(word)) for addr, word in seen["b_mask"]] == b_mask_want
    a_live = [[int(a_pad[mt * g.rows:(mt + 1) * g.rows, kk].any()) for kk in range(4 * n_groups)]
              for mt in range(m_tiles)]
    if groups:  # a group's slots are live where any of its k-steps is
        a_live = [[max(live[4 * group:4 * group + 4]) for group in range(n_groups)
                   for _ in range(slots)] for live in a_live]
        a_live = [live + [0] * (span - len(live)) for live in a_live]
    assert [(bank, top_bits(word)) for bank, word in seen["a_panels"]] == [
        (mt % 2, a_live[mt]) for mt in range(m_tiles)]
    assert top_bits(seen["k_valid"]) == [1] * span


@pytest.mark.parametrize("cut", ["early", "missing"])
def test_loader_reports_a_packet_of_the_wrong_length(cut):
    g = Geometry(4, 4, 32, 16, 8)
    rng = np.random.default_rng(4)
    a = rng.integers(-128, 128, (6, 5), dtype=np.int8)
    b = rng.integers(-128, 128, (5, 7), dtype=np.int8)
    packet = beats_of(g, pack_input(g, a, b))
    if cut == "early":  # TLAST three beats before the end; nothing after
        beats = [(data, index == len(packet) - 4) for index, data in enumerate(packet[:-3])]
    else:  # no TLAST on the last beat, then two more beats of a following packet, the second
        beats = [(data, index == len(packet) + 1)
                 for index, data in enumerate(packet + [0, 0])]
    seen = run_loader(g, a, b, None, None, 0, beats, rng)
    assert (seen["early"], seen["missing"]) == ((1, 0) if cut == "early" else (0, 1))
    assert seen["taken"] == len(beats)  # up to the TLAST, then it waits for a start


# ---- Drain -----------------------------------------------------------------------------------

class DrainBench(Elaboratable):
    """A Drain with its bias and multiplier memories (read asynchronously)."""

    def __init__(self, geometry, bias_words, mult_words):
        self.drain = Drain(geometry)
        self.geometry, self.words = geometry, (bias_words, mult_words)

    def elaborate(self, platform):
        m = Module()
        m.submodules.drain = drain = self.drain
        for name, words in zip(("bias", "mult"), self.words):
            m.submodules[name] = memory = Memory(shape=32 * self.geometry.cols,
                                                 depth=self.geometry.n_tiles_max, init=words)
            read = memory.read_port(domain="comb")
            port = getattr(drain, f"{name}_read")
            m.d.comb += [read.addr.eq(port.addr), port.data.eq(read.data)]
        return m


@pytest.mark.parametrize("requant", [False, True])
def test_drain_packet_under_backpressure(requant):
    g = Geometry(4, 4, 32, 16, 12)
    rng = np.random.default_rng(5 + requant)
    m, n = 10, 11
    m_tiles, n_tiles = g.tiles(m, n)
    acc = rng.integers(-2**31, 2**31, (m_tiles * g.rows, n_tiles * g.cols), dtype=np.int64)
    acc = acc.astype(np.int32)
    bias = rng.integers(-2**20, 2**20, n_tiles * g.cols).astype(np.int32)
    mult = rng.integers(2**28, 2**31, n_tiles * g.cols).astype(np.int32)
    shift, zero = 20, -3

    def words(values):
        return [int.from_bytes(values[t * g.cols:(t + 1) * g.cols].astype("<i4").tobytes(),
                               "little") for t in range(n_tiles)]

    bench = DrainBench(g, words(bias), words(mult))
    dut = bench.drain
    options = Option.BIAS | Option.RELU | (Option.REQUANT | Option.CHANNEL_QUANT if requant else 0)
    out, counts = bytearray(), {"popped": 0, "drained": 0, "last": []}

    async def drive(ctx):
        set_job(ctx, dut.job, g, m, 1, n, options, (0, shift, zero))
        set_single(ctx, dut.single, g, m, 1, n)
        ctx.set(dut.busy, 1)
        ctx.set(dut.link_idle, 1)
        await ctx.tick()
        ctx.set(dut.start, 1)
        await ctx.tick()
        ctx.set(dut.start, 0)
        rows = [(i, acc[mt * g.rows + i, nt * g.cols:(nt + 1) * g.cols])
                for mt in range(m_tiles) for nt in range(n_tiles) for i in range(g.rows)]
        pushed = 0
        for _ in range(5000):
            # Rows as the array gives them, never more in flight than the FIFO holds (what
            # the sequencer's reservation guarantees).
            push = pushed < len(rows) and pushed - counts["popped"] < 2 * g.rows \
                and rng.random() < 0.6
            ctx.set(dut.out_valid, push)
            if push:
                ctx.set(dut.out_row, rows[pushed][0])
                for j, value in enumerate(rows[pushed][1]):
                    ctx.set(dut.c[j], int(value))
            ready = rng.random() < 0.5
            ctx.set(dut.output.ready, ready)
            if ctx.get(dut.output.valid) and ready:
                out.extend(ctx.get(dut.output.payload.data).to_bytes(g.beat_bytes, "little"))
                counts["last"].append(ctx.get(dut.output.payload.last))
            counts["popped"] += ctx.get(dut.popped)
            counts["drained"] += ctx.get(dut.drained)
            pushed += push
            await ctx.tick()

    simulate(bench, drive)
    got = unpack_output(g, bytes(out), m, n, requant)
    want = golden.postprocess(acc[:m, :n], bias[:n], (mult[:n], shift, zero) if requant else None,
                              relu=True)
    np.testing.assert_array_equal(got, want)
    assert counts["popped"] == m_tiles * n_tiles * g.rows
    assert counts["drained"] == 1
    assert counts["last"] == [0] * (len(counts["last"]) - 1) + [1]


def test_drain_closes_an_abandoned_packet():
    g = Geometry(4, 4, 32, 16, 12)
    bench = DrainBench(g, [0] * 3, [0] * 3)
    dut = bench.drain
    beats = []

    async def drive(ctx):
        set_job(ctx, dut.job, g, 8, 1, 8)
        set_single(ctx, dut.single, g, 8, 1, 8)
        ctx.set(dut.busy, 1)
        ctx.set(dut.link_idle, 1)
        ctx.set(dut.output.ready, 1)
        ctx.set(dut.start, 1)
        await ctx.tick()
        ctx.set(dut.start, 0)
        for _ in range(10):  # not closing yet: nothing leaves
            assert not ctx.get(dut.output.valid)
            await ctx.tick()
        ctx.set(dut.closing, 1)
        ctx.set(dut.nothing_reserved, 1)
        for _ in range(10):
            if ctx.get(dut.output.valid):
                beats.append((ctx.get(dut.output.payload.data), ctx.get(dut.output.payload.last)))
            drained = ctx.get(dut.drained)
            await ctx.tick()
            if drained:
                ctx.set(dut.busy, 0)

    simulate(bench, drive)
    assert beats == [(0, 1)]
