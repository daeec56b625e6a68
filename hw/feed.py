"""The operand feed: the memories' words of each issued k-step onto the array's edge.

:class:`Feed` takes a k-step as the :class:`.Sequencer` decides it (``step``, ``slot``) and the
operand memories' words, which come out two cycles after their (registered) addresses, so three
cycles after the decision: ``a_word`` (``rows`` bytes) and ``b_word`` (``cols`` bytes).

Contract:

- Four cycles after the decision the k-step is on the array's edge: the lanes ``a`` and ``b``
  (the words' bytes, zero for a ``kill`` k-step), each lane's zero flag beside it (``a_zero``,
  ``b_zero``: registered with the lane, so the PEs' gating reads a flag that travels with the
  operand, not a compare of it), and ``valid``, ``first``, ``last``, all registers.
- For the work counters, in the cycle before (three after the decision): ``counted`` (an
  issued k-step that is not a kill) with its ``counted_slot``; and in the edge's cycle
  ``zeros``, the lanes' zero flags (A's, then B's).
"""

from amaranth import Cat, Module, Mux, Signal, signed
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .pipeline import delay
from .pe import OPERAND
from .sequencer import STEP

# Cycles from the sequencer's decision to the memories' words: the registered address, the
# block RAM's read, its output register.
MEMORY_LATENCY = 3


class Feed(wiring.Component):
    def __init__(self, rows, cols):
        self.rows, self.cols = rows, cols
        super().__init__({
            "step": In(STEP), "slot": In(range(rows * cols + 1)),
            "a_word": In(8 * rows), "b_word": In(8 * cols),
            "a": Out(OPERAND).array(rows), "b": Out(OPERAND).array(cols),
            "a_zero": Out(1).array(rows), "b_zero": Out(1).array(cols),
            "valid": Out(1), "first": Out(1), "last": Out(1),
            "counted": Out(1), "counted_slot": Out(range(rows * cols + 1)),
            "zeros": Out(rows + cols),
        })

    def elaborate(self, platform):
        m = Module()
        step = self.step

        def follow(value, name):
            return delay(m, value, MEMORY_LATENCY, name)

        kill_q = follow(step.kill, "kill")
        m.d.comb += [self.counted.eq(follow(step.issue & ~step.kill, "counted_q")),
                     self.counted_slot.eq(follow(self.slot, "slot_q"))]
        m.d.sync += [
            self.valid.eq(follow(step.issue, "valid")),
            self.first.eq(follow(step.first, "first")),
            self.last.eq(follow(step.last, "last")),
        ]
        a_lanes = [Signal(signed(8), name=f"a_lane{i}", reset_less=True)
                   for i in range(self.rows)]
        b_lanes = [Signal(signed(8), name=f"b_lane{j}", reset_less=True)
                   for j in range(self.cols)]
        a_zeros = Signal(self.rows, reset_less=True)
        b_zeros = Signal(self.cols, reset_less=True)
        for lanes, word, ports, flags, zeros in (
                (a_lanes, self.a_word, self.a, self.a_zero, a_zeros),
                (b_lanes, self.b_word, self.b, self.b_zero, b_zeros)):
            for n, lane in enumerate(lanes):
                byte = word[8 * n:8 * n + 8]
                m.d.sync += [lane.eq(Mux(kill_q, 0, byte)), zeros[n].eq(kill_q | (byte == 0))]
                m.d.comb += [ports[n].eq(lane), flags[n].eq(zeros[n])]
        m.d.comb += self.zeros.eq(Cat(a_zeros, b_zeros))
        return m
