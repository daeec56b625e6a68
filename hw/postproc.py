"""Post-processing of one result row: bias, gemmlowp requantization to INT8, ReLU.

The arithmetic is specified in :mod:`sparsa.protocol` (module docstring, "Arithmetic"); each of
the ``cols`` lanes does it independently. Eleven registered stages, one row per cycle, no
backpressure (whoever issues rows reserves room downstream first). The stages are cut so that no
cycle holds more than one wide adder or one 18x18 multiplier (what an ECP5 or 7-series DSP
slice does) or one compare, which keeps this block off the critical path:

1. ``x = acc + bias`` (INT32 wrap) when ``bias_en``;
2. the four 17x17 partial products of ``x * mult[j]`` (halves of ``x`` and the multiplier);
3. the two middle products summed; the outer two need no adder (they do not overlap);
4. ``p = x * mult[j]``, the exact 64-bit product;
5. ``p + nudge`` (rounding of the doubling high multiply);
6. that divided by ``2**31``: the floor, and whether truncation toward zero adds one;
7. ``h``: the quotient, or ``INT32_MAX`` in the one saturating case;
8. ``h >> shift`` and whether the remainder rounds up;
9. round and add ``zero`` (and, beside it, whether the result is below ``zero``);
10. whether that is above 127 or below the floor (-128, or ``zero`` with ReLU), by bit tests;
11. the clamp to INT8 (ReLU included).

``out_word`` packs lane ``j`` at bits ``[32j, 32j+32)`` for INT32 output, or at ``[8j, 8j+8)``
for INT8 output (``requant``), which is the byte layout of an output-stream vector.
``acc``, ``bias`` and ``mult`` are sampled together with ``in_valid``; the other configuration
inputs must hold still while rows are in flight (and from a cycle before: the shift's mask and
thresholds and the clamp's floor are registered from them).
"""

from amaranth import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .pipeline import delay

LATENCY = 11
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
            x1 = registered(self.acc[j] + Mux(self.bias_en, self.bias[j], 0), "x1", signed(32))
            mult1 = registered(self.mult[j], "mult1")  # sampled with the row, like bias

            # x * mult from 17x17 signed partial products: low halves zero-extended, high halves
            # signed.
            x_lo, x_hi = Cat(x1[:16], Const(0, 1)).as_signed(), x1[16:].as_signed()
            m_lo, m_hi = Cat(mult1[:16], Const(0, 1)).as_signed(), mult1[16:].as_signed()
            ll2 = registered(x_lo * m_lo, "ll2", signed(34))
            lh2 = registered(x_lo * m_hi, "lh2", signed(34))
            hl2 = registered(x_hi * m_lo, "hl2", signed(34))
            hh2 = registered(x_hi * m_hi, "hh2", signed(34))
            overflow2 = registered((x1 == INT32_MIN) & (mult1 == INT32_MIN), "overflow2")
            outer3 = registered(Cat(ll2[:32], hh2[:32]).as_signed(), "outer3", signed(64))
            middle3 = registered(lh2 + hl2, "middle3", signed(35))
            p4 = registered(outer3 + (middle3 << 16), "p4", signed(64))
            # (p + nudge) / 2**31 truncated toward zero: floor division, plus one for a negative
            # dividend with a remainder.
            n5 = registered(p4 + Mux(p4 >= 0, 1 << 30, 1 - (1 << 30)), "n5", signed(65))
            floor6 = registered(n5 >> 31, "floor6", signed(34))
            adjust6 = registered((n5 < 0) & (n5[:31] != 0), "adjust6")
            overflow6 = delay(m, overflow2, 4, f"overflow_{j}_", reset_less=True)
            h7 = registered(Mux(overflow6, INT32_MAX, floor6 + adjust6), "h7", signed(32))

            # Rounding of the shift: up when the remainder exceeds half, or reaches it for a
            # negative h: remainder >= half + 1 (+ 1 when h < 0), against thresholds prepared
            # from the job's shift, so the stage holds one compare after the masking.
            remainder = Signal(unsigned(32), name=f"remainder_{j}")
            m.d.comb += remainder.eq(h7.as_unsigned() & mask)
            shifted8 = registered(h7 >> shift_copy, "shifted8", signed(32))
            up8 = registered(Mux(h7 < 0, remainder >= half2, remainder >= half1), "up8")

            rounded9 = registered(shifted8 + up8 + self.zero, "rounded9", signed(33))
            # ReLU keeps what is at least the zero point: rounded9 < zero, i.e. shifted8 + up8
            # < 0, decided beside the adder.
            below9 = registered(shifted8[31] & ~(up8 & (shifted8 == -1)), "below9")
            # Clamp to [zero (ReLU) or -128, 127]: out of INT8 range when bits 7 and up are not
            # all equal to the sign (bit tests, registered), then the choice.
            top = rounded9[7:]
            over10 = registered(~rounded9[-1] & (top != 0), "over10")
            under10 = registered(Mux(self.relu, below9,
                                     rounded9[-1] & (top != (1 << len(top)) - 1)), "under10")
            low10 = registered(rounded9[:8], "low10", signed(8))
            q11 = registered(Mux(over10, 127, Mux(under10, floor, low10)), "q11", signed(8))
            x10 = delay(m, x1, LATENCY - 2, f"x_{j}_", reset_less=True)
            x11 = registered(Mux(self.relu & (x10 < 0), 0, x10), "x11", signed(32))
            lanes.append((x11, q11))

        int32_word = Cat(*(x for x, _ in lanes))
        int8_word = Cat(*(q for _, q in lanes))
        m.d.comb += self.out_word.eq(Mux(self.requant, int8_word, int32_word))
        return m
