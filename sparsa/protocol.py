"""The sparsa wire protocol: register map, stream formats and arithmetic, defined once.

Both the gateware (:mod:`sparsa.hw`) and the host (:mod:`sparsa.host`) import this module; it
needs nothing but NumPy, so a board's host can use it without Amaranth.

Registers (AXI4-Lite, 32-bit, byte addresses)
==============================================

See :data:`REGISTERS`. ID/capability registers are read-only and describe the build, so one
host runtime serves every generated configuration. ``CONTROL`` is write-only and self-clearing:
``START`` begins a job with the values of ``M``, ``K``, ``N``, ``OPTIONS`` and the quantization
registers at that moment (a START also abandons any job in progress and clears the counters);
``SOFT_RESET`` returns the datapath to idle and clears ``STATUS``, ``ERROR`` and the counters,
keeping the configuration registers. Counters are 32 bits and wrap modulo 2**32.

A job is checked at START. A rejected job (``ERROR`` is a :class:`Error` code, ``STATUS.ERROR``
set at once) consumes and discards its input packet up to TLAST and still closes its output
packet, so a DMA engine driving it never hangs. Output then is one all-zero beat with TLAST.

Streams (AXI4-Stream, TDATA ``W`` bits, byte 0 of a beat in TDATA[7:0])
======================================================================

A *vector* is a run of bytes zero-padded to a whole number of beats. An ``M x K @ K x N`` job on
a ``rows x cols`` array is tiled into ``ceil(M/rows)`` m-tiles and ``ceil(N/cols)`` n-tiles;
rows past ``M`` and columns past ``N`` are zero padding that the host never sees.

Input packet (one per job, TLAST on its final beat):

1. bias, when ``OPTIONS.BIAS``: per n-tile ``t``, one vector of ``cols`` int32 (little-endian),
   ``bias[t*cols + j]``;
2. per-column requantization multipliers, when ``OPTIONS.CHANNEL_QUANT``: per n-tile ``t``, one
   vector of ``cols`` int32 (little-endian), ``mult[t*cols + j]``;
3. B, kept on chip for the whole job: per n-tile ``t``, per ``k < K``, one vector of ``cols``
   int8, ``B[k, t*cols + j]`` (or, with ``OPTIONS.GROUPS``, in the group format below);
4. A, streamed: per m-tile ``t``, per ``k < K``, one vector of ``rows`` int8, ``A[t*rows + i, k]``.

TLAST on any other beat ends the job with ``TLAST_EARLY`` (the output packet is closed after the
rows already under way); a final beat without TLAST sets ``TLAST_MISSING``, and the device
discards beats up to the next TLAST (the results are still complete).

Group format of B (``OPTIONS.GROUPS``; builds with ``FEATURES.GROUPS``)
-------------------------------------------------------------------

K is cut into ``G = ceil(K/4)`` groups of four k-steps (group ``g``: ``k = 4g .. 4g+3``, the
last one shorter when ``K % 4``). Per n-tile ``t``:

1. the step counts: one vector of ``G`` bytes, ``c[g]`` (0 to the group's k-steps);
2. per group ``g`` with ``c[g] > 0``: one *lane vector* of ``cols`` bytes, byte ``j`` holding
   column ``j``'s lane (``k - 4g``) for each of the group's steps, step ``s`` in bits
   ``2s+1:2s``; then ``c[g]`` vectors of ``cols`` int8, step ``s``'s value for column ``j`` being
   ``B[4g + lane, t*cols + j]``.

Each nonzero of ``B`` in the group appears in exactly one step, in its column and with its lane;
a step's other values are 0 (their lanes any). So ``c[g]`` is at least the largest count of
nonzeros of one column in the group (:func:`group_steps` makes it exactly that). The device
takes counts modulo 8 and drops the steps of a group past its k-steps; a lane past K
multiplies zero. A step's row ``i``,
column ``j`` multiplies ``A[i, 4g + lane]``: the four A values of a group travel through the
array together and each PE picks one by the lane that came down its column, so a group costs
``c[g]`` cycles instead of four (2:4 weights: 2, 1:4: 1, an all-zero group: 0).

Output packet (TLAST on its final beat): per m-tile, per n-tile, per tile row ``i < rows``, one
vector of ``cols`` results: int32 little-endian, or int8 when ``OPTIONS.REQUANT``.

Sparse-skip
===========

Zero work is skipped at two levels, with no mask in the stream: the device notes, as operands
arrive, which A vectors (a k-step of an m-tile) and which B vectors (a k-step of an n-tile) are
all zero.

- In a PE, a zero operand leaves the multiplier's operand registers and the accumulator
  untouched (their clock enables drop).
- In the schedule, a k-step whose A or B vector is all zero is not issued to the array for that
  output tile, so it costs no cycle (the tile's k-steps are taken from its nonzero mask, lowest
  first, one per cycle). With ``OPTIONS.GROUPS`` the same holds for a step whose values are all
  zero and for every step of a group whose four A vectors are all zero. A tile whose k-steps
  are all skipped still yields its (bias-only) results through one zero k-step. ``OPTIONS.NO_SKIP`` issues every
  k-step; results are identical, only cycles and ``MACS``/``KSTEPS_SKIPPED`` differ.

``OPTIONS.GROUPS`` with ``NO_SKIP``, or on a build without ``FEATURES.GROUPS``, is ``BAD_OPTION``.
``KSTEPS_SKIPPED`` counts, per output tile, ``K`` less the steps issued (a group's steps stand in
for its four k-steps).

``MACS_SKIPPED`` counts the products ``(i, j, k)``, ``i < M``, ``j < N``, ``k < K``, with
``A[i,k] == 0`` or ``B[k,j] == 0`` (those the PEs did not accumulate, whether or not their
k-step was issued); ``MACS`` counts the real products of the issued k-steps, so with skipping on
``MACS + (products of skipped k-steps) == M*K*N``.

Arithmetic
==========

Products are INT8 x INT8, summed in INT32 with two's-complement wrap. Per output, in order:

1. ``OPTIONS.BIAS``: ``x = wrap32(acc + bias[col])``.
2. ``OPTIONS.REQUANT`` (the gemmlowp/TFLite fixed-point scheme), with ``mult`` = ``QUANT_MULT``
   (int32), or ``mult[col]`` from the input packet when ``OPTIONS.CHANNEL_QUANT`` (per-channel
   weight scales; only with ``REQUANT``, else ``BAD_OPTION``), ``shift`` = ``QUANT_SHIFT``
   (0..31, shared by all columns), ``zp`` = ``QUANT_ZERO`` (-128..127):

   - saturating rounding doubling high multiply: if ``x == mult == -2**31`` the result is
     ``2**31 - 1``; otherwise with ``p = x * mult`` (exact, 64-bit) and
     ``nudge = 2**30 if p >= 0 else 1 - 2**30``, the result is ``(p + nudge) / 2**31`` truncated
     toward zero;
   - rounding divide by ``2**shift``: with ``mask = 2**shift - 1``, ``r = h & mask``,
     ``threshold = (mask >> 1) + (1 if h < 0 else 0)``, the result is
     ``(h >> shift) + (1 if r > threshold else 0)`` (``>>`` arithmetic), i.e. round half away
     from zero;
   - add ``zp``, then saturate to [-128, 127].

3. ``OPTIONS.RELU``: clamp below at ``zp`` for requantized outputs (the real value 0), at 0 for
   int32 outputs.
"""

from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

MAGIC = 0x53505253  # "SPRS"
VERSION = (1, 2)  # 1.1: OPTIONS.CHANNEL_QUANT; 1.2: OPTIONS.GROUPS
ADDRESS_WIDTH = 12  # a 4 KiB AXI4-Lite window
# The IP's vendor:library:name:version, as the Vivado packaging script names it and the PYNQ
# driver (sparsa.host.board.SparsaIP.bindto) binds to it.
IP_VLNV = "sparsa.dev:sparsa:sparsa_accel:1.0"
STREAM_WIDTHS = (8, 16, 32, 64, 128, 256, 512, 1024)  # TDATA widths a build may have


class Error(IntEnum):
    NONE = 0
    ZERO_DIMENSION = 1
    K_TOO_LARGE = 2
    N_TOO_LARGE = 3
    BAD_OPTION = 4
    BAD_QUANT = 5
    TLAST_EARLY = 6
    TLAST_MISSING = 7


class Option(IntEnum):
    BIAS = 1 << 0
    REQUANT = 1 << 1
    RELU = 1 << 2
    NO_SKIP = 1 << 3  # issue every k-step, zero or not (for A/B comparison in one build)
    CHANNEL_QUANT = 1 << 4  # per-column requantization multipliers in the input packet
    GROUPS = 1 << 5  # B in the group format (see the module docstring)


class Feature(IntEnum):
    BIAS = 1 << 0
    REQUANT = 1 << 1
    RELU = 1 << 2
    SPARSE_SKIP = 1 << 3
    CHANNEL_QUANT = 1 << 4
    GROUPS = 1 << 5


def features(sparse_skip=True):
    """The FEATURES bits a build reports: everything, less SPARSE_SKIP and GROUPS (the group
    format of B is part of sparse-skip) for a build without it (``Accelerator(sparse_skip=False)``)."""
    bits = Feature.BIAS | Feature.REQUANT | Feature.RELU | Feature.CHANNEL_QUANT
    return int(bits | (Feature.SPARSE_SKIP if sparse_skip else 0)
               | (Feature.GROUPS if sparse_skip else 0))


class Control(IntEnum):
    START = 1 << 0
    SOFT_RESET = 1 << 1


class Status(IntEnum):
    BUSY = 1 << 0
    DONE = 1 << 1
    ERROR = 1 << 2


@dataclass(frozen=True)
class Register:
    name: str
    address: int
    access: str  # "ro", "rw" or "wo"
    reset: int = 0
    doc: str = ""
    fields: type | None = field(default=None, compare=False)


REGISTERS = (
    Register("ID", 0x00, "ro", MAGIC, "magic word 'SPRS'"),
    Register("VERSION", 0x04, "ro", VERSION[0] << 16 | VERSION[1], "protocol version major.minor"),
    Register("ROWS", 0x08, "ro", doc="array rows"),
    Register("COLS", 0x0C, "ro", doc="array columns"),
    Register("STREAM_WIDTH", 0x10, "ro", doc="TDATA width in bits, both streams"),
    Register("MAX_K", 0x14, "ro", doc="largest K a job may have"),
    Register("MAX_N", 0x18, "ro", doc="largest N a job may have"),
    Register("FEATURES", 0x1C, "ro", doc="Feature bits", fields=Feature),
    Register("CONTROL", 0x20, "wo", doc="Control bits, self-clearing", fields=Control),
    Register("STATUS", 0x24, "ro", doc="Status bits", fields=Status),
    Register("ERROR", 0x28, "ro", doc="Error code of the current/last job", fields=Error),
    Register("M", 0x30, "rw", 1, "rows of A and C"),
    Register("K", 0x34, "rw", 1, "columns of A, rows of B"),
    Register("N", 0x38, "rw", 1, "columns of B and C"),
    Register("OPTIONS", 0x3C, "rw", 0, "Option bits", fields=Option),
    Register("QUANT_MULT", 0x40, "rw", 1 << 30, "requantization multiplier (int32)"),
    Register("QUANT_SHIFT", 0x44, "rw", 0, "requantization right shift, 0..31"),
    Register("QUANT_ZERO", 0x48, "rw", 0, "output zero point (int32 register, -128..127)"),
    Register("CYCLES", 0x50, "ro", doc="cycles from START to the last output beat"),
    Register("STALL_IN", 0x54, "ro", doc="cycles the array waited for operands"),
    Register("STALL_OUT", 0x58, "ro", doc="cycles the array waited for room in the output"),
    Register("MACS", 0x5C, "ro", doc="multiply-accumulate slots issued on real (unpadded) data"),
    Register("MACS_SKIPPED", 0x60, "ro",
             doc="products (i, j, k) of the job with A[i,k] == 0 or B[k,j] == 0"),
    Register("KSTEPS_SKIPPED", 0x64, "ro", doc="k-steps of output tiles not issued"),
)

REGISTER = {register.name: register for register in REGISTERS}
# The quantization registers' reset values: what a job without requantization leaves in place.
RESET_QUANT = tuple(REGISTER[name].reset for name in ("QUANT_MULT", "QUANT_SHIFT", "QUANT_ZERO"))
# Other bits, or CHANNEL_QUANT without REQUANT: BAD_OPTION.
KNOWN_OPTIONS = (Option.BIAS | Option.REQUANT | Option.RELU | Option.NO_SKIP
                 | Option.CHANNEL_QUANT | Option.GROUPS)
GROUP = 4  # k-steps per group of the group format
LANE_BITS = 2  # bits of a lane in a lane vector
COUNTERS = ("CYCLES", "STALL_IN", "STALL_OUT", "MACS", "MACS_SKIPPED", "KSTEPS_SKIPPED")


DEFAULT_BUILD = {"rows": 8, "cols": 8, "stream_width": 64, "max_k": 256, "max_n": 256}
"""The default build's geometry (``sparsa.hw.Accelerator()``, the CLI's defaults)."""

DSP_STYLES = ("generic", "ecp5")
"""How a build writes its multipliers and operand memories (``dsp=``; see :mod:`sparsa.hw.dsp`)."""


@dataclass(frozen=True)
class Geometry:
    """What a host needs to know of a build to lay out its streams."""

    rows: int
    cols: int
    stream_width: int  # bits
    max_k: int
    max_n: int

    @property
    def beat_bytes(self):
        return self.stream_width // 8

    def vector_beats(self, nbytes):
        return -(-nbytes // self.beat_bytes)

    @property
    def n_tiles_max(self):
        """n-tiles of the widest job (``max_n`` columns)."""
        return -(-self.max_n // self.cols)

    def tiles(self, m, n):
        return -(-m // self.rows), -(-n // self.cols)

    def input_beats(self, m, k, n, bias, channel_quant=False, b_beats=None):
        """Beats of an input packet; ``b_beats``: B's (of the group format, see
        :func:`group_beats`), else those of the plain one."""
        m_tiles, n_tiles = self.tiles(m, n)
        if b_beats is None:
            b_beats = n_tiles * k * self.vector_beats(self.cols)
        return (n_tiles * self.vector_beats(4 * self.cols) * (bool(bias) + bool(channel_quant))
                + b_beats + m_tiles * k * self.vector_beats(self.rows))

    def output_beats(self, m, n, requant):
        m_tiles, n_tiles = self.tiles(m, n)
        width = 1 if requant else 4
        return m_tiles * n_tiles * self.rows * self.vector_beats(width * self.cols)


def _vectors(values, beat_bytes):
    """Rows of ``values`` (any dtype) as little-endian bytes, each padded to whole beats."""
    raw = np.ascontiguousarray(values.astype(values.dtype.newbyteorder("<"))).view(np.uint8)
    raw = raw.reshape(values.shape[0], -1)
    pad = -raw.shape[1] % beat_bytes
    return np.pad(raw, ((0, 0), (0, pad))) if pad else raw


def group_counts(b, cols):
    """The group format's step counts of B (K x N): ``counts[t, g]``, the largest count of
    nonzeros of one of n-tile ``t``'s columns in group ``g``."""
    b = np.asarray(b)
    k, n = b.shape
    groups, n_tiles = -(-k // GROUP), -(-n // cols)
    nonzero = np.zeros((groups * GROUP, n_tiles * cols), np.uint8)
    np.not_equal(b, 0, out=nonzero[:k, :n].view(bool))
    per_column = nonzero.reshape(groups, GROUP, n_tiles, cols).sum(axis=1, dtype=np.uint8)
    return per_column.max(axis=2).T


def group_steps(b, cols):
    """B (K x N) in the group format's steps, per n-tile of ``cols`` columns and group of four
    k-steps: ``(counts, lanes, values)``, ``counts[t, g]`` the steps (the largest count of
    nonzeros of a column in the group), ``lanes[t, g, s, j]`` and ``values[t, g, s, j]`` (for
    ``s < 4``; only ``s < counts[t, g]`` are sent). A column's nonzeros come first, lowest lane
    first; its remaining steps take its zero lanes, with the value 0."""
    b = np.asarray(b)
    k, n = b.shape
    groups, n_tiles = -(-k // GROUP), -(-n // cols)
    padded = np.zeros((groups * GROUP, n_tiles * cols), np.int8)
    padded[:k, :n] = b
    blocks = padded.reshape(groups, GROUP, n_tiles, cols)  # [g, lane, t, j]
    # Each column's pattern of nonzeros in the group (4 bits, lane l at bit l) picks its lanes
    # in step order from a table.
    pattern = np.zeros((groups, n_tiles, cols), np.uint8)
    for lane in range(GROUP):
        pattern |= (blocks[:, lane] != 0).view(np.uint8) << lane
    lanes = _STEP_LANES[pattern]  # [g, t, j, step]
    by_lane = np.ascontiguousarray(blocks.transpose(0, 2, 3, 1)).reshape(-1)  # [g, t, j, lane]
    where = np.arange(pattern.size, dtype=np.intp)[:, None] * GROUP + lanes.reshape(-1, GROUP)
    values = by_lane[where].reshape(lanes.shape)
    counts = _NONZEROS[pattern].max(axis=2).T
    return counts, lanes.transpose(1, 0, 3, 2), values.transpose(1, 0, 3, 2)


# For each pattern of nonzeros of a column in a group (lane l at bit l): its lanes in step
# order (the nonzeros, then the zeros, each lowest first), and its count of nonzeros.
_STEP_LANES = np.array([[lane for lane in range(GROUP) if p >> lane & 1]
                        + [lane for lane in range(GROUP) if not p >> lane & 1]
                        for p in range(1 << GROUP)], np.uint8)
_NONZEROS = np.array([bin(p).count("1") for p in range(1 << GROUP)], np.uint8)


def group_vectors(geometry, b):
    """B's part of an input packet in the group format, as a list per n-tile of its bytes
    (uint8, whole beats), and the steps (:func:`group_steps`) they hold."""
    g = geometry
    counts, lanes, values = group_steps(b, g.cols)
    n_tiles, groups = counts.shape
    # Per group: the lane vector (byte j: column j's four lanes), then the four steps' values;
    # a group sends its lane vector and its first counts[t, g] steps.
    lane_bytes = (lanes.astype(np.uint8) << (LANE_BITS * np.arange(GROUP, dtype=np.uint8)
                                             )[:, None]).sum(axis=2, dtype=np.uint8)
    vectors = np.concatenate([lane_bytes[:, :, None, :], values.view(np.uint8)], axis=2)
    pad = g.vector_beats(g.cols) * g.beat_bytes - g.cols
    vectors = np.pad(vectors, ((0, 0), (0, 0), (0, 0), (0, pad)))  # [t, g, 1 + 4, bytes]
    sent = np.arange(GROUP + 1) <= counts[:, :, None]
    sent &= (counts > 0)[:, :, None]
    header = np.zeros((n_tiles, g.vector_beats(groups) * g.beat_bytes), np.uint8)
    header[:, :groups] = counts
    chosen = np.split(vectors[sent].reshape(-1), np.cumsum(sent.sum(axis=(1, 2)))[:-1]
                      * vectors.shape[3])
    parts = [np.concatenate([header[t], chosen[t]]) for t in range(n_tiles)]
    return parts, (counts, lanes, values)


def group_beats(geometry, counts):
    """Beats of B in the group format with these step counts (``counts[t, g]``)."""
    g = geometry
    counts = np.asarray(counts, np.int64)
    n_tiles, groups = counts.shape
    vectors = int((counts + (counts > 0)).sum())
    return n_tiles * g.vector_beats(groups) + vectors * g.vector_beats(g.cols)


def read_groups(geometry, data, k, n):
    """B (K x N) from the group format at the start of ``data`` (uint8), and the bytes it took;
    raises ValueError when the data ends inside it. Counts are taken modulo 8, steps past a
    group's k-steps are dropped and a lane past K multiplies zero, as on the device. B is int8
    unless a column's steps repeat a lane (a packet :func:`group_vectors` never makes), whose
    values then add up: int16."""
    g = geometry
    n_tiles = -(-n // g.cols)
    groups = -(-k // GROUP)
    vector = g.vector_beats(g.cols) * g.beat_bytes
    header = g.vector_beats(groups) * g.beat_bytes
    data = np.asarray(data).view(np.uint8)
    kept = np.minimum(GROUP, k - GROUP * np.arange(groups))  # each group's k-steps
    # The headers, tile by tile (each tile's place follows from the counts before it).
    counts = np.zeros((n_tiles, groups), np.int64)
    starts = np.zeros(n_tiles, np.int64)  # each tile's first vector after its header
    position = 0
    for t in range(n_tiles):
        if position + header > data.size:
            raise ValueError("the input packet ends inside B")
        counts[t] = data[position:position + header][:groups] & 7
        starts[t] = position + header
        position = starts[t] + int((counts[t] + (counts[t] > 0)).sum()) * vector
    if position > data.size:
        raise ValueError("the input packet ends inside B")
    # Every kept step: its tile, group and number, its lane vector's and its values' offsets.
    sizes = counts + (counts > 0)
    heads = starts[:, None] + (np.cumsum(sizes, axis=1) - sizes) * vector  # [t, g]
    steps = np.minimum(counts, kept).reshape(-1)
    where = np.repeat(np.arange(steps.size), steps)  # flat (t, g) of each step
    step = np.arange(where.size) - np.repeat(np.cumsum(steps) - steps, steps)
    head = heads.reshape(-1)[where]
    columns = np.arange(g.cols)
    lanes = (data[head[:, None] + columns] >> (LANE_BITS * step[:, None]).astype(np.uint8)) & 3
    values = data[(head + (1 + step) * vector)[:, None] + columns].view(np.int8)
    tile, group = np.divmod(where, groups)
    rows = GROUP * group[:, None] + lanes  # the k of each value
    cols = tile[:, None] * g.cols + columns
    size = groups * GROUP * n_tiles * g.cols
    flat = (rows * (n_tiles * g.cols) + cols).reshape(-1)
    taken = np.bincount(flat, minlength=size)
    b = np.bincount(flat, values.reshape(-1).astype(np.float64), minlength=size)
    b = b.reshape(groups * GROUP, n_tiles * g.cols)[:k, :n]
    # A column's steps that repeat a lane add up (more than int8 holds).
    return b.astype(np.int16 if taken.max(initial=0) > 1 else np.int8), position


def pack_input(geometry, a, b, bias=None, mult=None, groups=False):
    """The input packet for ``a @ b (+ bias)`` (with per-column multipliers ``mult`` for
    ``OPTIONS.CHANNEL_QUANT``; B in the group format with ``groups``) as a flat uint8 array
    (see the module docstring)."""
    g = geometry
    m, k = a.shape
    n = b.shape[1]
    m_tiles, n_tiles = g.tiles(m, n)
    a_pad = np.zeros((m_tiles * g.rows, k), np.int8)
    a_pad[:m] = a
    b_pad = np.zeros((k, n_tiles * g.cols), np.int8)
    b_pad[:, :n] = b
    parts = []
    for column_values in (bias, mult):
        if column_values is not None:
            padded = np.zeros(n_tiles * g.cols, np.int32)
            padded[:n] = column_values
            parts.append(_vectors(padded.reshape(n_tiles, g.cols), g.beat_bytes))
    # B: [n-tile][k][col] (or the group format); A: [m-tile][k][row].
    if groups:
        parts.extend(group_vectors(g, b)[0])
    else:
        parts.append(_vectors(b_pad.reshape(k, n_tiles, g.cols).transpose(1, 0, 2)
                              .reshape(n_tiles * k, g.cols), g.beat_bytes))
    parts.append(_vectors(a_pad.reshape(m_tiles, g.rows, k).transpose(0, 2, 1)
                          .reshape(m_tiles * k, g.rows), g.beat_bytes))
    return np.concatenate([part.reshape(-1) for part in parts])


def unpack_output(geometry, data, m, n, requant):
    """C (M x N, int32 or int8 when ``requant``) from an output packet's bytes."""
    g = geometry
    m_tiles, n_tiles = g.tiles(m, n)
    dtype = np.dtype("<i1") if requant else np.dtype("<i4")
    row_bytes = g.vector_beats(dtype.itemsize * g.cols) * g.beat_bytes
    data = np.frombuffer(bytes(data) if not isinstance(data, np.ndarray) else data, np.uint8)
    expected = m_tiles * n_tiles * g.rows * row_bytes
    if data.size != expected:
        raise ValueError(f"output packet has {data.size} bytes, expected {expected}")
    rows = data.reshape(-1, row_bytes)[:, :dtype.itemsize * g.cols].copy().view(dtype)
    tiles = rows.reshape(m_tiles, n_tiles, g.rows, g.cols).transpose(0, 2, 1, 3)
    return tiles.reshape(m_tiles * g.rows, n_tiles * g.cols)[:m, :n].astype(dtype.newbyteorder("="))
