"""The loader: the operand stream into the on-chip memories.

:class:`Loader` takes the beats of one job's input packet (``input``, an
:mod:`amaranth.lib.stream` of :func:`.link.beat_layout`) in the order of
:mod:`sparsa.protocol`: the bias vectors (with ``job.bias``), the per-column multipliers (with
``job.channel_quant``), one vector of ``cols`` int32 per n-tile each; the B panel, ``K`` words
of ``cols`` bytes per n-tile; then A, ``K`` words of ``rows`` bytes per m-tile, into two banks
by turns. A word is as many beats as its bytes take.

Contract:

- Each completed word is written one cycle after its last beat, through registers (``en``,
  ``addr`` and the word: the memories' write enables are not on the loader's own path), to
  ``bias_write`` / ``mult_write`` (address: the n-tile), ``b_write`` (n-tile x K + k) or
  ``a_write`` (bank x max_k + k).
- ``panel_full[bank]`` is set a cycle after an A bank's last word (and its mask) is written,
  and cleared when the sequencer sets ``free[bank]`` (freeing wins in the same cycle). The
  loader never writes into a full bank: it waits (``input.ready`` low) until it is freed.
- With sparse-skip, ``a_nonzero[bank]`` and the B masks (``b_mask_write``, one word per n-tile)
  hold per k-step whether the word was not all zero (always set with ``job.no_skip``); k-step k
  sits at bit ``max_k - K + k`` (each is a shift register, so no index decoders), and
  ``k_valid`` has the top K bits set; the bits below are stale and meant to be masked by it.
  The masks are updated a cycle after the word's write (``panel_full`` with them).
- A TLAST before the packet's last beat sets ``tlast_early``, a last beat without TLAST sets
  ``tlast_missing``, each a cycle later, for one cycle; after the last beat, or a TLAST, the
  loader takes (and drops) beats until a TLAST and waits for the next ``start``. A job that
  ``rejected`` takes only the packet's beats up to its TLAST.
- ``loading_a`` is high while the loader is in A (B is complete).
- At ``start`` the first state comes from ``registers.options`` (the job is latched in that
  very cycle), everything else from ``job`` and ``single``.
"""

from amaranth import Cat, Const, Module, Mux, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from sparsa.protocol import Option

from .bram import write_signature
from .job import REGISTERS, SINGLE, job_layout
from .link import beat_layout
from .pipeline import delay, or_all, walk_flag


class Loader(wiring.Component):
    def __init__(self, geometry, sparse_skip=True):
        g = self.geometry = geometry
        self.sparse_skip = sparse_skip
        n_tiles = g.n_tiles_max
        members = {
            "start": In(1), "rejected": In(1), "registers": In(REGISTERS),
            "job": In(job_layout(g)), "single": In(SINGLE),
            "input": In(stream.Signature(beat_layout(g.stream_width))),
            "free": In(2),
            "bias_write": In(write_signature(32 * g.cols, n_tiles)),
            "mult_write": In(write_signature(32 * g.cols, n_tiles)),
            "b_write": In(write_signature(8 * g.cols, n_tiles * g.max_k)),
            "a_write": In(write_signature(8 * g.rows, 2 * g.max_k)),
            "panel_full": Out(2),
            "loading_a": Out(1),
            "tlast_early": Out(1), "tlast_missing": Out(1),
        }
        if sparse_skip:
            members.update({
                "a_nonzero": Out(g.max_k).array(2),
                "k_valid": Out(g.max_k),
                "b_mask_write": In(write_signature(g.max_k, n_tiles)),
            })
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        g = self.geometry
        rows, cols, width = g.rows, g.cols, g.stream_width
        self.beats_max = max(g.vector_beats(4 * cols), g.vector_beats(cols), g.vector_beats(rows))
        self.beat = Signal(range(self.beats_max))
        # A word's earlier beats, each in its own register (written when its beat is taken and
        # never cleared: a word uses only the beats it has, and the memories' widths cut off
        # the rest), so no data register waits on whether the word is complete.
        self.partial = [Signal(width, name=f"partial{index}", reset_less=True)
                        for index in range(self.beats_max - 1)]
        self.ld_k = Signal(range(g.max_k))
        self.ld_j0 = Signal(range(g.max_n + cols))
        self.ld_i0 = Signal(33)
        self.ld_nt = Signal(range(g.n_tiles_max))
        self.ld_b_addr = Signal(range(g.n_tiles_max * g.max_k))
        self.ld_bank = Signal()
        self.take = Signal()
        self.in_data = self.input.payload.data
        # The loader's ready: always, but while loading A into a bank that is not yet free.
        # (In IDLE nothing is waiting: the input link stops taking beats at TLAST, and before
        # the job starts it is empty.) ``loading_a`` follows the FSM into and out of A, so the
        # ready is one LUT of registers.
        # Whether the A bank being loaded is free, from registers of the cycle before. A bank
        # turns full only by the loader's own panel event, which comes after the loader has
        # moved on to the other bank, and the loader waits in the cycle after each move
        # (``panel_event``); so the lag never lets it write a full bank, and costs only a cycle
        # when the sequencer frees one. In A, the loader's ready is a choice between registers.
        bank_free, panel_event = Signal(), Signal()
        word = Signal(width * self.beats_max)
        m.d.comb += [
            self.input.ready.eq(~self.loading_a | (bank_free & ~panel_event)),
            self.take.eq(self.input.valid & self.input.ready),
            word.eq(Cat(*(Mux(self.beat == index, self.in_data, part)
                          for index, part in enumerate(self.partial)), self.in_data)),
        ]
        a_done = self._fsm(m, word)
        m.d.sync += [bank_free.eq(~self.panel_full.bit_select(self.ld_bank, 1)),
                     panel_event.eq(a_done & self.last_k)]
        # The masks and the panel flags take a completed word's news a cycle later, from
        # registers, so their wide shift registers' enables are not on the loader's own path.
        # (The sequencer looks at a panel only once its flag is set, and at B's masks later.)
        a_event, a_bank = Signal(), Signal()
        m.d.sync += [a_event.eq(a_done), a_bank.eq(self.ld_bank)]
        for bank in range(2):
            with m.If(panel_event & (a_bank == bank)):
                m.d.sync += self.panel_full[bank].eq(1)
            with m.If(self.free[bank]):
                m.d.sync += self.panel_full[bank].eq(0)
        if self.sparse_skip:
            self._masks(m, a_event, a_bank)
        return m

    def _collect(self, m, beats):
        """Gather ``beats`` beats into ``word``; true on the beat that completes it."""
        complete = Signal(name=f"complete{beats}")
        # (A one-beat word needs no compare: beat is 0 in its states, since every word before
        # it completed or the job started.)
        m.d.comb += complete.eq(self.take & (self.beat == beats - 1) if beats > 1 else self.take)
        with m.If(self.take):
            for index, part in enumerate(self.partial[:beats - 1]):
                with m.If(self.beat == index):
                    m.d.sync += part.eq(self.in_data)
            with m.If(complete):
                m.d.sync += self.beat.eq(0)
            with m.Else():
                m.d.sync += self.beat.eq(self.beat + 1)
        return complete

    def _fsm(self, m, word):
        """The loader's states; returns the event of a completed A word."""
        g, job = self.geometry, self.job
        rows, cols = g.rows, g.cols
        take, last = self.take, self.input.payload.last
        # Completed words reach the memories a cycle later, through registers (enable, address
        # and the word). Nothing reads a word that soon: the sequencer looks at a panel only
        # once its flag is set (itself a cycle after the word), the drain at bias and
        # multipliers much later.
        word_q = Signal.like(word, reset_less=True)
        m.d.sync += word_q.eq(word)

        def write_later(port, address, name):
            enable = Signal(name=f"{name}_write")
            m.d.sync += [port.en.eq(enable), port.addr.eq(address)]
            m.d.comb += port.data.eq(word_q)
            return enable

        bias_write = write_later(self.bias_write, self.ld_nt, "bias")
        mult_write = write_later(self.mult_write, self.ld_nt, "mult")
        b_write = write_later(self.b_write, self.ld_b_addr, "b")
        a_write = write_later(self.a_write, Mux(self.ld_bank, g.max_k, 0) + self.ld_k, "a")
        start = self.start
        self.last_k, next_k, restart_k = walk_flag(m, start, self.single.k, self.ld_k, 1,
                                                   job.k, "last_k")
        last_n_tile, next_n_tile, restart_n_tile = walk_flag(
            m, start, self.single.n, self.ld_j0, cols, job.n, "last_n_tile")
        last_m_tile, next_m_tile, _ = walk_flag(m, start, self.single.m, self.ld_i0, rows,
                                                job.m, "last_m_tile")
        self.b_done, a_done = Signal(), Signal()  # a B / an A word is complete

        # A packet of the wrong length is reported a cycle later, from registered events, so
        # the error code and ``closing`` are not on the loader's own path.
        tlast_early, tlast_missing = Signal(), Signal()
        m.d.comb += [self.tlast_early.eq(delay(m, tlast_early, 1, "tlast_early_q")),
                     self.tlast_missing.eq(delay(m, tlast_missing, 1, "tlast_missing_q"))]

        def early_tlast(final):
            with m.If(take & last & ~final):
                m.d.comb += tlast_early.eq(1)

        def column_vectors(write):
            """Load one vector of ``cols`` int32 per n-tile (``write``: the memory's enable);
            true after the last."""
            complete = self._collect(m, g.vector_beats(4 * cols))
            early_tlast(Const(0))
            m.d.comb += write.eq(complete)
            with m.If(complete):
                m.d.sync += [self.ld_nt.eq(self.ld_nt + 1), self.ld_j0.eq(self.ld_j0 + cols),
                             next_n_tile]
                with m.If(last_n_tile):
                    m.d.sync += [self.ld_j0.eq(0), self.ld_nt.eq(0), restart_n_tile]
            return complete & last_n_tile

        with m.FSM(name="loader"):
            with m.State("IDLE"):
                with m.If(start):
                    m.d.sync += [self.ld_k.eq(0), self.ld_j0.eq(0), self.ld_i0.eq(0),
                                 self.ld_nt.eq(0), self.ld_b_addr.eq(0), self.ld_bank.eq(0),
                                 self.beat.eq(0)]
                    # (The options come from the register: the job is latched in this cycle.)
                    with m.If(self.rejected):
                        m.next = "DRAIN"
                    with m.Elif(self.registers.options & Option.BIAS):
                        m.next = "BIAS"
                    with m.Elif(self.registers.options & Option.CHANNEL_QUANT):
                        m.next = "MULT"
                    with m.Else():
                        m.next = "B"
            with m.State("BIAS"):
                with m.If(column_vectors(bias_write)):
                    m.next = "B"
                    with m.If(job.channel_quant):
                        m.next = "MULT"
                with m.If(take & last):
                    m.next = "IDLE"
            with m.State("MULT"):
                with m.If(column_vectors(mult_write)):
                    m.next = "B"
                with m.If(take & last):
                    m.next = "IDLE"
            with m.State("B"):
                complete = self._collect(m, g.vector_beats(cols))
                early_tlast(Const(0))
                m.d.comb += [b_write.eq(complete), self.b_done.eq(complete)]
                with m.If(complete):
                    m.d.sync += [self.ld_b_addr.eq(self.ld_b_addr + 1),
                                 self.ld_k.eq(self.ld_k + 1), next_k]
                    with m.If(self.last_k):
                        m.d.sync += [self.ld_k.eq(0), restart_k, self.ld_j0.eq(self.ld_j0 + cols),
                                     next_n_tile, self.ld_nt.eq(self.ld_nt + 1)]
                        with m.If(last_n_tile):
                            m.d.sync += self.loading_a.eq(1)
                            m.next = "A"
                with m.If(take & last):
                    m.d.sync += self.loading_a.eq(0)
                    m.next = "IDLE"
            with m.State("A"):
                complete = self._collect(m, g.vector_beats(rows))
                final = complete & self.last_k & last_m_tile
                early_tlast(final)
                m.d.comb += [a_write.eq(complete), a_done.eq(complete)]
                with m.If(complete):
                    m.d.sync += [self.ld_k.eq(self.ld_k + 1), next_k]
                    with m.If(self.last_k):
                        m.d.sync += [self.ld_k.eq(0), restart_k, self.ld_bank.eq(~self.ld_bank),
                                     self.ld_i0.eq(self.ld_i0 + rows), next_m_tile]
                with m.If(take & last):
                    m.d.sync += self.loading_a.eq(0)
                    m.next = "IDLE"
                with m.Elif(final):
                    m.d.comb += tlast_missing.eq(1)
                    m.d.sync += self.loading_a.eq(0)
                    m.next = "DRAIN"
            with m.State("DRAIN"):
                with m.If(take & last):
                    m.next = "IDLE"
        return a_done

    def _low_bits_any(self, bits):
        """``word[:bits].any()`` with the beat's choice after the ORs (the same value, as
        ``any`` of a multiplexer is the multiplexer of the ``any``s), so ``beat`` reaches one
        multiplexer per beat rather than every bit on the way."""
        width = self.geometry.stream_width
        terms = []
        for index in range(-(-bits // width)):
            size = min(width, bits - index * width)
            arriving = self.in_data[:size].any()
            if index < len(self.partial):
                arriving = Mux(self.beat == index, arriving, self.partial[index][:size].any())
            terms.append(arriving)
        return or_all(terms)

    def _masks(self, m, a_event, a_bank):
        """The nonzero masks, a cycle after each word (see the module's docstring)."""
        g = self.geometry
        # The mask of the n-tile being loaded, shifted in (no reset: bits that were not shifted
        # in during this job are masked off by ``k_valid``, as are a_nonzero's).
        b_nonzero = Signal(g.max_k, reset_less=True)
        b_event, b_last, b_first = Signal(), Signal(), Signal()
        b_bit, a_bit = Signal(), Signal()
        b_nt = Signal.like(self.ld_nt)
        no_skip = self.job.no_skip
        m.d.sync += [
            b_event.eq(self.b_done), b_last.eq(self.last_k), b_first.eq(self.ld_nt == 0),
            b_nt.eq(self.ld_nt),
            b_bit.eq(no_skip | self._low_bits_any(8 * g.cols)),
            a_bit.eq(no_skip | self._low_bits_any(8 * g.rows)),
        ]
        b_shifted = Signal(g.max_k)  # b_nonzero with the completed B word's bit shifted in
        m.d.comb += [
            b_shifted.eq(Cat(b_nonzero[1:], b_bit)),
            self.b_mask_write.addr.eq(b_nt),
            self.b_mask_write.data.eq(b_shifted),
            self.b_mask_write.en.eq(b_event & b_last),
        ]
        with m.If(b_event):
            m.d.sync += b_nonzero.eq(b_shifted)
            with m.If(b_first):
                m.d.sync += self.k_valid.eq(Cat(self.k_valid[1:], 1))
        for bank in range(2):
            with m.If(a_event & (a_bank == bank)):
                m.d.sync += self.a_nonzero[bank].eq(Cat(self.a_nonzero[bank][1:], a_bit))
