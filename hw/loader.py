"""The loader: the operand stream into the on-chip memories.

:class:`Loader` takes the beats of one job's input packet (``input``, an
:mod:`amaranth.lib.stream` of :func:`.link.beat_layout`) in the order of
:mod:`sparsa.protocol`: the bias vectors (with ``job.bias``), the per-column multipliers (with
``job.channel_quant``), one vector of ``cols`` int32 per n-tile each; the B panel, ``K`` words
of ``cols`` bytes per n-tile (or, with ``job.groups``, the group format: per n-tile the step
counts, then per group the code beats it needs and its steps); then A, ``K`` words of ``rows``
bytes per m-tile, into two banks by turns. A word is as many beats as its bytes take.

Contract:

- Each completed word is written one cycle after its last beat (a column vector two), through
  registers (``en``, ``addr`` and the word: the memories' write enables are not on the loader's
  own path), to ``bias_write`` / ``mult_write`` (address: the n-tile), ``b_write`` (n-tile x
  ``job.tile_slots`` + slot: the word's values and each column's lane; a plain k-step k is
  slot k with lane ``k % 4`` in every column, step s of group g is slot Sg + s with the lanes
  of the group's codes, S the job's slots per group (1 with ``job.one_slot``, 2 with
  ``job.two_slots``, else 4); steps past the group's k-steps or its S slots are dropped) or
  ``a_write`` (bank x :func:`a_bank_words` + group: a group's four A words side by side,
  written with its last word; in a last group of fewer than four, the lanes past K are zero).
- ``panel_full[bank]`` is set a cycle after an A bank's last word (and its mask) is written,
  and cleared when the sequencer sets ``free[bank]`` (freeing wins in the same cycle). The
  loader never writes into a full bank: it waits (``input.ready`` low) until it is freed.
- With sparse-skip, ``a_nonzero[bank]`` and the B masks (``b_mask_write``, one word per n-tile)
  hold per slot whether it is to be issued: B's, whether its word was not all zero (always
  set with ``job.no_skip``; 0 for a group's slots past its steps); A's, whether the k-step's
  A word was not all zero, or with ``job.groups`` whether any of its group's was. Slot s sits
  at bit ``max_k - T + s`` (T = ``job.tile_slots``, SG rounded up to a multiple of four,
  G = ceil(K/4): each mask is a shift register taking four slots' bits at a time, the slots
  of one plain group or of 4/S groups, so no index decoders), and ``k_valid`` has the top T
  bits set; the bits below are stale and meant to be masked by it. The masks are updated a
  cycle after the group's last write (``panel_full`` with them).
- A TLAST before the packet's last beat sets ``tlast_early``, a last beat without TLAST sets
  ``tlast_missing``, each a cycle later, for one cycle; after the last beat, or a TLAST, the
  loader takes (and drops) beats until a TLAST and waits for the next ``start``. A job that
  ``rejected`` takes only the packet's beats up to its TLAST.
- ``loading_a`` is high while the loader is in A (B is complete).
- At ``start`` the first state comes from ``registers.options`` (the job is latched in that
  very cycle), everything else from ``job`` and ``single``.
"""

from math import gcd

from amaranth import Array, Cat, Const, Module, Mux, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from sparsa.protocol import CODE_BITS, CODE_PAIRS, GROUP, Option

from .bram import write_signature
from .feed import b_word_width
from .job import REGISTERS, SINGLE, a_bank_words, group_slots, job_layout
from .link import beat_layout
from .pe import LANES
from .pipeline import delay, or_all, walk_flag, walk_flag_behind


class Loader(wiring.Component):
    def __init__(self, geometry, sparse_skip=True):
        g = self.geometry = geometry
        self.sparse_skip = sparse_skip
        self.groups = sparse_skip  # the group format of B comes with sparse-skip
        n_tiles = g.n_tiles_max
        members = {
            "start": In(1), "rejected": In(1), "registers": In(REGISTERS),
            "job": In(job_layout(g)), "single": In(SINGLE),
            "input": In(stream.Signature(beat_layout(g.stream_width))),
            "free": In(2),
            "bias_write": In(write_signature(32 * g.cols, n_tiles)),
            "mult_write": In(write_signature(32 * g.cols, n_tiles)),
            "b_write": In(write_signature(b_word_width(g.cols), n_tiles * g.max_k)),
            "a_write": In(write_signature(8 * g.rows * LANES,
                                         2 * a_bank_words(g, sparse_skip))),
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
        self.ld_k = Signal(range(g.max_k_for(1) if self.groups else g.max_k))
        self.ld_j0 = Signal(range(g.max_n + cols))
        self.ld_i0 = Signal(33)
        self.ld_nt = Signal(range(g.n_tiles_max))
        self.ld_b_base = Signal(range(g.n_tiles_max * g.max_k))  # the n-tile's first B word
        self.ld_bank = Signal()
        self.take = Signal()
        self.in_data = self.input.payload.data
        # The loader's ready: always, but while loading A into a bank that is not yet free, or
        # in a group of no steps of B's group format (state PASS, which takes no beat). (In IDLE
        # nothing is waiting: the input link stops taking beats at TLAST, and before the job
        # starts it is empty.) ``loading_a`` follows the FSM into and out of A, ``pausing`` into
        # and out of PASS.
        # Whether the A bank being loaded is free, from registers of the cycle before. A bank
        # turns full only by the loader's own panel event, which comes after the loader has
        # moved on to the other bank, and the loader waits in the cycle after each move
        # (``panel_event``); so the lag never lets it write a full bank, and costs only a cycle
        # when the sequencer frees one.
        # The ready is a register of its own, worked out a cycle ahead from the values these
        # registers are about to take (the FSM sets ``loading_a`` and ``pausing`` through
        # ``_next`` signals), so it always equals that choice between them, and the input's
        # ``take``, which reaches every enable of the loader, is one LUT of two registers.
        bank_free, panel_event = Signal(), Signal()
        word = Signal(width * self.beats_max)
        self.pausing = Signal()
        self.loading_a_next, self.pausing_next = Signal(), Signal()
        ready = Signal(init=1)
        m.d.comb += [
            self.loading_a_next.eq(self.loading_a), self.pausing_next.eq(self.pausing),
            self.input.ready.eq(ready),
            self.take.eq(self.input.valid & ready),
            word.eq(Cat(*(Mux(self.beat == index, self.in_data, part)
                          for index, part in enumerate(self.partial)), self.in_data)),
        ]
        # The words completed, for the masks (a cycle later): ``b_word``/``a_word`` with the
        # slot's place in its nibble of the mask (four slots); ``a_group_end`` when an A group
        # is complete, ``b_nibble_end`` when B's nibble is (its four slots, or the n-tile's
        # last group).
        self.b_word, self.a_word = Signal(), Signal()
        self.b_place = Signal(range(LANES))
        self.a_group_end, self.b_nibble_end = Signal(), Signal()
        self.b_tile_end = Signal()  # the end of an n-tile's B
        a_done = self._fsm(m, word)
        bank_free_next = ~self.panel_full.bit_select(self.ld_bank, 1)
        panel_event_next = a_done & self.last_k
        m.d.sync += [bank_free.eq(bank_free_next), panel_event.eq(panel_event_next),
                     self.loading_a.eq(self.loading_a_next), self.pausing.eq(self.pausing_next),
                     ready.eq(Mux(self.loading_a_next, bank_free_next & ~panel_event_next,
                                  ~self.pausing_next))]
        # The masks and the panel flags take a completed word's news a cycle later, from
        # registers, so their wide shift registers' enables are not on the loader's own path.
        # (The sequencer looks at a panel only once its flag is set, and at B's masks later.)
        a_bank = Signal()
        m.d.sync += a_bank.eq(self.ld_bank)
        for bank in range(2):
            with m.If(panel_event & (a_bank == bank)):
                m.d.sync += self.panel_full[bank].eq(1)
            with m.If(self.free[bank]):
                m.d.sync += self.panel_full[bank].eq(0)
        if self.sparse_skip:
            self._masks(m, a_bank)
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

    def _memory_writes(self, m, word):
        """The memories' write ports, a cycle or two behind the input; returns the events and
        addresses the states drive: (``b_write``, ``b_slot``, ``b_lanes_q``, ``bias_done``,
        ``mult_done``, ``a_done``)."""
        g = self.geometry
        rows, cols = g.rows, g.cols
        # Completed words reach the memories a cycle later, through registers (enable, address
        # and the word). Nothing reads a word that soon: the sequencer looks at a panel only
        # once its flag is set (itself a cycle after the word), the drain at bias and
        # multipliers much later.
        word_q = Signal.like(word, reset_less=True)
        m.d.sync += word_q.eq(word)

        def write_later(port, address, name, data=None):
            enable = Signal(name=f"{name}_write")
            m.d.sync += [port.en.eq(enable), port.addr.eq(address)]
            m.d.comb += port.data.eq(word_q if data is None else data)
            return enable

        # B's words carry each column's lane (a plain k-step's: k % 4 in every column); A's
        # words are gathered into their group (``a_group``, the lanes written so far), which is
        # written whole with its last word, the lanes past it zero (a last group of fewer than
        # four k-steps: a lane past K reads zero). The gathering works a cycle behind the
        # input, from ``word_q`` and registered events, so the group's registers (four words
        # wide) load on an enable of registers, not on the input's ``take``; the group's write
        # follows a cycle later, still before the sequencer can read it (it reads a panel
        # only once the panel's flag is set, two cycles after the word).
        b_lanes_q = Signal(2 * cols, reset_less=True)
        a_group = [Signal(8 * rows, name=f"a_group{lane}", reset_less=True)
                   for lane in range(LANES)]
        a_place = self.ld_k[:2]
        a_done = Signal()  # an A word is complete
        a_done_q = delay(m, a_done, 1, "a_done_q")
        a_place_q = delay(m, a_place, 1, "a_place_q", reset_less=True)
        a_group_q = Signal(8 * rows * LANES, reset_less=True)
        m.d.sync += a_group_q.eq(Cat(*(
            Mux(a_place_q == lane, word_q[:8 * rows],
                Mux(a_place_q < lane, 0, part) if lane else part)
            for lane, part in enumerate(a_group))))
        for lane, part in enumerate(a_group):
            with m.If(a_done_q & (a_place_q == lane)):
                m.d.sync += part.eq(word_q[:8 * rows])
        # The column vectors' writes come a cycle later still, from a registered event (their
        # enables reach every part of their memories, placed apart from the loader), with the
        # vector and its address a cycle behind ``word_q`` and ``ld_nt``.
        vector_q = Signal(32 * cols, reset_less=True)
        vector_address = delay(m, self.ld_nt, 1, "vector_address", reset_less=True)
        m.d.sync += vector_q.eq(word_q[:32 * cols])
        bias_done, mult_done = Signal(), Signal()  # a column vector is complete
        m.d.comb += [
            write_later(self.bias_write, vector_address, "bias", vector_q).eq(
                delay(m, bias_done, 1, "bias_done_q")),
            write_later(self.mult_write, vector_address, "mult", vector_q).eq(
                delay(m, mult_done, 1, "mult_done_q")),
        ]
        b_slot = Signal(range(g.n_tiles_max * g.max_k))
        b_write = write_later(self.b_write, b_slot, "b", Cat(word_q[:8 * cols], b_lanes_q))
        bank_words = a_bank_words(g, self.groups)
        a_write = write_later(self.a_write,
                              delay(m, Mux(self.ld_bank, bank_words, 0) + self.ld_k[2:],
                                    1, "a_address", reset_less=True), "a", a_group_q)
        m.d.comb += a_write.eq(delay(m, self.a_group_end, 1, "a_group_end_q"))
        return b_write, b_slot, b_lanes_q, bias_done, mult_done, a_done

    def _fsm(self, m, word):
        """The loader's states; returns the event of a completed A word."""
        g, job = self.geometry, self.job
        rows, cols = g.rows, g.cols
        take, last = self.take, self.input.payload.last
        a_place = self.ld_k[:2]
        b_write, b_slot, b_lanes_q, bias_done, mult_done, a_done = self._memory_writes(m, word)
        start = self.start
        self.last_k, next_k, restart_k = walk_flag(m, start, self.single.k, self.ld_k, 1,
                                                   job.k, "last_k")
        # (The n-tile walk's flag from registers a cycle behind ``ld_j0``: its steps come from
        # the input's handshake in the column vectors and plain B.)
        last_n_tile, next_n_tile, restart_n_tile = walk_flag_behind(
            m, start, self.single.n, self.ld_j0, cols, job.n, "last_n_tile")
        last_m_tile, next_m_tile, _ = walk_flag(m, start, self.single.m, self.ld_i0, rows,
                                                job.m, "last_m_tile")
        if self.groups:
            self._group_walk(m)

        # A packet of the wrong length is reported a cycle later, from registered events, so
        # the error code and ``closing`` are not on the loader's own path.
        tlast_early, tlast_missing = Signal(), Signal()
        m.d.comb += [self.tlast_early.eq(delay(m, tlast_early, 1, "tlast_early_q")),
                     self.tlast_missing.eq(delay(m, tlast_missing, 1, "tlast_missing_q"))]

        def early_tlast(final):
            with m.If(take & last & ~final):
                m.d.comb += tlast_early.eq(1)

        def column_vectors(done):
            """Load one vector of ``cols`` int32 per n-tile (``done``: the event of a complete
            one, for its memory's write); true after the last."""
            complete = self._collect(m, g.vector_beats(4 * cols))
            early_tlast(Const(0))
            m.d.comb += done.eq(complete)
            with m.If(complete):
                m.d.sync += [self.ld_nt.eq(self.ld_nt + 1), self.ld_j0.eq(self.ld_j0 + cols)]
                m.d.comb += next_n_tile.eq(1)
                with m.If(last_n_tile):
                    m.d.sync += [self.ld_j0.eq(0), self.ld_nt.eq(0)]
                    m.d.comb += restart_n_tile.eq(1)
            return complete & last_n_tile

        def n_tile_done():
            """The statements at the end of an n-tile's B."""
            m.d.sync += [self.ld_j0.eq(self.ld_j0 + cols), self.ld_nt.eq(self.ld_nt + 1),
                         self.ld_b_base.eq(self.ld_b_base + job.tile_slots)]
            m.d.comb += next_n_tile.eq(1)
            with m.If(last_n_tile):
                m.d.comb += self.loading_a_next.eq(1)
                m.next = "A"

        with m.FSM(name="loader"):
            with m.State("IDLE"):
                with m.If(start):
                    m.d.sync += [self.ld_k.eq(0), self.ld_j0.eq(0), self.ld_i0.eq(0),
                                 self.ld_nt.eq(0), self.ld_b_base.eq(0), self.ld_bank.eq(0),
                                 self.beat.eq(0)]
                    if self.groups:
                        m.d.sync += [self._walk.fill.eq(0), self._walk.group_slot.eq(0)]
                    # (The options come from the register: the job is latched in this cycle.)
                    with m.If(self.rejected):
                        m.next = "DRAIN"
                    with m.Elif(self.registers.options & Option.BIAS):
                        m.next = "BIAS"
                    with m.Elif(self.registers.options & Option.CHANNEL_QUANT):
                        m.next = "MULT"
                    with m.Else():
                        self._to_b(m, self.registers.options & Option.GROUPS)
            with m.State("BIAS"):
                with m.If(column_vectors(bias_done)):
                    self._to_b(m, job.groups)
                    with m.If(job.channel_quant):
                        m.next = "MULT"
                with m.If(take & last):
                    m.next = "IDLE"
            with m.State("MULT"):
                with m.If(column_vectors(mult_done)):
                    self._to_b(m, job.groups)
                with m.If(take & last):
                    m.next = "IDLE"
            with m.State("B"):
                complete = self._collect(m, g.vector_beats(cols))
                early_tlast(Const(0))
                group_end = complete & ((self.ld_k[:2] == LANES - 1) | self.last_k)
                m.d.comb += [b_write.eq(complete),
                             b_slot.eq(self.ld_b_base + self.ld_k),
                             self.b_word.eq(complete), self.b_place.eq(self.ld_k[:2]),
                             self.b_nibble_end.eq(group_end),
                             self.b_tile_end.eq(complete & self.last_k)]
                m.d.sync += b_lanes_q.eq(Cat(*(self.ld_k[:2] for _ in range(cols))))
                with m.If(complete):
                    m.d.sync += [self.ld_k.eq(self.ld_k + 1), next_k]
                    with m.If(self.last_k):
                        m.d.sync += [self.ld_k.eq(0), restart_k]
                        n_tile_done()
                with m.If(take & last):
                    m.d.comb += self.loading_a_next.eq(0)
                    m.next = "IDLE"
            if self.groups:
                self._group_states(m, b_write, b_slot, b_lanes_q, early_tlast,
                                   n_tile_done)
            with m.State("A"):
                complete = self._collect(m, g.vector_beats(rows))
                final = complete & self.last_k & last_m_tile
                group_end = complete & ((a_place == LANES - 1) | self.last_k)
                early_tlast(final)
                m.d.comb += [a_done.eq(complete),
                             self.a_word.eq(complete), self.a_group_end.eq(group_end)]
                with m.If(complete):
                    m.d.sync += [self.ld_k.eq(self.ld_k + 1), next_k]
                    with m.If(self.last_k):
                        m.d.sync += [self.ld_k.eq(0), restart_k, self.ld_bank.eq(~self.ld_bank),
                                     self.ld_i0.eq(self.ld_i0 + rows), next_m_tile]
                with m.If(take & last):
                    m.d.comb += self.loading_a_next.eq(0)
                    m.next = "IDLE"
                with m.Elif(final):
                    m.d.comb += tlast_missing.eq(1)
                    m.d.comb += self.loading_a_next.eq(0)
                    m.next = "DRAIN"
            with m.State("DRAIN"):
                with m.If(take & last):
                    m.next = "IDLE"
        return a_done

    def _to_b(self, m, groups):
        """On to B: ``COUNTS`` for the group format (``groups``), else ``B``."""
        m.next = "B"
        if self.groups:
            with m.If(groups):
                m.next = "COUNTS"

    def _group_walk(self, m):
        """The group format's registers and position flags (outside the FSM)."""
        g, job = self.geometry, self.job
        beat_bytes = g.beat_bytes
        groups_max = g.max_k_for(1) // GROUP
        w = self._walk = type("GroupWalk", (), {})()
        w.positions = -(-groups_max // beat_bytes)  # beats of the widest job's counts
        # The counts, 3 bits each (taken modulo 8). The current group's (``count``) and the
        # next one's (``following``) are registers of their own beside the state machine, each
        # with the code units it needs (``*_need``); the groups after them are in ``counts``,
        # the lowest first. A beat's counts are written at their places, and each group end
        # moves them all down by one (but for a uniform count, which stays: ``following`` is
        # written with it too).
        w.count, w.following = Signal(3, reset_less=True), Signal(3, reset_less=True)
        w.need_range = range(int(max(CODE_BITS)) * g.cols // gcd(g.stream_width, g.cols) + 1)
        w.count_need = Signal(w.need_range, reset_less=True)
        w.following_need = Signal(w.need_range, reset_less=True)
        w.counts = Signal(3 * max(1, beat_bytes * w.positions - 2), reset_less=True)
        w.final_step = Signal()  # the step being loaded is the group's last
        w.uniform = Signal()
        w.count_beat = Signal(range(w.positions))
        k_most = g.max_k_for(1)
        w.count_k = Signal(range(k_most + GROUP * beat_bytes))  # k-steps whose counts are in
        w.group_k = Signal(range(k_most + GROUP))  # the group's first k-step
        w.group_slot = Signal(range(g.max_k))  # its first slot in the n-tile's B
        w.step = Signal(3)  # the step of the group being loaded
        # The n-tile's code bits taken in and not yet used: the lowest ``fill`` units of
        # ``buffer`` (a unit: the greatest common divisor of the beat's and a column's bits,
        # so every fill is a whole number of units), and the group's codes (``codes``).
        w.unit = gcd(g.stream_width, g.cols)
        need_max = int(max(CODE_BITS)) * g.cols
        w.buffer = Signal(need_max - w.unit + g.stream_width, reset_less=True)
        w.fill = Signal(range(len(w.buffer) // w.unit + 1))
        w.codes = Signal(need_max, reset_less=True)
        w.last_count, w.next_count, w.restart_count = walk_flag(
            m, self.start, self.single.counts, w.count_k, GROUP * beat_bytes, job.k, "last_count")
        w.last_group, w.next_group, w.restart_group = walk_flag(
            m, self.start, self.single.group, w.group_k, GROUP, job.k, "last_group")
        # The group's steps kept: its k-steps (4, or K - 4g for the last) but at most its slots
        # (a register, from the job and the walk: a step past them is dropped). It lags a
        # group's start by a cycle, which only its first step sees, and that one is always
        # kept.
        w.slots = group_slots(job)
        w.steps_here = Signal(range(GROUP + 1))
        k_left = job.k - w.group_k
        m.d.sync += w.steps_here.eq(Mux(w.last_group & (k_left < w.slots), k_left, w.slots))

    @staticmethod
    def _code_widths(count):
        """Per nonzero width of a column's code (``CODE_BITS``): it, and whether a group of
        ``count`` steps has codes of that width."""
        for bits in sorted(set(int(bits) for bits in CODE_BITS) - {0}):
            yield bits, or_all([count == c for c, width in enumerate(CODE_BITS) if width == bits])

    def _need(self, count):
        """The units of code a group of ``count`` steps takes."""
        w, cols = self._walk, self.geometry.cols
        need = Const(0, w.need_range)
        for bits, this in self._code_widths(count):
            need = Mux(this, bits * cols // w.unit, need)
        return need

    def _used(self, buffer, count):
        """``buffer`` less the codes (its lowest bits) of a group of ``count`` steps."""
        rest = buffer
        for bits, this in self._code_widths(count):
            rest = Mux(this, buffer >> bits * self.geometry.cols, rest)
        return rest

    def _lane(self, count, step, codes, column):
        """Column ``column``'s lane in step ``step`` of a group of ``count`` steps with these
        codes (the module docstring of :mod:`sparsa.protocol`)."""
        two, three = codes[2 * column:2 * column + 2], codes[3 * column:3 * column + 3]
        first = Array(Const(pair[0], 2) for pair in CODE_PAIRS + (CODE_PAIRS[0],) * 2)
        second = Array(Const(pair[1], 2) for pair in CODE_PAIRS + (CODE_PAIRS[0],) * 2)
        step = step[:2]
        lane = Mux(count == 1, two,
                   Mux(count == 2, Mux(step[0], second[three], first[three]),
                       Mux(count == 3, step + (step >= two), step)))
        return lane[:2]

    def _group_states(self, m, b_write, b_slot, b_lanes_q, early_tlast, n_tile_done):
        """B in the group format: per n-tile its step counts (``COUNTS``), then per group the
        code beats it still needs (``HEAD``; a group of no steps takes a cycle in ``PASS``
        instead) and its steps (``STEPS``)."""
        g, w = self.geometry, self._walk
        cols, beat_bytes = g.cols, g.beat_bytes
        take, last = self.take, self.input.payload.last
        counts, count_beat, count_k, group_k = w.counts, w.count_beat, w.count_k, w.group_k
        step, steps_here, buffer, fill = w.step, w.steps_here, w.buffer, w.fill
        count = w.count
        beat_units = g.stream_width // w.unit

        def use(bits, count, fill_left):
            """The group's codes are the lowest of ``bits``: on to its steps."""
            m.d.sync += [w.codes.eq(bits[:len(w.codes)]), buffer.eq(self._used(bits, count)),
                         fill.eq(fill_left), step.eq(0), w.final_step.eq(count == 1)]
            m.next = "STEPS"

        def begin(count, need, from_counts=False):
            """On to a group whose count is ``count`` (its codes: ``need`` units): its steps,
            when its codes are in (from ``COUNTS``, the n-tile's first group, only a group with
            no codes), its code beats (``HEAD``), or, for a group of no steps, ``PASS``."""
            m.d.comb += self.pausing_next.eq(count == 0)
            with m.If(count == 0):
                m.next = "PASS"
            with m.Elif(need == 0 if from_counts else fill >= need):
                if from_counts:
                    m.d.sync += [step.eq(0), w.final_step.eq(count == 1)]
                    m.next = "STEPS"
                else:
                    use(buffer, count, fill - need)
            with m.Else():
                m.next = "HEAD"

        def to_idle():
            m.d.comb += [self.loading_a_next.eq(0), self.pausing_next.eq(0)]
            m.next = "IDLE"

        def set_count(register, need, value):
            m.d.sync += [register.eq(value), need.eq(self._need(value))]

        def group_done():
            # (B's mask takes a nibble when the group's slots end one, or with the n-tile.)
            m.d.comb += self.b_nibble_end.eq(((w.group_slot + w.slots)[:2] == 0)
                                             | w.last_group)
            m.d.sync += [group_k.eq(group_k + GROUP), w.next_group,
                         w.group_slot.eq(w.group_slot + w.slots)]
            with m.If(~w.uniform):
                m.d.sync += [count.eq(w.following), w.count_need.eq(w.following_need),
                             counts.eq(counts >> 3)]
                set_count(w.following, w.following_need, counts[:3])
            begin(w.following, w.following_need)
            with m.If(w.last_group):
                m.d.comb += self.b_tile_end.eq(1)
                m.d.sync += [group_k.eq(0), w.restart_group, count_k.eq(0), w.restart_count,
                             fill.eq(0), w.group_slot.eq(0)]
                m.d.comb += self.pausing_next.eq(0)
                m.next = "COUNTS"
                n_tile_done()

        with m.State("COUNTS"):
            early_tlast(Const(0))
            with m.If(take):
                with m.Switch(count_beat):
                    for position in range(w.positions):
                        with m.Case(position):
                            for byte in range(beat_bytes):
                                value = self.in_data[8 * byte:8 * byte + 3]
                                group = position * beat_bytes + byte
                                if group == 0:
                                    # (A uniform count is the following group's too.)
                                    set_count(count, w.count_need, value)
                                    set_count(w.following, w.following_need, value)
                                elif group == 1 and position == 0:
                                    with m.If(~self.in_data[7]):  # (not a uniform header)
                                        set_count(w.following, w.following_need, value)
                                elif group == 1:
                                    set_count(w.following, w.following_need, value)
                                else:
                                    m.d.sync += counts[3 * (group - 2):3 * (group - 1)].eq(value)
                m.d.sync += [count_beat.eq(count_beat + 1),
                             count_k.eq(count_k + GROUP * beat_bytes), w.next_count]
                first = count_beat == 0
                uniform = first & self.in_data[7]  # UNIFORM: this beat is the whole header
                with m.If(first):
                    m.d.sync += w.uniform.eq(self.in_data[7])
                with m.If(w.last_count | uniform):
                    m.d.sync += count_beat.eq(0)
                    # The first group's count: in this beat if it is the first of the counts.
                    first_count = Mux(first, self.in_data[:3], count)
                    begin(first_count, self._need(first_count), from_counts=True)
            with m.If(take & last):
                to_idle()
        with m.State("PASS"):
            # A group of no steps takes no beat (``pausing`` holds the input) and a cycle.
            group_done()
        with m.State("HEAD"):
            # A code beat joins the buffer above its ``fill`` units (one of the few places a
            # fill below the largest group's codes can be).
            early_tlast(Const(0))
            merged = Signal.like(buffer)
            with m.Switch(fill):
                for place in range(-(-len(w.codes) // w.unit)):
                    with m.Case(place):
                        low = place * w.unit
                        m.d.comb += merged.eq(Cat(buffer[:low], self.in_data,
                                                  buffer[low + g.stream_width:]))
            need = w.count_need
            with m.If(take):
                with m.If(fill + beat_units >= need):
                    use(merged, count, fill + beat_units - need)
                with m.Else():
                    m.d.sync += [buffer.eq(merged), fill.eq(fill + beat_units)]
            with m.If(take & last):
                to_idle()
        with m.State("STEPS"):
            complete = self._collect(m, g.vector_beats(cols))
            early_tlast(Const(0))
            kept = complete & (step < steps_here)
            m.d.comb += [b_write.eq(kept),
                         b_slot.eq(self.ld_b_base + w.group_slot + step[:2]),
                         self.b_word.eq(kept), self.b_place.eq((w.group_slot + step)[:2])]
            m.d.sync += b_lanes_q.eq(Cat(*(self._lane(count, step, w.codes, j)
                                           for j in range(cols))))
            with m.If(complete):
                m.d.sync += [step.eq(step + 1), w.final_step.eq(step + 2 == count)]
                with m.If(w.final_step):
                    group_done()
            with m.If(take & last):
                to_idle()

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

    def _masks(self, m, a_bank):
        """The nonzero masks, a cycle after each word (see the module's docstring)."""
        g, job = self.geometry, self.job
        no_skip = job.no_skip
        # The word's bit and place and the nibble's end, registered; the slots' bits gather
        # in a nibble and enter the mask (a shift register, no reset: bits not shifted in
        # during this job are masked off by ``k_valid``) four at a time, so the masks' wide
        # registers shift by four whatever the job's slots per group.
        b_nonzero = Signal(g.max_k, reset_less=True)
        b_nibble, a_nibble = Signal(LANES), Signal(LANES)
        b_word, b_end, a_word, a_end = Signal(), Signal(), Signal(), Signal()
        b_place, a_place = Signal(range(LANES)), Signal(range(LANES))
        b_last, b_first = Signal(), Signal()
        b_bit, a_bit = Signal(), Signal()
        b_nt = Signal.like(self.ld_nt)
        # A's slots: per k-step (plain B), or in the group format the group's S slots at its
        # place in the nibble (group g's at (g x S) mod 4: ``a_span``), the nibble entering
        # the mask when full or with the panel's last group (``a_shift``).
        slots = group_slots(job)
        group = self.ld_k[2:]
        place = Mux(job.one_slot, group[:2], Mux(job.two_slots, Cat(Const(0, 1), group[0]), 0))
        a_span, a_shift = Signal(LANES), Signal()
        m.d.sync += [
            b_word.eq(self.b_word), b_end.eq(self.b_nibble_end), b_place.eq(self.b_place),
            a_word.eq(self.a_word), a_end.eq(self.a_group_end), a_place.eq(self.ld_k[:2]),
            a_span.eq((Mux(job.one_slot, 1, Mux(job.two_slots, 0b11, 0b1111)) << place)[:LANES]),
            a_shift.eq(((place + slots)[:2] == 0) | self.last_k),
            b_last.eq(self.b_tile_end),
            b_first.eq(self.ld_nt == 0), b_nt.eq(self.ld_nt),
            b_bit.eq(no_skip | self._low_bits_any(8 * g.cols)),
            a_bit.eq(no_skip | self._low_bits_any(8 * g.rows)),
        ]
        b_group = Signal(LANES)  # the nibble's bits with this word's
        a_group = Signal(LANES)  # the A group's k-steps with this word's
        a_pack = Signal(LANES)  # the A slots of the nibble so far
        a_packed = Signal(LANES)  # with this group's
        b_shifted = Signal(g.max_k)  # b_nonzero with the completed nibble shifted in
        m.d.comb += [
            b_group.eq(b_nibble | Mux(b_word & b_bit, 1 << b_place, 0)),
            a_group.eq(a_nibble | Mux(a_word & a_bit, 1 << a_place, 0)),
            a_packed.eq(a_pack | Mux(job.groups, Mux(a_group.any(), a_span, 0), a_group)),
            b_shifted.eq(Cat(b_nonzero[LANES:], b_group)),
            self.b_mask_write.addr.eq(b_nt),
            self.b_mask_write.data.eq(b_shifted),
            self.b_mask_write.en.eq(b_last),
        ]
        m.d.sync += [b_nibble.eq(b_group), a_nibble.eq(a_group)]
        with m.If(b_end):
            m.d.sync += [b_nonzero.eq(b_shifted), b_nibble.eq(0)]
            with m.If(b_first):
                m.d.sync += self.k_valid.eq(Cat(self.k_valid[LANES:], Const(-1, LANES)))
        with m.If(a_end):
            m.d.sync += [a_nibble.eq(0), a_pack.eq(Mux(a_shift, 0, a_packed))]
        for bank in range(2):
            with m.If(a_end & a_shift & (a_bank == bank)):
                m.d.sync += self.a_nonzero[bank].eq(Cat(self.a_nonzero[bank][LANES:], a_packed))
