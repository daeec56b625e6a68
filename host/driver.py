"""What users call: ``sparsa.open(backend)`` and the accelerator object's ``matmul``."""

import collections
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
import weakref
from dataclasses import dataclass

import numpy as np

from sparsa import protocol
from sparsa.protocol import REGISTER, Control, Error, Feature, Option, Status

from . import arith, jobs, reference
from .errors import DeviceError, TransferError
from .validate import check_array, check_matmul

log = logging.getLogger("sparsa")

GROUP_FORMAT_VERSION = (1, 3)  # the protocol version whose group format this runtime writes
STEPS_VERSION = (1, 4)  # the first with OPTIONS.STEPS_* and MAX_K2 / MAX_K1
IDENTITY = ("ID", "VERSION", "ROWS", "COLS", "STREAM_WIDTH", "MAX_K", "MAX_K2", "MAX_K1", "MAX_N",
            "FEATURES")
COUNTER_KEYS = {"CYCLES": "cycles", "MACS": "macs", "MACS_SKIPPED": "macs_skipped",
                "STALL_IN": "stall_in", "STALL_OUT": "stall_out",
                "KSTEPS_SKIPPED": "ksteps_skipped"}


MIN_BUFFER = 4096  # bytes: the smallest DMA buffer (one page)


class BufferPool:
    """One send and one receive buffer from ``transport.allocate``, reused across jobs. A
    buffer is sized up to a power of two (at least :data:`MIN_BUFFER`, at most ``limit``), so
    growing jobs allocate once per size class; the smaller buffer is freed when a larger one
    replaces it, and both when the pool is released."""

    def __init__(self, transport, limit):
        self._transport = transport
        self._limit = limit
        self._buffers = {}

    def get(self, direction, nbytes):
        buffer = self._buffers.get(direction)
        if buffer is None or buffer.size < nbytes:
            size = min(max(MIN_BUFFER, 1 << (nbytes - 1).bit_length()), max(self._limit, nbytes))
            if buffer is not None:
                self._free(self._buffers.pop(direction))
            buffer = self._buffers[direction] = self._transport.allocate(size)
        return buffer

    def sizes(self):
        return {direction: buffer.size for direction, buffer in self._buffers.items()}

    def release(self):
        while self._buffers:
            self._free(self._buffers.popitem()[1])

    def _free(self, buffer):
        free = getattr(self._transport, "free", None)
        if free is not None:
            free(buffer)


def _release(pool, transport):
    """Free a driver's buffers and close its transport (on ``close()`` or when the driver is
    collected or the interpreter exits). A transport that may still write into a buffer (a
    DMA channel armed by a job that never finished) is stopped first; when it cannot be
    stopped, its buffers are left allocated rather than freed under a running DMA."""
    stop = getattr(transport, "stop", None)
    try:
        if stop is not None:
            stop()
        pool.release()
    except DeviceError as error:
        log.warning("sparsa: DMA buffers not freed: %s", error)
    finally:
        transport.close()


@dataclass(frozen=True)
class Info:
    """A build's configuration, as its ID/capability registers describe it."""

    rows: int
    cols: int
    stream_width: int
    max_k: int
    max_n: int
    features: tuple  # names of the Feature bits set
    version: tuple  # protocol (major, minor)
    max_k2: int = 0  # K of a job whose groups take at most 2 steps (MAX_K2)
    max_k1: int = 0  # ... at most 1 step (MAX_K1)

    @property
    def geometry(self):
        return protocol.Geometry(self.rows, self.cols, self.stream_width, self.max_k, self.max_n)

    def max_k_for(self, slots):
        """The largest K of a job with ``slots`` slots per group (4: MAX_K, 2: MAX_K2, 1:
        MAX_K1)."""
        return {1: self.max_k1, 2: self.max_k2}.get(slots, self.max_k) or self.max_k


def read_info(transport):
    """Read and check the ID/capability registers."""
    ident = transport.read(REGISTER["ID"].address)
    if ident != protocol.MAGIC:
        raise DeviceError(f"no sparsa accelerator here: ID register reads {ident:#010x}, "
                          f"expected {protocol.MAGIC:#010x}")
    version = transport.read(REGISTER["VERSION"].address)
    version = (version >> 16, version & 0xFFFF)
    if version[0] != protocol.VERSION[0]:
        raise DeviceError(f"the device speaks protocol {version[0]}.{version[1]}, this runtime "
                          f"{protocol.VERSION[0]}.{protocol.VERSION[1]}")
    values = {name: transport.read(REGISTER[name].address)
              for name in ("ROWS", "COLS", "STREAM_WIDTH", "MAX_K", "MAX_N", "FEATURES")}
    features = tuple(feature.name for feature in Feature if values["FEATURES"] & feature
                     # (a device of protocol 1.2 reads an earlier group format: plain B only)
                     and not (feature == Feature.GROUPS and version < GROUP_FORMAT_VERSION))
    # (Devices before protocol 1.4 keep 4 slots per group: K up to MAX_K in any format.)
    limits = {name: transport.read(REGISTER[name].address) if version >= STEPS_VERSION
              else values["MAX_K"] for name in ("MAX_K2", "MAX_K1")}
    return Info(values["ROWS"], values["COLS"], values["STREAM_WIDTH"], values["MAX_K"],
                values["MAX_N"], features, version, limits["MAX_K2"], limits["MAX_K1"])


class PreparedWeights:
    """Weights from :meth:`Accelerator.prepare`: a read-only copy of ``B`` and its stream
    bytes, packed on first use for each job shape and kept."""

    def __init__(self, b):
        check_array(b, "B", np.int8, 2)
        self.array = np.array(b, np.int8, order="C")
        self.array.flags.writeable = False
        self._packed = {}
        self.formats = {}  # the B format chosen per job shape (see _in_format)
        self._live_columns = None
        self._live = None

    @property
    def shape(self):
        return self.array.shape

    @property
    def live_columns(self):
        """The indices of B's columns that are not all zero (worked out once)."""
        if self._live_columns is None:
            self._live_columns = np.flatnonzero(self.array.any(axis=0))
        return self._live_columns

    def live(self):
        """These weights without their all-zero columns (prepared once), or these."""
        if len(self.live_columns) == self.array.shape[1]:
            return self
        if self._live is None:
            self._live = PreparedWeights(self.array[:, self.live_columns])
        return self._live

    def packed(self, geometry, k0, k, n0, n, groups=False):
        """B's part of the input packet for rows ``k0:k0+k`` and columns ``n0:n0+n`` (in the
        group format with ``groups``)."""
        key = (geometry, k0, k, n0, n, groups)
        packed = self._packed.get(key)
        if packed is None:
            pack = jobs.pack_groups if groups else jobs.pack_weights
            packed = self._packed[key] = pack(geometry, self.array[k0:k0 + k, n0:n0 + n])
        return packed

    def __repr__(self):
        return f"<PreparedWeights {self.array.shape[0]}x{self.array.shape[1]}>"


class Accelerator:
    """An INT8 GEMM accelerator; see :meth:`matmul`. Use as a context manager or ``close()``."""

    backend = None
    info = None

    def __init__(self):
        self.last_counters = None
        self.closed = False
        # Held by every call that touches the device or the counters: callers in several
        # threads take turns. A caller that reads ``last_counters`` of its own call holds it
        # around both (``with acc.lock: acc.matmul(...); acc.last_counters``).
        self.lock = threading.RLock()

    def prepare(self, B):
        """``B`` (K x N int8) as weights to pass to :meth:`matmul` many times: checked and
        copied once, and on a device backend packed into the stream's layout once per job
        shape rather than on every call. The result is the same as passing ``B``."""
        return PreparedWeights(B)

    def matmul(self, A, B, *, bias=None, requant=None, relu=False, sparse_skip=True, out=None):
        """``C = A @ B`` (A: M x K int8, B: K x N int8 or from :meth:`prepare`), any
        M, K, N >= 1.

        ``bias``: int32 of shape (N,), added to the int32 sums (with wrap). ``requant``:
        ``(multiplier, shift, zero_point)`` (see :func:`sparsa.quant.requant_params`) makes C
        int8; multiplier and shift may be arrays of N (per-channel: an array of multipliers
        with one shift runs on the device, per-channel shifts on the host).
        ``relu``: clamp at 0 (int32) or at the zero point (int8). ``sparse_skip=False`` issues
        every k-step (same result; only the counters differ). ``out``: a C-contiguous array to
        write C into. Returns C: int32 (M, N), or int8 with ``requant``. Inputs are not modified.
        """
        with self.lock:
            return self._checked_matmul(A, B, bias, requant, relu, sparse_skip, out)

    def _checked_matmul(self, A, B, bias, requant, relu, sparse_skip, out):
        if self.closed and not getattr(self, "_counting", False):  # (estimates need no device)
            raise RuntimeError("matmul on a closed accelerator")
        prepared = B if isinstance(B, PreparedWeights) else None
        if prepared is not None:
            B = prepared.array
        requant = check_matmul(A, B, bias, requant, relu, sparse_skip, out)
        if sparse_skip:
            done = self._without_structural_zeros(A, B, bias, requant, bool(relu), out, prepared)
            if done is not None:
                return done
        # (out=None: the backend's own new array, sparing the reference a copy.)
        return self._matmul(A, B, bias, requant, bool(relu), bool(sparse_skip), out, prepared)

    def _without_structural_zeros(self, a, b, bias, requant, relu, out, prepared):
        """Rows of A and columns of B that are all zero (padding rows, masked samples, dead or
        pruned output channels) left out of the device's job: their outputs are those of a
        zero sum (bias, requantization and ReLU of 0), filled in here, and their products are
        added to ``macs_skipped`` (every one has a zero operand). Returns C (``out``, or a new
        array), or None when there are none (the job runs as it is)."""
        m, k = a.shape
        n = b.shape[1]
        rows = np.flatnonzero(a.any(axis=1))
        cols = prepared.live_columns if prepared is not None else np.flatnonzero(b.any(axis=0))
        if len(rows) == m and len(cols) == n:
            return None
        if out is None:
            out = np.empty((m, n), np.int8 if requant is not None else np.int32)
        out[...] = arith.postprocess(np.zeros((1, n), np.int32), bias, requant, relu)
        removed = m * k * n - len(rows) * k * len(cols)
        if len(rows) == 0 or len(cols) == 0:
            self._no_job(removed)
            return out
        if len(cols) < n:
            prepared = prepared.live() if prepared is not None else None
            b = prepared.array if prepared is not None else np.ascontiguousarray(b[:, cols])
            bias = bias[cols] if bias is not None else None
            if requant is not None:
                requant = tuple(v[cols] if isinstance(v, np.ndarray) else v for v in requant)
        a = np.ascontiguousarray(a[rows]) if len(rows) < m else a
        live = np.empty((len(rows), len(cols)), out.dtype)
        self._matmul(a, b, bias, requant, relu, True, live, prepared)
        out[np.ix_(rows, cols)] = live
        self._add_skipped(removed)
        return out

    def counters_later(self):
        """The last call's counters as a callable that returns them: for a caller that may or
        may not look at them (a compiled model's per-node report), so the reference works out
        its estimate only when they are asked for."""
        counters = self.last_counters
        return lambda: counters

    def _add_skipped(self, products):
        counters = self.last_counters
        if counters is not None:
            self.last_counters = dict(counters, macs_skipped=counters["macs_skipped"] + products)

    def _no_job(self, products):
        """The counters of a call that needed no job (every product had a zero operand)."""
        self.last_counters = dict({key: 0 for key in COUNTER_KEYS.values()}, jobs=0,
                                  macs_skipped=products,
                                  estimated=self.backend in ("reference", "reference-device"))
        if hasattr(self, "last_timing"):
            self.last_timing = {"pack": 0.0, "device": 0.0, "unpack": 0.0, "host": 0.0}

    def _matmul(self, a, b, bias, requant, relu, sparse_skip, out, prepared=None):
        raise NotImplementedError

    def identity(self):
        """The ID and capability registers as the device reports them: {name: value} (MAX_K2
        and MAX_K1 from devices of protocol 1.4 on)."""
        names = [name for name in IDENTITY
                 if self.info.version >= STEPS_VERSION or name not in ("MAX_K2", "MAX_K1")]
        with self.lock:
            return {name: int(self._register_source().read(REGISTER[name].address))
                    for name in names}

    def _register_source(self):
        raise NotImplementedError

    def close(self):
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        i = self.info
        return (f"<sparsa {self.backend}: {i.rows}x{i.cols} array, {i.stream_width}-bit streams, "
                f"K <= {i.max_k}{_sparse_k(i)}, N <= {i.max_n}, {'/'.join(i.features)}>")


def _sparse_k(info):
    """The larger K limits of B in fewer slots per group, for a device's description."""
    if info.max_k_for(2) == info.max_k_for(1) == info.max_k:
        return ""
    return f" (2:4 {info.max_k_for(2)}, 1:4 {info.max_k_for(1)})"


def _k_chunk(info, b, sparse_skip):
    """The K of a plan's jobs for this B: ``MAX_K``, or, when K is larger and every group of
    four k-steps of B has at most two (one) nonzeros in each column, ``MAX_K2`` (``MAX_K1``):
    its jobs then take B in the group format with that many slots per group (one device job
    instead of several summed on the host)."""
    if not (sparse_skip and "GROUPS" in info.features and b.shape[0] > info.max_k):
        return info.max_k
    counts = protocol.group_counts(b, info.cols)
    return info.max_k_for(protocol.slots_for(counts))


def _in_format(geometry, job, a, b, max_transfer, steps=True, prepared=None, count=True):
    """``job`` with B in the group format when that is estimated to take fewer cycles
    (:func:`.reference.choose_format`) and its packet fits ``max_transfer``, or when its K
    is past ``MAX_K`` (:func:`_k_chunk`), else ``job``; and the estimated counters of the job
    as chosen (None without ``count``). In the group format it asks for the fewest slots per
    group that keep B's steps (``OPTIONS.STEPS_*``) when the device takes them (``steps``:
    protocol 1.4 on). For ``prepared`` weights the choice is made once per job shape, for
    activations without zeros, and kept with them: a compiled model's jobs cost the host no
    estimate (a call's own A decides otherwise)."""
    g = geometry
    a_job, b_job = job.operands(a, b)
    key = (g, job.m, job.k0, job.k, job.n0, job.n, job.options, max_transfer, steps)
    choice = prepared.formats.get(key) if prepared is not None else None
    counters = None
    if choice is None:
        counts = protocol.group_counts(b_job, g.cols)
        vectors = g.column_beats(job.n, job.bias, job.channel_quant)
        b_beats = protocol.group_beats(g, counts)
        if job.k > g.max_k:  # only the group format holds it
            groups = True
        else:
            basis = np.broadcast_to(np.int8(1), a_job.shape) if prepared is not None else a_job
            groups, counters, _ = reference.choose_format(g, basis, b_job, job.requant, counts,
                                                         vectors)
            if prepared is not None:
                counters = None  # (those of activations without zeros)
            if groups and g.input_beats(job.m, job.k, job.n, job.bias, job.channel_quant,
                                        b_beats) * g.beat_bytes > max_transfer:
                groups, counters = False, None
        chosen = job
        if groups:
            slots = protocol.slots_for(counts) if steps else protocol.GROUP
            chosen = dataclasses.replace(
                job, options=job.options | Option.GROUPS | protocol.STEPS_OPTIONS[slots],
                input_bytes=g.input_beats(job.m, job.k, job.n, job.bias, job.channel_quant,
                                          b_beats) * g.beat_bytes)
        choice = (chosen, b_beats if groups else None, vectors)
        if prepared is not None:
            prepared.formats[key] = choice
    chosen, b_beats, vectors = choice
    if count and counters is None:
        counters = reference.counters(g, a_job, b_job, True, job.requant, b_beats is not None,
                                      b_beats, vectors)
    return chosen, counters if count else None


def _report(per_job, estimated):
    """``last_counters`` for a call: the device counters of its jobs, summed, and how many
    jobs it took (``jobs``)."""
    per_job = list(per_job)
    report = {key: sum(int(counts[name]) for counts in per_job)
              for name, key in COUNTER_KEYS.items()}
    report["jobs"] = len(per_job)
    report["estimated"] = estimated
    return report


class ReferenceAccelerator(Accelerator):
    """The NumPy fallback: the device's arithmetic straight on the operands (no packing), with
    the counters the device would report (cycles estimated)."""

    backend = "reference"
    # A compiled model runs a convolution on it as one CPU kernel call, not as the device's
    # calls (see sparsa.host.graph); :meth:`counters_of` gives the device's counters.
    whole_layers = True

    def __init__(self, sparse_skip=True, **geometry):
        super().__init__()
        device = reference.ReferenceDevice(**geometry, sparse_skip=sparse_skip)
        self.info = read_info(device)
        self._device = device  # the registers it would have
        self._skips = sparse_skip
        self._workspace = arith.Workspace()
        self._counting = False

    def _checked_matmul(self, A, B, bias, requant, relu, sparse_skip, out):
        """C straight from the operands (rows and columns that are all zero need no special
        case here); the device's counters, which do, are worked out when first asked for
        (:meth:`_count`), from what they depend on: A's nonzero pattern (kept as bits), B (a
        copy, unless prepared: read-only), which of bias, requantization and ReLU apply."""
        if self._counting:
            return super()._checked_matmul(A, B, bias, requant, relu, sparse_skip, out)
        if self.closed:
            raise RuntimeError("matmul on a closed accelerator")
        prepared = B if isinstance(B, PreparedWeights) else None
        b = prepared.array if prepared is not None else B
        requant = check_matmul(A, b, bias, requant, relu, sparse_skip, out)
        relu = bool(relu)
        if requant is None:
            out = arith.matmul(A, b, out=out, workspace=self._workspace)
            if bias is not None:
                np.add(out, bias, out=out)  # int32 wrap
            if relu:
                np.maximum(out, 0, out=out)
        elif out is None:
            out = arith.gemm(A, b, bias, requant, relu, self._workspace)
        else:
            np.copyto(out, arith.gemm(A, b, bias, requant, relu, self._workspace))
        self._pending = (np.packbits(A.view(np.uint8), axis=1), A.shape[1],  # (nonzero: 1)
                         prepared if prepared is not None else b.copy(), bias is not None,
                         None if requant is None else tuple(
                             v.copy() if isinstance(v, np.ndarray) else v for v in requant),
                         relu, bool(sparse_skip))
        self._last_counters = None
        return out

    def _count(self, pending):
        """The counters of a call from what :meth:`_checked_matmul` kept of it."""
        a_bits, k, b, bias, requant, relu, sparse_skip = pending
        a = np.unpackbits(a_bits, axis=1, count=k).view(np.int8)  # A's nonzeros as ones
        n = b.shape[1]
        return self.counters_of(a, b, bias=np.zeros(n, np.int32) if bias else None,
                                requant=requant, relu=relu, sparse_skip=sparse_skip)

    def _matmul(self, a, b, bias, requant, relu, sparse_skip, out, prepared=None):
        # Reached only while counting (the base class's path, structural zeros left out).
        self._last_counters = self._estimate((a, b, bias is not None, requant, relu,
                                              sparse_skip, prepared))
        return out

    def counters_of(self, A, B, *, bias=None, requant=None, relu=False, sparse_skip=True):
        """The counters ``matmul`` with these arguments would report (its jobs, estimated
        cycles, MACs issued and skipped), without computing C; ``last_counters`` stays."""
        with self.lock:
            kept = self._pending, self._last_counters
            self._pending = None
            self._counting = True
            try:
                self._checked_matmul(A, B, bias, requant, relu, sparse_skip, None)
                return self._last_counters
            finally:
                self._counting = False
                self._pending, self._last_counters = kept

    @property
    def last_counters(self):
        """The counters the device would report: summed over the jobs the driver would run."""
        if self._pending is not None:
            self._last_counters = self._count(self._pending)
            self._pending = None
        return self._last_counters

    def counters_later(self):
        if self._pending is None:
            return super().counters_later()
        pending, done = self._pending, []

        def counters():
            if not done:
                done.append(self._count(pending))
            return done[0]
        return counters

    def _estimate(self, call):
        a, b, bias, requant, relu, sparse_skip, prepared = call
        g = self.info.geometry
        plan = jobs.plan(g, a.shape[0], a.shape[1], b.shape[1], bias, requant, relu,
                         sparse_skip, k_size=_k_chunk(self.info, b, sparse_skip))
        skip = sparse_skip and self._skips
        groups = skip and "GROUPS" in self.info.features  # as the device driver chooses
        return _report(
            (_in_format(g, job, a, b, jobs.DEFAULT_MAX_TRANSFER, prepared=prepared)[1]
             if groups
             else reference.counters(g, *job.operands(a, b), skip, job.requant,
                                     vectors=g.column_beats(job.n, job.bias, job.channel_quant))
             for job in plan.jobs), estimated=True)

    def _register_source(self):
        return self._device

    @last_counters.setter
    def last_counters(self, value):
        self._pending = None
        self._last_counters = value


class DeviceAccelerator(Accelerator):
    """The driver over a transport (board, simulated RTL or the reference device model).

    Jobs are double-buffered: each has a slot (a send and a receive buffer, two slots), is
    packed into it on the caller's thread, runs on the device (its register writes, the
    transfer, its status: one job at a time, in order) and is unpacked from it, so the host
    packs one job and unpacks another while the device runs a third: a GEMM of several jobs
    runs its device part on a helper thread, and calls from several threads at once (a
    compiled model's micro-batches) share the device the same way. ``last_counters`` and
    ``last_timing`` are those of the calling thread's last call."""

    @property
    def concurrent(self):
        """Whether ``matmul`` may be called from several threads at once, and overlaps (not
        over a transport that only its caller's thread may use: a cocotb bridge)."""
        return getattr(self.transport, "any_thread", True)

    def __init__(self, transport, backend, max_transfer=None):
        self._local = threading.local()  # (before Accelerator's, which sets last_counters)
        super().__init__()
        self.transport = transport
        self.backend = backend
        self.info = read_info(transport)
        self.geometry = self.info.geometry
        self.max_transfer = (max_transfer or getattr(transport, "max_transfer", None)
                             or jobs.DEFAULT_MAX_TRANSFER)
        self.buffers = BufferPool(transport, self.max_transfer)
        self._finalizer = weakref.finalize(self, _release, self.buffers, transport)
        # DMA buffers a host cannot cache (PYNQ's, by default): packets are built and read in
        # ordinary memory and each DMA buffer gets one sequential write or read per job.
        self._staging = {} if getattr(transport, "uncached_buffers", False) else None
        self._io = threading.Lock()  # the transport: one job's registers and transfer at once
        self._slots = queue.LifoQueue()  # free slots, the first one first
        for slot in range(SLOTS - 1, -1, -1):
            self._slots.put(slot)
        self._runner = None  # the helper thread for GEMMs of several jobs (made on first use)
        self._write("CONTROL", Control.SOFT_RESET)

    @property
    def last_counters(self):
        return getattr(self._local, "counters", None)

    @last_counters.setter
    def last_counters(self, value):
        self._local.counters = value

    @property
    def last_timing(self):
        """The calling thread's last call: seconds packing, on the device (registers, transfer,
        status; the device's busy time), unpacking, and post-processing on the host."""
        return getattr(self._local, "timing", None)

    @last_timing.setter
    def last_timing(self, value):
        self._local.timing = value

    def _staged(self, direction, nbytes):
        """A reusable array in ordinary (cached) memory of ``nbytes`` for ``direction``."""
        buffer = self._staging.get(direction)
        if buffer is None or buffer.size < nbytes:
            size = max(MIN_BUFFER, 1 << (nbytes - 1).bit_length())  # as the pool sizes them
            buffer = self._staging[direction] = np.empty(size, np.uint8)
        return buffer[:nbytes]

    def _write(self, name, value):
        self.transport.write(REGISTER[name].address, value)

    def _register_source(self):
        return self.transport

    def identity(self):
        with self._io:
            return super().identity()

    def _read(self, name):
        return self.transport.read(REGISTER[name].address)

    def _timeout(self, job):
        """Seconds to wait for a job: ten times a generous cycle bound, at least one second."""
        rate = self.transport.cycles_per_second
        if rate is None:
            return None
        g = self.geometry
        m_tiles, n_tiles = g.tiles(job.m, job.n)
        bound = (m_tiles * n_tiles * (max(job.k, g.rows, g.cols) + 2) + job.input_bytes
                 + job.output_bytes + 1000)
        return 1.0 + 10 * bound / rate

    def run_job(self, job, a, b, bias, out, accumulate=False, mult=None, timing=None,
                prepared=None):
        """Run one planned job; its result goes into ``out`` (a view of C). Returns counters.
        ``mult``: the per-column multipliers of the whole GEMM, for a CHANNEL_QUANT job.
        ``timing``: a dict whose ``pack``, ``device`` and ``unpack`` seconds this job adds to."""
        slot = self._take_slot()
        try:
            self._pack(slot, job, a, b, bias, mult, prepared, timing)
            counts = self._run_on_device(slot, job, timing)
            self._unpack(slot, job, out, accumulate, timing)
        finally:
            self._slots.put(slot)
        return counts

    def _take_slot(self):
        slot = self._slots.get()
        if self.closed:
            self._slots.put(slot)
            raise RuntimeError("matmul on a closed accelerator")
        return slot

    def _buffer(self, slot, direction, nbytes):
        return self.buffers.get(direction if slot == 0 else f"{direction}{slot}", nbytes)

    def _pack(self, slot, job, a, b, bias, mult, prepared, timing):
        """The job's input packet into the slot's send buffer (on the caller's thread)."""
        g = self.geometry
        started = time.perf_counter()
        send = self._buffer(slot, "send", job.input_bytes)
        columns = slice(job.n0, job.n0 + job.n)
        staged = self._staging is not None
        packet = self._staged(f"send{slot}", job.input_bytes) if staged else send
        jobs.pack_into(g, packet, a[job.m0:job.m0 + job.m, job.k0:job.k0 + job.k],
                       b[job.k0:job.k0 + job.k, columns], bias[columns] if job.bias else None,
                       mult[columns] if job.channel_quant else None,
                       prepared.packed(g, job.k0, job.k, job.n0, job.n, job.groups)
                       if prepared else None, job.groups)
        if staged:
            send[:job.input_bytes] = packet  # one sequential write
        if timing is not None:
            timing["pack"] += time.perf_counter() - started

    def _run_on_device(self, slot, job, timing=None):
        """The job on the device, from the slot's send buffer into its receive buffer: its
        registers, START, the transfer, its status and counters (one job at a time)."""
        send = self._buffer(slot, "send", job.input_bytes)
        receive = self._buffer(slot, "receive", job.output_bytes)
        with self._io:
            started = time.perf_counter()
            try:
                for name, value in job.registers():
                    self._write(name, value)
                self._write("CONTROL", Control.START)
                self.transport.transfer(send, job.input_bytes, receive, job.output_bytes,
                                        self._timeout(job))
                status, code = self._read("STATUS"), self._read("ERROR")
                counts = {name: self._read(name) for name in protocol.COUNTERS}
            except BaseException as error:  # a timeout, a fault, Ctrl-C, a transport's failure
                self._abandon(job, error)
            if timing is not None:
                timing["device"] += time.perf_counter() - started
        if code != Error.NONE or status != Status.DONE:
            raise DeviceError(f"job M={job.m} K={job.k} N={job.n} failed: STATUS={status:#x}, "
                              f"ERROR={_error_name(code)}")
        return counts

    def _unpack(self, slot, job, out, accumulate, timing):
        """The job's result from the slot's receive buffer into ``out``."""
        started = time.perf_counter()
        receive = self._buffer(slot, "receive", job.output_bytes)
        if self._staging is not None:
            received = self._staged(f"receive{slot}", job.output_bytes)
            received[:] = receive[:job.output_bytes]  # one sequential read
            receive = received
        jobs.unpack_into(self.geometry, receive, out, job.requant, accumulate)
        if timing is not None:
            timing["unpack"] += time.perf_counter() - started

    def _abandon(self, job, error):
        """Any exit from a job but success: quote STATUS and ERROR, soft-reset the device and
        let the transport recover (the board resets its DMA, with deadlines), so no channel is
        left armed and the next job runs. A timeout or a transfer fault raises
        :class:`DeviceError` saying so; anything else (``KeyboardInterrupt``, an error of the
        transport) is raised again as it was, once the device is safe."""
        what = ("timed out" if isinstance(error, TimeoutError)
                else "failed" if isinstance(error, TransferError) else "was interrupted")
        message = f"job M={job.m} K={job.k} N={job.n} {what} ({error or type(error).__name__})"
        failure = None
        try:
            status, code = self._read("STATUS"), self._read("ERROR")
            self._write("CONTROL", Control.SOFT_RESET)
            message += (f"; STATUS={status:#x}, ERROR={_error_name(code)}; "
                        f"the device was soft-reset")
            recover = getattr(self.transport, "recover", None)
            if recover is not None:
                recover()
                message += " and the transport recovered"
        except DeviceError as cleanup:
            failure = cleanup
            message += f", but recovery failed: {cleanup}"
        if not isinstance(error, (TimeoutError, TransferError)):
            if failure is not None:
                log.warning("sparsa: %s", message)
            raise error
        raise DeviceError(message) from error

    def matmul(self, A, B, *, bias=None, requant=None, relu=False, sparse_skip=True, out=None):
        if not self.concurrent:
            return super().matmul(A, B, bias=bias, requant=requant, relu=relu,
                                  sparse_skip=sparse_skip, out=out)
        # Not under ``lock``: calls from several threads overlap (see the class).
        return self._checked_matmul(A, B, bias, requant, relu, sparse_skip, out)

    def _matmul(self, a, b, bias, requant, relu, sparse_skip, out, prepared=None):
        m, k = a.shape
        n = b.shape[1]
        if out is None:
            out = np.empty((m, n), np.int8 if requant is not None else np.int32)
        plan = jobs.plan(self.geometry, m, k, n, bias is not None, requant, relu,
                         sparse_skip, self.max_transfer, "CHANNEL_QUANT" in self.info.features,
                         _k_chunk(self.info, b, sparse_skip))
        acc = out if plan.on_device else np.empty((m, n), np.int32)
        mult = requant[0] if requant is not None else None
        timing = {"pack": 0.0, "device": 0.0, "unpack": 0.0, "host": 0.0}
        planned = plan.jobs
        if sparse_skip and "GROUPS" in self.info.features:
            steps = self.info.version >= STEPS_VERSION
            planned = [_in_format(self.geometry, job, a, b, self.max_transfer, steps,
                                  prepared, count=False)[0] for job in planned]
        if len(planned) == 1 or not getattr(self.transport, "any_thread", True):
            # (One job, or a transport only its caller's thread may use: in turn.)
            per_job = [self.run_job(job, a, b, bias, acc[job.m0:job.m0 + job.m,
                                                         job.n0:job.n0 + job.n],
                                    accumulate=job.k0 > 0, mult=mult, timing=timing,
                                    prepared=prepared) for job in planned]
        else:
            per_job = self._pipelined(planned, a, b, bias, acc, mult, prepared, timing)
        if not plan.on_device:
            started = time.perf_counter()
            np.copyto(out, arith.postprocess(acc, bias, requant, relu), casting="unsafe")
            timing["host"] = time.perf_counter() - started
        self.last_counters = _report(per_job, estimated=self.backend == "reference-device")
        self.last_timing = timing
        return out

    def _pipelined(self, planned, a, b, bias, acc, mult, prepared, timing):
        """Several jobs, each packed while the one before is on the device (on the helper
        thread) and unpacked while the one after is; unpacked in order (K chunks add up).
        Returns their counters. A failed job stops the rest; its error is raised once every
        job already on its way has finished and its slot is free again."""
        if self._runner is None:
            with self.lock:
                if self._runner is None:
                    self._runner = concurrent.futures.ThreadPoolExecutor(
                        1, thread_name_prefix="sparsa-device")
        pending = collections.deque()  # (job, slot, future), in order
        per_job = []

        def finish_oldest():
            job, slot, future = pending.popleft()
            try:
                try:
                    counts = future.result()
                finally:  # (interrupted while waiting: the job leaves its buffers first)
                    concurrent.futures.wait([future])
                per_job.append(counts)
                self._unpack(slot, job, acc[job.m0:job.m0 + job.m, job.n0:job.n0 + job.n],
                             job.k0 > 0, timing)
            finally:
                self._slots.put(slot)

        try:
            for job in planned:
                try:  # a free slot; else this call's oldest job frees its own first
                    slot = self._slots.get_nowait()
                except queue.Empty:
                    if pending:
                        finish_oldest()
                    slot = self._slots.get()
                if self.closed:
                    self._slots.put(slot)
                    raise RuntimeError("matmul on a closed accelerator")
                try:
                    self._pack(slot, job, a, b, bias, mult, prepared, timing)
                    pending.append((job, slot, self._runner.submit(
                        self._run_on_device, slot, job, timing)))
                except BaseException:
                    self._slots.put(slot)
                    raise
            while pending:
                finish_oldest()
        finally:
            while pending:  # after an error: let the jobs on their way end, free their slots
                job, slot, future = pending.popleft()
                concurrent.futures.wait([future])
                self._slots.put(slot)
        return per_job

    def close(self):
        """Free the DMA buffers and close the transport (also done when the object is collected
        or the interpreter exits); calls running in other threads finish their jobs first."""
        with self.lock:
            if not self.closed:
                self.closed = True
                held = [self._slots.get() for _ in range(SLOTS)]  # no job in flight
                if self._runner is not None:
                    self._runner.shutdown(wait=True)
                for slot in held:
                    self._slots.put(slot)
            self._finalizer()
            super().close()


SLOTS = 2  # jobs in flight per device: one on the device while the host packs or unpacks one


def _error_name(code):
    try:
        return Error(code).name
    except ValueError:
        return str(code)
