"""A stream link between two distant parts of the die, with no combinational path across it.

:class:`CreditLink` carries an :mod:`amaranth.lib.stream` of any payload ``shape`` (the
accelerator's: :func:`beat_layout`, an AXI4-Stream beat's data and TLAST) from its source
side (port ``i``) to its sink side (port ``o``) through ``stages`` registers, into a FIFO
on the sink side. Flow control is by credits: the source side counts the FIFO entries that are
free and takes a beat only while it has one; each beat that leaves the FIFO sends a credit
back through ``stages`` registers. So ``i.ready`` is a register beside the source and
``o.valid`` is the FIFO's own, and every signal that crosses between the two sides is a
register's output (the link's cost is latency, never a long path with logic at both ends).

With ``buffered``, the FIFO's output is registered too (:class:`SyncFIFOBuffered`: one cycle
more, for a sink whose logic starts with the data). The FIFO has as many entries as a credit's
round trip has cycles, so the link carries a beat every cycle when neither side waits.
``idle`` is high when every beat taken has left the FIFO (all credits are home).
"""

from amaranth import Module, Shape, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFO, SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from .pipeline import delay


def beat_layout(width):
    """One beat of an AXI4-Stream port: ``data`` (TDATA, ``width`` bits) and ``last`` (TLAST)."""
    return data.StructLayout({"data": width, "last": 1})


class CreditLink(wiring.Component):
    def __init__(self, shape, stages=2, buffered=False):
        if stages < 1:
            raise ValueError(f"stages must be at least 1, not {stages}")
        self.shape = shape
        self.width = Shape.cast(shape).width
        self.stages = stages
        self.buffered = buffered
        # A beat taken in cycle t is written into the FIFO at the end of cycle t + stages, can
        # leave it in cycle t + stages + 1 (+ 1 if buffered), and its credit is back in use
        # ``stages`` cycles after that, plus one for the counter's register.
        self.depth = 2 * stages + 2 + int(buffered)
        super().__init__({
            "i": In(stream.Signature(shape)),
            "o": Out(stream.Signature(shape)),
            "idle": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        fifo_type = SyncFIFOBuffered if self.buffered else SyncFIFO
        m.submodules.fifo = fifo = fifo_type(width=self.width, depth=self.depth)

        credits = Signal(range(self.depth + 1), init=self.depth)
        # ``i.ready`` is a register of its own (credits != 0 after this cycle), so a source
        # whose ``valid`` depends on ``ready`` sees no decode of the counter in its loop.
        ready = Signal(init=1)
        take = Signal()
        m.d.comb += [
            self.i.ready.eq(ready),
            take.eq(self.i.valid & ready),
            self.idle.eq(credits == self.depth),
        ]
        valid = delay(m, take, self.stages, "valid")
        data = delay(m, self.i.payload, self.stages, "data", reset_less=True)
        m.d.comb += [
            fifo.w_en.eq(valid), fifo.w_data.eq(data),
            self.o.valid.eq(fifo.r_rdy), self.o.payload.eq(fifo.r_data),
            fifo.r_en.eq(self.o.ready),
        ]
        returned = delay(m, self.o.valid & self.o.ready, self.stages, "returned")
        m.d.sync += [credits.eq(credits - take + returned),
                     ready.eq(returned | (credits >= 2) | ((credits == 1) & ~take))]
        return m
