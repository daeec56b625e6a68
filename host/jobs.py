"""The driver's core, free of I/O: plan a GEMM as device jobs, pack operands into stream bytes,
unpack results.

A :class:`Job` is what one START does: its register values, its place in the whole GEMM and the
sizes of its input and output packets. :func:`plan` cuts any ``M x K @ K x N`` into jobs the
device accepts (``K <= MAX_K``, ``N <= MAX_N``, packets within the DMA's transfer limit).
:func:`pack_into` writes a job's input packet into a caller's (DMA) buffer and
:func:`unpack_into` reads an output packet into the caller's result, both vectorized NumPy.
Transports (:mod:`sparsa.host.board`, :mod:`sparsa.host.reference`) only move these bytes and
poke registers.

When K is cut, each K chunk runs as a plain int32 job, the host adds the chunks with int32
wrap (what the device's accumulators would have done) and applies bias, requantization and ReLU
itself (:mod:`sparsa.host.arith`), so the result is the same as one job would give. So it does
for per-column shifts, which the device does not take (per-column multipliers with one shift go
to the device, ``OPTIONS.CHANNEL_QUANT``).
"""

from dataclasses import dataclass

import numpy as np

from sparsa.protocol import RESET_QUANT, Option, group_vectors

DEFAULT_MAX_TRANSFER = 2**26 - 1  # AXI DMA with a 26-bit buffer length register


@dataclass(frozen=True)
class Job:
    """One device job: rows ``m0:m0+m`` of A, k-steps ``k0:k0+k``, columns ``n0:n0+n`` of B."""

    m0: int
    m: int
    k0: int
    k: int
    n0: int
    n: int
    options: int
    quant: tuple  # (QUANT_MULT, QUANT_SHIFT, QUANT_ZERO)
    input_bytes: int
    output_bytes: int

    @property
    def bias(self):
        return bool(self.options & Option.BIAS)

    @property
    def requant(self):
        return bool(self.options & Option.REQUANT)

    @property
    def channel_quant(self):
        return bool(self.options & Option.CHANNEL_QUANT)

    @property
    def groups(self):
        return bool(self.options & Option.GROUPS)

    def operands(self, a, b):
        """This job's parts of the whole GEMM's ``a`` and ``b``."""
        return (a[self.m0:self.m0 + self.m, self.k0:self.k0 + self.k],
                b[self.k0:self.k0 + self.k, self.n0:self.n0 + self.n])

    def registers(self):
        """The register writes that configure this job, in order (CONTROL.START comes after)."""
        return (("M", self.m), ("K", self.k), ("N", self.n), ("OPTIONS", self.options),
                ("QUANT_MULT", self.quant[0] & 0xFFFFFFFF), ("QUANT_SHIFT", self.quant[1]),
                ("QUANT_ZERO", self.quant[2] & 0xFFFFFFFF))


@dataclass(frozen=True)
class Plan:
    jobs: tuple
    on_device: bool  # bias/requant/ReLU done by the device (else by the host, after the sum)
    split_k: bool  # results of jobs with the same (m0, n0) are summed on the host


def _chunks(total, size):
    return [(start, min(size, total - start)) for start in range(0, total, size)]


def job_options(bias=False, requant=None, relu=False, sparse_skip=True):
    """``(OPTIONS, (QUANT_MULT, QUANT_SHIFT, QUANT_ZERO))`` for a job the device post-processes
    itself: ``requant`` is ``(multiplier, shift, zero_point)``, the multiplier an int or an
    array of one per column (then ``OPTIONS.CHANNEL_QUANT``, and QUANT_MULT keeps its reset
    value)."""
    options = 0 if sparse_skip else Option.NO_SKIP
    options |= (Option.BIAS if bias else 0) | (Option.RELU if relu else 0)
    quant = RESET_QUANT
    if requant is not None:
        column_mult = isinstance(requant[0], np.ndarray)
        options |= Option.REQUANT | (Option.CHANNEL_QUANT if column_mult else 0)
        quant = (RESET_QUANT[0] if column_mult else int(requant[0]), int(requant[1]),
                 int(requant[2]))
    return options, quant


def plan(geometry, m, k, n, bias=False, requant=None, relu=False, sparse_skip=True,
         max_transfer=DEFAULT_MAX_TRANSFER, channel_quant=True, k_size=None):
    """The jobs for ``C[m, n] = A[m, k] @ B[k, n]`` with these options on ``geometry``.

    ``requant`` is ``(multiplier, shift, zero_point)``: scalars go to the device's registers, a
    per-column multiplier array into the input packet (when the device has ``channel_quant``);
    a per-column shift makes the host requantize. ``k_size``: the largest K of a job (default
    ``MAX_K``; ``MAX_K2`` or ``MAX_K1`` for B that the group format keeps in fewer slots).
    Jobs are ordered m-chunk, n-chunk, k-chunk.
    """
    g = geometry
    column_mult = requant is not None and isinstance(requant[0], np.ndarray)
    column_shift = requant is not None and isinstance(requant[1], np.ndarray)
    k_size = g.max_k if k_size is None else k_size
    split_k = k > k_size
    on_device = not split_k and not column_shift and (channel_quant or not column_mult)
    if on_device:
        options, quant = job_options(bias, requant, relu, sparse_skip)
    else:
        options, quant = job_options(sparse_skip=sparse_skip)
    device_bias, device_requant = bool(options & Option.BIAS), bool(options & Option.REQUANT)
    device_mult = bool(options & Option.CHANNEL_QUANT)
    # N chunks are whole n-tiles where the build allows; K chunks as large as the build takes.
    n_size = g.max_n - g.max_n % g.cols if g.max_n >= g.cols else g.max_n
    # M chunks: whole m-tiles, as many as keep both packets within the DMA's limit.
    widest = min(n, n_size)
    deepest = min(k, k_size)
    fixed = g.input_beats(0, deepest, widest, device_bias, device_mult) * g.beat_bytes
    per_tile_in = g.input_beats(g.rows, deepest, 0, False) * g.beat_bytes
    per_tile_out = g.output_beats(g.rows, widest, device_requant) * g.beat_bytes
    tiles = min((max_transfer - fixed) // per_tile_in if max_transfer > fixed else 0,
                max_transfer // per_tile_out)
    if tiles < 1:
        raise ValueError(f"max_transfer: {max_transfer} bytes cannot hold one m-tile of a job "
                         f"with K={deepest}, N={widest} (needs {fixed + per_tile_in} input bytes "
                         f"and {per_tile_out} output bytes)")
    m_size = min(tiles * g.rows, m)
    jobs = []
    for m0, mc in _chunks(m, m_size):
        for n0, nc in _chunks(n, n_size):
            for k0, kc in _chunks(k, k_size):
                jobs.append(Job(m0, mc, k0, kc, n0, nc, options, quant,
                                g.input_beats(mc, kc, nc, device_bias, device_mult)
                                * g.beat_bytes,
                                g.output_beats(mc, nc, device_requant) * g.beat_bytes))
    return Plan(tuple(jobs), on_device, split_k)


class _WideView:
    """An array interface over ``array``'s memory with each run of ``nbytes`` bytes along its
    last axis as one ``V<nbytes>`` element. ``ndarray.view`` does this only for C-contiguous
    arrays before NumPy 1.23 (the PYNQ image has 1.21), whatever the other axes' strides."""

    def __init__(self, array, nbytes):
        interface = array.__array_interface__
        self.__array_interface__ = {
            "version": 3, "typestr": f"|V{nbytes}", "data": interface["data"],
            "shape": array.shape[:-1] + (array.shape[-1] * array.itemsize // nbytes,),
            "strides": array.strides[:-1] + (nbytes,)}
        self._source = array  # keeps the memory alive as long as the view


def wide_view(array, nbytes):
    """``array`` with each run of ``nbytes`` bytes along its last axis as one element (NumPy
    moves wide elements many times faster than bytes), or None when the last axis is not
    contiguous or not a whole number of runs. Writes to the view go to ``array``."""
    row = array.shape[-1] * array.itemsize
    if nbytes < array.itemsize or row % nbytes or not (array.strides[-1] == array.itemsize
                                                        or array.shape[-1] == 1):
        return None
    if array.size == 0:
        return np.empty(array.shape[:-1] + (row // nbytes,), f"V{nbytes}")
    try:
        return array.view(np.dtype(f"V{nbytes}"))
    except ValueError:  # NumPy < 1.23 and an array that is not C-contiguous
        return np.asarray(_WideView(array, nbytes))


def _fill(region, values, lanes):
    """``region`` (tiles, steps, vector bytes) <- ``values`` (steps, count): value ``t*lanes + i``
    of a step goes to byte ``i`` of tile ``t``'s vector; padding lanes and bytes become 0."""
    count = values.shape[1]
    full = count // lanes
    if full:
        target = region[:full, :, :lanes]
        source = values[:, :full * lanes]
        wide_source, wide_target = wide_view(source, lanes), wide_view(target, lanes)
        if wide_source is not None and wide_target is not None:
            wide_target[:, :, 0] = wide_source.T  # a vector at a time
        else:
            target[...] = source.reshape(-1, full, lanes).transpose(1, 0, 2)
    rest = count - full * lanes
    if rest:
        region[full, :, :rest] = values[:, full * lanes:]
        region[full, :, rest:] = 0
    if region.shape[2] > lanes:
        region[:, :, lanes:] = 0


def weight_bytes(geometry, k, n):
    """The size of B's part of an input packet, for a ``k x n`` B."""
    g = geometry
    return g.tiles(1, n)[1] * k * g.vector_beats(g.cols) * g.beat_bytes


def pack_weights(geometry, b, out=None):
    """B's part of an input packet ([n-tile][k][col], int8), into ``out`` or a new array."""
    g = geometry
    k, n = b.shape
    n_tiles = g.tiles(1, n)[1]
    vector = g.vector_beats(g.cols) * g.beat_bytes
    if out is None:
        out = np.empty(n_tiles * k * vector, np.int8)
    _fill(out.reshape(n_tiles, k, vector), b, g.cols)
    return out


def pack_groups(geometry, b):
    """B's part of an input packet in the group format (``OPTIONS.GROUPS``, see
    :mod:`sparsa.protocol`), as one int8 array."""
    return np.concatenate(group_vectors(geometry, b)[0]).view(np.int8)


def pack_into(geometry, buffer, a, b, bias=None, mult=None, b_packed=None, groups=False):
    """Write the input packet of ``a @ b (+ bias)`` (with per-column multipliers ``mult`` for
    ``OPTIONS.CHANNEL_QUANT``; B in the group format with ``groups``) into ``buffer`` (uint8,
    at least the packet's size; e.g. a DMA buffer); returns the packet's size in bytes.
    ``a``/``b`` may be views. ``b_packed``: B's part already packed (:func:`pack_weights`, or
    :func:`pack_groups` with ``groups``), copied instead of packing ``b``."""
    g = geometry
    m, k = a.shape
    n = b.shape[1]
    m_tiles, n_tiles = g.tiles(m, n)
    if groups and b_packed is None:
        b_packed = pack_groups(g, b)
    b_span = weight_bytes(g, k, n) if b_packed is None else b_packed.size
    size = g.input_beats(m, k, n, bias is not None, mult is not None,
                         b_span // g.beat_bytes) * g.beat_bytes
    if buffer.size < size:
        raise ValueError(f"buffer: expected at least {size} bytes, got {buffer.size}")
    out = buffer[:size].view(np.int8)
    position = 0
    for column_values in (bias, mult):
        if column_values is not None:
            vector = g.vector_beats(4 * g.cols) * g.beat_bytes
            padded = np.zeros(n_tiles * g.cols, "<i4")
            padded[:n] = column_values
            region = out[position:position + n_tiles * vector].reshape(n_tiles, vector)
            region[:, :4 * g.cols] = padded.view(np.int8).reshape(n_tiles, 4 * g.cols)
            region[:, 4 * g.cols:] = 0
            position += n_tiles * vector
    # B: [n-tile][k][col] (or the group format)
    if b_packed is not None:
        out[position:position + b_span] = b_packed
    else:
        pack_weights(g, b, out[position:position + b_span])
    position += b_span
    # A: [m-tile][k][row]: the columns of A's transpose.
    vector = g.vector_beats(g.rows) * g.beat_bytes
    span = m_tiles * k * vector
    _fill(out[position:position + span].reshape(m_tiles, k, vector), a.T, g.rows)
    return size


def output_rows(geometry, data, m, n, requant):
    """An output packet in ``data`` (uint8) as [m-tile][n-tile][row][padded row] of int32, or
    int8 when ``requant``."""
    g = geometry
    m_tiles, n_tiles = g.tiles(m, n)
    dtype = np.dtype("<i1") if requant else np.dtype("<i4")
    row_bytes = g.vector_beats(dtype.itemsize * g.cols) * g.beat_bytes
    size = m_tiles * n_tiles * g.rows * row_bytes
    if data.size < size:
        raise ValueError(f"data: expected {size} bytes of output packet, got {data.size}")
    return data[:size].view(dtype).reshape(m_tiles, n_tiles, g.rows, row_bytes // dtype.itemsize)


def unpack_into(geometry, data, out, requant, accumulate=False):
    """Read an output packet (uint8 ``data``) into ``out`` (m x n, int8 when ``requant`` else
    int32; may be a view); with ``accumulate`` add to ``out`` with int32 wrap instead."""
    g = geometry
    m, n = out.shape
    rows = output_rows(g, data, m, n, requant)
    m_tiles, n_tiles = rows.shape[:2]
    dtype = rows.dtype
    row_bytes = rows.shape[3] * dtype.itemsize
    tiles = rows[:, :, :, :g.cols].transpose(0, 2, 1, 3)  # [m-tile][row][n-tile][col]
    full_m, full_n = m // g.rows, n // g.cols
    if full_m and full_n:  # whole tiles: one strided copy, no temporary
        target = out[:full_m * g.rows, :full_n * g.cols].reshape(full_m, g.rows, full_n, g.cols)
        source = tiles[:full_m, :, :full_n]
        unit = dtype.itemsize * g.cols
        if not accumulate and out.strides[-1] == dtype.itemsize and row_bytes % unit == 0 \
                and target.strides[2] % unit == 0:
            # A tile row at a time, as one wide element.
            wide_view(target, unit)[..., 0] = wide_view(source, unit)[..., 0]
        else:
            _store(target, source, accumulate)
    for out_rows, out_cols, tile_m, tile_n in (
            (slice(full_m * g.rows, m), slice(0, n), slice(full_m, None), slice(None)),
            (slice(0, full_m * g.rows), slice(full_n * g.cols, n), slice(0, full_m),
             slice(full_n, None))):
        target = out[out_rows, out_cols]
        if target.size:  # the ragged edges
            source = tiles[tile_m, :, tile_n]
            source = source.reshape(source.shape[0] * g.rows, source.shape[2] * g.cols)
            _store(target, source[:target.shape[0], :target.shape[1]], accumulate)


def _store(target, source, accumulate):
    if accumulate:
        np.add(target, source, out=target)  # int32 wrap
    else:
        target[...] = source
