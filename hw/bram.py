"""Block memories with a registered read: a write port, and a read port whose data comes two
cycles after its address (the block RAM's read, then a register on its output).

- ``"generic"`` style: an :class:`amaranth.lib.memory.Memory` with a synchronous read port and
  a register after it. Synthesis maps the memory to block RAM; the register stays in the logic.
- ``"ecp5"`` style: Lattice ECP5 ``DP16KD`` instances with their output register on
  (``REGMODE_B = "OUTREG"``), port A writing, port B reading. Yosys ``synth_ecp5`` never turns
  that register on, and without it a block RAM's data leaves 5.8 ns after the clock (nextpnr's
  figure for a speed-6 LFE5U), leaving about 2 ns of an 8 ns period for the route to the
  register that takes it; with it, 1.0 ns. Each block is configured as deep as the memory
  needs (16K x 1 ... 1K x 18) and as many sit side by side as the width takes; a memory deeper
  than 16K words takes several rows of blocks and a multiplexer after the output registers,
  chosen by the read address's upper bits, registered alongside. Simulation adds the model
  ``sim/dp16kd.v`` (:data:`sparsa.sim.runner.PRIMITIVE_MODELS`).

The style comes from the platform object of the elaboration, as for the multipliers
(:func:`.dsp.dsp_style`).
"""

from amaranth import ClockSignal, Const, Instance, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.memory import Memory, WritePort
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2

from .dsp import dsp_style
from .pipeline import delay

# DP16KD port widths and the address bit where the word address starts in each.
DP16KD_SHIFT = {18: 4, 9: 3, 4: 2, 2: 1, 1: 0}
DP16KD_ADDRESS_BITS = 14


def dp16kd_layout(width, depth):
    """(port width, blocks side by side, rows of blocks) of an ECP5 memory of ``width`` x
    ``depth``: the widest port width whose depth holds the memory, else 1-bit ports in rows."""
    for port in DP16KD_SHIFT:
        if 1 << (DP16KD_ADDRESS_BITS - DP16KD_SHIFT[port]) >= depth:
            break
    block_depth = 1 << (DP16KD_ADDRESS_BITS - DP16KD_SHIFT[port])
    return port, -(-width // port), -(-depth // block_depth)


def write_signature(width, depth):
    """A write port of a ``width`` x ``depth`` memory, seen from the memory (``en``, ``addr``,
    ``data``): :class:`amaranth.lib.memory.WritePort`'s, so one writer serves both kinds."""
    return WritePort.Signature(addr_width=ceil_log2(depth), shape=width)


def read_signature(width, depth):
    """A read port of a ``width`` x ``depth`` memory, seen from the memory (``addr`` in,
    ``data`` out); when the data comes is the memory's (a :class:`BlockMemory`'s: the word at
    the ``addr`` of two cycles before)."""
    return wiring.Signature({"addr": In(ceil_log2(depth)), "data": Out(width)})


class BlockMemory(wiring.Component):
    """``width`` x ``depth`` memory: ``write.data`` is written at ``write.addr`` when
    ``write.en``; ``read.data`` is the word at the ``read.addr`` of two cycles before (a write
    and a read of the same word in one cycle give the old word). ``attrs`` go on the generic
    style's memory (say ``ram_style``, for a memory synthesis would otherwise leave in LUTs)."""

    def __init__(self, width, depth, attrs=None):
        self.width, self.depth = width, depth
        self.attrs = dict(attrs or {})
        super().__init__({
            "write": Out(write_signature(width, depth)),
            "read": Out(read_signature(width, depth)),
        })

    def elaborate(self, platform):
        if dsp_style(platform) == "ecp5":
            return self._ecp5()
        m = Module()
        m.submodules.memory = memory = Memory(shape=self.width, depth=self.depth, init=[],
                                              attrs=self.attrs)
        write, read = memory.write_port(), memory.read_port()
        wiring.connect(m, wiring.flipped(self.write), write)
        m.d.comb += [read.addr.eq(self.read.addr),
                     self.read.data.eq(delay(m, read.data, 1, "word", reset_less=True))]
        return m

    def _ecp5(self):
        m = Module()
        port, columns, rows = dp16kd_layout(self.width, self.depth)
        shift = DP16KD_SHIFT[port]
        word_bits = DP16KD_ADDRESS_BITS - shift
        padded = Signal(port * columns)
        m.d.comb += padded.eq(self.write.data)
        # Rows of blocks: a word's row is its address's bits above a block's depth.
        w_row, r_row = self.write.addr[word_bits:], self.read.addr[word_bits:]
        # The address pins: below the word address, the byte enables on the writing port of an
        # 18-bit block (both bytes) and zeros otherwise; then the word address within a block.
        low_a = [Const(1, 1)] * 2 + [Const(0, 1)] * 2 if port == 18 else [Const(0, 1)] * shift
        address_a = low_a + [self.write.addr[k] if k < len(self.write.addr) else Const(0, 1)
                             for k in range(word_bits)]
        address_b = [Const(0, 1)] * shift + [self.read.addr[k] if k < len(self.read.addr)
                                             else Const(0, 1) for k in range(word_bits)]
        outputs = []
        for row in range(rows):
            words = Signal(port * columns, name=f"row{row}")
            outputs.append(words)
            enable = self.write.en & (w_row == row) if rows > 1 else self.write.en
            for column in range(columns):
                data_in = padded[column * port:(column + 1) * port]
                data_out = Signal(18, name=f"dout{row}_{column}")
                port_a_out = Signal(18, name=f"unread{row}_{column}")  # port A only writes
                m.d.comb += words[column * port:(column + 1) * port].eq(data_out[:port])
                m.submodules[f"block{row}_{column}"] = Instance(
                    "DP16KD",
                    p_DATA_WIDTH_A=port, p_DATA_WIDTH_B=port,
                    p_REGMODE_A="NOREG", p_REGMODE_B="OUTREG",
                    p_RESETMODE="SYNC", p_ASYNC_RESET_RELEASE="SYNC",
                    p_CSDECODE_A="0b000", p_CSDECODE_B="0b000",
                    p_WRITEMODE_A="NORMAL", p_WRITEMODE_B="NORMAL", p_GSR="AUTO",
                    i_CLKA=ClockSignal(), i_CEA=Const(1, 1), i_OCEA=Const(1, 1), i_WEA=enable,
                    i_RSTA=Const(0, 1),
                    i_CLKB=ClockSignal(), i_CEB=Const(1, 1), i_OCEB=Const(1, 1),
                    i_WEB=Const(0, 1), i_RSTB=Const(0, 1),
                    **{f"i_CS{p}{k}": Const(0, 1) for p in "AB" for k in range(3)},
                    **{f"i_ADA{k}": bit for k, bit in enumerate(address_a)},
                    **{f"i_ADB{k}": bit for k, bit in enumerate(address_b)},
                    **{f"i_DIA{k}": data_in[k] if k < port else Const(0, 1) for k in range(18)},
                    **{f"i_DIB{k}": Const(0, 1) for k in range(18)},
                    **{f"o_DOA{k}": port_a_out[k] for k in range(18)},
                    **{f"o_DOB{k}": data_out[k] for k in range(18)},
                )
        if rows == 1:
            m.d.comb += self.read.data.eq(outputs[0])
        else:  # the row of the address two cycles before, beside the output registers
            row_q = delay(m, r_row, 2, "read_row")
            data = outputs[-1]
            for row in reversed(range(rows - 1)):
                data = Mux(row_q == row, outputs[row], data)
            m.d.comb += self.read.data.eq(data)
        return m
