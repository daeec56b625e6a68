"""The sparsa accelerator: an AXI-attached GEMM engine around the systolic array.

``Accelerator(rows, cols, stream_width, max_k, max_n)`` is the top level. Ports, named as Vivado
infers them: ``aclk``; ``aresetn`` (active-low, synchronous, AXI style); ``s_axis_*`` (operands
in: tdata, tvalid, tready, tlast); ``m_axis_*`` (results out: tdata, tvalid, tready, tlast);
``s_axi_*`` (AXI4-Lite registers, :mod:`.regs`). The stream layouts, register map and
arithmetic are those of :mod:`sparsa.protocol`.

Dataflow of one job (``C = A @ B``, ``M x K @ K x N``):

- **Loader** (s_axis -> on-chip memories): the bias, per-column requantization multipliers
  and the whole B panel go to memories that
  stay resident for the job, B as ``ceil(N/cols) x K`` words of ``cols`` bytes; then A arrives
  one m-tile (``rows x K``) at a time into one of two banks (double buffering: the next m-tile
  loads while the current one computes).
- **Sequencer** (memories -> array): for each m-tile, for each n-tile, issues the K k-steps of
  that output tile to the output-stationary :class:`.SystolicArray`, one per cycle, so each A
  panel is reused across all n-tiles and B across all m-tiles. Before a tile's last k-step it
  reserves room for the tile's result rows downstream, so nothing ever overflows.
- **Drain** (array -> post-processing -> FIFO -> m_axis): finished rows go through
  :class:`.PostProcessor` into a FIFO of ``2 x rows`` rows and out as stream vectors, while
  the array already works on the next tile.

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

from amaranth import (Cat, ClockDomain, Const, DomainRenamer, Module, Mux, Signal, signed,
                      unsigned)
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import bits_for

from sparsa import protocol
from sparsa.protocol import KNOWN_OPTIONS, STREAM_WIDTHS, Control, Error, Option, features

from .array import SystolicArray, check_dimensions, check_lut_columns
from .bram import BlockMemory
from .link import CreditLink
from .picker import StepPicker, group_flags
from .pipeline import delay, lut_product, or_all
from .postproc import PostProcessor
from .regs import RegisterBlock


class GemmCore(wiring.Component):
    """Loader, sequencer, array and drain of one job; reset between jobs by the top level."""

    def __init__(self, geometry, sparse_skip=True, lut_columns=0, dsp_packing=False):
        g = self.geometry = geometry
        self.sparse_skip = sparse_skip
        self.lut_columns = lut_columns
        self.dsp_packing = dsp_packing
        super().__init__({
            "start": In(1),
            "m": In(32), "k": In(32), "n": In(32), "options": In(32),
            "quant_mult": In(32), "quant_shift": In(32), "quant_zero": In(32),
            "s_axis_tdata": In(g.stream_width), "s_axis_tvalid": In(1),
            "s_axis_tready": Out(1), "s_axis_tlast": In(1),
            "m_axis_tdata": Out(g.stream_width), "m_axis_tvalid": Out(1),
            "m_axis_tready": In(1), "m_axis_tlast": Out(1),
            "busy": Out(1), "done": Out(1), "error": Out(8),
            "cycles": Out(32), "stall_in": Out(32), "stall_out": Out(32), "macs": Out(32),
            "macs_skipped": Out(32), "ksteps_skipped": Out(32),
        })

    def elaborate(self, platform):
        m = Module()
        g = self.geometry
        rows, cols, width = g.rows, g.cols, g.stream_width
        n_tiles_max = -(-g.max_n // cols)
        fifo_rows = 2 * rows
        gap = max(rows, cols)

        # ---- the job, latched at start -------------------------------------------------------
        # The job's values are latched at start and read only after it, so they need no reset
        # (nor do the other data registers marked ``reset_less`` below: the fewer loads on the
        # core's reset, the shorter its net).
        job_m = Signal(32, reset_less=True)
        job_k = Signal(range(g.max_k + 1), reset_less=True)
        job_n = Signal(range(g.max_n + 1), reset_less=True)
        bias_en, requant, relu, no_skip = Signal(), Signal(), Signal(), Signal()
        channel_quant = Signal()
        mult = Signal(signed(32), reset_less=True)
        shift = Signal(unsigned(5), reset_less=True)
        zero = Signal(signed(8), reset_less=True)
        closing = Signal()  # no more tiles will be issued; close the output packet when drained
        # The job's registers are checked ahead of ``start`` (the top level starts the core
        # three cycles after the START write): each condition is registered, then the first
        # that fails gives the error code, so neither stage holds more than one wide compare.
        # Both registers follow the job's registers in every cycle, through the core's reset
        # too (which comes a cycle after the START write), so ``check`` is right at ``start``.
        zero_signed = self.quant_zero.as_signed()
        requant_asked = (self.options & Option.REQUANT).any()
        conditions = [
            (Error.ZERO_DIMENSION, (self.m == 0) | (self.k == 0) | (self.n == 0)),
            (Error.K_TOO_LARGE, self.k > g.max_k),
            (Error.N_TOO_LARGE, self.n > g.max_n),
            (Error.BAD_OPTION, ((self.options & ~Const(KNOWN_OPTIONS, 32)) != 0)
                | ((self.options & Option.CHANNEL_QUANT).any() & ~requant_asked)),
            (Error.BAD_QUANT, requant_asked & ((self.quant_shift > 31) | (zero_signed < -128)
                                               | (zero_signed > 127))),
        ]
        failed = Signal(len(conditions), reset_less=True)
        m.d.sync += failed.eq(Cat(*(condition for _, condition in conditions)))
        check = Signal(8, reset_less=True)
        verdict = Const(Error.NONE, 8)
        for index, (error, _) in reversed(list(enumerate(conditions))):
            verdict = Mux(failed[index], error, verdict)
        m.d.sync += check.eq(verdict)
        rejected = Signal()
        with m.If(self.start):
            m.d.sync += [
                job_m.eq(self.m), job_k.eq(self.k), job_n.eq(self.n),
                bias_en.eq(self.options & Option.BIAS),
                requant.eq((self.options & Option.REQUANT).any()),
                relu.eq((self.options & Option.RELU).any()),
                no_skip.eq((self.options & Option.NO_SKIP).any()),
                channel_quant.eq((self.options & Option.CHANNEL_QUANT).any()),
                mult.eq(self.quant_mult), shift.eq(self.quant_shift), zero.eq(self.quant_zero),
                self.busy.eq(1), self.error.eq(check),
            ]
            m.d.comb += rejected.eq(check != Error.NONE)
            with m.If(rejected):
                m.d.sync += closing.eq(1)

        # ---- memories ------------------------------------------------------------------------
        m.submodules.bias_mem = bias_mem = Memory(shape=32 * cols, depth=n_tiles_max, init=[])
        m.submodules.mult_mem = mult_mem = Memory(shape=32 * cols, depth=n_tiles_max, init=[])
        # The operand memories answer two cycles after the address: a block RAM's read and a
        # register on its output (in an ECP5 build the block's own output register).
        m.submodules.b_mem = b_mem = BlockMemory(8 * cols, n_tiles_max * g.max_k)
        m.submodules.a_mem = a_mem = BlockMemory(8 * rows, 2 * g.max_k)
        bias_wr = bias_mem.write_port()
        bias_rd = bias_mem.read_port(domain="comb")
        mult_wr, mult_rd = mult_mem.write_port(), mult_mem.read_port(domain="comb")
        panel_full = Signal(2)  # per A bank: loaded and not yet consumed
        if self.sparse_skip:
            # Nonzero masks: one per A bank (registers) and one per n-tile of B (a small memory).
            # Each is a shift register: a word's "not all zero" bit enters at the top, so after
            # the K words of a panel, k-step k sits at bit max_k - K + k (no index decoders).
            # Bits below max_k - K are stale and masked off by ``k_valid``, whose top K bits are
            # set while the first n-tile of B arrives.
            a_nonzero = [Signal(g.max_k, name=f"a_nonzero{bank}", reset_less=True)
                         for bank in range(2)]
            k_valid = Signal(g.max_k)
            # Few words but wide: block RAM, so the masks cost no LUTs (ram_style is the
            # attribute Vivado and Yosys both read), with its output register (a block RAM's
            # own on an ECP5, whose plain read comes too late for any logic after it).
            m.submodules.b_nonzero_mem = b_nonzero_mem = BlockMemory(
                g.max_k, n_tiles_max, attrs={"ram_style": "block"})

        at_start = {}  # (step, register): ``step >= register``, registered

        def walk_flag(value, step, limit, register, name):
            """A register holding ``value + step >= limit`` while ``value`` walks 0, step,
            2 step, ... (a position in the job against one of its dimensions). Returns it with
            the statements that keep it true to ``value`` where ``value`` steps on and where it
            returns to 0. Both outcomes are compared from registers beforehand, so the flag
            costs the control logic one multiplexer, not an adder and a compare. At ``start``
            it is set from the job's ``register`` (``value`` starts at 0), compared in the
            cycles before, as the job check is (the registers hold still from the START write
            on), so ``start`` loads a register, not a 32-bit compare."""
            key = (step, id(register))
            if key not in at_start:
                at_start[key] = Signal(name=f"{name}_at_start", reset_less=True)
                m.d.sync += at_start[key].eq(step >= register)
            flag = Signal(name=name)
            with m.If(self.start):
                m.d.sync += flag.eq(at_start[key])
            return flag, flag.eq(value + 2 * step >= limit), flag.eq(step >= limit)

        # ---- stream links --------------------------------------------------------------------
        # Each stream port is a credit-based link (:class:`.CreditLink`): the port's handshake
        # is answered beside the port, from a credit count, and the beats cross to the loader
        # (from the drain) through registers into a FIFO, so no path runs from the DMA's
        # handshake into the loader's or the drain's decisions, nor between the two ends of a
        # link. The input link takes beats only from ``start`` to the first TLAST, as the loader
        # alone did: a following packet waits outside for its job, and nothing is held across
        # the START reset.
        m.submodules.s_link = s_link = CreditLink(width + 1, buffered=True)
        m.submodules.m_link = m_link = CreditLink(width + 1)
        accepting = Signal()
        in_valid, in_ready, in_last, in_data = Signal(), Signal(), Signal(), Signal(width)
        out_valid, out_ready, out_last, out_data = Signal(), Signal(), Signal(), Signal(width)
        m.d.comb += [
            self.s_axis_tready.eq(s_link.i.ready & accepting),
            s_link.i.valid.eq(self.s_axis_tvalid & accepting),
            s_link.i.payload.eq(Cat(self.s_axis_tdata, self.s_axis_tlast)),
            in_valid.eq(s_link.o.valid), s_link.o.ready.eq(in_ready),
            in_data.eq(s_link.o.payload[:width]), in_last.eq(s_link.o.payload[width]),
            m_link.i.valid.eq(out_valid), out_ready.eq(m_link.i.ready),
            m_link.i.payload.eq(Cat(out_data, out_last)),
            self.m_axis_tvalid.eq(m_link.o.valid), m_link.o.ready.eq(self.m_axis_tready),
            self.m_axis_tdata.eq(m_link.o.payload[:width]),
            self.m_axis_tlast.eq(m_link.o.payload[width]),
        ]
        with m.If(self.start):
            m.d.sync += accepting.eq(1)
        with m.If(self.s_axis_tvalid & self.s_axis_tready & self.s_axis_tlast):
            m.d.sync += accepting.eq(0)

        # ---- loader: s_axis -> memories ------------------------------------------------------
        beats_bias = g.vector_beats(4 * cols)
        beats_b = g.vector_beats(cols)
        beats_a = g.vector_beats(rows)
        beats_max = max(beats_bias, beats_b, beats_a)
        beat = Signal(range(beats_max))
        # A word's earlier beats, each in its own register (written when its beat is taken and
        # never cleared: a word uses only the beats it has, and the memories' widths cut off
        # the rest), so no data register waits on whether the word is complete.
        partial = [Signal(width, name=f"partial{index}", reset_less=True)
                   for index in range(beats_max - 1)]
        ld_k = Signal(range(g.max_k))
        ld_j0 = Signal(range(g.max_n + cols))
        ld_i0 = Signal(33)
        ld_nt = Signal(range(n_tiles_max))
        # The mask of the n-tile being loaded, shifted in (no reset: bits that were not shifted
        # in during this job are masked off by ``k_valid``, as are a_nonzero's).
        b_nonzero = Signal(g.max_k, reset_less=True)
        ld_b_addr = Signal(range(n_tiles_max * g.max_k))
        ld_bank = Signal()
        word = Signal(width * beats_max)
        take = Signal()
        # The loader's ready: always, but while loading A into a bank that is not yet free.
        # (In IDLE nothing is waiting: the input link stops taking beats at TLAST, and before
        # the job starts it is empty.) ``loading_a`` follows the FSM into and out of A, so the
        # ready is one LUT of registers.
        loading_a = Signal()
        bank_free, panel_event = Signal(), Signal()  # see below
        m.d.comb += [
            in_ready.eq(~loading_a | (bank_free & ~panel_event)),
            take.eq(in_valid & in_ready),
            word.eq(Cat(*(Mux(beat == index, in_data, part)
                          for index, part in enumerate(partial)), in_data)),
        ]
        # Completed words reach the memories a cycle later, through registers (enable, address
        # and the word), so the memories' write enables are not on the loader's decisions'
        # path. Nothing reads a word that soon: the sequencer looks at a panel only once its
        # flag is set (itself a cycle after the word), the drain at bias and multipliers much
        # later.
        word_q = Signal.like(word, reset_less=True)
        m.d.sync += word_q.eq(word)

        def write_later(en, addr, data, address, name):
            enable = Signal(name=f"{name}_write")
            m.d.sync += [en.eq(enable), addr.eq(address)]
            m.d.comb += data.eq(word_q)
            return enable

        bias_write = write_later(bias_wr.en, bias_wr.addr, bias_wr.data, ld_nt, "bias")
        mult_write = write_later(mult_wr.en, mult_wr.addr, mult_wr.data, ld_nt, "mult")
        b_write = write_later(b_mem.w_en, b_mem.w_addr, b_mem.w_data, ld_b_addr, "b")
        a_write = write_later(a_mem.w_en, a_mem.w_addr, a_mem.w_data,
                              Mux(ld_bank, g.max_k, 0) + ld_k, "a")
        last_k, next_k, restart_k = walk_flag(ld_k, 1, job_k, self.k, "last_k")
        last_n_tile, next_n_tile, restart_n_tile = walk_flag(ld_j0, cols, job_n, self.n,
                                                             "last_n_tile")
        last_m_tile, next_m_tile, _ = walk_flag(ld_i0, rows, job_m, self.m, "last_m_tile")
        b_done, a_done = Signal(), Signal()  # a B / an A word is complete

        def collect(beats):
            """Gather ``beats`` beats into ``word``; true on the beat that completes it."""
            complete = Signal(name=f"complete{beats}")
            # (A one-beat word needs no compare: beat is 0 in its states, since every word
            # before it completed or the job started.)
            m.d.comb += complete.eq(take & (beat == beats - 1) if beats > 1 else take)
            with m.If(take):
                for index, part in enumerate(partial[:beats - 1]):
                    with m.If(beat == index):
                        m.d.sync += part.eq(in_data)
                with m.If(complete):
                    m.d.sync += beat.eq(0)
                with m.Else():
                    m.d.sync += beat.eq(beat + 1)
            return complete

        # A packet of the wrong length is reported a cycle later, from registered events, so
        # the error code and ``closing`` are not on the loader's own path.
        tlast_early, tlast_missing = Signal(), Signal()
        tlast_early_q = delay(m, tlast_early, 1, "tlast_early_q")
        with m.If(tlast_early_q):
            m.d.sync += [self.error.eq(Error.TLAST_EARLY), closing.eq(1)]
        with m.If(delay(m, tlast_missing, 1, "tlast_missing_q")):
            m.d.sync += self.error.eq(Error.TLAST_MISSING)

        def early_tlast(final):
            with m.If(take & in_last & ~final):
                m.d.comb += tlast_early.eq(1)

        def column_vectors(write):
            """Load one vector of ``cols`` int32 per n-tile (``write``: the memory's enable);
            true after the last."""
            complete = collect(beats_bias)
            early_tlast(Const(0))
            m.d.comb += write.eq(complete)
            with m.If(complete):
                m.d.sync += [ld_nt.eq(ld_nt + 1), ld_j0.eq(ld_j0 + cols), next_n_tile]
                with m.If(last_n_tile):
                    m.d.sync += [ld_j0.eq(0), ld_nt.eq(0), restart_n_tile]
            return complete & last_n_tile

        # Whether the A bank being loaded is free, from registers of the cycle before. A bank
        # turns full only by the loader's own panel event, which comes after the loader has
        # moved on to the other bank, and the loader waits in the cycle after each move
        # (``panel_event``); so the lag never lets it write a full bank, and costs only a cycle
        # when the sequencer frees one. In A, the loader's ready is a choice between registers.
        m.d.sync += [bank_free.eq(~panel_full.bit_select(ld_bank, 1)),
                     panel_event.eq(a_done & last_k)]

        with m.FSM(name="loader"):
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += [ld_k.eq(0), ld_j0.eq(0), ld_i0.eq(0), ld_nt.eq(0),
                                 ld_b_addr.eq(0), ld_bank.eq(0), beat.eq(0)]
                    with m.If(rejected):
                        m.next = "DRAIN"
                    with m.Elif(self.options & Option.BIAS):
                        m.next = "BIAS"
                    with m.Elif(self.options & Option.CHANNEL_QUANT):
                        m.next = "MULT"
                    with m.Else():
                        m.next = "B"
            with m.State("BIAS"):
                with m.If(column_vectors(bias_write)):
                    m.next = "B"
                    with m.If(channel_quant):
                        m.next = "MULT"
                with m.If(take & in_last):
                    m.next = "IDLE"
            with m.State("MULT"):
                with m.If(column_vectors(mult_write)):
                    m.next = "B"
                with m.If(take & in_last):
                    m.next = "IDLE"
            with m.State("B"):
                complete = collect(beats_b)
                early_tlast(Const(0))
                m.d.comb += [b_write.eq(complete), b_done.eq(complete)]
                with m.If(complete):
                    m.d.sync += [ld_b_addr.eq(ld_b_addr + 1), ld_k.eq(ld_k + 1), next_k]
                    with m.If(last_k):
                        m.d.sync += [ld_k.eq(0), restart_k, ld_j0.eq(ld_j0 + cols), next_n_tile,
                                     ld_nt.eq(ld_nt + 1)]
                        with m.If(last_n_tile):
                            m.d.sync += loading_a.eq(1)
                            m.next = "A"
                with m.If(take & in_last):
                    m.d.sync += loading_a.eq(0)
                    m.next = "IDLE"
            with m.State("A"):
                complete = collect(beats_a)
                final = complete & last_k & last_m_tile
                early_tlast(final)
                m.d.comb += [a_write.eq(complete), a_done.eq(complete)]
                with m.If(complete):
                    m.d.sync += [ld_k.eq(ld_k + 1), next_k]
                    with m.If(last_k):
                        m.d.sync += [ld_k.eq(0), restart_k, ld_bank.eq(~ld_bank),
                                     ld_i0.eq(ld_i0 + rows), next_m_tile]
                with m.If(take & in_last):
                    m.d.sync += loading_a.eq(0)
                    m.next = "IDLE"
                with m.Elif(final):
                    m.d.comb += tlast_missing.eq(1)
                    m.d.sync += loading_a.eq(0)
                    m.next = "DRAIN"
            with m.State("DRAIN"):
                with m.If(take & in_last):
                    m.next = "IDLE"

        def low_bits_any(bits):
            """``word[:bits].any()`` with the beat's choice after the ORs (the same value, as
            ``any`` of a multiplexer is the multiplexer of the ``any``s), so ``beat`` reaches one
            multiplexer per beat rather than every bit on the way."""
            terms = []
            for index in range(-(-bits // width)):
                size = min(width, bits - index * width)
                arriving = in_data[:size].any()
                if index < len(partial):
                    arriving = Mux(beat == index, arriving, partial[index][:size].any())
                terms.append(arriving)
            return or_all(terms)

        # The masks and the panel flags take a completed word's news a cycle later, from
        # registers, so their wide shift registers' enables are not on the loader's own path.
        # (The sequencer looks at a panel only once its flag is set, and at B's masks later.)
        a_event, a_bank = Signal(), Signal()
        m.d.sync += [a_event.eq(a_done), a_bank.eq(ld_bank)]
        if self.sparse_skip:
            b_event, b_last, b_first = Signal(), Signal(), Signal()
            b_bit, a_bit = Signal(), Signal()
            b_nt = Signal.like(ld_nt)
            m.d.sync += [
                b_event.eq(b_done), b_last.eq(last_k), b_first.eq(ld_nt == 0), b_nt.eq(ld_nt),
                b_bit.eq(no_skip | low_bits_any(8 * cols)),
                a_bit.eq(no_skip | low_bits_any(8 * rows)),
            ]
            b_shifted = Signal(g.max_k)  # b_nonzero with the completed B word's bit shifted in
            m.d.comb += [
                b_shifted.eq(Cat(b_nonzero[1:], b_bit)),
                b_nonzero_mem.w_addr.eq(b_nt),
                b_nonzero_mem.w_data.eq(b_shifted),
                b_nonzero_mem.w_en.eq(b_event & b_last),
            ]
            with m.If(b_event):
                m.d.sync += b_nonzero.eq(b_shifted)
                with m.If(b_first):
                    m.d.sync += k_valid.eq(Cat(k_valid[1:], 1))
            for bank in range(2):
                with m.If(a_event & (a_bank == bank)):
                    m.d.sync += a_nonzero[bank].eq(Cat(a_nonzero[bank][1:], a_bit))

        # ---- sequencer: memories -> array ----------------------------------------------------
        # With sparse-skip, the k-steps to issue for an output tile are the set bits of the
        # tile's mask: the A panel's nonzero mask AND the n-tile's B mask. A StepPicker hands
        # them out lowest first, one per cycle, so all-zero k-steps cost no cycle. Without
        # sparse-skip (a build for comparison), a counter walks k.
        #
        # Per tile, LOAD starts the picker (or the counter) and ISSUE issues a k-step per cycle
        # as they come; the last one waits until the FIFO has room for the tile's rows and the
        # array's issue rule allows. Every decision reads registers: where the tile is in the
        # job (``sq_last_n``/``sq_last_m``), its real size (``slot``), the memory bases and the
        # B mask (out of its block RAM, registered, read while the previous tile issues) are all
        # prepared cycles ahead, since a tile lasts at least three cycles past LOAD.
        m.submodules.array = array = SystolicArray(rows, cols, self.lut_columns,
                                                   self.dsp_packing)
        sq_nt = Signal(range(n_tiles_max))
        sq_n_left = Signal(range(g.max_n + 1))  # columns of C from this tile's first one on
        sq_m_left = Signal(32)  # rows of C from this tile's first one on
        sq_b_base = Signal(range(n_tiles_max * g.max_k + 1))
        sq_bank = Signal()
        sq_last_n, sq_last_m = Signal(), Signal()  # the tile is in the last n-tile / m-tile
        issued = Signal(range(g.max_k + 1))  # k-steps of this tile issued so far
        # Real products per k-step of this tile.
        slot = Signal(range(rows * cols + 1), reset_less=True)
        since_last = Signal(range(gap + 1))
        reserved = Signal(range(fifo_rows + rows + 1))
        reserve, popped = Signal(), Signal()  # issue_last and row_popped, a cycle late
        issue = Signal()  # a k-step goes to the array
        take = Signal()  # the same, worked out apart for the picker (see ``accept_more``)
        issue_last = Signal()
        advance = Signal()  # issue_last, a cycle later: the sequencer's position moves on
        tile_load = Signal()  # LOAD: the tile's k-steps start
        in_issue = Signal()  # the sequencer is in ISSUE
        sequencer_in_load = Signal()  # the sequencer is in LOAD
        # The k-step to issue now is k_position - k_offset (the nonzero masks hold k-step k at
        # bit max_k - K + k); the offset is folded into registered memory base addresses.
        k_position = Signal(max(1, bits_for(g.max_k - 1)))
        k_offset = Signal(range(g.max_k), reset_less=True)
        ready = Signal()  # a k-step is there to issue
        more = Signal()  # another k-step of this tile follows the one issued now
        empty = Signal()  # this tile has no k-step to issue at all
        mask_ready = Signal()  # LOAD may start the tile (its B mask is out of the block RAM)
        # Memory bases minus the offset, modulo the address width (the sums are always in range).
        a_base, b_base = Signal.like(a_mem.r_addr), Signal.like(b_mem.r_addr)
        rows_real = Signal(range(rows + 1), reset_less=True)
        cols_real = Signal(range(cols + 1), reset_less=True)
        m.d.sync += [
            a_base.eq(Mux(sq_bank, g.max_k, 0) - k_offset),
            b_base.eq(sq_b_base - k_offset),
            sq_last_n.eq(sq_n_left <= cols),
            sq_last_m.eq(sq_m_left <= rows),
            rows_real.eq(Mux(sq_m_left >= rows, rows, sq_m_left)),
            cols_real.eq(Mux(sq_n_left >= cols, cols, sq_n_left)),
            slot.eq(lut_product(rows_real, cols_real)),
        ]
        kill = Signal()  # a zero k-step: a tile with nothing to issue still yields its results
        row_popped = Signal()
        if self.sparse_skip:
            m.submodules.picker = picker = StepPicker(g.max_k)
            next_nt = Signal.like(sq_nt)
            # The B mask is read for the tile after this one while issuing, else for this one;
            # the tags follow the address through the block RAM and its output register. The
            # address is a register: the block RAM's address pins see no logic from the
            # sequencer's state. Any address it reads is safe, ``mask_ready`` compares the tags.
            b_addr, b_tag1, b_tag2 = Signal.like(sq_nt), Signal.like(sq_nt), Signal.like(sq_nt)
            b_mask = b_nonzero_mem.r_data  # the B mask at b_tag2
            # B's masks are all in their memory a cycle after B's last word; ``tile_mask`` has
            # them four cycles later. A panel of one k-step can be full before that, so a
            # job's tiles also wait for ``b_final`` (a few cycles after the loader leaves B).
            b_final = Signal()
            b_left = delay(m, loading_a, 3, "b_left")
            b_final_next = ~self.start & (b_left | b_final)
            m.d.sync += b_final.eq(b_final_next)
            # mask_ready: whether tile_mask is this tile's (the tag of its B mask, b_tag2 a
            # cycle before, is sq_nt, or next_nt in the two cycles after issue_last while
            # sq_nt moves on; at start sq_nt returns to 0 while the sequencer waits, not in
            # LOAD) and B's masks are final. One register, worked out a cycle ahead, so LOAD's
            # decision (which loads the picker) is one LUT of registers. It is read only in
            # LOAD, so its value after an ISSUE cycle matters only when that cycle was
            # issue_last: the choice of tag takes the state (``in_issue``) for issue_last,
            # and issue_last's own logic stays out of this register's input.
            # The two tag compares are registered a cycle ahead, from the values b_tag2, sq_nt
            # and next_nt will have (sq_nt moves on only after ``advance``, to next_nt; next_nt
            # follows sq_nt), so the choice between them is the only logic left here.
            tag_is_next, tag_is_sq = Signal(), Signal()
            next_nt_next = Mux(sq_last_n, 0, sq_nt + 1)  # next_nt's next value
            m.d.sync += [
                tag_is_next.eq(b_tag1 == next_nt_next),
                tag_is_sq.eq(b_tag1 == Mux(advance, next_nt, sq_nt)),
            ]
            ready_next = Mux(in_issue | advance, tag_is_next, tag_is_sq) & b_final_next
            # A copy for the picker's mask register (see below); its other power-up value keeps
            # synthesis from merging the two (it is read only in LOAD, never right after reset).
            mask_ready_copy = Signal(init=1)
            m.d.sync += [mask_ready.eq(ready_next), mask_ready_copy.eq(ready_next)]
            # The tile's mask (the A panel's, the B n-tile's, the job's K) and its per-group
            # flags are registered together, so the picker's load isolates the lowest flag and
            # ORs no mask bits. The mask is the B mask's a cycle later (see ``mask_ready``);
            # the A side is read straight from the panel masks, as fresh as before.
            tile_mask = Signal(g.max_k, reset_less=True)
            tile_groups = Signal(picker.groups, reset_less=True)
            next_mask = Mux(sq_bank, a_nonzero[1], a_nonzero[0]) & k_valid & b_mask
            m.d.comb += [
                b_nonzero_mem.r_addr.eq(b_addr),  # a register, b_mask two cycles later
                picker.mask.eq(tile_mask),
                picker.mask_groups.eq(tile_groups),
                picker.load.eq(tile_load),
                # The mask register's copy of tile_load, from its own registers and without
                # ``closing`` (a job that closes takes no more tokens): a LUT and a net apart.
                picker.load_mask.eq(sequencer_in_load & mask_ready_copy),
                picker.take.eq(take),
                k_position.eq(picker.position),
                ready.eq(picker.valid),
                more.eq(~picker.last),
                empty.eq(picker.none),
            ]
            m.d.sync += [
                k_offset.eq(g.max_k - job_k),
                next_nt.eq(next_nt_next),
                b_addr.eq(Mux(in_issue, next_nt, sq_nt)),
                b_tag1.eq(b_addr), b_tag2.eq(b_tag1),
                tile_mask.eq(next_mask),
                tile_groups.eq(group_flags(next_mask, g.max_k)),
            ]
        else:
            step = Signal(range(g.max_k))
            m.d.comb += [k_position.eq(step), more.eq(step != job_k - 1), mask_ready.eq(1)]
            # The first k-step goes in the same cycle after LOAD as with the picker (and the
            # registered tile size, ``slot``, is ready by then).
            warm = delay(m, tile_load, 2, "warming")
            with m.If(tile_load | issue_last):  # as the picker: nothing offered after the last
                m.d.sync += ready.eq(0)
            with m.Elif(warm):
                m.d.sync += ready.eq(1)
            with m.If(tile_load | issue_last):
                m.d.sync += step.eq(0)
            with m.Elif(issue):
                m.d.sync += step.eq(step + 1)
        # The k-step's memory addresses are registered (the sum is not in the block RAMs'
        # address set-up).
        m.d.sync += [a_mem.r_addr.eq(a_base + k_position), b_mem.r_addr.eq(b_base + k_position)]
        # ``room`` is registered: it lags ``reserved`` by a cycle, and ``reserved`` takes the
        # sequencer's and the drain's news a cycle late (``reserve``, ``popped``, registers),
        # which only errs on the safe side: no tile ends within three cycles of the last, and a
        # row freed late only delays the next reservation.
        room = Signal()
        room_next = reserved <= fifo_rows - rows
        m.d.sync += room.eq(room_next)
        # ``since_last`` counts the cycles since the last issue_last (saturating at ``gap``); a
        # tile may end ``gap`` cycles after the one before (exactly). Where ``gap`` allows, the
        # count restarts from ``advance`` (a register), a cycle late, with its threshold one
        # lower and the cycle of ``advance`` itself excluded: the same cycles, and issue_last
        # does not reach the counter.
        restart_late = gap >= 3
        with m.If(since_last < gap):
            m.d.sync += since_last.eq(since_last + 1)
        with m.If(advance if restart_late else issue_last):
            m.d.sync += since_last.eq(0)
        # (Next cycle is at least ``gap`` after the last issue_last, unless that is this one.)
        gap_next = (~advance & (since_last >= gap - 3)) if restart_late else (since_last >= gap - 2)
        # Whether the sequencer takes a k-step offered now: ``accept_more`` (in ISSUE, not
        # closing) for one that is not the tile's last, ``accept_last`` (that, with room and the
        # gap) for the last. Registers, worked out from the sequencer's own registers, so the
        # issue decision is one LUT of the offered k-step and these, and the picker's ``take``
        # (which it feeds back into the picker) a LUT of the picker's registers and copies of
        # these, not a trip to the sequencer and back. Their next values leave out what
        # issue_last does (the sequencer leaves ISSUE, closing may be set, the gap restarts):
        # after issue_last no k-step is offered until the next tile's LOAD, so these are read
        # only while they are exact. Closing is otherwise set from a registered loader error,
        # or at a start (in IDLE).
        accept_more_next = (in_issue | (sequencer_in_load & mask_ready)) & ~closing & ~tlast_early_q
        accept_last_next = accept_more_next & room_next & gap_next
        accept_more, accept_last = Signal(), Signal()
        # The picker's copies; their other power-up value keeps synthesis from merging them
        # with the sequencer's (nothing is offered in the cycle after reset).
        take_more, take_last = Signal(init=1), Signal(init=1)
        m.d.sync += [accept_more.eq(accept_more_next), accept_last.eq(accept_last_next),
                     take_more.eq(accept_more_next), take_last.eq(accept_last_next)]
        m.d.comb += [
            issue.eq(ready & Mux(more, accept_more, accept_last)),
            issue_last.eq(ready & ~more & accept_last),
            kill.eq(issue_last & empty),
            take.eq(ready & Mux(more, take_more, take_last)),
        ]
        skipped = Signal(range(g.max_k + 1))  # k-steps of this tile not issued, at its end
        m.d.comb += skipped.eq(job_k - issued - ~empty)

        # Where the next tile is in the job: moved on a cycle after issue_last, from a register,
        # so the decision reaches a few registers and this wide bookkeeping hangs off a
        # register's fan-out. Its readers have the time: the next tile's first k-step comes
        # three cycles after LOAD, and its size, bases and B-mask tag are registered from
        # these in between (``mask_ready`` looks at next_nt in both cycles in which sq_nt lags).
        m.d.sync += advance.eq(issue_last)
        with m.If(advance):
            m.d.sync += [sq_n_left.eq(sq_n_left - cols), sq_nt.eq(sq_nt + 1),
                         sq_b_base.eq(sq_b_base + job_k)]
            with m.If(sq_last_n):
                m.d.sync += [sq_n_left.eq(job_n), sq_nt.eq(0), sq_b_base.eq(0),
                             sq_m_left.eq(sq_m_left - rows)]

        with m.FSM(name="sequencer") as sequencer:
            with m.State("IDLE"):
                with m.If(self.start & ~rejected):
                    m.d.sync += [sq_nt.eq(0), sq_n_left.eq(self.n), sq_m_left.eq(self.m),
                                 sq_b_base.eq(0),
                                 sq_bank.eq(0), since_last.eq(gap)]
                    m.next = "WAIT"
            with m.State("WAIT"):
                with m.If(closing):
                    m.next = "IDLE"
                with m.Elif(panel_full.bit_select(sq_bank, 1)):
                    m.next = "LOAD"
                with m.Else():
                    m.d.sync += self.stall_in.eq(self.stall_in + 1)
            with m.State("LOAD"):
                with m.If(closing):
                    m.next = "IDLE"
                with m.Elif(mask_ready):
                    m.d.comb += tile_load.eq(1)
                    m.d.sync += issued.eq(0)
                    m.next = "ISSUE"
            with m.State("ISSUE"):
                # (Until the first k-step is out of the picker, ``ready`` is low.)
                with m.If(closing):
                    m.next = "IDLE"
                with m.Elif(ready & more):
                    m.d.sync += issued.eq(issued + 1)
                with m.Elif(ready & ~room):
                    m.d.sync += self.stall_out.eq(self.stall_out + 1)
                with m.Elif(issue_last):
                    m.next = "LOAD"
                    with m.If(sq_last_n):
                        m.d.sync += sq_bank.eq(~sq_bank)
                        with m.If(sq_last_m):
                            m.d.sync += closing.eq(1)
                            m.next = "IDLE"
                        with m.Else():
                            m.next = "WAIT"
        m.d.comb += [in_issue.eq(sequencer.ongoing("ISSUE")),
                     sequencer_in_load.eq(sequencer.ongoing("LOAD"))]

        # Panel bookkeeping: the loader fills a bank, the sequencer frees it after its last tile.
        release = issue_last & sq_last_n
        for bank in range(2):
            with m.If(panel_event & (a_bank == bank)):
                m.d.sync += panel_full[bank].eq(1)
            with m.If(release & (sq_bank == bank)):
                m.d.sync += panel_full[bank].eq(0)

        # The addresses are registered, the memories answer one cycle later, and their data is
        # registered twice before the array: as it leaves the block RAM, with nothing between
        # (:class:`.BlockMemory`'s output register; a block RAM's clock-to-output takes most of
        # a cycle on an ECP5, so that register belongs beside it, or in it), then into the
        # lanes; the k-step's flags follow the data.
        def follow(value, name):
            return delay(m, value, 3, name)

        kill_q = follow(kill, "kill")
        counted_q = follow(issue & ~kill, "counted_q")
        slot_q = follow(slot, "slot_q")
        # The MAC counter counts from the delayed copies (read only after DONE, which comes
        # many cycles after the last k-step), not from the sequencer's decision in its cycle.
        with m.If(counted_q):
            m.d.sync += self.macs.eq(self.macs + slot_q)
        m.d.sync += [
            array.valid.eq(follow(issue, "valid")),
            array.first.eq(follow(issue & (issued == 0), "first")),
            array.last.eq(follow(issue_last, "last")),
        ]
        a_lanes = [Signal(signed(8), name=f"a_lane{i}", reset_less=True) for i in range(rows)]
        b_lanes = [Signal(signed(8), name=f"b_lane{j}", reset_less=True) for j in range(cols)]
        a_word, b_word = a_mem.r_data, b_mem.r_data
        # Each lane's zero flag is registered beside it, so the PEs' gating reads a flag that
        # travels with the operand, not a compare of it (and the counters below count them).
        a_zeros, b_zeros = Signal(rows, reset_less=True), Signal(cols, reset_less=True)
        for lanes, word, ports, flags, zeros in ((a_lanes, a_word, array.a, array.a_zero, a_zeros),
                                                 (b_lanes, b_word, array.b, array.b_zero, b_zeros)):
            for n, lane in enumerate(lanes):
                byte = word[8 * n:8 * n + 8]
                m.d.sync += [lane.eq(Mux(kill_q, 0, byte)), zeros[n].eq(kill_q | (byte == 0))]
                m.d.comb += [ports[n].eq(lane), flags[n].eq(zeros[n])]

        # MACs skipped: of an issued k-step, the products with a zero operand (popcounts of the
        # nonzero lanes at the array edge); of a skipped k-step, all its products. Registered in
        # stages (the lanes' zero flags, copied; the live lanes; counts; their product; the
        # zeros; the sum), so no cycle holds more than one small multiply or one wide add; the
        # counters are read only after DONE, which comes many cycles after the last k-step.
        zeros3 = delay(m, Cat(a_zeros, b_zeros), 1, "zeros3", reset_less=True)
        live_a4, live_b4 = Signal(rows), Signal(cols)  # the lanes that are not zero
        nonzero_a5 = Signal(range(rows + 1))
        nonzero_b5 = Signal(range(cols + 1))
        nonzero6 = Signal(range(rows * cols + 1))
        counted6 = delay(m, counted_q, 5, "counted")
        slot6 = delay(m, slot_q, 5, "slot")
        # A tile's skipped k-steps are taken a cycle after issue_last (``skipped`` registered,
        # picked by ``advance``), so issue_last reaches no wide register here.
        skipped_q = Signal.like(skipped, reset_less=True)
        skipped1, skipped_slot1 = Signal.like(skipped), Signal.like(slot)
        issued_zeros7 = Signal(range(rows * cols + 1))
        # A skipped tile's products: its k-steps times its slot, from two halves of the slot's
        # bits, registered, then summed, so no cycle holds the whole adder tree.
        half = (len(skipped_slot1) + 1) // 2
        skipped_low2 = Signal(range(g.max_k * (1 << half)))
        skipped_high2 = Signal(range(g.max_k * (1 << (len(skipped_slot1) - half))))
        skipped_products3 = Signal(range(rows * cols * g.max_k + 1))
        m.d.sync += [
            live_a4.eq(~zeros3[:rows]),
            live_b4.eq(~zeros3[rows:]),
            nonzero_a5.eq(sum(live_a4)),
            nonzero_b5.eq(sum(live_b4)),
            nonzero6.eq(lut_product(nonzero_a5, nonzero_b5)),
            issued_zeros7.eq(Mux(counted6, slot6 - nonzero6, 0)),
            skipped_q.eq(skipped),
            skipped1.eq(Mux(advance, skipped_q, 0)), skipped_slot1.eq(slot),
            skipped_low2.eq(lut_product(skipped1, skipped_slot1[:half])),
            skipped_high2.eq(lut_product(skipped1, skipped_slot1[half:])),
            skipped_products3.eq(skipped_low2 + (skipped_high2 << half)),
            self.macs_skipped.eq(self.macs_skipped + issued_zeros7 + skipped_products3),
            self.ksteps_skipped.eq(self.ksteps_skipped + skipped1),
        ]

        # ---- drain: array -> post-processing -> FIFO -> m_axis -------------------------------
        m.submodules.post = post = PostProcessor(cols)
        dr_j0 = Signal(range(g.max_n + cols))
        dr_tile = Signal(range(n_tiles_max))
        m.d.comb += [bias_rd.addr.eq(dr_tile), mult_rd.addr.eq(dr_tile)]
        with m.If(array.out_valid & (array.out_row == rows - 1)):
            m.d.sync += [dr_j0.eq(dr_j0 + cols), dr_tile.eq(dr_tile + 1)]
            with m.If(dr_j0 + cols >= job_n):
                m.d.sync += [dr_j0.eq(0), dr_tile.eq(0)]
        m.d.comb += [
            post.in_valid.eq(array.out_valid),
            post.bias_en.eq(bias_en), post.requant.eq(requant), post.relu.eq(relu),
            post.shift.eq(shift), post.zero.eq(zero),
        ]
        for j in range(cols):
            m.d.comb += [post.acc[j].eq(array.c[j]),
                         post.bias[j].eq(bias_rd.data[32 * j:32 * j + 32]),
                         post.mult[j].eq(Mux(channel_quant, mult_rd.data[32 * j:32 * j + 32],
                                             mult))]

        # The row FIFO: ``fifo_rows`` rows in a memory read asynchronously (distributed RAM), a
        # write pointer, a read pointer and a count. A pop moves only the read pointer and the
        # count, not a read register as wide as the row. Written out rather than the library's
        # SyncFIFO, whose level gates every write with a room check (the sequencer reserves the
        # room, so none is needed) and, with that fan-out, sat in the drain's loop from the pop
        # back to the pop; here the count serves only ``rows_ready``, a register of its own (the
        # count after this cycle is not zero).
        m.submodules.row_fifo = row_fifo = Memory(shape=32 * cols, depth=fifo_rows, init=[])
        fifo_write = row_fifo.write_port()
        fifo_read = row_fifo.read_port(domain="comb")
        produce, consume = Signal(range(fifo_rows)), Signal(range(fifo_rows))
        held = Signal(range(fifo_rows + 1))
        rows_ready = Signal()
        push = post.out_valid
        m.d.comb += [fifo_write.addr.eq(produce), fifo_write.data.eq(post.out_word),
                     fifo_write.en.eq(push), fifo_read.addr.eq(consume)]
        with m.If(push):
            m.d.sync += produce.eq(Mux(produce == fifo_rows - 1, 0, produce + 1))
        with m.If(row_popped):
            m.d.sync += consume.eq(Mux(consume == fifo_rows - 1, 0, consume + 1))
        m.d.sync += [held.eq(held + push - row_popped),
                     rows_ready.eq(push | (held >= 2) | ((held == 1) & ~row_popped))]

        beats_int32 = g.vector_beats(4 * cols)
        beats_int8 = g.vector_beats(cols)
        out_beat = Signal(range(beats_int32))
        out_row = Signal(range(rows))
        out_j0 = Signal(range(g.max_n + cols))
        out_i0 = Signal(33)
        padded = Signal(width * beats_int32)
        m.d.comb += padded.eq(fifo_read.data)
        row_end = out_beat == Mux(requant, beats_int8, beats_int32) - 1
        out_last_n, next_out_n, restart_out_n = walk_flag(out_j0, cols, job_n, self.n,
                                                          "out_last_n")
        out_last_m, next_out_m, _ = walk_flag(out_i0, rows, job_m, self.m, "out_last_m")
        final_row = (out_row == rows - 1) & out_last_n & out_last_m
        out_take = out_valid & out_ready
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
                out_valid.eq(1),
                out_data.eq(padded.word_select(out_beat, width)),
                out_last.eq(row_end & final_row),
            ]
            with m.If(out_take):
                m.d.sync += out_beat.eq(out_beat + 1)
                with m.If(row_end):
                    m.d.comb += row_popped.eq(1)
                    m.d.sync += [out_beat.eq(0), out_row.eq(out_row + 1)]
                    with m.If(out_row == rows - 1):
                        m.d.sync += out_row.eq(0)
                        m.d.comb += group_end.eq(1)
                    with m.If(final_row):
                        m.d.sync += finished.eq(1)
        with m.Elif(closing & (reserved == 0) & ~reserve & self.busy & ~finished):
            # A job that ended early still closes its output packet: one zero beat with TLAST.
            m.d.comb += [out_valid.eq(1), out_last.eq(1)]
            with m.If(out_take):
                m.d.sync += finished.eq(1)
        # The job is done when its last beat has left the output link.
        with m.If(finished & m_link.idle):
            m.d.sync += [finished.eq(0), self.busy.eq(0), self.done.eq(1)]

        m.d.sync += [reserve.eq(issue_last), popped.eq(row_popped),
                     reserved.eq(reserved + Mux(reserve, rows, 0) - popped)]
        with m.If(self.busy):
            m.d.sync += self.cycles.eq(self.cycles + 1)
        return m


class Accelerator(wiring.Component):
    """The top level. For arrays with more PEs than the part has DSP slices: ``lut_columns``,
    how many of the array's columns (the last ones) multiply in LUTs; ``dsp_packing``, the
    other columns in pairs with two INT8 MACs per DSP slice (:class:`.PackedPair`)."""

    def __init__(self, rows=8, cols=8, stream_width=64, max_k=256, max_n=256, sparse_skip=True,
                 lut_columns=0, dsp_packing=False):
        check_dimensions(rows, cols)
        check_lut_columns(lut_columns, cols)
        self.lut_columns = lut_columns
        self.dsp_packing = bool(dsp_packing)
        if stream_width not in STREAM_WIDTHS:
            raise ValueError(f"stream_width must be one of {STREAM_WIDTHS}, not {stream_width}")
        for name, value in (("max_k", max_k), ("max_n", max_n)):
            if not isinstance(value, int) or not 1 <= value <= 65536:
                raise ValueError(f"{name} must be an int between 1 and 65536, not {value!r}")
        self.geometry = protocol.Geometry(rows, cols, stream_width, max_k, max_n)
        self.sparse_skip = sparse_skip
        self._regs = RegisterBlock()
        members = {"aclk": In(1), "aresetn": In(1)}
        members.update({name: member for name, member in self._regs.signature.members.items()
                        if name.startswith("s_axi_")})
        members.update({
            "s_axis_tdata": In(stream_width), "s_axis_tvalid": In(1),
            "s_axis_tready": Out(1), "s_axis_tlast": In(1),
            "m_axis_tdata": Out(stream_width), "m_axis_tvalid": Out(1),
            "m_axis_tready": In(1), "m_axis_tlast": Out(1),
        })
        super().__init__(members)

    def capabilities(self):
        g = self.geometry
        return {"ROWS": g.rows, "COLS": g.cols, "STREAM_WIDTH": g.stream_width,
                "MAX_K": g.max_k, "MAX_N": g.max_n,
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
        m.d.comb += [
            core.start.eq(delay(m, start & ~soft_reset, 3, "start_")),
            core.m.eq(regs.M), core.k.eq(regs.K), core.n.eq(regs.N),
            core.options.eq(regs.OPTIONS), core.quant_mult.eq(regs.QUANT_MULT),
            core.quant_shift.eq(regs.QUANT_SHIFT), core.quant_zero.eq(regs.QUANT_ZERO),
            core.s_axis_tdata.eq(self.s_axis_tdata), core.s_axis_tvalid.eq(self.s_axis_tvalid),
            core.s_axis_tlast.eq(self.s_axis_tlast), self.s_axis_tready.eq(core.s_axis_tready),
            self.m_axis_tdata.eq(core.m_axis_tdata), self.m_axis_tvalid.eq(core.m_axis_tvalid),
            self.m_axis_tlast.eq(core.m_axis_tlast), core.m_axis_tready.eq(self.m_axis_tready),
            regs.STATUS.eq(core.busy * protocol.Status.BUSY | core.done * protocol.Status.DONE
                           | (core.error != 0) * protocol.Status.ERROR),
            regs.ERROR.eq(core.error),
            regs.CYCLES.eq(core.cycles), regs.STALL_IN.eq(core.stall_in),
            regs.STALL_OUT.eq(core.stall_out), regs.MACS.eq(core.macs),
            regs.MACS_SKIPPED.eq(core.macs_skipped), regs.KSTEPS_SKIPPED.eq(core.ksteps_skipped),
            regs.ID.eq(protocol.MAGIC),
            regs.VERSION.eq(protocol.REGISTER["VERSION"].reset),
        ]
        for name, value in self.capabilities().items():
            m.d.comb += getattr(regs, name).eq(value)
        return m
