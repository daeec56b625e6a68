"""The sequencer's k-step picker: the set bits of a tile's nonzero mask, lowest first, one per
cycle, with no path through all the mask's bits in one cycle.

A plain priority encoder over the mask and the "clear the bit I just took" loop around it put
a 256-bit encoder in every cycle (the accelerator's critical path on an ECP5). The picker splits
the mask into groups of 16 and works in three registered stages:

- ``avail``: which groups still hold bits not yet fetched (set from ``mask_groups`` on ``load``);
- ``nxt``: the bits of the lowest such group, fetched a cycle ahead (a one-hot multiplexer of
  the groups, by a registered one-hot ``first``, the lowest bit of ``avail``);
- ``cur``: the group being picked from. The token stage takes the lowest bit of ``cur`` (or of
  ``nxt`` when ``cur`` is spent) into the output registers, and the rest stays in ``cur``.

Each loop is a 16-bit isolate (a few levels of LUTs) plus a few gates. The token leaves through
a skid register, so ``take`` does not enter the loops. Tokens flow one per
cycle once started: the first is offered in the third cycle after the ``load`` cycle
(``avail``, ``nxt``, token). A mask with no bit at all gives a single token with ``none`` (and
``last``) set, in the second.

Interface: ``load`` (one cycle) takes ``mask`` with its ``mask_groups`` (bit g: group g of the
mask has a set bit, see :func:`group_flags`) and drops any token in flight; ``valid``,
``position``, ``last`` (no bit follows) and ``none`` describe the token offered now, and ``take``
consumes it (the next one is offered in the following cycle). The group flags come from the
user, registered with the mask, so ``load`` only isolates the lowest of them: ORing 16 mask
bits per group in the load cycle put eight LUT levels before the ``first`` register, the
latest path of the ECP5 build on several seeds. ``load_mask`` stores the mask itself: it must
be high with every ``load``, and otherwise only when the tokens still to come no longer matter
(they would come from the new mask). The user works it out apart from ``load``, so the mask
register's enable (``width`` flip-flops) is a net of its own and ``load`` reaches only the
control registers: on the ECP5 the shared net took 2.7 ns to cross the picker.
"""

from amaranth import Cat, Const, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import bits_for

from .pipeline import or_all

GROUP = 16


def _lower_any(value):
    """``[value[:i].any() for i in range(len(value))]`` as a tree: per block of four, the
    bits below inside the block OR the blocks below (the same, one level up), so each is a
    few levels of LUTs rather than a chain through all the lower bits."""
    bits = [value[i] for i in range(len(value))]
    if len(bits) <= 4:
        return [Cat(*bits[:i]).any() if i else Const(0, 1) for i in range(len(bits))]
    blocks = [Cat(*bits[k:k + 4]) for k in range(0, len(bits), 4)]
    blocks_below = _lower_any(Cat(*(block.any() for block in blocks)))
    result = []
    for i in range(len(bits)):
        block, position = divmod(i, 4)
        inside = Cat(*bits[block * 4:i]).any() if position else Const(0, 1)
        result.append(inside | blocks_below[block])
    return result


def _isolate_lowest(m, value, name):
    """``value`` with only its lowest set bit kept: bit i survives when no lower bit is set.
    (Written as ORs, not as ``x & -x``: synthesis maps the subtraction to a carry chain, which
    LUT mapping cannot flatten; this is a shallow tree of LUTs.)"""
    lowest = Signal(len(value), name=name)
    below = _lower_any(value)
    m.d.comb += lowest.eq(Cat(*(value[i] & ~below[i] for i in range(len(value)))))
    return lowest


def _lowest_index(value):
    """The index of ``value``'s lowest set bit (0 when none is set), as a tree over blocks of
    four: each block's own lowest index and whether it has a bit (one LUT each), the lowest
    block that has one (the same, a level up), and the index inside it chosen by the blocks'
    flags in priority order: about three levels of LUTs for 16 bits. (Isolating the bit and
    then encoding it left seven or eight LUT levels before the token register in the ECP5
    netlist; with this, four to six.)"""
    bits = [value[i] for i in range(len(value))]
    if len(bits) == 1:
        return Const(0, 1)
    if len(bits) <= 4:
        index = Const(len(bits) - 1, 2)
        for i in reversed(range(len(bits) - 1)):
            index = Mux(bits[i], i, index)
        return index[:bits_for(len(bits) - 1)]
    blocks = [Cat(*bits[k:k + 4]) for k in range(0, len(bits), 4)]
    inner = _lowest_index(blocks[-1])
    for block in reversed(blocks[:-1]):  # the lowest block with a bit chooses, by priority
        inner = Mux(block.any(), _lowest_index(block), inner)
    return Cat(inner, Const(0, 2 - len(inner)),
               _lowest_index(Cat(*(block.any() for block in blocks))))


def group_flags(mask, width):
    """Per group of the picker's ``width``-bit mask, whether it has a set bit: the value for
    :class:`StepPicker`'s ``mask_groups``."""
    size = min(GROUP, width)
    count = -(-width // size)
    return Cat(*(mask[g * size:min(width, (g + 1) * size)].any() for g in range(count)))


def _several(value):
    """Whether ``value`` has two or more bits set, from its nibbles: one with two or more, or
    two that are not empty (each test is one LUT on four signals)."""
    nibbles = [value[k:k + 4] for k in range(0, len(value), 4)]

    def two_of(bits):
        return Cat(*(bits[a] & bits[b] for a in range(len(bits))
                     for b in range(a + 1, len(bits)))).any()
    return Cat(*(two_of(nibble) for nibble in nibbles),
               two_of(Cat(*(nibble.any() for nibble in nibbles)))).any()


def _encode(one_hot, bits):
    """The index of the set bit of ``one_hot`` (an OR per index bit; 0 when none is set)."""
    return Cat(*(Cat(*(one_hot[i] for i in range(len(one_hot)) if i >> bit & 1)).any()
                 for bit in range(bits)))


class StepPicker(wiring.Component):
    def __init__(self, width):
        self.width = width
        self.group = min(GROUP, width)
        self.groups = -(-width // self.group)
        super().__init__({
            "mask": In(width),
            "mask_groups": In(self.groups),
            "load": In(1),
            "load_mask": In(1),
            "take": In(1),
            "valid": Out(1),
            "position": Out(max(1, bits_for(width - 1))),
            "last": Out(1),
            "none": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        size, count = self.group, self.groups
        index_bits = max(1, bits_for(size - 1))
        group_bits = max(1, bits_for(count - 1))

        padded = Cat(self.mask, Const(0, size * count - self.width))
        bits = Signal(size * count, reset_less=True)  # data: read under avail, *_valid
        groups = [bits[g * size:(g + 1) * size] for g in range(count)]
        avail = Signal(count)
        fresh = Signal()  # the cycle after load: the empty-mask check
        nxt_bits, cur_bits = Signal(size, reset_less=True), Signal(size, reset_less=True)
        nxt_group, cur_group = Signal(group_bits), Signal(group_bits)
        nxt_valid, cur_valid = Signal(), Signal()

        # The token stage (t_*) picks from cur, or from nxt once cur is spent. Behind it, a skid
        # register (s_*) holds a token offered and not taken, so the token stage advances
        # whenever the skid is empty: ``take`` reaches only the skid, not the picker.
        t_valid, t_last, t_none = Signal(), Signal(), Signal()
        t_position = Signal.like(self.position)
        s_valid, s_last, s_none = Signal(), Signal(), Signal()
        s_position = Signal.like(self.position)
        m.d.comb += [
            self.valid.eq(s_valid | t_valid),
            self.position.eq(Mux(s_valid, s_position, t_position)),
            self.last.eq(Mux(s_valid, s_last, t_last)),
            self.none.eq(Mux(s_valid, s_none, t_none)),
        ]
        advance = ~s_valid
        with m.If(s_valid):
            with m.If(self.take):
                m.d.sync += s_valid.eq(0)
        with m.Else():
            # The skid's data follows the token while the skid is empty (it is read only under
            # s_valid), so ``take`` reaches s_valid alone.
            m.d.sync += [s_valid.eq(t_valid & ~self.take), s_position.eq(t_position),
                         s_last.eq(t_last), s_none.eq(t_none)]
        # Both candidates are worked out in parallel and the choice comes last.
        source_group = Signal(group_bits)
        m.d.comb += source_group.eq(Mux(cur_valid, cur_group, nxt_group))
        source_valid = cur_valid | nxt_valid
        lowest_cur = _isolate_lowest(m, cur_bits, "lowest_cur")
        lowest_nxt = _isolate_lowest(m, nxt_bits, "lowest_nxt")
        index = Signal(index_bits)
        rest = Signal(size)
        m.d.comb += [
            index.eq(Mux(cur_valid, _lowest_index(cur_bits), _lowest_index(nxt_bits))),
            rest.eq(Mux(cur_valid, cur_bits & ~lowest_cur, nxt_bits & ~lowest_nxt)),
        ]
        more_here = Mux(cur_valid, _several(cur_bits), _several(nxt_bits))
        # Bits left after this pick: the rest of the source, nxt (when cur is the source), and
        # the groups not fetched yet.
        last = ~more_here & ~(cur_valid & nxt_valid) & ~avail.any()
        nxt_taken = advance & ~cur_valid & nxt_valid

        # The next group to fetch, one-hot, registered with avail (so the fetch is only the
        # multiplexer): isolated from the mask's groups on load, from what is left after each
        # fetch.
        first = Signal(count)
        fetched = Signal(size)
        m.d.comb += fetched.eq(or_all([Mux(first[g], groups[g], 0) for g in range(count)]))

        loaded = self.mask_groups
        remaining = Signal(count)
        m.d.comb += remaining.eq(avail & ~first)
        first_loaded = _isolate_lowest(m, loaded, "first_loaded")
        first_remaining = _isolate_lowest(m, remaining, "first_remaining")
        with m.If(self.load_mask):
            m.d.sync += bits.eq(padded)
        with m.If(self.load):
            m.d.sync += [
                avail.eq(loaded), first.eq(first_loaded),
                fresh.eq(1), nxt_valid.eq(0), cur_valid.eq(0), t_valid.eq(0), s_valid.eq(0),
            ]
        with m.Else():
            m.d.sync += fresh.eq(0)
            with m.If(advance):
                with m.If(source_valid):
                    m.d.sync += [
                        t_valid.eq(1), t_none.eq(0), t_last.eq(last),
                        t_position.eq(Cat(index, source_group) if count > 1 else index),
                        cur_bits.eq(rest), cur_group.eq(source_group), cur_valid.eq(more_here),
                    ]
                with m.Elif(fresh & ~avail.any()):
                    m.d.sync += [t_valid.eq(1), t_none.eq(1), t_last.eq(1), t_position.eq(0)]
                with m.Else():
                    m.d.sync += t_valid.eq(0)
            with m.If(~nxt_valid | nxt_taken):
                m.d.sync += nxt_valid.eq(avail.any())
                with m.If(avail.any()):
                    m.d.sync += [nxt_bits.eq(fetched), nxt_group.eq(_encode(first, group_bits)),
                                 avail.eq(remaining),
                                 first.eq(first_remaining)]
        return m
