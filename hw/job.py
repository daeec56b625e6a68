"""The job of the accelerator: its registers checked and latched at start, and its status.

:class:`JobControl` takes the register values (``registers``: ``m``, ``k``, ``n``, ``options``,
``quant_*``) and ``start``, and gives the job the other stages read (:func:`job_layout`),
whether it was rejected, and the status: ``busy``, ``done``, ``error``, and ``closing`` (no more
tiles will be issued: the drain closes the output packet once it is empty).

Contract:

- The checks of :mod:`sparsa.protocol` (zero dimension, K or N too large, unknown options,
  channel quantization without requantization, the group format with ``NO_SKIP`` or on a build
  without it (``groups``), bad shift or zero point) are worked out from
  the registers in every cycle, two registered stages deep, so they are right at ``start`` if
  the registers have held still for two cycles (the top level starts the core three cycles
  after the START write). The first failing check, in the order above, is the error code.
- At ``start`` the job is latched and ``busy`` set; ``error`` takes the check's verdict, and a
  rejected job (``rejected`` high in the ``start`` cycle) sets ``closing`` at once.
- Afterwards ``error`` and ``closing`` follow the loader's packet events (``tlast_early``
  closes the job; ``tlast_missing`` only reports), ``job_end`` (the sequencer issued the last
  tile) sets ``closing``, and ``drained`` (the last beat has left the output link) ends the job:
  ``busy`` low, ``done`` high. Nothing but the core's reset clears them.
- ``tile_slots`` (the B memory's slots per n-tile: ceil(K/4) times the slots per group, 1 with
  ``STEPS_1``, 2 with ``STEPS_2``, else 4 (``one_slot``, ``two_slots``), rounded up to a
  multiple of four: the masks take slots four at a time) is worked out the same way, a stage
  deep, and latched with the job.
- ``single`` holds ``1 >= K``, ``cols >= N``, ``rows >= M``, ``4 >= K`` (one group) and
  ``4 x beat bytes >= K`` (the group format's counts in one beat) from the registers,
  registered: the first values of the position flags of the loader and the drain
  (:func:`.pipeline.walk_flag`).
"""

from amaranth import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from sparsa.protocol import GROUP, KNOWN_OPTIONS, Error, Option


def job_layout(geometry):
    """The latched job: dimensions, options decoded, the per-tensor requantization."""
    return data.StructLayout({
        "m": unsigned(32),
        "k": range(geometry.max_k_for(1) + 1),
        "n": range(geometry.max_n + 1),
        "bias": 1, "requant": 1, "relu": 1, "no_skip": 1, "channel_quant": 1, "groups": 1,
        # The B memory's slots per group (1, 2 or 4: ``one_slot``, ``two_slots``, neither)
        # and per n-tile (``tile_slots``: that times ceil(K/4), rounded up to a multiple of
        # four; at most max_k).
        "one_slot": 1, "two_slots": 1, "tile_slots": range(geometry.max_k + 1),
        "mult": signed(32), "shift": unsigned(5), "zero": signed(8),
    })


def group_slots(job):
    """The job's slots per group (1, 2 or 4) from its latched flags (``job_layout``)."""
    return Mux(job.one_slot, 1, Mux(job.two_slots, 2, GROUP))


def a_bank_words(geometry, groups):
    """The A memory's words per bank (a word holds a group of four k-steps) for the largest K of
    a job: ``MAX_K1`` with the group format (``groups``), else ``MAX_K``."""
    return geometry.max_k_for(1 if groups else GROUP) // GROUP


# The job's registers as the core sees them (:mod:`.regs` holds them; START does not change
# them, so they hold still from the START write on).
REGISTERS = data.StructLayout({
    "m": 32, "k": 32, "n": 32, "options": 32,
    "quant_mult": 32, "quant_shift": 32, "quant_zero": 32,
})

SINGLE = data.StructLayout({"k": 1, "n": 1, "m": 1, "group": 1, "counts": 1})


class JobControl(wiring.Component):
    def __init__(self, geometry, groups=True):
        self.geometry = geometry
        self.groups = groups
        super().__init__({
            "start": In(1), "registers": In(REGISTERS),
            "tlast_early": In(1), "tlast_missing": In(1), "job_end": In(1), "drained": In(1),
            "job": Out(job_layout(geometry)),
            "single": Out(SINGLE),
            "rejected": Out(1),
            "closing": Out(1), "busy": Out(1), "done": Out(1), "error": Out(8),
        })

    def elaborate(self, platform):
        m = Module()
        g, r = self.geometry, self.registers
        # The job's values are latched at start and read only after it, so they need no reset
        # (the fewer loads on the core's reset, the shorter its net); the flags are reset.
        job_m = Signal(32, reset_less=True)
        job_k = Signal(range(g.max_k_for(1) + 1), reset_less=True)
        job_n = Signal(range(g.max_n + 1), reset_less=True)
        bias_en, requant, relu, no_skip = Signal(), Signal(), Signal(), Signal()
        channel_quant, groups, one_slot, two_slots = Signal(), Signal(), Signal(), Signal()
        tile_slots = Signal(range(g.max_k + 1), reset_less=True)
        mult = Signal(signed(32), reset_less=True)
        shift = Signal(unsigned(5), reset_less=True)
        zero = Signal(signed(8), reset_less=True)
        m.d.comb += [
            self.job.m.eq(job_m), self.job.k.eq(job_k), self.job.n.eq(job_n),
            self.job.bias.eq(bias_en), self.job.requant.eq(requant), self.job.relu.eq(relu),
            self.job.no_skip.eq(no_skip), self.job.channel_quant.eq(channel_quant),
            self.job.groups.eq(groups), self.job.one_slot.eq(one_slot),
            self.job.two_slots.eq(two_slots), self.job.tile_slots.eq(tile_slots),
            self.job.mult.eq(mult), self.job.shift.eq(shift), self.job.zero.eq(zero),
        ]

        # Each condition is registered, then the first that fails gives the error code, so
        # neither stage holds more than one wide compare. Both registers follow the job's
        # registers in every cycle, through the core's reset too (which comes a cycle after the
        # START write).
        zero_signed = r.quant_zero.as_signed()
        requant_asked = (r.options & Option.REQUANT).any()
        groups_asked = (r.options & Option.GROUPS).any()
        groups_refused = ((r.options & Option.NO_SKIP).any() if self.groups else Const(1))
        steps_1, steps_2 = (r.options & Option.STEPS_1).any(), (r.options & Option.STEPS_2).any()
        conditions = [
            (Error.ZERO_DIMENSION, (r.m == 0) | (r.k == 0) | (r.n == 0)),
            (Error.K_TOO_LARGE, (r.k > g.max_k_for(1))
                | ((r.k > g.max_k_for(2)) & ~steps_1)
                | ((r.k > g.max_k) & ~steps_1 & ~steps_2)),
            (Error.N_TOO_LARGE, r.n > g.max_n),
            (Error.BAD_OPTION, ((r.options & ~Const(KNOWN_OPTIONS, 32)) != 0)
                | ((r.options & Option.CHANNEL_QUANT).any() & ~requant_asked)
                | (groups_asked & groups_refused)
                | ((steps_1 | steps_2) & ~groups_asked) | (steps_1 & steps_2)),
            (Error.BAD_QUANT, requant_asked & ((r.quant_shift > 31) | (zero_signed < -128)
                                               | (zero_signed > 127))),
        ]
        failed = Signal(len(conditions), reset_less=True)
        m.d.sync += failed.eq(Cat(*(condition for _, condition in conditions)))
        check = Signal(8, reset_less=True)
        verdict = Const(Error.NONE, 8)
        for index, (error, _) in reversed(list(enumerate(conditions))):
            verdict = Mux(failed[index], error, verdict)
        m.d.sync += check.eq(verdict)

        # The position flags' first values, compared from the registers the same way.
        for field, step, register in (("k", 1, r.k), ("n", g.cols, r.n), ("m", g.rows, r.m),
                                      ("group", GROUP, r.k),
                                      ("counts", GROUP * g.beat_bytes, r.k)):
            first_is_last = Signal(name=f"single_{field}", reset_less=True)
            m.d.sync += first_is_last.eq(step >= register)
            m.d.comb += self.single[field].eq(first_is_last)

        # The job's slots per n-tile, the same way (only a job that passes is latched with
        # them, so the value is cut to its width): S x G rounded up to whole nibbles of the
        # masks, ceil(G x S / 4) x 4.
        groups_of_k = (r.k + GROUP - 1)[2:]
        slots_next = Signal.like(tile_slots)
        m.d.sync += slots_next.eq(Mux(steps_1, (groups_of_k + 3)[2:] << 2,
                                      Mux(steps_2, (groups_of_k + 1)[1:] << 2,
                                          groups_of_k << 2)))

        with m.If(self.start):
            m.d.sync += [
                job_m.eq(r.m), job_k.eq(r.k), job_n.eq(r.n),
                one_slot.eq(steps_1), two_slots.eq(steps_2 & ~steps_1),
                tile_slots.eq(slots_next),
                bias_en.eq(r.options & Option.BIAS),
                requant.eq((r.options & Option.REQUANT).any()),
                relu.eq((r.options & Option.RELU).any()),
                no_skip.eq((r.options & Option.NO_SKIP).any()),
                channel_quant.eq((r.options & Option.CHANNEL_QUANT).any()),
                groups.eq(groups_asked),
                mult.eq(r.quant_mult), shift.eq(r.quant_shift), zero.eq(r.quant_zero),
                self.busy.eq(1), self.error.eq(check),
            ]
            m.d.comb += self.rejected.eq(check != Error.NONE)
            with m.If(self.rejected):
                m.d.sync += self.closing.eq(1)
        with m.If(self.tlast_early):
            m.d.sync += [self.error.eq(Error.TLAST_EARLY), self.closing.eq(1)]
        with m.If(self.tlast_missing):
            m.d.sync += self.error.eq(Error.TLAST_MISSING)
        with m.If(self.job_end):
            m.d.sync += self.closing.eq(1)
        with m.If(self.drained):
            m.d.sync += [self.busy.eq(0), self.done.eq(1)]
        return m
