"""The drain: the array's finished rows through post-processing and a FIFO onto the output stream.

:class:`Drain` takes each result row as the array gives it (``out_valid``, ``out_row``, ``c``),
the n-tile's bias and multipliers from their memories (``bias_read`` / ``mult_read``, read
asynchronously at the n-tile's index), and sends the job's output packet on ``output`` (an
:mod:`amaranth.lib.stream` of :func:`.link.beat_layout`) in the order of :mod:`sparsa.protocol`:
per output tile, ``rows`` rows of ``cols`` values, each row as many beats as its bytes take
(int32, or int8 with ``job.requant``), TLAST on the job's last beat.

Contract:

- Rows go through a :class:`.PostProcessor` (bias, requantization, ReLU; 14 cycles) into a FIFO
  of ``2 x rows`` rows. The FIFO never overflows because the sequencer reserves room for each
  tile's rows before it issues the tile's last k-step; so the drain takes rows without
  backpressure, and ``popped`` tells the sequencer each row that has left.
- ``output.valid`` may wait on nothing but a row in the FIFO; the beats of a row leave in order
  while ``output.ready``.
- A job that is ``closing`` with no row in flight (``nothing_reserved``, an empty FIFO) and
  whose last beat has not left sends one zero beat with TLAST, so its packet always closes.
- ``drained`` is high for one cycle when the job's last beat has left and the output link is
  ``link_idle`` (the job is done).
"""

from amaranth import Module, Mux, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import bits_for

from .bram import read_signature
from .job import SINGLE, job_layout
from .link import beat_layout
from .pe import ACCUMULATOR
from .pipeline import delay, walk_flag
from .postproc import PostProcessor


class Drain(wiring.Component):
    def __init__(self, geometry):
        g = self.geometry = geometry
        self.fifo_rows = 2 * g.rows
        super().__init__({
            "start": In(1), "job": In(job_layout(g)), "single": In(SINGLE),
            "closing": In(1), "busy": In(1), "nothing_reserved": In(1), "link_idle": In(1),
            "out_valid": In(1), "out_row": In(max(1, bits_for(g.rows - 1))),
            "c": In(ACCUMULATOR).array(g.cols),
            # Read asynchronously: the data is the word at this cycle's address.
            "bias_read": In(read_signature(32 * g.cols, g.n_tiles_max)),
            "mult_read": In(read_signature(32 * g.cols, g.n_tiles_max)),
            "output": Out(stream.Signature(beat_layout(g.stream_width))),
            "popped": Out(1), "drained": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        push, word = self._post(m)
        fifo_data, rows_ready = self._fifo(m, push, word)
        self._serializer(m, fifo_data, rows_ready)
        return m

    def _post(self, m):
        """Post-processing of the rows with their n-tile's bias and multipliers."""
        g, job = self.geometry, self.job
        rows, cols = g.rows, g.cols
        m.submodules.post = post = PostProcessor(cols)
        dr_j0 = Signal(range(g.max_n + cols))
        dr_tile = Signal(range(g.n_tiles_max))
        m.d.comb += [self.bias_read.addr.eq(dr_tile), self.mult_read.addr.eq(dr_tile)]
        with m.If(self.out_valid & (self.out_row == rows - 1)):
            m.d.sync += [dr_j0.eq(dr_j0 + cols), dr_tile.eq(dr_tile + 1)]
            with m.If(dr_j0 + cols >= job.n):
                m.d.sync += [dr_j0.eq(0), dr_tile.eq(0)]
        m.d.comb += [
            post.in_valid.eq(self.out_valid),
            post.bias_en.eq(job.bias), post.requant.eq(job.requant), post.relu.eq(job.relu),
            post.shift.eq(job.shift), post.zero.eq(job.zero),
        ]
        for j in range(cols):
            m.d.comb += [post.acc[j].eq(self.c[j]),
                         post.bias[j].eq(self.bias_read.data[32 * j:32 * j + 32]),
                         post.mult[j].eq(Mux(job.channel_quant,
                                             self.mult_read.data[32 * j:32 * j + 32], job.mult))]
        return post.out_valid, post.out_word

    def _fifo(self, m, push, word):
        """The row FIFO; returns the oldest row and whether there is one."""
        fifo_rows = self.fifo_rows
        # ``fifo_rows`` rows in a memory read asynchronously (distributed RAM), a write
        # pointer, a read pointer and a count. A pop moves only the read pointer and the count,
        # not a read register as wide as the row. Written out rather than the library's
        # SyncFIFO, whose level gates every write with a room check (the sequencer reserves the
        # room, so none is needed) and, with that fan-out, sat in the drain's loop from the pop
        # back to the pop; here the count serves only ``rows_ready``, a register of its own (the
        # count after this cycle is not zero).
        m.submodules.row_fifo = row_fifo = Memory(shape=len(word), depth=fifo_rows, init=[])
        fifo_write = row_fifo.write_port()
        fifo_read = row_fifo.read_port(domain="comb")
        produce, consume = Signal(range(fifo_rows)), Signal(range(fifo_rows))
        held = Signal(range(fifo_rows + 1))
        rows_ready = Signal()
        m.d.comb += [fifo_write.addr.eq(produce), fifo_write.data.eq(word),
                     fifo_write.en.eq(push), fifo_read.addr.eq(consume)]
        with m.If(push):
            m.d.sync += produce.eq(Mux(produce == fifo_rows - 1, 0, produce + 1))
        with m.If(self.popped):
            m.d.sync += consume.eq(Mux(consume == fifo_rows - 1, 0, consume + 1))
        m.d.sync += [held.eq(held + push - self.popped),
                     rows_ready.eq(push | (held >= 2) | ((held == 1) & ~self.popped))]
        return fifo_read.data, rows_ready

    def _serializer(self, m, fifo_data, rows_ready):
        """The oldest row's beats onto ``output``, and where the drain is in the job."""
        g, job = self.geometry, self.job
        rows, cols, width = g.rows, g.cols, g.stream_width
        beats_int32 = g.vector_beats(4 * cols)
        beats_int8 = g.vector_beats(cols)
        out_beat = Signal(range(beats_int32))
        out_row = Signal(range(rows))
        out_j0 = Signal(range(g.max_n + cols))
        out_i0 = Signal(33)
        padded = Signal(width * beats_int32)
        m.d.comb += padded.eq(fifo_data)
        # Whether the beat offered now is its row's last: a register, from the beat counter's
        # next value, so the output's handshake reaches the row FIFO's count (``popped``)
        # through one LUT. (``job.requant`` changes only at a job's start, long before its
        # first row.)
        row_end = Signal(init=int(beats_int32 == 1))
        beat_next = Signal.like(out_beat)
        m.d.comb += beat_next.eq(out_beat)
        m.d.sync += [out_beat.eq(beat_next),
                     row_end.eq(beat_next == Mux(job.requant, beats_int8, beats_int32) - 1)]
        out_last_n, next_out_n, restart_out_n = walk_flag(m, self.start, self.single.n, out_j0,
                                                          cols, job.n, "out_last_n")
        out_last_m, next_out_m, _ = walk_flag(m, self.start, self.single.m, out_i0, rows,
                                              job.m, "out_last_m")
        final_row = (out_row == rows - 1) & out_last_n & out_last_m
        output = self.output
        finished = Signal()  # the last beat is in the output link
        group_end = Signal()  # the last row of a group of ``rows`` leaves
        # Where the drain is in the job (the group's columns and rows, and whether they are the
        # last) moves on a cycle after the group's last row, from a register, so the output
        # handshake's decision does not reach these wide registers; the next group's last row
        # comes a cycle later at the soonest (with more than one row).
        group_left = delay(m, group_end, 1, "group_left") if rows > 1 else group_end
        with m.If(group_left):
            m.d.sync += [out_j0.eq(out_j0 + cols), next_out_n]
            with m.If(out_last_n):
                m.d.sync += [out_j0.eq(0), restart_out_n, out_i0.eq(out_i0 + rows), next_out_m]
        with m.If(rows_ready):
            m.d.comb += [
                output.valid.eq(1),
                output.payload.data.eq(padded.word_select(out_beat, width)),
                output.payload.last.eq(row_end & final_row),
            ]
            # (valid is high here: a beat leaves when ready, with no path from the closing
            # beat's decision below.)
            with m.If(output.ready):
                m.d.comb += beat_next.eq(out_beat + 1)
                with m.If(row_end):
                    m.d.comb += [self.popped.eq(1), beat_next.eq(0)]
                    m.d.sync += out_row.eq(out_row + 1)
                    with m.If(out_row == rows - 1):
                        m.d.sync += out_row.eq(0)
                        m.d.comb += group_end.eq(1)
                    with m.If(final_row):
                        m.d.sync += finished.eq(1)
        with m.Elif(self.closing & self.nothing_reserved & self.busy & ~finished):
            # A job that ended early still closes its output packet: one zero beat with TLAST.
            m.d.comb += [output.valid.eq(1), output.payload.last.eq(1)]
            with m.If(output.ready):
                m.d.sync += finished.eq(1)
        # The job is done when its last beat has left the output link.
        with m.If(finished & self.link_idle):
            m.d.comb += self.drained.eq(1)
            m.d.sync += finished.eq(0)
