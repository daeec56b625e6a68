"""One processing element of the output-stationary systolic array.

Dataflow: the PE owns one output C[i, j]. Each cycle an A operand arrives from the left and a B
operand from above; the PE multiplies them (signed INT8 x INT8 -> INT16) and adds the product to
its INT32 accumulator, which wraps modulo 2**32 exactly as NumPy's int32 arithmetic does. The
multiplier has registers of its own on both sides (operands in, product out twice), so neither
the 32-bit add nor the route to a DSP block shares a cycle with the multiplier (on an ECP5 the
multiply and add in one cycle close at about 92 MHz, the multiply between shared registers at
about 86). Ahead of them the PE registers the operands it picked (the A value of the k-step's
group at the lane that came down its column, B, and their zero flags), so the multiplexer and
the route into a DSP block's input registers are not in one cycle either.

A PE takes the k-step from the west (``west``, a :data:`KSTEP`: the A operand and the control
flags that travel with it) and its B operand from the north (``north``, a :data:`B_OPERAND`),
and passes both on through registers, ``east`` and ``south``, one cycle later. Built for an
ECP5 (``dsp="ecp5"``, see :mod:`.dsp`), the operand registers and the first product register
are those inside the MULT18X18D.

Control flags (valid with the A operand):

- ``valid``: this cycle carries a k-step.
- ``first``: the first k-step of a tile; the accumulator restarts from zero instead of adding.
- ``last``: the last k-step of a tile; the finished sum is latched into ``result``, where it stays
  until the next tile's last k-step, so the next tile can accumulate while this one is read.

Sparse-skip hook: ``zero`` is high when either operand is zero, from ``west.a_zero`` and
``north.zero``: flags that travel with the operands (registered on like the operands),
worked out once where the operands enter the array, so the
multiplier's clock enable is one gate of registers rather than two 8-bit compares. A flag may
be low for a zero operand (that only forgoes the gating; the product is then a true zero), but
must never be high for an operand that is not zero. The multiplier's operand
registers then hold (as they do when ``valid`` is low), so the multiplier does not switch, and
the accumulator's clock enable is dropped (only a ``first`` k-step still clears it), so a zero
operand costs no register update; the product would have been zero, so the sum is unchanged.

:class:`PackedPair` is two PEs of one column in one multiplier: both take the same B operand
and lane, so ``(a0 * 2**16 + a1) * b`` (a 25 x 8-bit product, one DSP48E1) holds both INT8
products.

Latency: ``acc`` and ``result`` hold a k-step's sum :data:`LATENCY` (5) cycles after its
operands are presented; ``east`` and ``south`` are one cycle behind ``west`` and ``north``.
"""

import operator
from functools import partial

from amaranth import Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from sparsa.protocol import GROUP

from .dsp import dsp_style, mult18x18d
from .pipeline import LOCAL, delay

OPERAND = signed(8)
ACCUMULATOR = signed(32)
LANES = GROUP  # A values per k-step: a group's four (see sparsa.protocol, the group format)
# A k-step as it travels east along a row, from PE to PE: the group's A values with their zero
# flags and the control flags (valid with A).
KSTEP = data.StructLayout({"a": data.ArrayLayout(OPERAND, LANES), "a_zero": LANES,
                           "valid": 1, "first": 1, "last": 1})
# A B operand as it travels south down a column, with its zero flag and the lane of the A
# values it multiplies.
B_OPERAND = data.StructLayout({"b": OPERAND, "zero": 1, "lane": range(LANES)})
MULTIPLIER_STAGES = 4  # picked operands, operand registers, product, product again
LATENCY = MULTIPLIER_STAGES + 1  # cycles from a k-step's operands to the sum in ``acc``


def _flags(m, depth, name, valid, *flags):
    """The k-step's flags through ``depth`` registers (named ``name`` and a stage number):
    ``valid`` with a reset, the others without (they are read only with ``valid``)."""
    valid = delay(m, valid, depth, f"{name}valid", attrs=LOCAL)
    packed = delay(m, Cat(*flags), depth, f"{name}flags", reset_less=True, attrs=LOCAL)
    out, low = [valid], 0
    for flag in flags:
        width = len(flag)
        out.append(packed[low:low + width])
        low += width
    return out


def _picked(m, west, a, b, zeros):
    """Stage 1 of a k-step: the operands registered as the PE picked them, ``a`` (the A value
    at the lane that came down the column, see :func:`_pick`, or a pair's two packed) and
    ``b``, with the k-step's flags from ``west`` and the zero flags ``zeros``. The registers
    are the PE's own (:data:`.LOCAL` for the flags, which are the same along an
    anti-diagonal), so they can sit beside its multiplier, whose input registers they feed.
    Returns ``(a, b, flags)``, ``flags`` being ``(valid, first, last, zeros)`` registered:
    :func:`_flags` carries them on to the accumulator."""
    flags = _flags(m, 1, "picked_", west.valid, west.first, west.last, zeros)
    a = delay(m, a, 1, "a_picked", reset_less=True)
    b = delay(m, b, 1, "b_picked", reset_less=True)
    return a, b, flags


def _gated_product(m, valid, operands, skip, multiply):
    """Stages 2-4 of a k-step: the operand registers, the product, the product again.

    - The operand registers (``operands``: (register, value) pairs) load only for a valid
      k-step that is not skipped (``skip``: every product it would make is zero), so a
      skipped or empty k-step leaves the multiplier's inputs, and the DSP block, still.
    - The product of such a k-step is stale, so the second product register clears it: the
      accumulator adds 0, as it must where ``first`` or ``last`` meets a zero operand.
    - The operand registers are the multiplier's alone (the operands travel on through
      registers of their own, see :func:`_pass_on`). On an FPGA whose DSP blocks sit in rows
      apart from the logic (ECP5), they and the first product register can then be placed
      beside the multiplier and the second product register beside the accumulator, so no
      path has both the multiplier and a long route in it.

    ``multiply(*registers)`` is the multiplier."""
    with m.If(valid & ~skip):
        m.d.sync += [register.eq(value) for register, value in operands]
    raw = delay(m, multiply(*(register for register, _ in operands)), 1, "product_raw",
                reset_less=True)
    return _cleared(m, raw, skip)


def _cleared(m, raw, skip):
    """Stage 4: the product registered again, 0 for a skipped k-step (whose operand registers
    held, so ``raw`` is stale)."""
    skip2 = delay(m, skip, 2, "skip", reset_less=True)
    product = Signal.like(raw, name="product", reset_less=True)
    m.d.sync += product.eq(Mux(skip2, 0, raw))
    return product


def _pick(m, west, lane, name="a"):
    """The A value a PE multiplies and its zero flag: lane ``lane`` of the k-step's group (a
    4:1 byte multiplexer, registered in :func:`_picked`)."""
    value = Signal(OPERAND, name=f"{name}_pick")
    zero = Signal(name=f"{name}_zero_pick")
    m.d.comb += [value.eq(west.a[lane]), zero.eq(west.a_zero.bit_select(lane, 1))]
    return value, zero


def _data(m, shape, name, port=None):
    """A data register with no reset (the reset reaches only a PE's ``valid`` flags: the
    accumulator starts from ``first``, the result is read after ``last``, and operands and
    flags travel with ``valid``), driving ``port`` when given."""
    register = Signal(shape, name=name, reset_less=True)
    if port is not None:
        m.d.comb += port.eq(register)
    return register


def _pass_on(m, a_lanes, north, south, depth=1):
    """Register the k-steps (``a_lanes``: (west, east) per row) on to the next PEs east, and
    the B operand (``north``) on to ``south`` through ``depth`` registers, field by field:
    only ``valid`` with a reset, and the k-step's flags, which are the same in every PE of an
    anti-diagonal, as :data:`.LOCAL` registers."""
    def register(value, name, attrs=None, depth=1):
        return delay(m, value, depth, name, reset_less=True, attrs=attrs)
    for row, (west, east) in enumerate(a_lanes):
        m.d.comb += [
            east.valid.eq(delay(m, west.valid, 1, f"valid_out{row}_", attrs=LOCAL)),
            east.a.eq(register(west.a, f"a_out{row}_")),
            east.a_zero.eq(register(west.a_zero, f"a_zero_out{row}_")),
            east.first.eq(register(west.first, f"first_out{row}_", LOCAL)),
            east.last.eq(register(west.last, f"last_out{row}_", LOCAL)),
        ]
    m.d.comb += [south.b.eq(register(north.b, "b_out", depth=depth)),
                 south.zero.eq(register(north.zero, "b_zero_out", depth=depth)),
                 south.lane.eq(register(north.lane, "b_lane_out", depth=depth))]


def lut_multiply(m, a, b):
    """``a * b`` (signed INT8, a 16-bit result) from 4x4-bit unsigned products (8-bit results,
    which Yosys leaves to LUTs; Vivado reads ``use_dsp``): with a = a_u - 256 a7 (a_u the
    unsigned byte, a7 the sign), a * b = a_u b_u - 256 (a7 b_u + b7 a_u) modulo 2**16, which is
    all 16 bits hold."""
    a_u, b_u = a.as_unsigned(), b.as_unsigned()
    parts = []
    for name, x, y, shift in (("ll", a_u[:4], b_u[:4], 0), ("lh", a_u[:4], b_u[4:], 4),
                              ("hl", a_u[4:], b_u[:4], 4), ("hh", a_u[4:], b_u[4:], 8)):
        part = Signal(8, name=f"pp_{name}", attrs={"use_dsp": "no"})
        m.d.comb += part.eq(x * y)
        parts.append(part << shift)
    correction = Signal(8, name="sign_correction")
    m.d.comb += correction.eq(Mux(a[7], b_u, 0) + Mux(b[7], a_u, 0))
    product = Signal(16, name="product_u")
    m.d.comb += product.eq(parts[0] + parts[1] + parts[2] + parts[3] - (correction << 8))
    return product.as_signed()


def pair_totals(m, product, accs, first):
    """A packed pair's two sums from its 32-bit product ``P = (a0 * 2**16 + a1) * b``: row 1
    adds the low half (``a1 * b``); row 0 adds the high half plus the borrow bit, as the carry
    into one adder: ``({acc, 1} + {P[31:16], P[15]}) >> 1``. ``first`` starts both from 0."""
    low = product[:16].as_signed()
    high = Cat(product[15], product[16:]).as_signed()
    totals = [Signal(ACCUMULATOR, name="total0"), Signal(ACCUMULATOR, name="total1")]
    m.d.comb += [
        totals[0].eq((Cat(Const(1, 1), Mux(first, 0, accs[0])) + high)[1:33]),
        totals[1].eq(Mux(first, 0, accs[1]) + low),
    ]
    return totals


class ProcessingElement(wiring.Component):
    west: In(KSTEP)
    north: In(B_OPERAND)
    east: Out(KSTEP)
    south: Out(B_OPERAND)

    acc: Out(ACCUMULATOR)
    result: Out(ACCUMULATOR)
    zero: Out(1)

    def __init__(self, multiplier="dsp"):
        """``multiplier``: ``"dsp"`` (a plain product, which synthesis maps to a DSP slice) or
        ``"lut"`` (the same product from 4x4-bit partial products, which stay in LUTs: for
        arrays with more PEs than the part has DSP slices)."""
        if multiplier not in ("dsp", "lut"):
            raise ValueError(f"multiplier: expected 'dsp' or 'lut', got {multiplier!r}")
        self.multiplier = multiplier
        super().__init__()

    def elaborate(self, platform):
        m = Module()

        west, north = self.west, self.north
        # Stage 1: the picked operands (:func:`_picked`); stages 2-4: the multiplier's own
        # operand registers, the product, and the product again (see MULTIPLIER_STAGES and
        # :func:`_gated_product`); the k-step's flags keep pace.
        a_pick, a_zero = _pick(m, west, north.lane)
        m.d.comb += self.zero.eq(a_zero | north.zero)
        a_value, b_value, picked = _picked(m, west, a_pick, north.b, self.zero)
        picked_valid, picked_zero = picked[0], picked[3]
        if self.multiplier == "dsp" and dsp_style(platform) == "ecp5":
            # Stages 2-3 inside an ECP5 DSP block (its operand and product registers).
            raw = mult18x18d(m, a_value, b_value, picked_valid & ~picked_zero, "mult")
            product = _cleared(m, raw, picked_zero)
            self.multiplier_inputs = None
        else:
            a, b = Signal(OPERAND, reset_less=True), Signal(OPERAND, reset_less=True)
            self.multiplier_inputs = (a, b)  # the operand registers, for tests and waveforms
            multiply = partial(lut_multiply, m) if self.multiplier == "lut" else operator.mul
            product = _gated_product(m, picked_valid, [(a, a_value), (b, b_value)],
                                     picked_zero, multiply)
        valid, first, last, zero = _flags(m, MULTIPLIER_STAGES - 1, "", *picked)

        # Stage 5: the sum this k-step leaves in the accumulator; .eq() truncates to 32 bits,
        # which is the two's-complement wrap of INT32 accumulation.
        acc = _data(m, ACCUMULATOR, "acc_q", self.acc)
        result = _data(m, ACCUMULATOR, "result_q", self.result)
        total = Signal(ACCUMULATOR)
        m.d.comb += total.eq(Mux(first, 0, acc) + product)

        with m.If(valid & (first | ~zero)):
            m.d.sync += acc.eq(total)
        with m.If(valid & last):
            m.d.sync += result.eq(total)

        _pass_on(m, [(west, self.east)], north, self.south)
        return m


class PackedPair(wiring.Component):
    """Two neighbouring PEs of a column (rows ``2p`` and ``2p + 1``) sharing one multiplier.

    Both take the same B operand and lane in the same cycle (the array skews the pair's two
    rows alike and passes B on through two registers), so they pick their A values from the
    same lane, and one signed 25 x 8-bit product ``P = (a[0] * 2**16 + a[1]) * b`` carries
    both INT8 products: ``a[1] * b`` lies in [-16256, 16384], so it is ``P``'s low 16 bits
    read as signed; ``a[0] * b`` is ``P >> 16`` plus bit 15 of ``P`` (the borrow a negative
    low product took from the upper half). A DSP48E1's 25 x 18 multiplier does this in one
    slice, two INT8 MACs per DSP. ``|P| < 2**31``, so a 32-bit product register holds it
    exactly. The pair takes B in either format: its two PEs always multiply the same lane.

    Ports are those of :class:`ProcessingElement`, with ``west``, ``east``, ``acc``,
    ``result`` and ``zero`` one per row (index ``l`` is row ``2p + l``); ``south`` is
    ``north`` two cycles later. The k-step's flags are row 0's (the rows carry the same). Each
    row's accumulator is gated by its own ``zero``; the shared multiplier holds only when
    both rows are zero. Same :data:`LATENCY`.
    """

    west: In(KSTEP).array(2)
    north: In(B_OPERAND)
    east: Out(KSTEP).array(2)
    south: Out(B_OPERAND)

    acc: Out(ACCUMULATOR).array(2)
    result: Out(ACCUMULATOR).array(2)
    zero: Out(1).array(2)

    def elaborate(self, platform):
        m = Module()

        west, north = self.west, self.north
        # Stages 1-4 as in the plain PE (A packed before stage 1), with the flags beside them.
        picks = [_pick(m, west[row], north.lane, f"a{row}") for row in range(2)]
        packed = Signal(signed(25))
        m.d.comb += packed.eq((picks[0][0] << 16) + picks[1][0])
        for row in range(2):
            m.d.comb += self.zero[row].eq(picks[row][1] | north.zero)
        a_value, b_value, picked = _picked(m, west[0], packed, north.b, Cat(*self.zero))
        picked_valid, picked_zero = picked[0], picked[3]
        a, b = Signal(signed(25), reset_less=True), Signal(OPERAND, reset_less=True)
        product = _gated_product(m, picked_valid, [(a, a_value), (b, b_value)],
                                 picked_zero[0] & picked_zero[1], operator.mul)
        valid, first, last, zero = _flags(m, MULTIPLIER_STAGES - 1, "", *picked)

        # Stage 5: each row's sum (:func:`pair_totals`).
        acc = [_data(m, ACCUMULATOR, f"acc{row}_q", self.acc[row]) for row in range(2)]
        totals = pair_totals(m, product, acc, first)
        for row in range(2):
            result = _data(m, ACCUMULATOR, f"result{row}_q", self.result[row])
            with m.If(valid & (first | ~zero[row])):
                m.d.sync += acc[row].eq(totals[row])
            with m.If(valid & last):
                m.d.sync += result.eq(totals[row])

        _pass_on(m, [(west[row], self.east[row]) for row in range(2)], north, self.south, 2)
        return m
