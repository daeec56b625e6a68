"""Post-processing of one result row: bias, gemmlowp requantization to INT8, ReLU.

The arithmetic is specified in :mod:`sparsa.protocol` (module docstring, "Arithmetic"); each of
the ``cols`` lanes does it independently. Four registered stages, one row per cycle, no
backpressure (whoever issues rows reserves room downstream first):

1. ``x = acc + bias`` (INT32 wrap) when ``bias_en``;
2. ``p = x * mult[j]`` (exact 64-bit product; one multiplier per lane);
3. ``h`` = saturating rounding doubling high half of ``p``;
4. rounding right shift by ``shift``, add ``zero``, saturate to INT8, ReLU.

``out_word`` packs lane ``j`` at bits ``[32j, 32j+32)`` for INT32 output, or at ``[8j, 8j+8)``
for INT8 output (``requant``), which is the byte layout of an output-stream vector.
``acc``, ``bias`` and ``mult`` are sampled together with ``in_valid``; the other configuration
inputs must hold still while rows are in flight.
"""

from amaranth import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

LATENCY = 4
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
        valid = [Signal(name=f"valid{stage}") for stage in range(1, LATENCY + 1)]
        m.d.sync += valid[0].eq(self.in_valid)
        for stage in range(1, LATENCY):
            m.d.sync += valid[stage].eq(valid[stage - 1])
        m.d.comb += self.out_valid.eq(valid[-1])

        lanes = []
        for j in range(self.cols):
            x1 = Signal(signed(32), name=f"x1_{j}")
            mult1 = Signal(signed(32), name=f"mult1_{j}")  # sampled with the row, like bias
            m.d.sync += [x1.eq(self.acc[j] + Mux(self.bias_en, self.bias[j], 0)),
                         mult1.eq(self.mult[j])]

            x2 = Signal(signed(32), name=f"x2_{j}")
            p2 = Signal(signed(64), name=f"p2_{j}")
            m.d.sync += [x2.eq(x1), p2.eq(x1 * mult1)]
            overflow2 = Signal(name=f"overflow2_{j}")
            m.d.sync += overflow2.eq((x1 == INT32_MIN) & (mult1 == INT32_MIN))

            # (p + nudge) / 2**31, truncated toward zero: floor division after adding
            # 2**31 - 1 to a negative dividend.
            nudged = Signal(signed(65), name=f"nudged_{j}")
            m.d.comb += nudged.eq(p2 + Mux(p2 >= 0, 1 << 30, 1 - (1 << 30)))
            quotient = Signal(signed(65), name=f"quotient_{j}")
            m.d.comb += quotient.eq(Mux(nudged < 0, nudged + ((1 << 31) - 1), nudged) >> 31)
            x3 = Signal(signed(32), name=f"x3_{j}")
            h3 = Signal(signed(32), name=f"h3_{j}")
            m.d.sync += [x3.eq(x2), h3.eq(Mux(overflow2, INT32_MAX, quotient))]

            mask = Signal(unsigned(32), name=f"mask_{j}")
            m.d.comb += mask.eq((Const(1, 33) << self.shift) - 1)
            remainder = Signal(unsigned(32), name=f"remainder_{j}")
            threshold = Signal(unsigned(32), name=f"threshold_{j}")
            m.d.comb += [
                remainder.eq(h3.as_unsigned() & mask),
                threshold.eq((mask >> 1) + (h3 < 0)),
            ]
            rounded = Signal(signed(33), name=f"rounded_{j}")
            m.d.comb += rounded.eq((h3 >> self.shift) + (remainder > threshold) + self.zero)
            saturated = Signal(signed(8), name=f"saturated_{j}")
            m.d.comb += saturated.eq(Mux(rounded > 127, 127, Mux(rounded < -128, -128, rounded)))
            q4 = Signal(signed(8), name=f"q4_{j}")
            m.d.sync += q4.eq(Mux(self.relu & (saturated < self.zero), self.zero, saturated))
            x4 = Signal(signed(32), name=f"x4_{j}")
            m.d.sync += x4.eq(Mux(self.relu & (x3 < 0), 0, x3))
            lanes.append((x4, q4))

        int32_word = Cat(*(x for x, _ in lanes))
        int8_word = Cat(*(q for _, q in lanes))
        m.d.comb += self.out_word.eq(Mux(self.requant, int8_word, int32_word))
        return m
