"""The operand feed: the memories' words of each issued k-step onto the array's edge.

:class:`Feed` takes a k-step as the :class:`.Sequencer` decides it (``step``, ``slot``) and the
operand memories' words, which come out two cycles after their (registered) addresses, so three
cycles after the decision: ``a_word`` (a group of four k-steps: per lane ``l``, ``rows``
bytes at byte ``l * rows``) and ``b_word`` (``cols`` bytes, then each column's 2-bit lane).

Contract:

- Four cycles after the decision the k-step is on the array's edge: per row ``a`` (the row's
  four values of the group) and per column ``b`` and ``b_lane`` (the words' bytes and lanes,
  zero for a ``kill`` k-step), each value's zero flag beside it (``a_zero``, ``b_zero``:
  registered with the value, so the PEs' gating reads a flag that travels with the operand,
  not a compare of it), and ``valid``, ``first``, ``last``, all registers.
- For the work counters, in the cycle before (three after the decision): ``counted`` (an
  issued k-step that is not a kill) with its ``counted_slot``; and in the edge's cycle
  ``zeros`` (the zero flags: A's, lane by lane, ``rows`` each, then B's) and ``lanes`` (B's).
"""

from amaranth import Cat, Module, Mux, Signal
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from .pe import LANES, OPERAND
from .pipeline import delay
from .sequencer import STEP

# Cycles from the sequencer's decision to the memories' words: the registered address, the
# block RAM's read, its output register.
MEMORY_LATENCY = 3


def b_word_width(cols):
    """Bits of a word of the B memory: ``cols`` values, then ``cols`` 2-bit lanes."""
    return 10 * cols


class Feed(wiring.Component):
    def __init__(self, rows, cols):
        self.rows, self.cols = rows, cols
        super().__init__({
            "step": In(STEP), "slot": In(range(rows * cols + 1)),
            "a_word": In(8 * rows * LANES), "b_word": In(b_word_width(cols)),
            "a": Out(data.ArrayLayout(OPERAND, LANES)).array(rows),
            "b": Out(OPERAND).array(cols),
            "a_zero": Out(LANES).array(rows), "b_zero": Out(1).array(cols),
            "b_lane": Out(range(LANES)).array(cols),
            "valid": Out(1), "first": Out(1), "last": Out(1),
            "counted": Out(1), "counted_slot": Out(range(rows * cols + 1)),
            "zeros": Out(LANES * rows + cols), "lanes": Out(2 * cols),
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
        rows, cols = self.rows, self.cols
        # A's values lane by lane (the memory word's order), B's, each with its zero flag.
        values = Signal(8 * (LANES * rows + cols), reset_less=True)
        zeros = Signal(LANES * rows + cols, reset_less=True)
        b_lanes = Signal(2 * cols, reset_less=True)
        bytes_in = Cat(self.a_word, self.b_word[:8 * cols])
        for n in range(LANES * rows + cols):
            byte = bytes_in[8 * n:8 * n + 8]
            m.d.sync += [values[8 * n:8 * n + 8].eq(Mux(kill_q, 0, byte)),
                         zeros[n].eq(kill_q | (byte == 0))]
        m.d.sync += b_lanes.eq(Mux(kill_q, 0, self.b_word[8 * cols:]))
        for i in range(rows):
            for lane in range(LANES):
                n = lane * rows + i
                m.d.comb += [self.a[i][lane].eq(values[8 * n:8 * n + 8]),
                             self.a_zero[i][lane].eq(zeros[n])]
        for j in range(cols):
            n = LANES * rows + j
            m.d.comb += [self.b[j].eq(values[8 * n:8 * n + 8]), self.b_zero[j].eq(zeros[n]),
                         self.b_lane[j].eq(b_lanes[2 * j:2 * j + 2])]
        m.d.comb += [self.zeros.eq(zeros), self.lanes.eq(b_lanes)]
        return m
