"""The work counters of a job (the registers CYCLES ... KSTEPS_SKIPPED of :mod:`sparsa.protocol`).

:class:`WorkCounters` counts, from the core's reset on, 32 bits each, wrapping:

- ``cycles``: cycles with ``busy``;
- ``stall_in`` / ``stall_out``: cycles with ``waiting_panel`` / ``waiting_room`` (the sequencer
  waiting for an A panel / for room in the row FIFO);
- ``macs``: for each ``counted`` k-step, its ``counted_slot`` (real products per k-step);
- ``macs_skipped``: products not computed for a zero operand: of each counted k-step, those
  whose A or B value is zero (``zeros``, the values' zero flags, A's lane by lane then B's,
  and ``lanes``, B's lanes, one cycle after ``counted``: column ``j`` multiplies A's lane
  ``lanes[j]``); of each tile, at ``advance``, its ``skipped`` k-steps times its ``slot``;
- ``ksteps_skipped``: the ``skipped`` k-steps at each ``advance``.

The sums are registered in stages (the zero flags copied; the live values; per lane of A its
live rows, B's live columns; per column its live products; their sum; the zeros; the sum), so
no cycle holds more than one small multiply or one wide add: ``macs_skipped`` is complete
within nine cycles of the last counted k-step,
``ksteps_skipped`` two after the last ``advance``. The counters are read only after DONE, which
comes many cycles later.
"""

from amaranth import Array, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from sparsa import protocol

from .pe import LANES
from .pipeline import delay, lut_product

# The counters' ports: the protocol's counter registers, by their names in lower case.
COUNTERS = tuple(name.lower() for name in protocol.COUNTERS)


class WorkCounters(wiring.Component):
    def __init__(self, rows, cols, max_k):
        self.rows, self.cols, self.max_k = rows, cols, max_k
        slot = range(rows * cols + 1)
        super().__init__({
            "busy": In(1), "waiting_panel": In(1), "waiting_room": In(1),
            "counted": In(1), "counted_slot": In(slot), "zeros": In(LANES * rows + cols),
            "lanes": In(2 * cols),
            "advance": In(1), "skipped": In(range(max_k + 1)), "slot": In(slot),
            **{name: Out(32) for name in COUNTERS},
        })

    def elaborate(self, platform):
        m = Module()
        rows, cols = self.rows, self.cols
        with m.If(self.busy):
            m.d.sync += self.cycles.eq(self.cycles + 1)
        with m.If(self.waiting_panel):
            m.d.sync += self.stall_in.eq(self.stall_in + 1)
        with m.If(self.waiting_room):
            m.d.sync += self.stall_out.eq(self.stall_out + 1)
        with m.If(self.counted):
            m.d.sync += self.macs.eq(self.macs + self.counted_slot)

        zeros3 = delay(m, self.zeros, 1, "zeros3", reset_less=True)
        lanes4 = delay(m, self.lanes, 2, "lanes", reset_less=True)
        live_a4 = Signal(LANES * rows)  # the A values that are not zero, lane by lane
        live_b4 = Signal(cols)
        nonzero_a5 = [Signal(range(rows + 1), name=f"nonzero_a{lane}_5") for lane in range(LANES)]
        live_b5, lanes5 = Signal(cols), Signal(2 * cols)
        # Column j's live products: its live rows in the lane it takes, if its B is live.
        nonzero_column6 = [Signal(range(rows + 1), name=f"nonzero_c{j}_6") for j in range(cols)]
        nonzero7 = Signal(range(rows * cols + 1))
        counted7 = delay(m, self.counted, 6, "counted")
        slot7 = delay(m, self.counted_slot, 6, "slot")
        # A tile's skipped k-steps are taken a cycle after its last k-step (``skipped``
        # registered, picked by ``advance``), so the sequencer's decision reaches no wide
        # register here.
        skipped_q = Signal(range(self.max_k + 1), reset_less=True)
        skipped1 = Signal(range(self.max_k + 1))
        skipped_slot1 = Signal(range(rows * cols + 1), reset_less=True)
        issued_zeros8 = Signal(range(rows * cols + 1))
        # A skipped tile's products: its k-steps times its slot, from two halves of the slot's
        # bits, registered, then summed, so no cycle holds the whole adder tree.
        half = (len(skipped_slot1) + 1) // 2
        skipped_low2 = Signal(range(self.max_k * (1 << half)))
        skipped_high2 = Signal(range(self.max_k * (1 << (len(skipped_slot1) - half))))
        skipped_products3 = Signal(range(rows * cols * self.max_k + 1))
        m.d.sync += [
            live_a4.eq(~zeros3[:LANES * rows]),
            live_b4.eq(~zeros3[LANES * rows:]),
            *(nonzero_a5[lane].eq(sum(live_a4[lane * rows:(lane + 1) * rows]))
              for lane in range(LANES)),
            live_b5.eq(live_b4), lanes5.eq(lanes4),
            *(nonzero_column6[j].eq(Mux(live_b5[j], Array(nonzero_a5)[lanes5[2 * j:2 * j + 2]],
                                        0))
              for j in range(cols)),
            nonzero7.eq(sum(nonzero_column6)),
            issued_zeros8.eq(Mux(counted7, slot7 - nonzero7, 0)),
            skipped_q.eq(self.skipped),
            skipped1.eq(Mux(self.advance, skipped_q, 0)), skipped_slot1.eq(self.slot),
            skipped_low2.eq(lut_product(skipped1, skipped_slot1[:half])),
            skipped_high2.eq(lut_product(skipped1, skipped_slot1[half:])),
            skipped_products3.eq(skipped_low2 + (skipped_high2 << half)),
            self.macs_skipped.eq(self.macs_skipped + issued_zeros8 + skipped_products3),
            self.ksteps_skipped.eq(self.ksteps_skipped + skipped1),
        ]
        return m
