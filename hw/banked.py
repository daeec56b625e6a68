"""A memory split into banks of block-RAM size, with the bank choice after the read registers.

A memory deeper than one block RAM is built by synthesis as a cascade: several block RAMs and a
multiplexer on their outputs, by the upper address bits. A block RAM's clock-to-output takes
most of a cycle on an ECP5, so that multiplexer, between the block RAMs and the first register,
set the accelerator's timing (the B memory: 32 DP16KD, a 16-way choice). Here each bank is its
own memory with a register on its read data and nothing between, and the choice is made after
those registers, from the bank number delayed alongside: the same two cycles from address to
data as a block RAM and one register, and the multiplexer is in the next cycle's logic.

Interface: ``write`` (``en``, ``addr``, ``data``: as a write port, written at the clock edge)
and ``read`` (``addr``, presented in a cycle; ``data``, its word two cycles later).
"""

from types import SimpleNamespace

from amaranth import Array, Elaboratable, Module, Signal
from amaranth.lib.memory import Memory
from amaranth.utils import bits_for

from .pipeline import delay

BANK_DEPTH = 512  # words: a DP16KD as 512 x 36, a RAMB36E1 as 512 x 72


class BankedMemory(Elaboratable):
    def __init__(self, width, depth, bank_depth=BANK_DEPTH):
        if depth < 1 or bank_depth < 1:
            raise ValueError(f"depth and bank_depth: expected positive, got {depth}, {bank_depth}")
        self.width, self.depth = width, depth
        self.bank_depth = min(bank_depth, depth)
        self.banks = -(-depth // self.bank_depth)
        address = Signal(range(depth), name="addr")
        self.write = SimpleNamespace(en=Signal(name="w_en"), addr=Signal.like(address, name="w_addr"),
                                     data=Signal(width, name="w_data"))
        self.read = SimpleNamespace(addr=Signal.like(address, name="r_addr"),
                                    data=Signal(width, name="r_data"))

    def elaborate(self, platform):
        m = Module()
        low = bits_for(self.bank_depth - 1) if self.banks > 1 else len(self.read.addr)
        words = []
        for bank in range(self.banks):
            size = min(self.bank_depth, self.depth - bank * self.bank_depth)
            m.submodules[f"bank{bank}"] = memory = Memory(shape=self.width, depth=size, init=[])
            wr, rd = memory.write_port(), memory.read_port()
            chosen = (self.write.addr >> low) == bank if self.banks > 1 else 1
            m.d.comb += [wr.en.eq(self.write.en & chosen), wr.addr.eq(self.write.addr),
                         wr.data.eq(self.write.data), rd.addr.eq(self.read.addr)]
            words.append(delay(m, rd.data, 1, f"word{bank}_", reset_less=True))
        if self.banks == 1:
            m.d.comb += self.read.data.eq(words[0])
        else:
            bank_q = delay(m, self.read.addr >> low, 2, "bank", reset_less=True)
            m.d.comb += self.read.data.eq(Array(words)[bank_q])
        return m
