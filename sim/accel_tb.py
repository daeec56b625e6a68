"""cocotb testbench for the AXI top level :class:`sparsa.hw.Accelerator` (generated Verilog).

Bus models are cocotbext-axi's: an ``AxiStreamSource`` on ``s_axis``, an ``AxiStreamSink`` on
``m_axis`` and an ``AxiLiteMaster`` on ``s_axi``, with random pause generators on both streams.
Jobs are laid out with :mod:`sparsa.protocol` and checked against :func:`sparsa.sim.golden.gemm`.
Settings arrive as JSON in ``SPARSA_TB``: the build's ``rows``, ``cols``, ``stream_width``,
``max_k``, ``max_n`` and per-test knobs.
"""

import json
import logging
import os

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, with_timeout
from cocotbext.axi import (AxiLiteBus, AxiLiteMaster, AxiStreamBus, AxiStreamFrame,
                           AxiStreamSink, AxiStreamSource)

from sparsa import protocol
from sparsa.host import jobs
from sparsa.protocol import REGISTER, RESET_QUANT, Control, Error, Option, Status

from . import patterns
from .golden import gemm, sparse_counters




def settings():
    return json.loads(os.environ.get("SPARSA_TB", "{}"))


def geometry_of(cfg):
    return protocol.Geometry(cfg["rows"], cfg["cols"], cfg["stream_width"], cfg["max_k"],
                             cfg["max_n"])


def features(cfg):
    """The FEATURES bits a build with these settings reports."""
    return protocol.features(cfg.get("sparse_skip", True))


async def make_tb(dut):
    """The settings of this run and a reset testbench for the build they describe."""
    cfg = settings()
    tb = AccelTB(dut, geometry_of(cfg), cfg.get("sparse_skip", True),
                 bool(features(cfg) & protocol.Feature.GROUPS))
    await tb.reset()
    return cfg, tb


def pauses(rng, probability):
    """An endless random pause pattern: True (pause) with the given probability per cycle."""
    while True:
        yield bool(rng.random() < probability)


class AccelTB:
    def __init__(self, dut, geometry, skips=True, groups=True):
        self.dut = dut
        self.geometry = geometry
        self.skips = skips  # the build skips zero k-steps (FEATURES.SPARSE_SKIP)
        self.groups = groups  # the build takes B in the group format (FEATURES.GROUPS)
        dut.aresetn.value = 0  # held in reset from time zero, so no register starts out as X
        Clock(dut.aclk, 10, unit="ns").start()
        for prefix in ("s_axis", "m_axis", "s_axi"):
            logging.getLogger(f"cocotb.{dut._name}.{prefix}").setLevel(logging.WARNING)
        self.source = AxiStreamSource(AxiStreamBus.from_prefix(dut, "s_axis"), dut.aclk,
                                      dut.aresetn, reset_active_level=False)
        self.sink = AxiStreamSink(AxiStreamBus.from_prefix(dut, "m_axis"), dut.aclk,
                                  dut.aresetn, reset_active_level=False)
        self.axil = AxiLiteMaster(AxiLiteBus.from_prefix(dut, "s_axi"), dut.aclk,
                                  dut.aresetn, reset_active_level=False)

    def set_pauses(self, rng, idle=0.0, backpressure=0.0):
        for model, probability in ((self.source, idle), (self.sink, backpressure)):
            model.set_pause_generator(pauses(rng, probability) if probability else None)
            if not probability:
                model.pause = False  # a stopped generator leaves its last value behind

    async def reset(self):
        self.dut.aresetn.value = 0
        await ClockCycles(self.dut.aclk, 4)
        self.dut.aresetn.value = 1
        await ClockCycles(self.dut.aclk, 2)

    async def write(self, name, value):
        await self.axil.write_dword(REGISTER[name].address, value & 0xFFFFFFFF)

    async def read(self, name):
        return await self.axil.read_dword(REGISTER[name].address)

    async def counters(self):
        return {name: await self.read(name) for name in protocol.COUNTERS}

    async def start(self, m, k, n, options=0, quant=RESET_QUANT):
        for name, value in (("M", m), ("K", k), ("N", n), ("OPTIONS", options),
                            ("QUANT_MULT", quant[0]), ("QUANT_SHIFT", quant[1]),
                            ("QUANT_ZERO", quant[2])):
            await self.write(name, value)
        await self.write("CONTROL", Control.START)

    async def wait_done(self, cycles):
        for _ in range(max(cycles // 50, 10)):
            status = await self.read("STATUS")
            if status & Status.DONE:
                return status
            await ClockCycles(self.dut.aclk, 50)
        raise AssertionError(f"device not done after {cycles} cycles, STATUS={status:#x}, "
                             f"ERROR={await self.read('ERROR')}")

    def budget(self, m, k, n):
        """A generous cycle bound for a job, so a hang fails the test instead of stalling it."""
        g = self.geometry
        m_tiles, n_tiles = g.tiles(m, n)
        work = m_tiles * n_tiles * (max(k, g.rows, g.cols) + 4 * g.rows * g.vector_beats(4 * g.cols))
        return 20 * (work + g.input_beats(m, k, n, True, True) + 1000)

    async def receive(self, cycles):
        frame = await with_timeout(self.sink.recv(), 10 * cycles, "ns")
        return frame.tdata

    async def gemm(self, a, b, bias=None, requant=None, relu=False, skip=True, groups=False,
                   slots=None):
        """Run one job; returns (C, STATUS, ERROR, counters). A ``requant`` multiplier that is
        an array (one per column) goes in the input packet (``OPTIONS.CHANNEL_QUANT``); B in
        the group format with ``groups``, with ``slots`` per group (``OPTIONS.STEPS_*``; by
        default the fewest that keep B's largest group, :func:`fewest_slots`)."""
        m, k = a.shape
        n = b.shape[1]
        mult = requant[0] if requant is not None and np.ndim(requant[0]) else None
        if mult is not None:
            requant = (np.asarray(mult), *requant[1:])
        options, quant = jobs.job_options(bias is not None, requant, relu, skip)
        if groups:
            slots = fewest_slots(b, self.geometry.cols) if slots is None else slots
            options |= Option.GROUPS | protocol.STEPS_OPTIONS[slots]
        await self.start(m, k, n, options, quant)
        packet = protocol.pack_input(self.geometry, a, b, bias, mult, groups)
        await self.source.send(AxiStreamFrame(packet.tobytes()))
        cycles = self.budget(m, k, n)
        data = await self.receive(cycles)
        status = await self.wait_done(cycles)
        c = protocol.unpack_output(self.geometry, data, m, n, requant is not None)
        return c, status, await self.read("ERROR"), await self.counters()


def fewest_slots(b, cols):
    """The fewest B memory slots per group (1, 2 or 4) that keep every step of B's groups."""
    return protocol.slots_for(protocol.group_counts(b, cols))


def random_matrix(rng, shape):
    kind = rng.integers(5)
    values = rng.integers(-128, 128, shape, dtype=np.int8)
    if kind == 0:
        return values
    if kind == 1:  # unstructured zeros, 0 to 95%
        return np.where(rng.random(shape) < rng.random() * 0.95, 0, values).astype(np.int8)
    if kind == 2:  # whole zero rows and columns: skipped k-steps in A and B alike
        values[rng.random(shape[0]) < 0.5, :] = 0
        values[:, rng.random(shape[1]) < 0.5] = 0
        return values
    if kind == 3:
        return np.zeros(shape, np.int8) if rng.random() < 0.3 else values
    return rng.choice(np.array([-128, -1, 0, 1, 127], dtype=np.int8), shape)


def random_options(rng, n):
    bias = rng.integers(-2**31, 2**31, n, dtype=np.int64).astype(np.int32) \
        if rng.random() < 0.5 else None
    if bias is not None and rng.random() < 0.5:
        bias = (bias // 2**16).astype(np.int32)
    requant = None
    if rng.random() < 0.5:
        requant = (int(rng.choice([rng.integers(-2**31, 2**31), rng.integers(1 << 30, 2**31),
                                   -2**31, 2**31 - 1])),
                   int(rng.integers(0, 32)), int(rng.integers(-128, 128)))
        if rng.random() < 0.4:  # per-column multipliers (OPTIONS.CHANNEL_QUANT)
            mult = rng.integers(-2**31, 2**31, n, dtype=np.int64)
            mult[rng.random(n) < 0.2] = -2**31
            requant = (mult, *requant[1:])
    return bias, requant, bool(rng.random() < 0.5)


def assert_job(tb, got, status, error, counters, a, b, bias=None, requant=None, relu=False,
               skip=True, label="job", groups=False):
    """The job finished cleanly, its result is NumPy's and its counters are the golden ones."""
    assert error == Error.NONE, f"{label}: ERROR={Error(error).name}"
    assert status == Status.DONE, f"{label}: STATUS={status:#x}"
    want = gemm(a, b, bias, requant, relu)
    if not np.array_equal(got, want):
        bad = tuple(np.argwhere(got != want)[0])
        raise AssertionError(f"{label}: C{bad} = {got[bad]}, expected {want[bad]}")
    expected = sparse_counters(a, b, tb.geometry.rows, tb.geometry.cols, skip and tb.skips,
                               groups)
    for name, value in expected.items():
        assert counters[name] == value, f"{label}: {name}={counters[name]}, expected {value}"
    assert counters["CYCLES"] > 0


@cocotb.test()
async def test_random_jobs(dut):
    """Random shapes, values and options, back to back without reset, with random pauses."""
    cfg, tb = await make_tb(dut)
    g = tb.geometry
    rng = np.random.default_rng(cfg.get("seed", 0))
    max_dim = cfg.get("max_dim", 40)
    for job in range(cfg.get("count", 20)):
        tb.set_pauses(rng, idle=float(rng.choice([0, 0.2, 0.6])),
                      backpressure=float(rng.choice([0, 0.2, 0.6])))
        m = int(rng.integers(1, max_dim + 1))
        n = int(rng.integers(1, min(max_dim, g.max_n) + 1))
        skip = bool(rng.random() < 0.7)
        groups = skip and tb.groups and bool(rng.random() < 0.5)
        # Pruned weights (n:4 per group, or mixed across groups), with K up to what the
        # slots they need allow; other B at random.
        pruned = groups and bool(rng.random() < 0.5)
        keep = int(rng.integers(0, 5)) if pruned and rng.random() < 0.5 else None
        k_most = g.max_k_for(protocol.slots_for(keep)) if keep is not None else g.max_k
        k = int(rng.integers(1, min(max_dim, k_most) + 1))
        a = random_matrix(rng, (m, k))
        if keep is not None:
            b = patterns.n_of_m(rng, (k, n), keep, 4)
        else:
            b = patterns.mixed_groups(rng, (k, n)) if pruned else random_matrix(rng, (k, n))
        bias, requant, relu = random_options(rng, n)
        slots = None
        if groups:  # the fewest slots that keep B's groups, or sometimes more where K fits
            slots = int(rng.choice([s for s in (1, 2, 4) if s >= fewest_slots(b, g.cols)
                                    and k <= g.max_k_for(s)]))
        label = (f"job {job}: M={m} K={k} N={n} bias={bias is not None} requant={requant} "
                 f"relu={relu} skip={skip} groups={groups} slots={slots}")
        dut._log.info(label)
        got, status, error, counters = await tb.gemm(a, b, bias, requant, relu, skip, groups,
                                                     slots)
        assert_job(tb, got, status, error, counters, a, b, bias, requant, relu, skip, label,
                   groups)
    dut._log.info("%d random jobs bit-exact", cfg.get("count", 20))


@cocotb.test()
async def test_directed_jobs(dut):
    """Edge shapes: 1x1x1, capacity limits, extremes, requantization corner cases."""
    cfg, tb = await make_tb(dut)
    g = tb.geometry
    rng = np.random.default_rng(5)
    full = lambda shape, value: np.full(shape, value, np.int8)  # noqa: E731
    jobs = [
        (full((1, 1), -128), full((1, 1), -128), None, None, False),
        (full((3, g.max_k), -128), full((g.max_k, 2), -128), None, None, False),
        (rng.integers(-128, 128, (2, 3), dtype=np.int8),
         rng.integers(-128, 128, (3, g.max_n), dtype=np.int8), None, None, True),
        (full((5, 7), 127), full((7, 9), 127), np.arange(9, dtype=np.int32) * -1000,
         (2**31 - 1, 31, 127), False),
        (full((5, 7), -128), full((7, 9), 127), None, (-2**31, 0, -128), True),
        (full((4, 4), -128), full((4, 4), -128), np.full(4, 2**31 - 65536, np.int32),
         (-2**31, 0, 0), False),  # bias wraps INT32, then the saturating multiply corner
        (np.zeros((9, 9), np.int8), full((9, 9), 5), np.full(9, -7, np.int32),
         (1 << 30, 1, 3), True),
        # Per-column multipliers across several n-tiles, with the saturating corner.
        (full((2 * g.rows + 1, 5), -128), full((5, 2 * g.cols + 3), -128),
         np.full(2 * g.cols + 3, -2**31 + 81920, np.int32),
         (np.array([-2**31, 2**31 - 1, 1 << 30, 0, -1] * g.cols)[:2 * g.cols + 3], 4, -2), True),
    ]
    for number, (a, b, bias, requant, relu) in enumerate(jobs):
        got, status, error, counters = await tb.gemm(a, b, bias, requant, relu)
        assert_job(tb, got, status, error, counters, a, b, bias, requant, relu,
                   label=f"directed job {number}")
    if not tb.groups:
        return
    # The largest K of 1:4 and 2:4 weights (MAX_K1, MAX_K2), over two n-tiles and m-tiles, and
    # of weights whose groups take at most one step but are not 1:4 (some take none).
    for keep, slots in ((1, 1), (2, 2), (None, 1)):
        k = g.max_k_for(slots)
        n = g.cols + 1
        a = rng.integers(-128, 128, (g.rows + 1, k), dtype=np.int8)
        b = (patterns.n_of_m(rng, (k, n), keep, 4) if keep is not None
             else patterns.n_of_m(rng, (k, n), 1, 4) * (rng.random((k, n)) < 0.5))
        bias = rng.integers(-2**20, 2**20, n, dtype=np.int32)
        requant = (1 << 30, 4, 3)
        got, status, error, counters = await tb.gemm(a, b, bias, requant, True, groups=True)
        assert fewest_slots(b, g.cols) <= slots
        assert_job(tb, got, status, error, counters, a, b, bias, requant, True,
                   label=f"K={k} with {slots} slots per group", groups=True)


@cocotb.test()
async def test_registers(dut):
    """Capability registers describe the build; configuration registers read back."""
    cfg, tb = await make_tb(dut)
    g = tb.geometry
    assert await tb.read("ID") == protocol.MAGIC
    assert await tb.read("VERSION") == protocol.VERSION[0] << 16 | protocol.VERSION[1]
    for name, value in (("ROWS", g.rows), ("COLS", g.cols), ("STREAM_WIDTH", g.stream_width),
                        ("MAX_K", g.max_k), ("MAX_N", g.max_n),
                        ("MAX_K2", 2 * g.max_k if tb.groups else g.max_k),
                        ("MAX_K1", 4 * g.max_k if tb.groups else g.max_k)):
        assert await tb.read(name) == value, name
    assert await tb.read("FEATURES") == features(cfg)
    for register in protocol.REGISTERS:
        if register.access == "rw":
            assert await tb.read(register.name) == register.reset, register.name
    for name, value in (("M", 123456), ("K", 77), ("N", 0xFFFFFFFF), ("QUANT_ZERO", -5 & 0xFFFFFFFF)):
        await tb.write(name, value)
        assert await tb.read(name) == value, name
    assert await tb.read("STATUS") == 0
    unmapped = await tb.axil.read(0xFFC, 4)
    assert unmapped.resp != 0, "unmapped addresses answer with an error response"


@cocotb.test()
async def test_errors(dut):
    """Malformed jobs set ERROR, close the output packet, and the next job still works."""
    cfg, tb = await make_tb(dut)
    g = tb.geometry
    tb.set_pauses(np.random.default_rng(9), idle=0.3, backpressure=0.3)
    rng = np.random.default_rng(10)
    a = rng.integers(-128, 128, (g.rows + 3, 11), dtype=np.int8)
    b = rng.integers(-128, 128, (11, g.cols + 2), dtype=np.int8)
    packet = protocol.pack_input(g, a, b)
    good = (a.shape[0], a.shape[1], b.shape[1])

    async def expect_error(code, m, k, n, options=0, quant=RESET_QUANT, data=None):
        await tb.start(m, k, n, options, quant)
        if data is not None:
            await tb.source.send(AxiStreamFrame(data))
        closing = await tb.receive(tb.budget(*good))
        await tb.source.wait()  # as a host waits for its DMA's send channel
        status = await tb.wait_done(tb.budget(*good))
        assert await tb.read("ERROR") == code, f"expected {code.name}"
        assert status & Status.ERROR and not status & Status.BUSY, f"{code.name}: {status:#x}"
        return closing

    async def expect_good_job():
        got, status, error, counters = await tb.gemm(a, b)
        assert_job(tb, got, status, error, counters, a, b, label="job after an error")

    beat = g.beat_bytes
    # Rejected at START: the input (if any) is discarded, the output packet is one zero beat.
    assert await expect_error(Error.ZERO_DIMENSION, 0, 4, 4) == bytes(beat)
    await expect_good_job()
    await expect_error(Error.ZERO_DIMENSION, 4, 4, 0, data=packet.tobytes())
    await expect_good_job()
    await expect_error(Error.K_TOO_LARGE, 4, g.max_k + 1, 4)
    await expect_error(Error.N_TOO_LARGE, 4, 4, g.max_n + 1)
    await expect_error(Error.BAD_OPTION, 4, 4, 4, options=1 << 8)
    await expect_error(Error.BAD_OPTION, 4, 4, 4, options=Option.STEPS_2)  # no GROUPS
    await expect_error(Error.BAD_OPTION, 4, 4, 4, options=Option.CHANNEL_QUANT)  # no REQUANT
    await expect_error(Error.BAD_QUANT, 4, 4, 4, options=Option.REQUANT, quant=(1, 32, 0))
    await expect_error(Error.BAD_QUANT, 4, 4, 4, options=Option.REQUANT, quant=(1, 3, 128))
    await expect_good_job()
    # TLAST too early: the job ends, the output packet is closed.
    await expect_error(Error.TLAST_EARLY, *good, data=packet[:-beat].tobytes())
    await expect_good_job()
    await expect_error(Error.TLAST_EARLY, *good, data=packet[:beat].tobytes())
    await expect_good_job()
    # ... and inside the per-column multipliers.
    with_mult = protocol.pack_input(g, a, b, None, np.arange(b.shape[1]))
    await expect_error(Error.TLAST_EARLY, *good, options=Option.REQUANT | Option.CHANNEL_QUANT,
                       data=with_mult[:beat].tobytes())
    await expect_good_job()
    # TLAST missing (more beats than the job needs): results complete, extra beats discarded.
    await tb.start(*good)
    await tb.source.send(AxiStreamFrame(packet.tobytes() + bytes(3 * beat)))
    data = await tb.receive(tb.budget(*good))
    await tb.wait_done(tb.budget(*good))
    assert await tb.read("ERROR") == Error.TLAST_MISSING
    assert np.array_equal(protocol.unpack_output(g, data, *good[::2], False), gemm(a, b))
    await tb.source.wait()
    await expect_good_job()
    if not tb.groups:  # a build without the group format refuses it
        await expect_error(Error.BAD_OPTION, *good, options=Option.GROUPS)
        await expect_good_job()
        return
    await expect_error(Error.BAD_OPTION, *good, options=Option.GROUPS | Option.NO_SKIP)
    await expect_error(Error.BAD_OPTION, *good,
                       options=Option.GROUPS | Option.STEPS_2 | Option.STEPS_1)
    # K as large as the job's slots per group allow, and one more.
    for slots in (4, 2, 1):
        await expect_error(Error.K_TOO_LARGE, 4, g.max_k_for(slots) + 1, 4,
                           options=Option.GROUPS | protocol.STEPS_OPTIONS[slots])
    await expect_good_job()
    # The group format: TLAST inside B's counts, code beats and steps.
    grouped = protocol.pack_input(g, a, b, groups=True)
    for cut in (beat, 2 * beat, 4 * beat, len(grouped) - beat):
        await expect_error(Error.TLAST_EARLY, *good, options=Option.GROUPS,
                           data=grouped[:cut].tobytes())
        await expect_good_job()
    # Malformed groups, one n-tile each, B built here by the rules of the protocol's docstring:
    # counts taken modulo 8, steps past a group's k-steps dropped, lanes past K multiplying
    # zero, 2-step codes 6 and 7 read as 0, a uniform header's other bytes ignored.
    vector = g.vector_beats(g.cols) * g.beat_bytes
    columns = np.arange(g.cols)

    def vec(row):
        out = np.zeros(vector, np.uint8)
        out[:g.cols] = row.view(np.uint8)
        return out

    def lanes_of(count, code, step):
        if count == 1:
            return code
        if count == 2:
            return protocol.CODE_PAIRS[code if code < 6 else 0][step]
        if count == 3:
            return [lane for lane in range(4) if lane != code][step]
        return step

    async def malformed(k, header, counts, slots=4):
        """A job of K = ``k`` whose B has this header (bytes) and these counts (mod 8),
        random codes and values, with ``slots`` per group (``OPTIONS.STEPS_*``)."""
        a6 = rng.integers(-128, 128, (g.rows + 1, k), dtype=np.int8)
        b6 = np.zeros((-(-k // 4) * 4, g.cols), np.int64)  # the B the steps make
        bits = []  # the n-tile's code bits, lowest first
        size = g.beat_bytes if header[0] & 0x80 else g.vector_beats(len(header)) * g.beat_bytes
        part = [np.array((header + [0] * size)[:size], np.uint8)]  # a uniform header: 1 beat
        for group, count in enumerate(counts):
            width = {1: 2, 2: 3, 3: 2}.get(count, 0)
            codes = rng.integers(0, 1 << width, g.cols)
            before = -(-len(bits) // g.stream_width)
            bits += [int(code) >> bit & 1 for code in codes for bit in range(width)]
            for _ in range(-(-len(bits) // g.stream_width) - before):
                part.append(None)  # a code beat, filled in below
            for step in range(count):
                values = rng.integers(-128, 128, g.cols, dtype=np.int8)
                part.append(vec(values))
                if step < min(slots, k - 4 * group):
                    lanes = [lanes_of(count, int(code), step) for code in codes]
                    b6[4 * group + np.array(lanes), columns] += values
        bits += [0] * (-len(bits) % g.stream_width)
        code_beats = iter(np.packbits(np.array(bits, np.uint8), bitorder="little")
                          .reshape(-1, g.beat_bytes))
        part = [next(code_beats) if item is None else item for item in part]
        a_part = protocol.pack_input(g, a6, np.zeros((k, g.cols), np.int8))[
            -g.tiles(g.rows + 1, 1)[0] * k * g.vector_beats(g.rows) * g.beat_bytes:]
        await tb.start(g.rows + 1, k, g.cols, Option.GROUPS | protocol.STEPS_OPTIONS[slots])
        await tb.source.send(AxiStreamFrame(np.concatenate(part + [a_part]).tobytes()))
        data = await tb.receive(tb.budget(*good))
        status = await tb.wait_done(tb.budget(*good))
        assert (await tb.read("ERROR"), status) == (Error.NONE, Status.DONE)
        want = (a6.astype(np.int64) @ b6[:k]).astype(np.int32)
        assert np.array_equal(protocol.unpack_output(g, data, g.rows + 1, g.cols, False), want)
        await expect_good_job()

    # K = 10: 7 steps (3 past the group), 10 = 2 steps, 3 steps (1 past the group).
    await malformed(10, [7, 8 + 2, 3], [7, 2, 3])
    # K = 6, a uniform header (0x80 | 9: 1 step per group) with other bytes set.
    await malformed(6, [0x80 | 8 | 1, 0xFF, 0x7], [1, 1])
    # More steps than the job's slots per group: those past them are dropped.
    await malformed(11, [2, 3, 1], [2, 3, 1], slots=1)
    await malformed(9, [4, 1, 3], [4, 1, 3], slots=2)


@cocotb.test()
async def test_abandoned_jobs(dut):
    """Soft reset clears an abandoned job; a hard reset in mid-job is followed by a good job."""
    cfg, tb = await make_tb(dut)
    g = tb.geometry
    rng = np.random.default_rng(11)
    a = rng.integers(-128, 128, (3 * g.rows, 40), dtype=np.int8)
    b = rng.integers(-128, 128, (40, 2 * g.cols + 1), dtype=np.int8)
    shape = (a.shape[0], a.shape[1], b.shape[1])

    async def good_job():
        got, status, error, counters = await tb.gemm(a, b)
        assert_job(tb, got, status, error, counters, a, b, label="job after reset")

    # Started, then abandoned before any data: SOFT_RESET returns the device to idle.
    await tb.start(*shape)
    await ClockCycles(dut.aclk, 50)
    assert await tb.read("STATUS") == Status.BUSY
    await tb.write("CONTROL", Control.SOFT_RESET)
    assert await tb.read("STATUS") == 0
    assert await tb.read("CYCLES") == 0
    await good_job()

    # Abandoned halfway (input stops mid-packet): SOFT_RESET clears the device; the bus models'
    # half-sent and half-received packets are dropped by pulsing their reset.
    await tb.start(*shape)
    tb.sink.pause = True
    send = cocotb.start_soon(tb.source.send(AxiStreamFrame(protocol.pack_input(g, a, b).tobytes())))
    await ClockCycles(dut.aclk, g.input_beats(*shape, False) // 2)
    tb.source.pause = True
    await ClockCycles(dut.aclk, 20)
    assert await tb.read("STATUS") == Status.BUSY
    await tb.write("CONTROL", Control.SOFT_RESET)
    assert await tb.read("STATUS") == 0
    await send
    tb.source.clear()
    await tb.reset()
    tb.source.pause = tb.sink.pause = False
    tb.sink.clear()
    await good_job()

    # Hard reset in the middle of a job, then a good job.
    await tb.start(*shape)
    await tb.source.send(AxiStreamFrame(protocol.pack_input(g, a, b).tobytes()))
    await ClockCycles(dut.aclk, 300)
    await tb.reset()
    tb.source.clear()
    tb.sink.clear()
    assert await tb.read("STATUS") == 0
    await good_job()


@cocotb.test()
async def test_queued_packets(dut):
    """Input packets may be queued before their jobs start: the device takes beats from START
    to the packet's TLAST only, so the next packet waits outside (tready low) for its START."""
    cfg, tb = await make_tb(dut)
    g = tb.geometry
    rng = np.random.default_rng(12)
    jobs = []
    for m, k, n in ((2 * g.rows + 1, 30, g.cols + 3), (g.rows, 17, 2 * g.cols), (1, 1, 1)):
        jobs.append((rng.integers(-128, 128, (m, k), dtype=np.int8),
                     rng.integers(-128, 128, (k, n), dtype=np.int8)))
    await tb.start(jobs[0][0].shape[0], jobs[0][0].shape[1], jobs[0][1].shape[1])
    for a, b in jobs:  # all packets queued in the source model at once
        await tb.source.send(AxiStreamFrame(protocol.pack_input(g, a, b).tobytes()))
    for number, (a, b) in enumerate(jobs):
        m, k, n = a.shape[0], a.shape[1], b.shape[1]
        if number:
            # The previous job is done; this job's packet has not gone in.
            await ClockCycles(dut.aclk, 20)
            assert not tb.source.idle(), f"job {number}: its packet was taken before START"
            assert dut.s_axis_tready.value == 0
            await tb.start(m, k, n)
        cycles = tb.budget(m, k, n)
        data = await tb.receive(cycles)
        status = await tb.wait_done(cycles)
        got = protocol.unpack_output(g, data, m, n, False)
        assert_job(tb, got, status, await tb.read("ERROR"), await tb.counters(), a, b,
                   label=f"queued job {number}")
    assert tb.source.idle()


@cocotb.test()
async def test_sparse_patterns(dut):
    """Dense, all-zero, unstructured, block-sparse, n:4 and mixed operands, skip on and off and
    (on a build with it) B in the group format: results identical and exact, counters equal
    NumPy's counts, skipping never costs cycles, and the group format issues fewer k-steps
    than the plain one where B is n:4."""
    cfg, tb = await make_tb(dut)
    g = tb.geometry
    rng = np.random.default_rng(cfg.get("seed", 0))
    tb.set_pauses(rng, idle=0.2, backpressure=0.2)
    m, k, n = cfg.get("shape", (3 * g.rows + 1, 4 * g.rows + 3, 2 * g.cols + 3))
    k = min(k, g.max_k)
    n = min(n, g.max_n)
    cases = [
        ("dense", patterns.dense(rng, (m, k)), patterns.dense(rng, (k, n))),
        ("all-zero A", np.zeros((m, k), np.int8), patterns.dense(rng, (k, n))),
        ("all-zero B", patterns.dense(rng, (m, k)), np.zeros((k, n), np.int8)),
        *((f"unstructured {f:.0%}", patterns.relu_like(rng, (m, k), f), patterns.dense(rng, (k, n)))
          for f in (0.0, 0.3, 0.6, 0.8, 0.95)),
        *((f"block-sparse B {f:.0%}", patterns.dense(rng, (m, k)),
           patterns.block_sparse(rng, (k, n), f, g.rows, g.cols)) for f in (0.5, 0.75)),
        ("2:4 B", patterns.dense(rng, (m, k)), patterns.two_four(rng, (k, n))),
        ("1:4 B", patterns.relu_like(rng, (m, k), 0.3), patterns.n_of_m(rng, (k, n), 1, 4)),
        *((f"unstructured B {f:.0%}", patterns.dense(rng, (m, k)),
           patterns.unstructured(rng, (k, n), f)) for f in (0.5, 0.9)),
        ("mixed groups B", patterns.dense(rng, (m, k)), patterns.mixed_groups(rng, (k, n))),
    ]
    formats = [(True, False), (False, False)] + ([(True, True)] if tb.groups else [])
    for label, a, b in cases:
        cycles, skipped, results = {}, {}, {}
        for skip, groups in formats:
            got, status, error, counters = await tb.gemm(a, b, skip=skip, groups=groups)
            assert_job(tb, got, status, error, counters, a, b, skip=skip,
                       label=f"{label}, skip={skip}, groups={groups}", groups=groups)
            cycles[skip, groups] = counters["CYCLES"]
            skipped[skip, groups] = counters["KSTEPS_SKIPPED"]
            results[skip, groups] = got
        for result in results.values():
            assert np.array_equal(result, results[True, False])
        dut._log.info("%s: cycles %s", label, cycles)
        # Pauses jitter the cycle count a little; skipping must never be clearly slower.
        assert cycles[True, False] <= cycles[False, False] * 1.1 + 50, f"{label}: {cycles}"
        if tb.groups and label.endswith(":4 B"):  # (cycles: see `sparsa bench sparse`)
            assert skipped[True, True] > skipped[True, False], f"{label}: {skipped}"


@cocotb.test()
async def test_bench(dut):
    """Run the jobs in the ``.npz`` file ``jobs`` (a0, b0, skip0, optional groups0 and slots0:
    B's slots per group, by default the fewest that keep its groups, ...)
    without pauses, checking each against NumPy; write their counters to ``report`` (a JSON
    list)."""
    cfg, tb = await make_tb(dut)
    jobs = np.load(cfg["jobs"])
    results = []
    for index in range(int(jobs["count"])):
        a, b, skip = jobs[f"a{index}"], jobs[f"b{index}"], bool(jobs[f"skip{index}"])
        groups = bool(jobs[f"groups{index}"]) if f"groups{index}" in jobs else False
        slots = int(jobs[f"slots{index}"]) if f"slots{index}" in jobs else None
        got, status, error, counters = await tb.gemm(a, b, skip=skip, groups=groups,
                                                     slots=slots)
        assert_job(tb, got, status, error, counters, a, b, skip=skip, label=f"bench job {index}",
                   groups=groups)
        results.append({"m": a.shape[0], "k": a.shape[1], "n": b.shape[1], "skip": skip,
                        "groups": groups, **counters})
    with open(cfg["report"], "w") as f:
        json.dump(results, f)

