"""cocotb testbench for :class:`sparsa.hw.SystolicArray` (the generated Verilog).

Settings arrive as JSON in ``SPARSA_TB`` (see :mod:`sparsa.sim.runner`): ``rows``, ``cols``,
the build's ``lut_columns`` and ``dsp_packing`` (row pairs) and per-test knobs
(``count``, ``seed``, ``max_k``, ``bubbles``, ``report``).

The driver streams tiles back to back, one k-step per cycle with random bubbles, honouring the
array's issue rule; a monitor collects result rows on the falling edge. A tile is ``(a4, b,
lanes)``: per row and k-step the group's four A values, and per k-step and column the lane
its PE multiplies (random, or ``k % 4`` as a plain k-step has). Every row is compared with
:func:`sparsa.sim.golden.matmul_int32` of the A values the lanes pick.
"""

import json
import os
import time

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, FallingEdge, RisingEdge

from sparsa.hw.array import latency
from sparsa.hw.pe import LANES

from .golden import matmul_int32


def settings():
    return json.loads(os.environ.get("SPARSA_TB", "{}"))


class ArrayTB:
    def __init__(self, dut, cfg):
        self.dut = dut
        self.rows = rows = cfg["rows"]
        self.cols = cols = cfg["cols"]
        self.a = [getattr(dut, f"a__{i}") for i in range(rows)]
        self.b = [getattr(dut, f"b__{j}") for j in range(cols)]
        self.a_zero = [getattr(dut, f"a_zero__{i}") for i in range(rows)]
        self.b_zero = [getattr(dut, f"b_zero__{j}") for j in range(cols)]
        self.b_lane = [getattr(dut, f"b_lane__{j}") for j in range(cols)]
        self.c = [getattr(dut, f"c__{j}") for j in range(cols)]
        self.min_tile_cycles = max(rows, cols)
        self.latency = latency(rows, cols)
        self.cycles = 0
        Clock(dut.clk, 10, unit="ns").start()

    async def reset(self):
        self.dut.rst.value = 1
        self._idle()
        await ClockCycles(self.dut.clk, 2)
        self.dut.rst.value = 0
        await RisingEdge(self.dut.clk)

    def _idle(self):
        self.dut.valid.value = 0
        self.dut.first.value = 0
        self.dut.last.value = 0
        for port in self.a + self.b + self.a_zero + self.b_zero + self.b_lane:
            port.value = 0

    async def _drive(self, tiles, bubbles, rng):
        since_last = self.min_tile_cycles
        for a, b, lanes in tiles:
            depth = a.shape[1]
            for k in range(depth):
                while bubbles and rng.random() < bubbles:
                    self._idle()
                    await RisingEdge(self.dut.clk)
                    since_last += 1
                last = k == depth - 1
                while last and since_last < self.min_tile_cycles:
                    self._idle()
                    await RisingEdge(self.dut.clk)
                    since_last += 1
                self.dut.valid.value = 1
                self.dut.first.value = int(k == 0)
                self.dut.last.value = int(last)
                for i, port in enumerate(self.a):
                    port.value = int.from_bytes(a[i, k].tobytes(), "little")
                for j, port in enumerate(self.b):
                    port.value = int(b[k, j])
                    self.b_lane[j].value = int(lanes[k, j])
                # Zero flags as the accelerator sets them, but now and then left low for a
                # zero operand (allowed: it only forgoes the gating).
                for i, port in enumerate(self.a_zero):
                    port.value = sum(int(value == 0 and rng.random() >= 0.125) << lane
                                     for lane, value in enumerate(a[i, k]))
                for port, value in zip(self.b_zero, b[k, :]):
                    port.value = int(value == 0 and rng.random() >= 0.125)
                await RisingEdge(self.dut.clk)
                since_last = 0 if last else since_last + 1
        self._idle()

    async def _collect(self, driver):
        rows = []
        quiet = 0
        # Listen until the driver is done and a full latency has passed without a row, so a
        # missing row ends the test instead of hanging it and a spurious row is caught.
        while not driver.done() or quiet <= self.latency + 2:
            await FallingEdge(self.dut.clk)
            self.cycles += 1
            if int(self.dut.out_valid.value):
                rows.append((int(self.dut.out_row.value), [p.value.to_signed() for p in self.c]))
                quiet = 0
            elif driver.done():
                quiet += 1
        return rows

    async def run(self, tiles, bubbles=0.0, rng=None):
        """Stream ``tiles`` ((rows x K, K x cols) pairs); returns result tiles and busy cycles."""
        self.cycles = 0
        driver = cocotb.start_soon(self._drive(tiles, bubbles, rng or np.random.default_rng(0)))
        rows = await self._collect(driver)
        if len(rows) != len(tiles) * self.rows:
            raise AssertionError(f"expected {len(tiles) * self.rows} result rows, got {len(rows)}")
        results = []
        for t in range(len(tiles)):
            tile_rows = rows[t * self.rows:(t + 1) * self.rows]
            order = [index for index, _ in tile_rows]
            if order != list(range(self.rows)):
                raise AssertionError(f"tile {t}: result rows came out in order {order}")
            results.append(np.array([values for _, values in tile_rows], dtype=np.int32))
        # Busy cycles: from the first k-step to the last result row (the quiet tail excluded).
        return results, self.cycles - (self.latency + 3)


def picked(a, lanes):
    """Per column the A values its lanes pick: [column, row, k]."""
    rows, depth, _ = a.shape
    return np.stack([a[:, np.arange(depth), lanes[:, j]] for j in range(lanes.shape[1])])


def check_tiles(tiles, results):
    for t, ((a, b, lanes), got) in enumerate(zip(tiles, results)):
        want = np.stack([matmul_int32(a_j, b[:, j:j + 1])[:, 0]
                         for j, a_j in enumerate(picked(a, lanes))], axis=1)
        if not np.array_equal(got, want):
            bad = np.argwhere(got != want)[0]
            raise AssertionError(
                f"tile {t} (K={a.shape[1]}): C{tuple(bad)} = {got[tuple(bad)]}, "
                f"expected {want[tuple(bad)]}\nA=\n{a}\nB=\n{b}\nlanes=\n{lanes}\ngot=\n{got}\n"
                f"want=\n{want}")


def random_operand(rng, shape):
    """Int8 values from one of several distributions, so zeros and extremes are common."""
    kind = rng.integers(4)
    if kind == 0:
        return rng.integers(-128, 128, shape, dtype=np.int8)
    if kind == 1:
        values = rng.integers(-128, 128, shape, dtype=np.int8)
        return np.where(rng.random(shape) < rng.random(), 0, values).astype(np.int8)
    if kind == 2:
        return rng.choice(np.array([-128, -127, -1, 0, 1, 126, 127], dtype=np.int8), shape)
    return rng.integers(-3, 4, shape, dtype=np.int8)


def grouped(a, b, rng, plain=False):
    """A tile of ``a @ b`` as the array takes it: ``a``'s values in the lanes ``b``'s
    columns pick (``k % 4`` for all with ``plain``, else random) and random values in the
    other lanes."""
    rows, depth = a.shape
    cols = b.shape[1]
    if plain:
        lanes = np.repeat((np.arange(depth) % LANES)[:, None], cols, axis=1)
    else:
        lanes = rng.integers(0, LANES, (depth, cols))
    a4 = random_operand(rng, (rows, depth, LANES))
    for j in range(cols):  # column j's lanes hold a's values (the last column written wins)
        a4[:, np.arange(depth), lanes[:, j]] = a
    return a4, b, lanes.astype(np.uint8)


@cocotb.test()
async def test_directed(dut):
    cfg = settings()
    rows, cols = cfg["rows"], cfg["cols"]
    tb = ArrayTB(dut, cfg)
    await tb.reset()
    n = max(rows, cols)
    identity = np.eye(n, dtype=np.int8)
    rng = np.random.default_rng(1)
    values = rng.integers(-128, 128, (n, n), dtype=np.int8)
    single_a = np.zeros((rows, 5), np.int8)
    single_a[rows - 1, 3] = -128
    single_b = np.zeros((5, cols), np.int8)
    single_b[3, cols - 1] = 127
    tiles = [
        (identity[:rows, :n], values[:, :cols]),
        (values[:rows, :], identity[:, :cols]),
        (np.full((rows, 64), -128, np.int8), np.full((64, cols), -128, np.int8)),
        (np.full((rows, 64), 127, np.int8), np.full((64, cols), 127, np.int8)),
        (np.full((rows, 64), -128, np.int8), np.full((64, cols), 127, np.int8)),
        (single_a, single_b),
        (values[:rows, :1], values[:1, :cols]),
        (np.zeros((rows, 3), np.int8), rng.integers(-128, 128, (3, cols), dtype=np.int8)),
    ]
    tiles = [grouped(a, b, rng, plain=True) for a, b in tiles]
    results, _ = await tb.run(tiles)
    check_tiles(tiles, results)


@cocotb.test()
async def test_accumulator_wraps(dut):
    """Sums beyond INT32 wrap modulo 2**32, as NumPy int32 does: 140000 x (-128 x -128)."""
    cfg = settings()
    rows, cols = cfg["rows"], cfg["cols"]
    tb = ArrayTB(dut, cfg)
    await tb.reset()
    depth = 140_000
    a = np.full((rows, depth), -128, np.int8)
    b = np.full((depth, cols), -128, np.int8)
    b[0, 0] = 127
    tile = grouped(a, b, np.random.default_rng(2))
    results, _ = await tb.run([tile])
    assert matmul_int32(a, b)[0, 1] != 140_000 * 16384, "the golden model must wrap too"
    check_tiles([tile], results)


@cocotb.test()
async def test_random(dut):
    cfg = settings()
    rows, cols = cfg["rows"], cfg["cols"]
    rng = np.random.default_rng(cfg.get("seed", 0))
    tb = ArrayTB(dut, cfg)
    await tb.reset()
    max_k = cfg.get("max_k", 4 * max(rows, cols))
    tiles = []
    for _ in range(cfg.get("count", 50)):
        depth = int(rng.integers(1, max_k + 1))
        a4 = random_operand(rng, (rows, depth, LANES))
        b = random_operand(rng, (depth, cols))
        plain = rng.random() < 0.25
        tiles.append((a4, b, grouped(a4[:, :, 0], b, rng, plain)[2]))
    start = time.perf_counter()
    results, cycles = await tb.run(tiles, bubbles=cfg.get("bubbles", 0.1), rng=rng)
    seconds = time.perf_counter() - start
    check_tiles(tiles, results)
    dut._log.info("%d random tiles bit-exact; %d cycles in %.2f s (%.0f cycles/s)",
                  len(tiles), cycles, seconds, cycles / seconds)
    if "report" in cfg:
        with open(cfg["report"], "w") as f:
            json.dump({"tiles": len(tiles), "cycles": cycles, "seconds": seconds}, f)
