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
last one shorter when ``K % 4``). Group ``g`` of n-tile ``t`` takes ``c[g]`` *steps*; in step
``s`` column ``j`` carries one value, ``B[4g + lane, t*cols + j]``, its *lane* given by the
column's *code* (``CODE_BITS[c]`` bits) and the count:

====== ========== ======================================================================
``c``  code bits  lanes of steps 0, 1, ...
====== ========== ======================================================================
1      2          the code
2      3          the code's pair of :data:`CODE_PAIRS` (codes 6 and 7 read as 0)
3      2          every lane but the code, in rising order
4-7    0          0, 1, 2, 3
====== ========== ======================================================================

Each nonzero of ``B`` in the group appears in one step, in its column and with its lane; a
step's other values are 0. So ``c[g]`` is at least the largest count of nonzeros of one column
in the group (:func:`group_steps` makes it exactly that, and gives each column its nonzeros
and, to make up the count, its lowest zero lanes). Per n-tile ``t``:

1. the step counts: one vector of ``G`` bytes, ``c[g]`` (taken modulo 8; byte 0 below
   ``UNIFORM``), or, when every group has the same count, one beat whose byte 0 is
   ``UNIFORM | c`` (its other bytes are ignored);
2. per group ``g`` with ``c[g] > 0``: its *code beats*, then ``c[g]`` vectors of ``cols`` int8,
   the steps' values.

The codes of the n-tile's groups, group after group (within a group, column ``j``'s code in
bits ``j*b .. j*b+b-1``, ``b = CODE_BITS[c[g]]``), make one bit string, sent lowest bit first
in whole beats (the last one zero-padded): the code beats before a group's steps are those
that bring the beats of the string sent so far to ``ceil(bits / W)``, ``bits`` the string's
length up to and including this group's codes. (A group of 4 steps has no codes, and at 2:4 eight
columns' codes of eight groups fill three 64-bit beats, so 2:4 weights take about 0.6 of the
plain format's bytes.) The device drops the steps of a group past its k-steps, and past its
slots: the B memory keeps ``S`` slots per group, ``S`` = 1 with ``OPTIONS.STEPS_1``, 2 with
``OPTIONS.STEPS_2``, else 4 (:func:`slots_per_group`), so a job whose groups take at most one
step (1:4 weights) may have K up to ``MAX_K1`` = 4 x ``MAX_K``, at most two (2:4) up to
``MAX_K2`` = 2 x ``MAX_K``. A lane past K multiplies zero. A step's row ``i``, column ``j``
multiplies ``A[i, 4g + lane]``: the four A
values of a group travel through the array together and each PE picks one by the lane that
came down its column, so a group costs ``c[g]`` cycles instead of four (2:4 weights: 2, 1:4:
1, an all-zero group: 0).

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

``OPTIONS.GROUPS`` with ``NO_SKIP``, or on a build without ``FEATURES.GROUPS``, is ``BAD_OPTION``,
as are ``STEPS_2`` or ``STEPS_1`` without ``GROUPS`` and the two together. ``K_TOO_LARGE``: K
above ``MAX_K1`` with ``STEPS_1``, else above ``MAX_K2`` with ``STEPS_2``, else above ``MAX_K``.
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
VERSION = (1, 4)  # 1.1: OPTIONS.CHANNEL_QUANT; 1.2: OPTIONS.GROUPS; 1.3: its codes;
# 1.4: OPTIONS.STEPS_2 / STEPS_1 with MAX_K2 / MAX_K1
ADDRESS_WIDTH = 12  # a 4 KiB AXI4-Lite window
# The IP's vendor:library:name:version, as the Vivado packaging script names it and the PYNQ
# driver (sparsa.host.backends.SparsaIP.bindto) binds to it.
IP_VLNV = "sparsa.dev:sparsa:sparsa_accel:1.0"
# The block design's cells (bitstreams/build_overlay.tcl): PYNQ names an overlay's IP objects
# after them, so the accelerator is ``Overlay("sparsa.bit").sparsa``.
IP_CELL = "sparsa"
DMA_CELL = "axi_dma"
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
    STEPS_2 = 1 << 6  # with GROUPS: at most 2 steps per group kept, K up to MAX_K2
    STEPS_1 = 1 << 7  # with GROUPS: at most 1 step per group kept, K up to MAX_K1


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
    Register("MAX_K2", 0x2C, "ro", doc="largest K of a job with OPTIONS.STEPS_2"),
    Register("M", 0x30, "rw", 1, "rows of A and C"),
    Register("K", 0x34, "rw", 1, "columns of A, rows of B"),
    Register("N", 0x38, "rw", 1, "columns of B and C"),
    Register("OPTIONS", 0x3C, "rw", 0, "Option bits", fields=Option),
    Register("QUANT_MULT", 0x40, "rw", 1 << 30, "requantization multiplier (int32)"),
    Register("QUANT_SHIFT", 0x44, "rw", 0, "requantization right shift, 0..31"),
    Register("QUANT_ZERO", 0x48, "rw", 0, "output zero point (int32 register, -128..127)"),
    Register("MAX_K1", 0x4C, "ro", doc="largest K of a job with OPTIONS.STEPS_1"),
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
                 | Option.CHANNEL_QUANT | Option.GROUPS | Option.STEPS_2 | Option.STEPS_1)
GROUP = 4  # k-steps per group of the group format
STEPS_OPTIONS = {1: Option.STEPS_1, 2: Option.STEPS_2, 4: 0}  # a job's slots per group: its bit


def slots_per_group(options):
    """The B memory's slots per group of a job with these OPTIONS (1 with ``STEPS_1``, else 2
    with ``STEPS_2``, else 4): the steps of a group it keeps, and so its largest K,
    ``Geometry.max_k_for(slots)``."""
    return 1 if options & Option.STEPS_1 else 2 if options & Option.STEPS_2 else GROUP


def slots_for(steps):
    """The fewest slots per group (1, 2 or 4) that keep groups of ``steps`` steps (a count, or
    an array of them such as :func:`group_counts`'s: its largest)."""
    most = int(np.max(steps, initial=0))
    return 1 if most <= 1 else 2 if most <= 2 else GROUP
UNIFORM = 0x80  # in the first byte of an n-tile's counts: one count for all its groups
CODE_BITS = np.array([0, 2, 3, 2, 0, 0, 0, 0])  # bits of a column's code, by count (mod 8)
CODE_PAIRS = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))  # the lanes of a 2-step code
COUNTERS = ("CYCLES", "STALL_IN", "STALL_OUT", "MACS", "MACS_SKIPPED", "KSTEPS_SKIPPED")


DEFAULT_BUILD = {"rows": 8, "cols": 8, "stream_width": 64, "max_k": 256, "max_n": 256}
"""The default build's geometry (``sparsa.hw.Accelerator()``, the CLI's defaults)."""

MAX_DIMENSION = 32  # rows and columns of an array at most
MAX_DEPTH = 65536  # max_k and max_n at most


def check_dimensions(rows, cols):
    """Raise a clear error unless ``rows`` and ``cols`` are ints from 1 to
    :data:`MAX_DIMENSION`."""
    for name, value in (("rows", rows), ("cols", cols)):
        _check_int(name, value)
        if not 1 <= value <= MAX_DIMENSION:
            raise ValueError(f"{name} must be between 1 and {MAX_DIMENSION}, not {value}")


def _check_int(name, value):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")


def check_build(rows, cols, stream_width, max_k, max_n):
    """Raise ``ValueError`` (``TypeError`` for a value that is not an int) naming the first of a
    build's parameters outside its range: ``rows`` and ``cols`` 1 to :data:`MAX_DIMENSION`,
    ``stream_width`` one of :data:`STREAM_WIDTHS`, ``max_k`` a multiple of 4 (A is kept in
    groups of four k-steps) and ``max_n`` from 1 to :data:`MAX_DEPTH`. The gateware and every
    host backend check a build with this one function."""
    check_dimensions(rows, cols)
    for name, value in (("stream_width", stream_width), ("max_k", max_k), ("max_n", max_n)):
        _check_int(name, value)
    if stream_width not in STREAM_WIDTHS:
        raise ValueError(f"stream_width must be one of {STREAM_WIDTHS}, not {stream_width}")
    for name, value in (("max_k", max_k), ("max_n", max_n)):
        if not 1 <= value <= MAX_DEPTH:
            raise ValueError(f"{name} must be an int between 1 and {MAX_DEPTH}, not {value}")
    if max_k % GROUP:
        raise ValueError(f"max_k must be a multiple of {GROUP} (A is kept in groups of "
                         f"{GROUP} k-steps), not {max_k}")

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

    def max_k_for(self, slots):
        """The largest K of a job whose groups take ``slots`` slots of the B memory each (4:
        ``MAX_K``, 2: ``MAX_K2``, 1: ``MAX_K1``)."""
        return self.max_k * GROUP // slots

    def vector_beats(self, nbytes):
        return -(-nbytes // self.beat_bytes)

    @property
    def n_tiles_max(self):
        """n-tiles of the widest job (``max_n`` columns)."""
        return -(-self.max_n // self.cols)

    def tiles(self, m, n):
        return -(-m // self.rows), -(-n // self.cols)

    def column_beats(self, n, bias, channel_quant=False):
        """Beats of an input packet's column vectors: the bias and the multipliers."""
        return -(-n // self.cols) * self.vector_beats(4 * self.cols) * (bool(bias)
                                                                        + bool(channel_quant))

    def input_beats(self, m, k, n, bias, channel_quant=False, b_beats=None):
        """Beats of an input packet; ``b_beats``: B's (of the group format, see
        :func:`group_beats`), else those of the plain one."""
        m_tiles, n_tiles = self.tiles(m, n)
        if b_beats is None:
            b_beats = n_tiles * k * self.vector_beats(self.cols)
        return (self.column_beats(n, bias, channel_quant) + b_beats
                + m_tiles * k * self.vector_beats(self.rows))

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


def _lanes_of(count, code):
    """The lanes of steps 0-3 of a column with this code in a group of ``count`` steps (the
    module docstring's table; a step past the count takes its own number)."""
    if count == 1:
        return (code & 3, 1, 2, 3)
    if count == 2:
        return CODE_PAIRS[code if code < len(CODE_PAIRS) else 0] + (2, 3)
    if count == 3:
        return tuple(lane for lane in range(GROUP) if lane != code & 3) + (3,)
    return tuple(range(GROUP))


# CODE_LANES[count, code, step]: the lane (counts modulo 8, codes of up to 3 bits).
CODE_LANES = np.array([[_lanes_of(count, code) for code in range(8)] for count in range(8)],
                      np.uint8)


def _encode(count, pattern):
    """The code of a column whose nonzeros in a group are ``pattern`` (lane l at bit l) in a
    group of ``count`` steps: its lanes are its nonzeros and, to make up the count, its lowest
    zero lanes, in rising order."""
    nonzero = [lane for lane in range(GROUP) if pattern >> lane & 1]
    if len(nonzero) > count:
        return 0  # (never asked: the count is the densest column's)
    lanes = tuple(sorted(nonzero + [lane for lane in range(GROUP)
                                    if lane not in nonzero][:count - len(nonzero)]))
    if count == 1:
        return lanes[0]
    if count == 2:
        return CODE_PAIRS.index(lanes)
    if count == 3:
        return next(lane for lane in range(GROUP) if lane not in lanes)
    return 0


_ENCODE = np.array([[_encode(count, p) for p in range(1 << GROUP)] for count in range(GROUP + 1)],
                   np.uint8)


def group_steps(b, cols):
    """B (K x N) in the group format's steps, per n-tile of ``cols`` columns and group of four
    k-steps: ``(counts, codes, lanes, values)``, ``counts[t, g]`` the steps (the largest count
    of nonzeros of a column in the group), ``codes[t, g, j]`` column ``j``'s code, and
    ``lanes[t, g, s, j]``, ``values[t, g, s, j]`` its lane and value in step ``s`` (for
    ``s < 4``; only ``s < counts[t, g]`` are sent)."""
    b = np.asarray(b)
    k, n = b.shape
    groups, n_tiles = -(-k // GROUP), -(-n // cols)
    padded = np.zeros((groups * GROUP, n_tiles * cols), np.int8)
    padded[:k, :n] = b
    blocks = padded.reshape(groups, GROUP, n_tiles, cols)  # [g, lane, t, j]
    pattern = np.zeros((groups, n_tiles, cols), np.uint8)  # a column's nonzeros, lane l at bit l
    for lane in range(GROUP):
        pattern |= (blocks[:, lane] != 0).view(np.uint8) << lane
    counts = _NONZEROS[pattern].max(axis=2)  # [g, t]
    codes = _ENCODE[counts[:, :, None], pattern]  # [g, t, j]
    lanes = CODE_LANES[counts[:, :, None], codes]  # [g, t, j, step]
    by_lane = np.ascontiguousarray(blocks.transpose(0, 2, 3, 1)).reshape(-1)  # [g, t, j, lane]
    where = np.arange(pattern.size, dtype=np.intp)[:, None] * GROUP + lanes.reshape(-1, GROUP)
    values = by_lane[where].reshape(lanes.shape)
    return (counts.T, codes.transpose(1, 0, 2), lanes.transpose(1, 0, 3, 2),
            values.transpose(1, 0, 3, 2))


_NONZEROS = np.array([bin(p).count("1") for p in range(1 << GROUP)], np.uint8)


@dataclass
class _Layout:
    """Where the parts of B's group format go, from its counts (``[t, g]``, taken modulo 8) and
    whether each n-tile's header is a uniform count: in beats from B's first, ``tile_start[t]``,
    ``header[t]``; per group its code beats' first (``group_start[t, g]``), their number
    (``code_beats``), each column's code's width (``width``) and, in bits of the string of
    all code beats, where the group's codes begin (``code_bit``); ``code_rows``, every code
    beat in order."""

    counts: np.ndarray
    tile_start: np.ndarray
    header: np.ndarray
    group_start: np.ndarray
    code_beats: np.ndarray
    width: np.ndarray
    beats: int
    code_rows: np.ndarray
    code_bit: np.ndarray

    def code_places(self, cols):
        """``[t, g, j, i]``: bit ``i`` of column ``j``'s code in the string of all code beats
        (meant where ``i < width[t, g]``)."""
        return (self.code_bit[:, :, None, None] + np.arange(cols)[:, None]
                * self.width[:, :, None, None] + np.arange(3))


def _layout(geometry, counts, uniform):
    g = geometry
    counts = np.asarray(counts, np.int64) & 7
    groups = counts.shape[1]
    width = CODE_BITS[counts]
    ends = np.cumsum(width * g.cols, axis=1)  # the n-tile's code bits up to each group's
    code_end = -(-ends // g.stream_width)  # its code beats up to each group's steps
    code_beats = np.diff(code_end, axis=1, prepend=0)
    sizes = code_beats + counts * g.vector_beats(g.cols)
    header = np.where(uniform, 1, g.vector_beats(groups))
    tile_beats = header + sizes.sum(axis=1)
    tile_start = np.cumsum(tile_beats) - tile_beats
    group_start = (tile_start + header)[:, None] + np.cumsum(sizes, axis=1) - sizes
    each = code_beats.reshape(-1)
    code_rows = np.repeat(group_start.reshape(-1) - (np.cumsum(each) - each), each)
    code_rows += np.arange(code_rows.size)
    tile_codes = code_end[:, -1]
    code_base = (np.cumsum(tile_codes) - tile_codes) * g.stream_width  # each n-tile's first bit
    return _Layout(counts, tile_start, header, group_start, code_beats, width,
                   int(tile_beats.sum()), code_rows, code_base[:, None] + ends - width * g.cols)


def _uniform(counts):
    """Whether each n-tile's groups all have the same count (its header is then one beat)."""
    counts = np.asarray(counts)
    return (counts == counts[:, :1]).all(axis=1)


def group_vectors(geometry, b):
    """B's part of an input packet in the group format, as a list per n-tile of its bytes
    (uint8, whole beats), and the steps (:func:`group_steps`) they hold."""
    g = geometry
    steps = counts, codes, lanes, values = group_steps(b, g.cols)
    n_tiles, groups = counts.shape
    uniform = _uniform(counts)
    lay = _layout(g, counts, uniform)
    out = np.zeros((lay.beats, g.beat_bytes), np.uint8)
    flat = out.reshape(-1)
    # Headers: the counts, or one byte UNIFORM | count.
    many = np.flatnonzero(~uniform)
    flat[(lay.tile_start[many] * g.beat_bytes)[:, None] + np.arange(groups)] = counts[many]
    out[lay.tile_start[uniform], 0] = UNIFORM | counts[uniform, 0]
    # Codes: each n-tile's bit string, in its code beats.
    bits = np.zeros(lay.code_rows.size * g.stream_width, np.uint8)
    bit = np.arange(3)
    places = lay.code_places(g.cols)
    used = np.broadcast_to(bit < lay.width[:, :, None, None], places.shape)
    bits[places[used]] = ((codes[:, :, :, None] >> bit) & 1)[used]
    out[lay.code_rows] = np.packbits(bits, bitorder="little").reshape(-1, g.beat_bytes)
    # Values: a group's steps after its code beats, each a vector of cols bytes.
    vector_beats = g.vector_beats(g.cols)
    sent = np.arange(GROUP) < counts[:, :, None]  # [t, g, s]
    vectors = np.zeros((n_tiles, groups, GROUP, vector_beats * g.beat_bytes), np.uint8)
    vectors[..., :g.cols] = values.view(np.uint8)
    first = lay.group_start + lay.code_beats  # [t, g]
    start = first[:, :, None] + np.arange(GROUP) * vector_beats  # [t, g, s]
    rows = start[sent][:, None] + np.arange(vector_beats)
    out[rows.reshape(-1)] = vectors[sent].reshape(-1, g.beat_bytes)
    parts = np.split(flat, lay.tile_start[1:] * g.beat_bytes)
    return parts, steps


def group_beats(geometry, counts):
    """Beats of B in the group format with these step counts (``counts[t, g]``)."""
    return _layout(geometry, counts, _uniform(counts)).beats


def read_groups(geometry, data, k, n, slots=GROUP):
    """B (K x N, int8) from the group format at the start of ``data`` (uint8), and the bytes it
    took; raises ValueError when the data ends inside it. Counts are taken modulo 8, steps past
    a group's k-steps or past its ``slots`` are dropped and a lane past K multiplies zero, as on
    the device."""
    g = geometry
    n_tiles = -(-n // g.cols)
    groups = -(-k // GROUP)
    bb, vector_beats = g.beat_bytes, g.vector_beats(g.cols)
    data = np.asarray(data).view(np.uint8)
    # The headers, tile by tile (each tile's place follows from the counts before it).
    counts = np.zeros((n_tiles, groups), np.int64)
    uniform = np.zeros(n_tiles, bool)
    position = 0  # in beats
    for t in range(n_tiles):
        at = position * bb
        if at + bb > data.size:
            raise ValueError("the input packet ends inside B")
        uniform[t] = data[at] & UNIFORM
        if uniform[t]:
            counts[t] = data[at] & 7
        else:
            if at + g.vector_beats(groups) * bb > data.size:
                raise ValueError("the input packet ends inside B")
            counts[t] = data[at:at + groups] & 7
        position += _layout(g, counts[t:t + 1], uniform[t:t + 1]).beats
    if position * bb > data.size:
        raise ValueError("the input packet ends inside B")
    lay = _layout(g, counts, uniform)
    # The codes: each n-tile's code beats, as one bit string per n-tile.
    bits = np.unpackbits(data[:lay.beats * bb].reshape(-1, bb)[lay.code_rows], axis=1,
                         bitorder="little").reshape(-1)
    bits = np.concatenate([bits, np.zeros(3, np.uint8)])  # (places past a code of no bits)
    bit = np.arange(3)
    codes = ((bits[lay.code_places(g.cols)] & (bit < lay.width[:, :, None, None]))
             << bit).sum(axis=3)
    # (codes[t, g, j])
    # Every kept step: its tile, group and number, its values' offset.
    kept = np.minimum(slots, k - GROUP * np.arange(groups))  # each group's steps kept
    steps = np.minimum(lay.counts, kept).reshape(-1)
    where = np.repeat(np.arange(steps.size), steps)  # flat (t, g) of each step
    step = np.arange(where.size) - np.repeat(np.cumsum(steps) - steps, steps)
    head = (lay.group_start + lay.code_beats).reshape(-1)[where] + step * vector_beats
    columns = np.arange(g.cols)
    lanes = CODE_LANES[lay.counts.reshape(-1)[where, None],
                       codes.reshape(-1, g.cols)[where], step[:, None]]
    values = data[(head * bb)[:, None] + columns].view(np.int8)
    tile, group = np.divmod(where, groups)
    rows = GROUP * group[:, None] + lanes  # the k of each value
    b = np.zeros((groups * GROUP, n_tiles * g.cols), np.int8)
    b[rows, tile[:, None] * g.cols + columns] = values
    return b[:k, :n], position * bb


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
