"""A NumPy model of the device: registers, job checks, stream bytes in, stream bytes out.

:class:`ReferenceDevice` is a transport (like :class:`sparsa.host.board.PynqTransport`): it takes
the same register writes and input packets as the hardware and answers with the same output
packets, ``STATUS``/``ERROR`` values and counters, so the whole driver runs against it without a
board or a simulator. Its arithmetic is :mod:`sparsa.host.arith` (bit-exact, BLAS-fast).

Counters: ``MACS``, ``MACS_SKIPPED`` and ``KSTEPS_SKIPPED`` are exact (they follow from the
operands); ``CYCLES``, ``STALL_IN`` and ``STALL_OUT`` are an estimate from the schedule (see
:func:`counters`), so the driver reports them with ``estimated: True``.

Simplifications, where the hardware's exact behaviour depends on timing: a job whose input packet
ends early (``TLAST_EARLY``) answers with one zero beat (the hardware first sends the result rows
already under way); input sent while no job is started is refused with an exception (the
hardware holds TREADY low, so the DMA would time out).
"""

import collections
import threading
import time
from typing import NamedTuple

import numpy as np

from sparsa import protocol
from sparsa.protocol import (DEFAULT_BUILD, GROUP, KNOWN_OPTIONS, REGISTERS, Control, Error,
                             Feature, Option, Status)

from . import arith, jobs



def _signed(value):
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def counters(geometry, a, b, skip=True, requant=False, groups=False, b_beats=None, vectors=0,
             terms=None):
    """The counters of ``a @ b`` on ``geometry`` (B in the group format with ``groups``, in
    ``b_beats`` beats when given: a packet's own): exact work counts, estimated cycles.

    The cycle estimate follows the schedule tile by tile (:func:`_schedule`): the column
    vectors, B and the first A panel stream in before the first tile starts (``STALL_IN``, with
    the cycles any later tile waits for its panel); each tile takes three set-up cycles (load
    its mask into the k-step picker, fetch a group of it, pick the first k-step) plus its
    issued k-steps, at least the array's issue rule (``max(rows, cols) + 1`` after the tile
    before), and a cycle more at each m-tile; its last k-step waits for room in the row FIFO
    (``STALL_OUT``); its rows reach the FIFO ``cols + 17`` cycles later (the array's read-out,
    the fourteen post-processing stages) and leave at the output stream's pace. Against the
    RTL it is within 1% (or a cycle) on random jobs of compiled models' shapes (small K, N = 1,
    int8 output, per-channel requantization, the group format) and on the benchmarks' cubes
    (``tests/test_host_sim.py``, ``tests/test_host.py``). With ``groups``, a tile's issued
    steps are, per group whose four A vectors are not all zero, the largest count of nonzeros
    of one of its columns in the group, and B streams in its beats plus a cycle per group of
    no steps. ``vectors``: the packet's bias and multiplier beats. ``terms``: B's
    :func:`b_terms`, when the caller has them.
    """
    g = geometry
    m, k = a.shape
    n = b.shape[1]
    m_tiles, n_tiles = g.tiles(m, n)
    b_count, group_steps = terms if terms is not None else b_terms(g, b, groups)
    # Nonzero counts per (tile, k-step), summed in uint8 (tiles are at most 32 lanes wide).
    a_count = np.zeros((m_tiles * g.rows, k), np.uint8)
    np.not_equal(a, 0, out=a_count[:m].view(bool))
    a_count = a_count.reshape(m_tiles, g.rows, k).sum(axis=1, dtype=np.uint8)  # [m-tile, k]
    a_live, b_live = a_count != 0, b_count != 0
    nonzero_products = int(a_count.sum(axis=0, dtype=np.int64) @ b_count.sum(axis=1, dtype=np.int64))
    steps = None
    if groups:
        count = -(-k // GROUP)
        a_group = np.zeros((m_tiles, count * GROUP), bool)
        a_group[:, :k] = a_live
        a_group = a_group.reshape(m_tiles, count, GROUP).any(axis=2)
        steps = group_steps
        # Counts <= K: exact in float32.
        issued = np.rint(a_group.astype(np.float32) @ steps.astype(np.float32)).astype(np.int64)
    elif skip:
        # Issued k-steps per output tile: both vectors nonzero. Counts <= K: exact in float32.
        issued = np.rint(a_live.astype(np.float32) @ b_live.astype(np.float32)).astype(np.int64)
    else:
        issued = np.full((m_tiles, n_tiles), k, np.int64)
    rows_real = np.minimum(g.rows, m - g.rows * np.arange(m_tiles))
    cols_real = np.minimum(g.cols, n - g.cols * np.arange(n_tiles))
    macs = int(rows_real @ issued @ cols_real)
    panel = k * g.vector_beats(g.rows)
    if b_beats is None:
        b_beats = (protocol.group_beats(g, steps.T) if groups
                   else n_tiles * k * g.vector_beats(g.cols))
    stall_in = vectors + b_beats + panel + SCHEDULE["input"]
    if groups:
        stall_in += int((steps == 0).sum())  # the loader passes a group of no steps in a cycle
    cycles, stall_in, stall_out = _schedule(g, issued, panel, stall_in, requant, groups)
    wrap = lambda value: int(value) % 2**32  # noqa: E731
    return {"CYCLES": wrap(cycles), "STALL_IN": wrap(stall_in), "STALL_OUT": wrap(stall_out),
            "MACS": wrap(macs), "MACS_SKIPPED": wrap(m * k * n - nonzero_products),
            "KSTEPS_SKIPPED": wrap(m_tiles * n_tiles * k - issued.sum())}


def b_terms(geometry, b, groups=False):
    """What :func:`counters` needs of B alone (a model's weights are the B of job after job):
    nonzeros per k-step and n-tile (``[k, n-tile]``, uint8) and, with ``groups``, the group
    format's step counts (``[group, n-tile]``, :func:`sparsa.protocol.group_counts`), else
    None."""
    g = geometry
    k, n = b.shape
    n_tiles = -(-n // g.cols)
    b_nonzero = np.zeros((k, n_tiles, g.cols), np.uint8)
    np.not_equal(b, 0, out=b_nonzero.reshape(k, -1)[:, :n].view(bool))
    if g.cols % 8 == 0 and hasattr(np, "bitwise_count"):  # popcount 8 lanes (0/1 bytes) at once
        b_count = np.bitwise_count(b_nonzero.view(np.uint64)).reshape(k, n_tiles, g.cols // 8)
        b_count = b_count.sum(axis=2, dtype=np.uint8) if g.cols > 8 else b_count[:, :, 0]
    else:  # lane by lane (a sum over a short inner axis is slow in NumPy)
        b_count = b_nonzero[:, :, 0].copy()  # [k, n-tile]
        for lane in range(1, g.cols):
            b_count += b_nonzero[:, :, lane]
    return b_count, (protocol.group_counts(b, g.cols).T if groups else None)


# The schedule's constants (cycles), measured against the RTL: the input link and the panel
# flag before the first tile (``input``), a finished row's way to the row FIFO past the
# array's ``cols`` (``enter``), the FIFO's room reaching the sequencer (``room``), the last
# beat to the job's end (``end``), a tile's set-up (``setup``) and an m-tile's (``m_tile``),
# an A panel's last word to its flag (``panel``; in the group format ``group_panel``, and at
# least ``group_reload`` from the bank's release).
SCHEDULE = {"input": 5, "enter": 17, "room": 10, "end": 13, "setup": 3, "panel": 1, "m_tile": 1,
            "group_panel": 2, "group_reload": 12}


def _schedule(g, issued, panel, stall_in, requant, groups=False):
    """The job's cycles, ``STALL_IN`` and ``STALL_OUT``, following its tiles in issue order
    (``stall_in``: the cycles before the first tile can start): a tile starts when the one
    before has issued its last k-step and its A panel is in; it takes its issued k-steps and
    set-up, at least the array's issue rule; its last k-step waits until the row FIFO has room
    for its rows (two tiles' rows: the tile two before has left it); its rows reach the FIFO
    ``cols + enter`` cycles later and leave one after another at the output stream's pace.

    Jobs of many tiles whose row FIFO always has room in time (most: a tile's k-steps outlast
    two tiles' rows leaving) and whose panels' banks are free in time are worked out at once
    (:func:`_schedule_unstalled`); the others tile by tile (:func:`_schedule_tiles`)."""
    s = SCHEDULE
    steps = issued + s["setup"]
    cycles = np.maximum(steps, max(g.rows, g.cols) + 1)
    cycles[0, 0] = steps[0, 0]  # (the issue rule spaces two tiles)
    row_beats = g.vector_beats((1 if requant else 4) * g.cols)
    reload = max(panel + s["group_panel"], s["group_reload"]) if groups else panel + s["panel"]
    timing = dict(tile_out=g.rows * row_beats, reload=reload, panel_step=panel + s["panel"],
                  room_delay=s["room"], m_tile=s["m_tile"], read_out=g.cols + s["enter"])
    if issued.size >= 64:
        done = _schedule_unstalled(steps, cycles, stall_in, **timing)
        if done is not None:
            return done
    return _schedule_tiles(steps.tolist(), cycles.tolist(), stall_in, **timing)


def _schedule_unstalled(steps, cycles, stall_in, tile_out, reload, panel_step, room_delay,
                        m_tile, read_out):
    """:func:`_schedule_tiles`'s result, worked out for all tiles at once on the premise that no
    tile waits for room in the row FIFO and no m-tile waits for its panel's bank (an m-tile may
    wait for its panel to stream in); None where one would (the premise is checked against the
    times it gives, so a result is the tile-by-tile one)."""
    m_tiles, n_tiles = steps.shape
    # The m-tiles: each starts at the later of the one before's end and its panel's arrival,
    # and takes its tiles' cycles: row_end[i] = max(row_end[i - 1], ready[i]) + row[i], as a
    # running maximum.
    ready = stall_in + panel_step * np.arange(m_tiles)
    row = cycles.sum(axis=1) + m_tile
    before = np.cumsum(row) - row  # the rows' cycles before each
    row_end = np.maximum.accumulate(np.maximum(ready - before, stall_in)) + before + row
    row_begin = row_end - row
    previous = np.concatenate([[stall_in], row_end[:-1]])  # the end before each m-tile
    if m_tiles > 2 and (row_end[:-2] + reload > row_begin[2:]).any():
        return None  # a panel's bank still held by the m-tile two before
    waited = int((ready - previous)[ready > previous].sum())
    added = cycles.copy()
    added[:, 0] += m_tile
    end = (row_begin[:, None] + np.cumsum(added, axis=1)).reshape(-1)  # each tile's last step
    # A tile's rows leave after the rows before them: left[t] = max(entered[t], left[t - 1])
    # + tile_out, as a running maximum.
    order = np.arange(end.size) * tile_out
    left = np.maximum.accumulate(end + read_out - order) + order + tile_out
    room = left[:-2] + room_delay  # the row FIFO's room for tile t, from tile t - 2
    if (room > end[2:]).any():
        return None
    begin = end - cycles.reshape(-1)
    wait = room - begin[2:] - steps.reshape(-1)[2:]
    return int(left[-1]) + SCHEDULE["end"], stall_in + waited, int(wait[wait > 0].sum())


def _schedule_tiles(steps, tile_cycles, stall_in, tile_out, reload, panel_step, room_delay,
                    m_tile, read_out):
    """:func:`_schedule`, tile by tile (``steps`` and ``tile_cycles`` as lists of rows)."""
    m_tiles, n_tiles = len(steps), len(steps[0])
    # (A hot loop: conditionals rather than max(), locals, no appends.)
    popped = [0] * (m_tiles * n_tiles)
    m_ends = [0] * m_tiles
    stall_out, end, left, first, t = 0, stall_in, 0, stall_in, 0
    for i in range(m_tiles):
        # The panel streams after the one before; its bank is free once the m-tile two before
        # is done. (STALL_IN: the cycles waiting for it, the first panel's included.)
        ready = first + i * panel_step
        if i >= 2 and m_ends[i - 2] + reload > ready:
            ready = m_ends[i - 2] + reload
        if ready > end:
            stall_in += ready - end
        row_cycles, row_steps = tile_cycles[i], steps[i]
        for j in range(n_tiles):
            begin = end if end > ready else ready
            if j == 0:
                begin += m_tile
            natural = begin + row_cycles[j]
            if t >= 2:
                room = popped[t - 2] + room_delay
                # (STALL_OUT: the cycles the last k-step waits for room, the issue rule's own
                # wait included.)
                wait = room - begin - row_steps[j]
                if wait > 0:
                    stall_out += wait
                end = natural if natural > room else room
            else:
                end = natural
            entered = end + read_out
            left = (entered if entered > left else left) + tile_out
            popped[t] = left
            t += 1
        m_ends[i] = end
    return left + SCHEDULE["end"], stall_in, stall_out


def choose_format(geometry, a, b, requant=False, counts=None, vectors=0):
    """Whether the job ``a @ b`` (with skipping, on a build with ``FEATURES.GROUPS``) is
    estimated to take fewer cycles with B in the group format, and the counters of the format
    chosen: ``(groups, counters, b_beats)`` (``b_beats``: B's beats in the group format, else
    None). The estimate (:func:`counters`) counts B's beats too, so dense B, whose group format
    is a quarter longer, stays in the plain one. ``counts``: B's step counts
    (:func:`sparsa.protocol.group_counts`), when the caller has them."""
    plain = counters(geometry, a, b, True, requant, vectors=vectors)
    if counts is None:
        counts = protocol.group_counts(b, geometry.cols)
    b_beats = protocol.group_beats(geometry, counts)
    grouped = counters(geometry, a, b, True, requant, True, b_beats, vectors)
    if grouped["CYCLES"] < plain["CYCLES"]:
        return True, grouped, b_beats
    return False, plain, None


class Operands(NamedTuple):
    """An input packet's operands: ``a``, ``b`` (views where the format allows), ``bias`` and
    ``multipliers`` (or None), the bytes they took (``taken``), B's beats and, when B came
    from a :class:`DecodedB`, its :func:`b_terms` (else None)."""

    a: np.ndarray
    b: np.ndarray
    bias: object
    multipliers: object
    taken: int
    b_beats: int
    terms: object = None


def unpack_input(geometry, data, m, k, n, bias, channel_quant=False, groups=False,
                 slots=protocol.GROUP, decoded=None):
    """The :class:`Operands` of an input packet; B in the group format with ``groups``,
    ``slots`` per group (see :func:`sparsa.protocol.read_groups`), through ``decoded`` (a
    :class:`DecodedB`) when given. Raises ValueError when the packet ends early."""
    g = geometry
    m_tiles, n_tiles = g.tiles(m, n)
    data = data.view(np.int8)
    position = 0
    columns = []
    for present in (bias, channel_quant):
        values = None
        if present:
            vector = g.vector_beats(4 * g.cols) * g.beat_bytes
            region = data[position:position + n_tiles * vector].reshape(n_tiles, vector)
            values = np.ascontiguousarray(region[:, :4 * g.cols]).view("<i4").reshape(-1)[:n]
            position += n_tiles * vector
        columns.append(values)
    if decoded is not None:
        b, span, terms = decoded.read(g, data[position:], k, n, groups, slots)
    else:
        (b, span), terms = read_b(g, data[position:], k, n, groups, slots), None
    b_beats = span // g.beat_bytes
    position += span
    vector = g.vector_beats(g.rows) * g.beat_bytes
    span = m_tiles * k * vector
    if position + span > data.size:
        raise ValueError("the input packet ends inside A")
    a_tiles = data[position:position + span].reshape(m_tiles, k, vector)[:, :, :g.rows]
    a = a_tiles.transpose(0, 2, 1).reshape(m_tiles * g.rows, k)[:m]
    return Operands(a, b, *columns, position + span, b_beats, terms)


def read_b(geometry, data, k, n, groups, slots=protocol.GROUP):
    """B (K x N, int8; a view of ``data`` in the plain format) from the start of ``data`` (a
    packet's bytes from B's first), and the bytes it took. Raises ValueError when the data ends
    inside it."""
    g = geometry
    if groups:
        return protocol.read_groups(g, data, k, n, slots)
    n_tiles = -(-n // g.cols)
    vector = g.vector_beats(g.cols) * g.beat_bytes
    span = n_tiles * k * vector
    if span > data.size:
        raise ValueError("the input packet ends inside B")
    b_tiles = data[:span].view(np.int8).reshape(n_tiles, k, vector)[:, :, :g.cols]
    return b_tiles.transpose(1, 0, 2).reshape(k, n_tiles * g.cols)[:, :n], span


class DecodedB:
    """B operands decoded once per distinct packet bytes: a model's weights are the B of job
    after job, unchanged, and their group format's decode and :func:`b_terms` are most of the
    device model's work on small jobs. An entry is used only for the very bytes it was decoded
    from (the decode reads no byte past the span it returns), so results are those of a fresh
    decode. At most ``limit`` bytes of packets and operands are kept, least recently used
    first out."""

    SPANS = 8  # the most recent B sizes tried per shape and format

    def __init__(self, limit=64 << 20):
        self.limit = limit
        self.size = 0
        self._entries = collections.OrderedDict()  # (shape, bytes) -> (b, terms)
        self._spans = {}  # shape -> B sizes seen (bytes), newest last
        self._lock = threading.Lock()

    def read(self, geometry, data, k, n, groups, slots):
        """``(b, span, terms)`` as :func:`read_b` and :func:`b_terms` give them (``b``
        read-only)."""
        shape = (geometry, k, n, bool(groups), slots)
        data = data.view(np.uint8)
        with self._lock:
            for span in reversed(self._spans.get(shape, ())):
                if span <= data.size:
                    key = (shape, data[:span].tobytes())
                    found = self._entries.get(key)
                    if found is not None:
                        self._entries.move_to_end(key)
                        return found[0], span, found[1]
        b, span = read_b(geometry, data, k, n, groups, slots)
        b = np.array(b)  # (not a view of a buffer the sender reuses)
        b.flags.writeable = False
        terms = b_terms(geometry, b, groups)
        key = (shape, data[:span].tobytes())
        with self._lock:
            if key not in self._entries:
                self._entries[key] = (b, terms)
                self.size += 2 * span + b.nbytes
                spans = self._spans.setdefault(shape, [])
                if span in spans:
                    spans.remove(span)
                spans.append(span)
                del spans[:-self.SPANS]
                while self.size > self.limit and len(self._entries) > 1:
                    (old_shape, raw), (old_b, _) = self._entries.popitem(last=False)
                    self.size -= 2 * len(raw) + old_b.nbytes
        return b, span, terms

    def clear(self):
        with self._lock:
            self._entries.clear()
            self._spans.clear()
            self.size = 0


def pack_output(geometry, c, buffer, requant):
    """Write C's output packet into ``buffer``; returns its size in bytes."""
    g = geometry
    m, n = c.shape
    rows = jobs.output_rows(g, buffer, m, n, requant)
    m_tiles, n_tiles = rows.shape[:2]
    rows[...] = 0
    padded = np.zeros((m_tiles * g.rows, n_tiles * g.cols), rows.dtype)
    padded[:m, :n] = c
    rows[:, :, :, :g.cols] = padded.reshape(m_tiles, g.rows, n_tiles, g.cols).transpose(0, 2, 1, 3)
    return rows.nbytes


def _fits(size, receive_bytes):
    """``size``, if an output packet of that many bytes fits the receive transfer."""
    if receive_bytes < size:
        raise RuntimeError(f"receive buffer of {receive_bytes} bytes is too small for the "
                           f"{size}-byte output packet")
    return size


class ReferenceDevice:
    """The device as a transport: ``read``/``write`` registers, ``transfer`` packets. With
    ``clock_mhz``, a transfer takes the job's estimated cycles at that clock in wall time (at
    least), as a board's would; without it, transfers complete at once."""

    def __init__(self, rows=DEFAULT_BUILD["rows"], cols=DEFAULT_BUILD["cols"],
                 stream_width=DEFAULT_BUILD["stream_width"], max_k=DEFAULT_BUILD["max_k"],
                 max_n=DEFAULT_BUILD["max_n"], sparse_skip=True, clock_mhz=None):
        protocol.check_build(rows, cols, stream_width, max_k, max_n)
        if clock_mhz is not None and not (isinstance(clock_mhz, (int, float))
                                          and 0 < clock_mhz <= 10000):
            raise ValueError(f"clock_mhz: expected a clock in MHz (0 to 10000), got "
                             f"{clock_mhz!r}")
        # The driver's timeouts follow the clock; without one, no timeout is needed.
        self.cycles_per_second = clock_mhz * 1e6 if clock_mhz else None
        self.geometry = protocol.Geometry(rows, cols, stream_width, max_k, max_n)
        self.features = protocol.features(sparse_skip)
        self.registers = {register.name: register.reset for register in REGISTERS}
        k_limits = ((self.geometry.max_k_for(2), self.geometry.max_k_for(1)) if sparse_skip
                    else (max_k, max_k))
        self.registers.update(ROWS=rows, COLS=cols, STREAM_WIDTH=stream_width, MAX_K=max_k,
                              MAX_K2=k_limits[0], MAX_K1=k_limits[1], MAX_N=max_n,
                              FEATURES=int(self.features))
        self._by_address = {register.address: register for register in REGISTERS}
        self._job = None
        self._decoded = DecodedB()

    def read(self, address):
        register = self._by_address.get(address)
        if register is None or register.access == "wo":
            raise ValueError(f"address: {address:#x} is not a readable register")
        return self.registers[register.name]

    def write(self, address, value):
        register = self._by_address.get(address)
        if register is None or register.access == "ro":
            raise ValueError(f"address: {address:#x} is not a writeable register")
        value &= 0xFFFFFFFF
        if register.name != "CONTROL":
            self.registers[register.name] = value
        elif value & Control.SOFT_RESET:
            self._clear()
        elif value & Control.START:
            self._start()

    def _clear(self):
        self._job = None
        self.registers.update(STATUS=0, ERROR=Error.NONE, **{name: 0 for name in protocol.COUNTERS})

    def _start(self):
        self._clear()
        r = self.registers
        g = self.geometry
        m, k, n, options = r["M"], r["K"], r["N"], r["OPTIONS"]
        zero = _signed(r["QUANT_ZERO"])
        if m == 0 or k == 0 or n == 0:
            error = Error.ZERO_DIMENSION
        elif k > g.max_k_for(protocol.slots_per_group(options)):
            error = Error.K_TOO_LARGE
        elif n > g.max_n:
            error = Error.N_TOO_LARGE
        elif options & ~KNOWN_OPTIONS or (options & Option.CHANNEL_QUANT
                                          and not options & Option.REQUANT):
            error = Error.BAD_OPTION
        elif options & Option.GROUPS and (options & Option.NO_SKIP
                                          or not self.features & Feature.GROUPS):
            error = Error.BAD_OPTION
        elif options & (Option.STEPS_2 | Option.STEPS_1) and (
                not options & Option.GROUPS
                or options & (Option.STEPS_2 | Option.STEPS_1) == Option.STEPS_2 | Option.STEPS_1):
            error = Error.BAD_OPTION
        elif options & Option.REQUANT and not (r["QUANT_SHIFT"] <= 31 and -128 <= zero <= 127):
            error = Error.BAD_QUANT
        else:
            error = Error.NONE
        quant = (_signed(r["QUANT_MULT"]), r["QUANT_SHIFT"], zero)
        self._job = (m, k, n, options, quant, error)
        self.registers.update(STATUS=Status.BUSY, ERROR=error)

    def allocate(self, nbytes):
        return np.zeros(nbytes, np.uint8)

    def transfer(self, send, send_bytes, receive, receive_bytes, timeout=None):
        """Consume an input packet of ``send_bytes`` from ``send``; write the output packet into
        ``receive`` (at most ``receive_bytes``); returns the output packet's size (with a
        clock, once the job's cycles have passed)."""
        started = time.monotonic()
        size = self._transfer(send, send_bytes, receive, receive_bytes)
        if self.cycles_per_second:
            time.sleep(max(0.0, started + self.registers["CYCLES"] / self.cycles_per_second
                           - time.monotonic()))
        return size

    def _transfer(self, send, send_bytes, receive, receive_bytes):
        if self._job is None:
            raise TimeoutError("the device has no job started: input not accepted")
        m, k, n, options, quant, error = self._job
        g = self.geometry
        self._job = None
        beat = g.beat_bytes
        bias, requant = bool(options & Option.BIAS), bool(options & Option.REQUANT)
        channel_quant = bool(options & Option.CHANNEL_QUANT)
        groups = bool(options & Option.GROUPS)
        if error == Error.NONE:
            try:
                operands = unpack_input(g, send[:send_bytes], m, k, n, bias, channel_quant,
                                        groups, protocol.slots_per_group(options), self._decoded)
            except ValueError:
                error = Error.TLAST_EARLY
            else:
                if send_bytes > operands.taken:
                    error = Error.TLAST_MISSING  # extra beats discarded; results complete
        if error not in (Error.NONE, Error.TLAST_MISSING):
            size = _fits(beat, receive_bytes)
            receive[:size] = 0
            self.registers.update(STATUS=Status.DONE | Status.ERROR, ERROR=error)
            return size
        a, b = operands.a, operands.b
        if channel_quant:
            quant = (operands.multipliers.astype(np.int64), *quant[1:])
        size = _fits(g.output_beats(m, n, requant) * beat, receive_bytes)
        c = arith.gemm(a, b, operands.bias, quant if requant else None,
                       bool(options & Option.RELU))
        pack_output(g, c, receive, requant)
        skip = bool(self.features & Feature.SPARSE_SKIP) and not options & Option.NO_SKIP
        self.registers.update(counters(g, a, b, skip, requant, groups, operands.b_beats,
                                       g.column_beats(n, bias, channel_quant), operands.terms))
        status = Status.DONE | (Status.ERROR if error != Error.NONE else 0)
        self.registers.update(STATUS=status, ERROR=error)
        return size

    def close(self):
        self._decoded.clear()

