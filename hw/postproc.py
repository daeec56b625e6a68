"""Post-processing of one result row: bias, gemmlowp requantization to INT8, ReLU.

The arithmetic is specified in :mod:`sparsa.protocol` (module docstring, "Arithmetic"); each of
the ``cols`` lanes does it independently. Fourteen registered stages, one row per cycle, no
backpressure (whoever issues rows reserves room downstream first). The stages are cut so that no
cycle holds more than one wide adder or one 18x18 multiplier (what an ECP5 or 7-series DSP
slice does) or one compare, which keeps this block off the critical path:

0. the row's accumulators, biases (zero without ``bias_en``) and multipliers, registered;
1. ``x = acc + bias`` (INT32 wrap);
2. the 16-bit halves of ``x`` and ``mult[j]`` registered again, a copy for each multiplier
   (a register whose only load is one multiplier can sit beside it), extended to 17 bits after
   the register;
3. the four 17x17 partial products of ``x * mult[j]``;
4. the same, registered again (the first register beside the multiplier, this one beside the
   adders: on an ECP5 the DSP blocks sit in rows apart from the logic, and a multiplier leaves
   too little of a cycle for a long route on either side of it);
5. the two middle products summed; the outer two need no adder (they do not overlap);
6. ``p = x * mult[j]``, the exact 64-bit product;
7. ``p + nudge`` (rounding of the doubling high multiply);
8. that divided by ``2**31``: the floor, and whether truncation toward zero adds one;
9. ``h``: the quotient, or ``INT32_MAX`` in the one saturating case;
10. ``h >> shift`` and whether the remainder rounds up;
11. round and add ``zero`` (and, beside it, whether the result is below ``zero``);
12. whether that is above 127 or below the floor (-128, or ``zero`` with ReLU), by bit tests;
13. the clamp to INT8 (ReLU included).

Built for an ECP5 (``dsp="ecp5"``, :mod:`.dsp`), stages 2 and 3 are the MULT18X18D's own
input and output registers (no copies needed: each block has its own).

``out_word`` packs lane ``j`` at bits ``[32j, 32j+32)`` for INT32 output, or at ``[8j, 8j+8)``
for INT8 output (``requant``), which is the byte layout of an output-stream vector.
``acc``, ``bias`` and ``mult`` are sampled together with ``in_valid``; the other configuration
inputs must hold still while rows are in flight (and from a cycle before: the shift's mask and
thresholds and the clamp's floor are registered from them).
"""

from amaranth import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .dsp import dsp_style, mult18x18d
from .pipeline import delay

LATENCY = 14
INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1


class PostProcessor(wiring.Component):
    def __init__(self, cols):
        self.cols = cols
        super().__init__({
            "in_valid": In(1),
            "acc": In(signed(32)).array(cols),
            "bias": In(signed(32)).array(cols),
            "bias_en": In(1),
            "requant": In(1),
            "relu": In(1),
            "mult": In(signed(32)).array(cols),
            "shift": In(unsigned(5)),
            "zero": In(signed(8)),
            "out_valid": Out(1),
            "out_word": Out(32 * cols),
        })

    def elaborate(self, platform):
        m = Module()
        dsp = dsp_style(platform)
        m.d.comb += self.out_valid.eq(delay(m, self.in_valid, LATENCY, "valid"))

        # The shift's mask and rounding thresholds, prepared once from the job's shift.
        # The clamp's floor: the zero point with ReLU, else -128.
        # Everything but the valid flag is data, registered without reset.
        mask, half1, half2 = (Signal(32, reset_less=True) for _ in range(3))
        floor = Signal(signed(8), reset_less=True)
        m.d.sync += [mask.eq((Const(1, 33) << self.shift) - 1),
                     half1.eq((mask >> 1) + 1), half2.eq((mask >> 1) + 2),
                     floor.eq(Mux(self.relu, self.zero, -128))]

        lanes = []
        for j in range(self.cols):
            def registered(value, name, shape=None):
                """``value`` registered (one pipeline stage)."""
                return delay(m, value, 1, f"{name}_{j}_", shape, reset_less=True)

            # Each lane's shifter reads its own copy of the job's shift (a register per lane,
            # not one register driving every lane's 32-bit barrel shifter).
            shift_copy = registered(self.shift, "shift")
            # The row's inputs registered first: bias and multiplier come from memories read
            # in the cycle, so the bias adder starts from registers.
            acc0, bias0, mult0 = (registered(value, name) for value, name in (
                (self.acc[j], "acc0"), (Mux(self.bias_en, self.bias[j], 0), "bias0"),
                (self.mult[j], "mult0")))
            mult1 = registered(mult0, "mult1")  # beside x1
            x1 = registered(acc0 + bias0, "x1", signed(32))

            # x * mult from 17x17 signed partial products: low halves zero-extended, high halves
            # signed (extended after the operand registers, which hold the 16 bits each).
            x_lo, x_hi = x1[:16], x1[16:].as_signed()
            m_lo, m_hi = mult1[:16], mult1[16:].as_signed()

            def product(name, x_half, m_half, copies):
                """``x_half * m_half`` from operand registers of its own (stage 2), then the
                product twice (stages 3 and 4). Each operand half feeds two multipliers, and
                each of them gets its own copy of it; ``copies`` gives each copy a distinct
                power-up value (which no result reads), so synthesis does not merge them.
                In an ECP5 DSP block, stages 2 and 3 are the block's own registers."""
                if dsp == "ecp5":
                    raw = mult18x18d(m, x_half, m_half, Const(1, 1), f"{name}_{j}")
                    return delay(m, raw, 1, f"{name}_{j}_", signed(34), reset_less=True)
                operands = []
                for half, which, init in ((x_half, "x", copies[0]), (m_half, "m", copies[1])):
                    register = Signal(half.shape(), name=f"{name}_{which}_{j}", init=init,
                                      reset_less=True)
                    m.d.sync += register.eq(half)
                    # A low half is zero-extended, a high half sign-extended, to 17 bits.
                    operands.append(Cat(register, Const(0, 1)).as_signed()
                                    if not half.shape().signed else register)
                return delay(m, operands[0] * operands[1], 2, f"{name}_{j}_", signed(34),
                             reset_less=True)

            ones_lo, ones_hi = 2**16 - 1, -1  # all-ones power-up values of the second copies
            ll4 = product("ll", x_lo, m_lo, (0, 0))
            lh4 = product("lh", x_lo, m_hi, (ones_lo, 0))
            hl4 = product("hl", x_hi, m_lo, (0, ones_lo))
            hh4 = product("hh", x_hi, m_hi, (ones_hi, ones_hi))
            # The one product that saturates, INT32_MIN * INT32_MIN, found from 16-bit compares
            # registered in the stage of their operands, then combined: no cycle holds a
            # 64-input compare across registers that sit apart (x1's and mult1's bits go to
            # four multipliers).
            m_low_zero1 = registered(mult0[:16] == 0, "m_low_zero1")
            m_high_min1 = registered(mult0[16:] == 0x8000, "m_high_min1")
            x_low_zero2 = registered(x1[:16] == 0, "x_low_zero2")
            x_high_min2 = registered(x1[16:] == 0x8000, "x_high_min2")
            m_min2 = registered(m_low_zero1 & m_high_min1, "m_min2")
            overflow3 = registered(x_low_zero2 & x_high_min2 & m_min2, "overflow3")
            outer5 = registered(Cat(ll4[:32], hh4[:32]).as_signed(), "outer5", signed(64))
            middle5 = registered(lh4 + hl4, "middle5", signed(35))
            p6 = registered(outer5 + (middle5 << 16), "p6", signed(64))
            # (p + nudge) / 2**31 truncated toward zero: floor division, plus one for a negative
            # dividend with a remainder.
            n7 = registered(p6 + Mux(p6 >= 0, 1 << 30, 1 - (1 << 30)), "n7", signed(65))
            floor8 = registered(n7 >> 31, "floor8", signed(34))
            adjust8 = registered((n7 < 0) & (n7[:31] != 0), "adjust8")
            overflow8 = delay(m, overflow3, 5, f"overflow_{j}_", reset_less=True)
            h9 = registered(Mux(overflow8, INT32_MAX, floor8 + adjust8), "h9", signed(32))

            # Rounding of the shift: up when the remainder exceeds half, or reaches it for a
            # negative h: remainder >= half + 1 (+ 1 when h < 0), against thresholds prepared
            # from the job's shift, so the stage holds one compare after the masking.
            remainder = Signal(unsigned(32), name=f"remainder_{j}")
            m.d.comb += remainder.eq(h9.as_unsigned() & mask)
            shifted10 = registered(h9 >> shift_copy, "shifted10", signed(32))
            up10 = registered(Mux(h9 < 0, remainder >= half2, remainder >= half1), "up10")

            rounded11 = registered(shifted10 + up10 + self.zero, "rounded11", signed(33))
            # ReLU keeps what is at least the zero point: rounded11 < zero, i.e. shifted10 + up10
            # < 0, decided beside the adder.
            below11 = registered(shifted10[31] & ~(up10 & (shifted10 == -1)), "below11")
            # Clamp to [zero (ReLU) or -128, 127]: out of INT8 range when bits 7 and up are not
            # all equal to the sign (bit tests, registered), then the choice.
            top = rounded11[7:]
            over12 = registered(~rounded11[-1] & (top != 0), "over12")
            under12 = registered(Mux(self.relu, below11,
                                     rounded11[-1] & (top != (1 << len(top)) - 1)), "under12")
            low12 = registered(rounded11[:8], "low12", signed(8))
            q13 = registered(Mux(over12, 127, Mux(under12, floor, low12)), "q13", signed(8))
            x12 = delay(m, x1, LATENCY - 3, f"x_{j}_", reset_less=True)
            x13 = registered(Mux(self.relu & (x12 < 0), 0, x12), "x13", signed(32))
            lanes.append((x13, q13))

        int32_word = Cat(*(x for x, _ in lanes))
        int8_word = Cat(*(q for _, q in lanes))
        m.d.comb += self.out_word.eq(Mux(self.requant, int8_word, int32_word))
        return m
