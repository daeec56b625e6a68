"""The sparsa accelerator: an AXI-attached GEMM engine around the systolic array.

``Accelerator(rows, cols, stream_width, max_k, max_n)`` is the top level. Ports, named as Vivado
infers them: ``aclk``; ``aresetn`` (active-low, synchronous, AXI style); ``s_axis_*`` (operands
in: tdata, tvalid, tready, tlast, tkeep); ``m_axis_*`` (results out: tdata, tvalid, tready,
tlast, tkeep); ``s_axi_*`` (AXI4-Lite registers, :mod:`.regs`). Every packet is whole beats:
``m_axis_tkeep`` is all ones, and ``s_axis_tkeep`` is accepted for a complete interface and not
read (the host sends whole beats; a DMA's MM2S sets every byte of them). The stream layouts,
register map and arithmetic are those of :mod:`sparsa.protocol`.

Dataflow of one job (``C = A @ B``, ``M x K @ K x N``), one component per stage (each module's
docstring has its contract):

- :class:`.JobControl` checks the job's registers and latches the job at START; it holds the
  status (busy, done, error, closing).
- :class:`.Loader` (s_axis -> on-chip memories): the bias, per-column requantization
  multipliers and the whole B panel go to memories that stay resident for the job, B as
  ``ceil(N/cols) x K`` words of ``cols`` bytes; then A arrives one m-tile (``rows x K``) at a
  time into one of two banks (double buffering: the next m-tile loads while the current one
  computes).
- :class:`.Sequencer` (memories -> array): for each m-tile, for each n-tile, issues the
  k-steps of that output tile, one per cycle, so each A panel is reused across all n-tiles and
  B across all m-tiles; :class:`.Feed` puts each k-step's operands on the edge of the
  output-stationary :class:`.SystolicArray`. Before a tile's last k-step the sequencer
  reserves room for the tile's result rows downstream, so nothing ever overflows.
- :class:`.Drain` (array -> post-processing -> FIFO -> m_axis): finished rows go through
  :class:`.PostProcessor` into a FIFO of ``2 x rows`` rows and out as stream vectors, while
  the array already works on the next tile.
- :class:`.WorkCounters` count cycles, stalls, MACs and what sparse-skip saved.

Both stream ports are credit-based links (:class:`.CreditLink`): the handshake with the DMA is
answered beside the port, and the beats cross the die through registers, so no path runs from
the DMA's handshake into the loader's or the drain's decisions; the job is done when its last
beat has left the output link.

A dense job on an 8x8 array with a 64-bit stream is compute-bound once ``N > cols``: an m-tile
brings ``K`` beats and keeps the array busy ``ceil(N/cols) x K`` cycles.

Control: writing ``CONTROL.START`` resets the datapath (abandoning any job), then starts the job
with the registers' values; ``CONTROL.SOFT_RESET`` only resets the datapath. Bad jobs set
``ERROR`` instead of hanging; see :mod:`sparsa.protocol`.
"""

from amaranth import ClockDomain, DomainRenamer, Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from sparsa import protocol
from sparsa.protocol import DEFAULT_BUILD, Control, features

from .array import SystolicArray, check_lut_columns
from .bram import BlockMemory
from .counters import COUNTERS, WorkCounters
from .drain import Drain
from .feed import Feed, b_word_width
from .job import REGISTERS, JobControl, a_bank_words
from .link import CreditLink, beat_layout
from .loader import Loader
from .pe import LANES
from .pipeline import delay
from .regs import RegisterBlock
from .sequencer import Sequencer


class GemmCore(wiring.Component):
    """One job's stages, wired: :class:`.JobControl`, :class:`.Loader`, the memories,
    :class:`.Sequencer`, :class:`.Feed`, the :class:`.SystolicArray`, :class:`.Drain`,
    :class:`.WorkCounters`, and the stream links. Reset between jobs by the top level."""

    def __init__(self, geometry, sparse_skip=True, lut_columns=0, dsp_packing=False):
        g = self.geometry = geometry
        self.sparse_skip = sparse_skip
        self.lut_columns = lut_columns
        self.dsp_packing = dsp_packing
        beat = stream.Signature(beat_layout(g.stream_width))
        super().__init__({
            "start": In(1), "registers": In(REGISTERS),
            "s_axis": In(beat), "m_axis": Out(beat),
            "busy": Out(1), "done": Out(1), "error": Out(8),
            **{name: Out(32) for name in COUNTERS},
        })

    def elaborate(self, platform):
        m = Module()
        g = self.geometry
        n_tiles = g.n_tiles_max
        m.submodules.job = job = JobControl(g, self.sparse_skip)
        m.submodules.loader = loader = Loader(g, self.sparse_skip)
        m.submodules.sequencer = sequencer = Sequencer(g, self.sparse_skip)
        m.submodules.feed = feed = Feed(g.rows, g.cols)
        m.submodules.array = array = SystolicArray(g.rows, g.cols, self.lut_columns,
                                                   self.dsp_packing)
        m.submodules.drain = drain = Drain(g)
        m.submodules.counters = counters = WorkCounters(g.rows, g.cols, g.max_k_for(1))
        # The operand memories answer two cycles after the address: a block RAM's read and a
        # register on its output (in an ECP5 build the block's own output register).
        # B: a word per slot (values and lanes); A: a word per group (its four k-steps).
        m.submodules.b_mem = b_mem = BlockMemory(b_word_width(g.cols), n_tiles * g.max_k)
        m.submodules.a_mem = a_mem = BlockMemory(8 * g.rows * LANES,
                                                      2 * a_bank_words(g, self.sparse_skip))
        m.submodules.bias_mem = bias_mem = Memory(shape=32 * g.cols, depth=n_tiles, init=[])
        m.submodules.mult_mem = mult_mem = Memory(shape=32 * g.cols, depth=n_tiles, init=[])
        self._links(m, loader, drain)

        # The job: registers in, the latched job and status out; every stage reads it.
        m.d.comb += [job.start.eq(self.start), job.registers.eq(self.registers)]
        for stage in (loader, sequencer, drain):
            m.d.comb += [stage.start.eq(self.start), stage.job.eq(job.job)]
        for stage in (loader, sequencer):
            m.d.comb += [stage.rejected.eq(job.rejected), stage.registers.eq(self.registers)]
        for stage in (loader, drain):
            m.d.comb += stage.single.eq(job.single)
        m.d.comb += [
            job.tlast_early.eq(loader.tlast_early), job.tlast_missing.eq(loader.tlast_missing),
            job.job_end.eq(sequencer.job_end), job.drained.eq(drain.drained),
            self.busy.eq(job.busy), self.done.eq(job.done), self.error.eq(job.error),
        ]

        # Loader -> memories -> sequencer, feed -> array -> drain.
        wiring.connect(m, loader.bias_write, bias_mem.write_port())
        wiring.connect(m, loader.mult_write, mult_mem.write_port())
        wiring.connect(m, loader.b_write, b_mem.write)
        wiring.connect(m, loader.a_write, a_mem.write)
        if self.sparse_skip:
            # Few words but wide: block RAM, so the masks cost no LUTs (ram_style is the
            # attribute Vivado and Yosys both read), with its output register (a block RAM's
            # own on an ECP5, whose plain read comes too late for any logic after it).
            m.submodules.b_nonzero_mem = b_nonzero_mem = BlockMemory(
                g.max_k, n_tiles, attrs={"ram_style": "block"})
            wiring.connect(m, loader.b_mask_write, b_nonzero_mem.write)
            wiring.connect(m, sequencer.b_mask, b_nonzero_mem.read)
            m.d.comb += [sequencer.a_nonzero[bank].eq(loader.a_nonzero[bank]) for bank in range(2)]
            m.d.comb += sequencer.k_valid.eq(loader.k_valid)
        m.d.comb += [
            sequencer.closing.eq(job.closing), sequencer.tlast_early.eq(loader.tlast_early),
            sequencer.panel_full.eq(loader.panel_full), sequencer.loading_a.eq(loader.loading_a),
            loader.free.eq(sequencer.free),
            a_mem.read.addr.eq(sequencer.a_addr), b_mem.read.addr.eq(sequencer.b_addr),
            feed.step.eq(sequencer.step), feed.slot.eq(sequencer.slot),
            feed.a_word.eq(a_mem.read.data), feed.b_word.eq(b_mem.read.data),
            array.valid.eq(feed.valid), array.first.eq(feed.first), array.last.eq(feed.last),
        ]
        for i in range(g.rows):
            m.d.comb += [array.a[i].eq(feed.a[i]), array.a_zero[i].eq(feed.a_zero[i])]
        for j in range(g.cols):
            m.d.comb += [array.b[j].eq(feed.b[j]), array.b_zero[j].eq(feed.b_zero[j]),
                         array.b_lane[j].eq(feed.b_lane[j])]

        bias_read = bias_mem.read_port(domain="comb")
        mult_read = mult_mem.read_port(domain="comb")
        m.d.comb += [
            drain.out_valid.eq(array.out_valid), drain.out_row.eq(array.out_row),
            *(drain.c[j].eq(array.c[j]) for j in range(g.cols)),
            bias_read.addr.eq(drain.bias_read.addr), drain.bias_read.data.eq(bias_read.data),
            mult_read.addr.eq(drain.mult_read.addr), drain.mult_read.data.eq(mult_read.data),
            drain.closing.eq(job.closing), drain.busy.eq(job.busy),
            drain.nothing_reserved.eq(sequencer.nothing_reserved),
            sequencer.popped.eq(drain.popped),
        ]

        m.d.comb += [
            counters.busy.eq(job.busy),
            counters.waiting_panel.eq(sequencer.waiting_panel),
            counters.waiting_room.eq(sequencer.waiting_room),
            counters.counted.eq(feed.counted), counters.counted_slot.eq(feed.counted_slot),
            counters.zeros.eq(feed.zeros), counters.lanes.eq(feed.lanes),
            counters.advance.eq(sequencer.advance), counters.skipped.eq(sequencer.skipped),
            counters.slot.eq(sequencer.slot),
            *(getattr(self, name).eq(getattr(counters, name)) for name in COUNTERS),
        ]
        return m

    def _links(self, m, loader, drain):
        """The stream ports' credit links (:class:`.CreditLink`)."""
        # The port's handshake is answered beside the port, from a credit count, and the beats
        # cross to the loader (from the drain) through registers into a FIFO, so no path runs
        # from the DMA's handshake into the loader's or the drain's decisions, nor between the
        # two ends of a link. The input link takes beats only from ``start`` to the first
        # TLAST: a following packet waits outside for its job, and nothing is held across the
        # START reset.
        layout = beat_layout(self.geometry.stream_width)
        m.submodules.s_link = s_link = CreditLink(layout, buffered=True)
        m.submodules.m_link = m_link = CreditLink(layout)
        accepting = Signal()
        m.d.comb += [
            self.s_axis.ready.eq(s_link.i.ready & accepting),
            s_link.i.valid.eq(self.s_axis.valid & accepting),
            s_link.i.payload.eq(self.s_axis.payload),
            drain.link_idle.eq(m_link.idle),
        ]
        wiring.connect(m, s_link.o, loader.input)
        wiring.connect(m, drain.output, m_link.i)
        wiring.connect(m, m_link.o, wiring.flipped(self.m_axis))
        with m.If(self.start):
            m.d.sync += accepting.eq(1)
        with m.If(self.s_axis.valid & self.s_axis.ready & self.s_axis.payload.last):
            m.d.sync += accepting.eq(0)


class Accelerator(wiring.Component):
    """The top level. For arrays with more PEs than the part has DSP slices: ``lut_columns``,
    how many of the array's columns (the last ones) multiply in LUTs; ``dsp_packing``, the
    other columns in pairs with two INT8 MACs per DSP slice (:class:`.PackedPair`)."""

    def __init__(self, rows=DEFAULT_BUILD["rows"], cols=DEFAULT_BUILD["cols"],
                 stream_width=DEFAULT_BUILD["stream_width"], max_k=DEFAULT_BUILD["max_k"],
                 max_n=DEFAULT_BUILD["max_n"], sparse_skip=True, lut_columns=0,
                 dsp_packing=False):
        protocol.check_build(rows, cols, stream_width, max_k, max_n)
        check_lut_columns(lut_columns, cols)
        self.lut_columns = lut_columns
        self.dsp_packing = bool(dsp_packing)
        self.geometry = protocol.Geometry(rows, cols, stream_width, max_k, max_n)
        self.sparse_skip = sparse_skip
        self._regs = RegisterBlock()
        members = {"aclk": In(1), "aresetn": In(1)}
        members.update({name: member for name, member in self._regs.signature.members.items()
                        if name.startswith("s_axi_")})
        members.update({
            "s_axis_tdata": In(stream_width), "s_axis_tvalid": In(1),
            "s_axis_tready": Out(1), "s_axis_tlast": In(1), "s_axis_tkeep": In(stream_width // 8),
            "m_axis_tdata": Out(stream_width), "m_axis_tvalid": Out(1),
            "m_axis_tready": In(1), "m_axis_tlast": Out(1), "m_axis_tkeep": Out(stream_width // 8),
        })
        super().__init__(members)

    def capabilities(self):
        g = self.geometry
        return {"ROWS": g.rows, "COLS": g.cols, "STREAM_WIDTH": g.stream_width,
                "MAX_K": g.max_k, "MAX_N": g.max_n,
                # (Groups of at most 2 or 1 steps take fewer of the B memory's slots.)
                "MAX_K2": g.max_k_for(2) if self.sparse_skip else g.max_k,
                "MAX_K1": g.max_k_for(1) if self.sparse_skip else g.max_k,
                "FEATURES": features(self.sparse_skip)}

    def elaborate(self, platform):
        m = Module()
        m.domains.sync = sync = ClockDomain("sync")
        m.d.comb += [sync.clk.eq(self.aclk), sync.rst.eq(~self.aresetn)]

        m.submodules.regs = regs = self._regs
        for name in regs.signature.members:
            if name.startswith("s_axi_"):
                port, inner = getattr(self, name), getattr(regs, name)
                if regs.signature.members[name].flow == wiring.In:
                    m.d.comb += inner.eq(port)
                else:
                    m.d.comb += port.eq(inner)

        control = regs.CONTROL_write
        start = control & regs.CONTROL[Control.START.bit_length() - 1]
        soft_reset = control & regs.CONTROL[Control.SOFT_RESET.bit_length() - 1]
        # START first resets the datapath, then starts it three cycles later from a clean slate
        # (the core checks the job's registers all the while). The core has a clock domain of
        # its own whose reset is one register, set by aresetn, START or SOFT_RESET: a net from a
        # single flip-flop, which reaches the core's registers all over the die without logic
        # on the way (nextpnr puts it on a global network).
        m.domains.core = core_domain = ClockDomain("core")
        core_reset = Signal(init=1)
        m.d.sync += core_reset.eq(start | soft_reset)
        m.d.comb += [core_domain.clk.eq(self.aclk), core_domain.rst.eq(core_reset)]
        core = DomainRenamer("core")(GemmCore(self.geometry, self.sparse_skip,
                                              self.lut_columns, self.dsp_packing))
        m.submodules.core = core
        registers = core.registers
        m.d.comb += [
            core.start.eq(delay(m, start & ~soft_reset, 3, "start_")),
            registers.m.eq(regs.M), registers.k.eq(regs.K), registers.n.eq(regs.N),
            registers.options.eq(regs.OPTIONS), registers.quant_mult.eq(regs.QUANT_MULT),
            registers.quant_shift.eq(regs.QUANT_SHIFT), registers.quant_zero.eq(regs.QUANT_ZERO),
            # The AXI4-Stream ports under the names Vivado infers.
            core.s_axis.payload.data.eq(self.s_axis_tdata),
            core.s_axis.payload.last.eq(self.s_axis_tlast),
            core.s_axis.valid.eq(self.s_axis_tvalid), self.s_axis_tready.eq(core.s_axis.ready),
            self.m_axis_tdata.eq(core.m_axis.payload.data),
            self.m_axis_tlast.eq(core.m_axis.payload.last),
            self.m_axis_tkeep.eq(-1),
            self.m_axis_tvalid.eq(core.m_axis.valid), core.m_axis.ready.eq(self.m_axis_tready),
            regs.STATUS.eq(core.busy * protocol.Status.BUSY | core.done * protocol.Status.DONE
                           | (core.error != 0) * protocol.Status.ERROR),
            regs.ERROR.eq(core.error),
            *(getattr(regs, name).eq(getattr(core, name.lower())) for name in protocol.COUNTERS),
            regs.ID.eq(protocol.MAGIC),
            regs.VERSION.eq(protocol.REGISTER["VERSION"].reset),
        ]
        for name, value in self.capabilities().items():
            m.d.comb += getattr(regs, name).eq(value)
        return m
