"""One processing element of the output-stationary systolic array.

Dataflow: the PE owns one output C[i, j]. Each cycle an A operand arrives from the left and a B
operand from above; the PE multiplies them (signed INT8 x INT8 -> INT16) into a product register
and, a cycle later, adds the product to its INT32 accumulator, which wraps modulo 2**32 exactly
as NumPy's int32 arithmetic does. The product register splits the multiplier from the 32-bit
add, the PE's longest path (on an ECP5 the two in one cycle close at about 92 MHz). Both
operands leave through registers (``a_out`` to the right, ``b_out`` downwards) one cycle later,
together with the control flags that travel with A.

Control flags (valid with the A operand):

- ``valid``: this cycle carries a k-step.
- ``first``: the first k-step of a tile; the accumulator restarts from zero instead of adding.
- ``last``: the last k-step of a tile; the finished sum is latched into ``result``, where it stays
  until the next tile's last k-step, so the next tile can accumulate while this one is read.

Sparse-skip hook: ``zero`` is high when either operand is zero. The accumulator's clock enable
is then dropped (only a ``first`` k-step still clears it), so a zero operand costs no register
update; the product would have been zero, so the sum is unchanged.

Latency: ``acc`` and ``result`` update at the end of the cycle *after* the operands are
presented (:data:`LATENCY` cycles from operands to a visible sum); ``a_out``/``b_out`` and the
flags are one cycle behind the inputs.
"""

from amaranth import Module, Mux, Signal, signed
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

OPERAND = signed(8)
ACCUMULATOR = signed(32)
LATENCY = 2  # cycles from a k-step's operands to the sum in ``acc``/``result``


class ProcessingElement(wiring.Component):
    a_in: In(OPERAND)
    b_in: In(OPERAND)
    valid_in: In(1)
    first_in: In(1)
    last_in: In(1)

    a_out: Out(OPERAND)
    b_out: Out(OPERAND)
    valid_out: Out(1)
    first_out: Out(1)
    last_out: Out(1)

    acc: Out(ACCUMULATOR)
    result: Out(ACCUMULATOR)
    zero: Out(1)

    def elaborate(self, platform):
        m = Module()

        m.d.comb += self.zero.eq((self.a_in == 0) | (self.b_in == 0))

        # Stage 1: the product and the k-step's flags.
        product = Signal(signed(16))
        valid, first, last, zero = Signal(), Signal(), Signal(), Signal()
        m.d.sync += [
            product.eq(self.a_in * self.b_in),
            valid.eq(self.valid_in), first.eq(self.first_in), last.eq(self.last_in),
            zero.eq(self.zero),
        ]

        # Stage 2: the sum this k-step leaves in the accumulator; .eq() truncates to 32 bits,
        # which is the two's-complement wrap of INT32 accumulation.
        total = Signal(ACCUMULATOR)
        m.d.comb += total.eq(Mux(first, 0, self.acc) + product)

        with m.If(valid & (first | ~zero)):
            m.d.sync += self.acc.eq(total)
        with m.If(valid & last):
            m.d.sync += self.result.eq(total)

        m.d.sync += [
            self.a_out.eq(self.a_in),
            self.b_out.eq(self.b_in),
            self.valid_out.eq(self.valid_in),
            self.first_out.eq(self.first_in),
            self.last_out.eq(self.last_in),
        ]
        return m
