"""The sequencer: the loaded panels into k-steps for the array.

:class:`Sequencer` walks the job's output tiles, m-tile by m-tile (one A bank each, in turns),
n-tile by n-tile within it, and for each tile issues its k-steps (its slots, see
:class:`.Loader`: plain k-steps, or the steps of the group format), one per cycle: ``a_addr``
and ``b_addr`` are the memory addresses of the slot decided in this cycle (registered: the
words come out of the block RAMs two cycles later, see :class:`.Feed`; ``a_addr`` is the A
memory's word of the slot's group, bank x :func:`.a_bank_words` + slot / S, S the job's slots
per group), and ``step`` says what it is
(``issue``, the tile's ``first`` and ``last``, ``kill``: a tile with no k-step at all issues one
zero k-step so that it still yields its results).

Contract:

- A tile starts once its A bank is full (``panel_full``); the bank is freed (``free``) with the
  tile that ends its m-tile. With sparse-skip, the k-steps issued are the set bits of the A
  panel's nonzero mask AND the n-tile's B mask (read through ``b_mask``, a block memory) AND
  ``k_valid``, lowest first, through a :class:`.StepPicker`; all-zero k-steps cost no cycle.
  Without, a counter walks k.
- A tile's last k-step waits until the row FIFO downstream has room for its ``rows`` rows
  (counted here: reserved by each last k-step, returned by ``popped``) and until
  ``max(rows, cols)`` cycles have passed since the tile before ended (the array's issue rule).
  ``nothing_reserved`` tells the drain that no row is on its way.
- ``slot`` is the tile's real products per k-step (``rows x cols`` but at the job's edges);
  ``advance`` is high the cycle after a tile's last k-step, with ``skipped`` (the tile's
  k-steps not issued) valid in the cycle before.
- ``closing`` stops it at any point; ``job_end`` is high when the job's last tile ends.
  ``waiting_panel`` and ``waiting_room`` are high in the cycles it waits for an A panel or for
  room (the work counters count them).
"""

from amaranth import Module, Mux, Signal
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import bits_for, ceil_log2

from .bram import read_signature
from .job import REGISTERS, a_bank_words, job_layout
from .picker import StepPicker, group_flags
from .pipeline import delay, lut_product

STEP = data.StructLayout({"issue": 1, "first": 1, "last": 1, "kill": 1})


class Sequencer(wiring.Component):
    def __init__(self, geometry, sparse_skip=True):
        g = self.geometry = geometry
        self.sparse_skip = sparse_skip
        self.fifo_rows = 2 * g.rows
        members = {
            "start": In(1), "rejected": In(1), "closing": In(1), "tlast_early": In(1),
            "registers": In(REGISTERS), "job": In(job_layout(g)),
            "panel_full": In(2), "loading_a": In(1), "popped": In(1),
            "a_addr": Out(ceil_log2(2 * a_bank_words(g, sparse_skip))),
            "b_addr": Out(ceil_log2(g.n_tiles_max * g.max_k)),
            "step": Out(STEP),
            "slot": Out(range(g.rows * g.cols + 1)),
            "advance": Out(1),
            "skipped": Out(range(g.max_k_for(1) + 1)),
            "free": Out(2), "job_end": Out(1), "nothing_reserved": Out(1),
            "waiting_panel": Out(1), "waiting_room": Out(1),
        }
        if sparse_skip:
            members.update({
                "a_nonzero": In(g.max_k).array(2),
                "k_valid": In(g.max_k),
                "b_mask": In(read_signature(g.max_k, g.n_tiles_max)),
            })
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        g = self.geometry
        rows, cols = g.rows, g.cols
        n_tiles_max = g.n_tiles_max
        self.sq_nt = Signal(range(n_tiles_max))
        self.sq_n_left = Signal(range(g.max_n + 1))  # columns of C from this tile's first one on
        self.sq_m_left = Signal(32)  # rows of C from this tile's first one on
        self.sq_b_base = Signal(range(n_tiles_max * g.max_k + 1))
        self.sq_bank = Signal()
        self.sq_last_n, self.sq_last_m = Signal(), Signal()  # in the last n-tile / m-tile
        self.issued = Signal(range(g.max_k + 1))  # k-steps of this tile issued so far
        # K less one less ``issued``: the tile's k-steps skipped if the one offered now is its
        # last (a register, so ``skipped`` is a multiplexer of registers).
        self.k_left = Signal(range(g.max_k_for(1)), reset_less=True)
        self.issue = Signal()  # a k-step goes to the array
        self.take = Signal()  # ``issue``, worked out apart for the picker (see _accept)
        self.issue_last = Signal()
        self.tile_load = Signal()  # LOAD: the tile's k-steps start
        self.in_issue = Signal()  # the sequencer is in ISSUE
        self.in_load = Signal()  # the sequencer is in LOAD
        # The slot to issue now is k_position - k_offset (the nonzero masks hold slot s at bit
        # max_k - T + s, T the job's slots per n-tile, ``tile_slots``); the offset is folded
        # into registered memory base addresses (A's in groups: k_offset is a multiple of 4).
        self.k_position = Signal(max(1, bits_for(g.max_k - 1)))
        self.k_offset = Signal(range(g.max_k), reset_less=True)
        self.ready = Signal()  # a k-step is there to issue
        self.more = Signal()  # another k-step of this tile follows the one issued now
        self.empty = Signal()  # this tile has no k-step to issue at all
        self.mask_ready = Signal()  # LOAD may start the tile (its B mask is out of the memory)
        self.room = Signal()  # the row FIFO has room for a tile (see _room)
        # Memory bases minus the offset, modulo the address width (the sums are always in range).
        a_base, b_base = Signal.like(self.a_addr), Signal.like(self.b_addr)
        rows_real = Signal(range(rows + 1), reset_less=True)
        cols_real = Signal(range(cols + 1), reset_less=True)
        slot = Signal(range(rows * cols + 1), reset_less=True)
        m.d.comb += self.slot.eq(slot)
        job = self.job

        def in_groups(slot):
            """A slot's A word (its group: slot / S) from ``slot``."""
            return Mux(job.one_slot, slot, Mux(job.two_slots, slot >> 1, slot >> 2))

        bank_words = a_bank_words(g, self.sparse_skip)
        m.d.sync += [
            a_base.eq(Mux(self.sq_bank, bank_words, 0) - in_groups(self.k_offset)),
            b_base.eq(self.sq_b_base - self.k_offset),
            self.sq_last_n.eq(self.sq_n_left <= cols),
            self.sq_last_m.eq(self.sq_m_left <= rows),
            rows_real.eq(Mux(self.sq_m_left >= rows, rows, self.sq_m_left)),
            cols_real.eq(Mux(self.sq_n_left >= cols, cols, self.sq_n_left)),
            slot.eq(lut_product(rows_real, cols_real)),
        ]
        if self.sparse_skip:
            self._picker(m)
        else:
            self._counter(m)
        # The k-step's memory addresses are registered (the sum is not in the block RAMs'
        # address set-up).
        m.d.sync += [self.a_addr.eq(a_base + in_groups(self.k_position)),
                     self.b_addr.eq(b_base + self.k_position)]
        room_next = self._room(m)
        self._accept(m, room_next)
        m.d.comb += self.skipped.eq(Mux(self.empty, self.job.k, self.k_left))
        self._position(m)
        self._fsm(m)
        return m

    def _picker(self, m):
        """The k-steps of a tile from its masks, by a :class:`.StepPicker`."""
        g, job = self.geometry, self.job
        m.submodules.picker = picker = StepPicker(g.max_k)
        next_nt = self.next_nt = Signal.like(self.sq_nt)
        # The B mask is read for the tile after this one while issuing, else for this one; the
        # tags follow the address through the block RAM and its output register. The address
        # is a register: the block RAM's address pins see no logic from the sequencer's state.
        # Any address it reads is safe, ``mask_ready`` compares the tags.
        b_addr, b_tag1, b_tag2 = (Signal.like(self.sq_nt), Signal.like(self.sq_nt),
                                  Signal.like(self.sq_nt))
        b_mask = self.b_mask.data  # the B mask at b_tag2
        # B's masks are all in their memory a cycle after B's last word; ``tile_mask`` has
        # them four cycles later. A panel of one k-step can be full before that, so a job's
        # tiles also wait for ``b_final`` (a few cycles after the loader leaves B).
        b_final = Signal()
        b_left = delay(m, self.loading_a, 3, "b_left")
        b_final_next = ~self.start & (b_left | b_final)
        m.d.sync += b_final.eq(b_final_next)
        # mask_ready: whether tile_mask is this tile's (the tag of its B mask, b_tag2 a cycle
        # before, is sq_nt, or next_nt in the two cycles after issue_last while sq_nt moves on;
        # at start sq_nt returns to 0 while the sequencer waits, not in LOAD) and B's masks are
        # final. One register, worked out a cycle ahead, so LOAD's decision (which loads the
        # picker) is one LUT of registers. It is read only in LOAD, so its value after an ISSUE
        # cycle matters only when that cycle was issue_last: the choice of tag takes the state
        # (``in_issue``) for issue_last, and issue_last's own logic stays out of this
        # register's input. The two tag compares are registered a cycle ahead, from the values
        # b_tag2, sq_nt and next_nt will have (sq_nt moves on only after ``advance``, to
        # next_nt; next_nt follows sq_nt), so the choice between them is the only logic left.
        tag_is_next, tag_is_sq = Signal(), Signal()
        next_nt_next = Mux(self.sq_last_n, 0, self.sq_nt + 1)  # next_nt's next value
        m.d.sync += [
            tag_is_next.eq(b_tag1 == next_nt_next),
            tag_is_sq.eq(b_tag1 == Mux(self.advance, next_nt, self.sq_nt)),
        ]
        ready_next = Mux(self.in_issue | self.advance, tag_is_next, tag_is_sq) & b_final_next
        # A copy for the picker's mask register (see below); its other power-up value keeps
        # synthesis from merging the two (it is read only in LOAD, never right after reset).
        mask_ready_copy = Signal(init=1)
        m.d.sync += [self.mask_ready.eq(ready_next), mask_ready_copy.eq(ready_next)]
        # The tile's mask (the A panel's, the B n-tile's, the job's K) and its per-group flags
        # are registered together, so the picker's load isolates the lowest flag and ORs no
        # mask bits. The mask is the B mask's a cycle later (see ``mask_ready``); the A side is
        # read straight from the panel masks, as fresh as before.
        tile_mask = Signal(g.max_k, reset_less=True)
        tile_groups = Signal(picker.groups, reset_less=True)
        next_mask = (Mux(self.sq_bank, self.a_nonzero[1], self.a_nonzero[0]) & self.k_valid
                     & b_mask)
        m.d.comb += [
            self.b_mask.addr.eq(b_addr),  # a register, b_mask two cycles later
            picker.mask.eq(tile_mask),
            picker.mask_groups.eq(tile_groups),
            picker.load.eq(self.tile_load),
            # The mask register's copy of tile_load, from its own registers and without
            # ``closing`` (a job that closes takes no more tokens): a LUT and a net apart.
            picker.load_mask.eq(self.in_load & mask_ready_copy),
            picker.take.eq(self.take),
            self.k_position.eq(picker.position),
            self.ready.eq(picker.valid),
            self.more.eq(~picker.last),
            self.empty.eq(picker.none),
        ]
        m.d.sync += [
            # (Slots are counted from the mask bit of the job's first group: max_k - T.)
            self.k_offset.eq(g.max_k - job.tile_slots),
            next_nt.eq(next_nt_next),
            b_addr.eq(Mux(self.in_issue, next_nt, self.sq_nt)),
            b_tag1.eq(b_addr), b_tag2.eq(b_tag1),
            tile_mask.eq(next_mask),
            tile_groups.eq(group_flags(next_mask, g.max_k)),
        ]

    def _counter(self, m):
        """Without sparse-skip (a build for comparison): every k-step, by a counter."""
        step = Signal(range(self.geometry.max_k))
        m.d.comb += [self.k_position.eq(step), self.more.eq(step != self.job.k - 1),
                     self.mask_ready.eq(1)]
        # The first k-step goes in the same cycle after LOAD as with the picker (and the
        # registered tile size, ``slot``, is ready by then).
        warm = delay(m, self.tile_load, 2, "warming")
        with m.If(self.tile_load | self.issue_last):  # as the picker: none after the last
            m.d.sync += self.ready.eq(0)
        with m.Elif(warm):
            m.d.sync += self.ready.eq(1)
        with m.If(self.tile_load | self.issue_last):
            m.d.sync += step.eq(0)
        with m.Elif(self.issue):
            m.d.sync += step.eq(step + 1)

    def _room(self, m):
        """The rows reserved in the row FIFO and ``room``; returns room's next value."""
        rows, fifo_rows = self.geometry.rows, self.fifo_rows
        # ``room`` is registered: it lags ``reserved`` by a cycle, and ``reserved`` takes the
        # sequencer's and the drain's news a cycle late (``reserve``, ``popped``, registers),
        # which only errs on the safe side: no tile ends within three cycles of the last, and a
        # row freed late only delays the next reservation.
        reserved = Signal(range(fifo_rows + rows + 1))
        reserve, popped = Signal(), Signal()  # issue_last and the drain's pop, a cycle late
        room_next = reserved <= fifo_rows - rows
        m.d.sync += [self.room.eq(room_next),
                     reserve.eq(self.issue_last), popped.eq(self.popped),
                     reserved.eq(reserved + Mux(reserve, rows, 0) - popped)]
        m.d.comb += self.nothing_reserved.eq((reserved == 0) & ~reserve)
        return room_next

    def _accept(self, m, room_next):
        """Whether a k-step offered now is issued."""
        gap = max(self.geometry.rows, self.geometry.cols)
        # ``since_last`` counts the cycles since the last issue_last (saturating at ``gap``); a
        # tile may end ``gap`` cycles after the one before (exactly). Where ``gap`` allows, the
        # count restarts from ``advance`` (a register), a cycle late, with its threshold one
        # lower and the cycle of ``advance`` itself excluded: the same cycles, and issue_last
        # does not reach the counter.
        self.since_last = since_last = Signal(range(gap + 1))
        restart_late = gap >= 3
        with m.If(since_last < gap):
            m.d.sync += since_last.eq(since_last + 1)
        with m.If(self.advance if restart_late else self.issue_last):
            m.d.sync += since_last.eq(0)
        # (Next cycle is at least ``gap`` after the last issue_last, unless that is this one.)
        gap_next = ((~self.advance & (since_last >= gap - 3)) if restart_late
                    else (since_last >= gap - 2))
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
        accept_more_next = ((self.in_issue | (self.in_load & self.mask_ready))
                            & ~self.closing & ~self.tlast_early)
        accept_last_next = accept_more_next & room_next & gap_next
        accept_more, accept_last = Signal(), Signal()
        # The picker's copies; their other power-up value keeps synthesis from merging them
        # with the sequencer's (nothing is offered in the cycle after reset).
        take_more, take_last = Signal(init=1), Signal(init=1)
        m.d.sync += [accept_more.eq(accept_more_next), accept_last.eq(accept_last_next),
                     take_more.eq(accept_more_next), take_last.eq(accept_last_next)]
        ready, more = self.ready, self.more
        issue = self.issue
        m.d.comb += [
            issue.eq(ready & Mux(more, accept_more, accept_last)),
            self.issue_last.eq(ready & ~more & accept_last),
            self.step.issue.eq(issue),
            self.step.first.eq(issue & (self.issued == 0)),
            self.step.last.eq(self.issue_last),
            self.step.kill.eq(self.issue_last & self.empty),
            self.take.eq(ready & Mux(more, take_more, take_last)),
        ]

    def _position(self, m):
        """Where the next tile is in the job."""
        g = self.geometry
        # Moved on a cycle after issue_last, from a register, so the decision reaches a few
        # registers and this wide bookkeeping hangs off a register's fan-out. Its readers have
        # the time: the next tile's first k-step comes three cycles after LOAD, and its size,
        # bases and B-mask tag are registered from these in between (``mask_ready`` looks at
        # next_nt in both cycles in which sq_nt lags).
        m.d.sync += self.advance.eq(self.issue_last)
        with m.If(self.advance):
            m.d.sync += [self.sq_n_left.eq(self.sq_n_left - g.cols), self.sq_nt.eq(self.sq_nt + 1),
                         self.sq_b_base.eq(self.sq_b_base + self.job.tile_slots)]
            with m.If(self.sq_last_n):
                m.d.sync += [self.sq_n_left.eq(self.job.n), self.sq_nt.eq(0),
                             self.sq_b_base.eq(0), self.sq_m_left.eq(self.sq_m_left - g.rows)]
        # The bank is freed with the tile that ends its m-tile.
        release = self.issue_last & self.sq_last_n
        for bank in range(2):
            m.d.comb += self.free[bank].eq(release & (self.sq_bank == bank))

    def _fsm(self, m):
        """The tile's states: WAIT for its A panel, LOAD its k-steps, ISSUE them."""
        g = self.geometry
        ready, more, closing = self.ready, self.more, self.closing
        with m.FSM(name="sequencer") as sequencer:
            with m.State("IDLE"):
                with m.If(self.start & ~self.rejected):
                    # (The dimensions come from the registers: the job is latched in this
                    # cycle.)
                    m.d.sync += [self.sq_nt.eq(0), self.sq_n_left.eq(self.registers.n),
                                 self.sq_m_left.eq(self.registers.m), self.sq_b_base.eq(0),
                                 self.sq_bank.eq(0),
                                 self.since_last.eq(max(g.rows, g.cols))]
                    m.next = "WAIT"
            with m.State("WAIT"):
                with m.If(closing):
                    m.next = "IDLE"
                with m.Elif(self.panel_full.bit_select(self.sq_bank, 1)):
                    m.next = "LOAD"
                with m.Else():
                    m.d.comb += self.waiting_panel.eq(1)
            with m.State("LOAD"):
                with m.If(closing):
                    m.next = "IDLE"
                with m.Elif(self.mask_ready):
                    m.d.comb += self.tile_load.eq(1)
                    m.d.sync += [self.issued.eq(0), self.k_left.eq(self.job.k - 1)]
                    m.next = "ISSUE"
            with m.State("ISSUE"):
                # (Until the first k-step is out of the picker, ``ready`` is low.)
                with m.If(closing):
                    m.next = "IDLE"
                with m.Elif(ready & more):
                    m.d.sync += [self.issued.eq(self.issued + 1), self.k_left.eq(self.k_left - 1)]
                with m.Elif(ready & ~self.room):
                    m.d.comb += self.waiting_room.eq(1)
                with m.Elif(self.issue_last):
                    m.next = "LOAD"
                    with m.If(self.sq_last_n):
                        m.d.sync += self.sq_bank.eq(~self.sq_bank)
                        with m.If(self.sq_last_m):
                            m.d.comb += self.job_end.eq(1)
                            m.next = "IDLE"
                        with m.Else():
                            m.next = "WAIT"
        m.d.comb += [self.in_issue.eq(sequencer.ongoing("ISSUE")),
                     self.in_load.eq(sequencer.ongoing("LOAD"))]
