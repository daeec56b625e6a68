"""One processing element of the output-stationary systolic array.

Dataflow: the PE owns one output C[i, j]. Each cycle an A operand arrives from the left and a B
operand from above; the PE multiplies them (signed INT8 x INT8 -> INT16) and adds the product to
its INT32 accumulator, which wraps modulo 2**32 exactly as NumPy's int32 arithmetic does. The
multiplier has registers of its own on both sides (operands in, product out twice), so neither
the 32-bit add nor the route to a DSP block shares a cycle with the multiplier (on an ECP5 the
multiply and add in one cycle close at about 92 MHz, the multiply between shared registers at
about 86). A PE takes the k-step from the west (``west``, a :data:`KSTEP`: the A operand and
the control flags that travel with it) and its B operand from the north (``north``, a
:data:`B_OPERAND`), and passes both on through registers, ``east`` and ``south``, one cycle
later. Built for an ECP5
(``dsp="ecp5"``, see :mod:`.dsp`), the operand registers and the first product register are
those inside the MULT18X18D.

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

:class:`PackedPair` is two PEs of one row in one multiplier: both take the same A operand, so
``a * (b0 * 2**16 + b1)`` (an 8 x 25-bit product, one DSP48E1) holds both INT8 products.

Latency: ``acc`` and ``result`` hold a k-step's sum :data:`LATENCY` (4) cycles after its
operands are presented; ``east`` and ``south`` are one cycle behind ``west`` and ``north``.
"""

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
MULTIPLIER_STAGES = 3  # operand registers, product, product again
LATENCY = MULTIPLIER_STAGES + 1  # cycles from a k-step's operands to the sum in ``acc``


def _flags(m, valid, *flags):
    """The k-step's flags delayed to meet its product (MULTIPLIER_STAGES registers): ``valid``
    with a reset, the others without (they are read only with ``valid``)."""
    valid = delay(m, valid, MULTIPLIER_STAGES, "valid", attrs=LOCAL)
    packed = delay(m, Cat(*flags), MULTIPLIER_STAGES, "flags", reset_less=True, attrs=LOCAL)
    out, low = [valid], 0
    for flag in flags:
        width = len(flag)
        out.append(packed[low:low + width])
        low += width
    return out


def _gated_product(m, valid, operands, skip, multiply):
    """Stages 1-3 of a k-step: the operand registers, the product, the product again.

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
    """Stage 3: the product registered again, 0 for a skipped k-step (whose operand registers
    held, so ``raw`` is stale)."""
    skip2 = delay(m, skip, 2, "skip", reset_less=True)
    product = Signal.like(raw, name="product", reset_less=True)
    m.d.sync += product.eq(Mux(skip2, 0, raw))
    return product


def _pick(m, west, lane):
    """The A value a PE multiplies and its zero flag: lane ``lane`` of the k-step's group (a
    4:1 byte multiplexer before the multiplier's operand register)."""
    value = Signal(OPERAND, name="a_picked")
    zero = Signal(name="a_zero_picked")
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


def _pass_on(m, pe, b_lanes):
    """Register the k-step (``west`` to ``east``) and the B operands (``b_lanes``: (north,
    south) per lane) on to the next PEs, field by field: only ``valid`` with a reset, and the
    k-step's flags, which are the same in every PE of an anti-diagonal, as :data:`.LOCAL`
    registers."""
    def register(value, name, attrs=None):
        return delay(m, value, 1, name, reset_less=True, attrs=attrs)
    west, east = pe.west, pe.east
    m.d.comb += [
        east.valid.eq(delay(m, west.valid, 1, "valid_out", attrs=LOCAL)),
        east.a.eq(register(west.a, "a_out")),
        east.a_zero.eq(register(west.a_zero, "a_zero_out")),
        *(south.b.eq(register(north.b, f"b_out{lane}_"))
          for lane, (north, south) in enumerate(b_lanes)),
        *(south.zero.eq(register(north.zero, f"b_zero_out{lane}_"))
          for lane, (north, south) in enumerate(b_lanes)),
        *(south.lane.eq(register(north.lane, f"b_lane_out{lane}_"))
          for lane, (north, south) in enumerate(b_lanes)),
        east.first.eq(register(west.first, "first_out", LOCAL)),
        east.last.eq(register(west.last, "last_out", LOCAL)),
    ]


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

    def _product(self, m, a, b):
        if self.multiplier == "dsp":
            return a * b
        # a * b from 4x4-bit unsigned products (8-bit results, which Yosys leaves to LUTs;
        # Vivado reads use_dsp): with a = a_u - 256 a7 (a_u the unsigned byte, a7 the sign),
        # a * b = a_u b_u - 256 (a7 b_u + b7 a_u) modulo 2**16, which is all 16 bits hold.
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

    def elaborate(self, platform):
        m = Module()

        west, north = self.west, self.north
        a_value, a_zero = _pick(m, west, north.lane)
        m.d.comb += self.zero.eq(a_zero | north.zero)

        # Stages 1-3: the multiplier's own operand registers, the product, and the product
        # again (see MULTIPLIER_STAGES and :func:`_gated_product`); the k-step's flags keep
        # pace.
        if self.multiplier == "dsp" and dsp_style(platform) == "ecp5":
            # Stages 1-2 inside an ECP5 DSP block (its operand and product registers).
            raw = mult18x18d(m, a_value, north.b, west.valid & ~self.zero, "mult")
            product = _cleared(m, raw, self.zero)
            self.multiplier_inputs = None
        else:
            a, b = Signal(OPERAND, reset_less=True), Signal(OPERAND, reset_less=True)
            self.multiplier_inputs = (a, b)  # the operand registers, for tests and waveforms
            product = _gated_product(m, west.valid, [(a, a_value), (b, north.b)],
                                     self.zero, lambda a, b: self._product(m, a, b))
        valid, first, last, zero = _flags(m, west.valid, west.first, west.last, self.zero)

        # Stage 4: the sum this k-step leaves in the accumulator; .eq() truncates to 32 bits,
        # which is the two's-complement wrap of INT32 accumulation.
        acc = _data(m, ACCUMULATOR, "acc_q", self.acc)
        result = _data(m, ACCUMULATOR, "result_q", self.result)
        total = Signal(ACCUMULATOR)
        m.d.comb += total.eq(Mux(first, 0, acc) + product)

        with m.If(valid & (first | ~zero)):
            m.d.sync += acc.eq(total)
        with m.If(valid & last):
            m.d.sync += result.eq(total)

        _pass_on(m, self, [(north, self.south)])
        return m


class PackedPair(wiring.Component):
    """Two neighbouring PEs of a row (columns ``2p`` and ``2p + 1``) sharing one multiplier.

    Both see the same A operand in the same cycle (the array skews the pair's two B columns
    alike), so one signed 8 x 25-bit product ``P = a * (b[0] * 2**16 + b[1])`` carries both
    INT8 products: ``a * b[1]`` lies in [-16256, 16384], so it is ``P``'s low 16 bits read as
    signed; ``a * b[0]`` is ``P >> 16`` plus bit 15 of ``P`` (the borrow a negative low product
    took from the upper half). A DSP48E1's 25 x 18 multiplier does this in one slice, two
    INT8 MACs per DSP. ``|P| < 2**31``, so a 32-bit product register holds it exactly.

    Ports are those of :class:`ProcessingElement`, with ``north``, ``south``, ``acc``,
    ``result`` and ``zero`` one per lane (lane ``l`` is column
    ``2p + l``); each lane's accumulator is gated by its own ``zero``; the shared multiplier
    holds only when both lanes are zero. Same :data:`LATENCY`.
    """

    west: In(KSTEP)
    north: In(B_OPERAND).array(2)
    east: Out(KSTEP)
    south: Out(B_OPERAND).array(2)

    acc: Out(ACCUMULATOR).array(2)
    result: Out(ACCUMULATOR).array(2)
    zero: Out(1).array(2)

    def elaborate(self, platform):
        m = Module()

        west, north = self.west, self.north
        packed = Signal(signed(25))
        m.d.comb += packed.eq((north[0].b << 16) + north[1].b)
        # Both columns multiply one A value: the lane of the first column's (the plain format
        # gives both columns the same lane; a build with pairs has no group format).
        a_value, a_zero = _pick(m, west, north[0].lane)
        for lane in range(2):
            m.d.comb += self.zero[lane].eq(a_zero | north[lane].zero)

        # Stages 1-3 as in the plain PE: operand registers (B already packed), the product
        # and the product again, with the flags beside them.
        a, b = Signal(OPERAND, reset_less=True), Signal(signed(25), reset_less=True)
        product = _gated_product(m, west.valid, [(a, a_value), (b, packed)],
                                 self.zero[0] & self.zero[1], lambda a, b: a * b)
        valid, first, last, zero = _flags(m, west.valid, west.first, west.last,
                                          Cat(*self.zero))

        # Stage 4: each lane's sum. Lane 1 adds the low half; lane 0 adds the high half plus
        # the borrow bit, as the carry into one adder: ({acc, 1} + {P[31:16], P[15]}) >> 1.
        low = product[:16].as_signed()
        high = Cat(product[15], product[16:]).as_signed()
        acc = [_data(m, ACCUMULATOR, f"acc{lane}_q", self.acc[lane]) for lane in range(2)]
        totals = [Signal(ACCUMULATOR, name="total0"), Signal(ACCUMULATOR, name="total1")]
        m.d.comb += [
            totals[0].eq((Cat(Const(1, 1), Mux(first, 0, acc[0])) + high)[1:33]),
            totals[1].eq(Mux(first, 0, acc[1]) + low),
        ]
        for lane in range(2):
            result = _data(m, ACCUMULATOR, f"result{lane}_q", self.result[lane])
            with m.If(valid & (first | ~zero[lane])):
                m.d.sync += acc[lane].eq(totals[lane])
            with m.If(valid & last):
                m.d.sync += result.eq(totals[lane])

        _pass_on(m, self, [(north[lane], self.south[lane]) for lane in range(2)])
        return m
