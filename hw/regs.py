"""An AXI4-Lite slave holding sparsa's registers, built from :data:`sparsa.protocol.REGISTERS`.

Ports are the AXI4-Lite signals under the ``s_axi_`` prefix Vivado infers, plus one port per
register towards the datapath:

- a read-write register ``NAME`` drives ``NAME`` (its current value; reset from the protocol);
- a read-only register ``NAME`` reads ``NAME`` (driven by the datapath or a build constant);
- a write-only register ``NAME`` pulses ``NAME_write`` for one cycle with ``NAME`` = the data.

A write is taken when address and data are both valid (the AXI rule lets a slave wait for both)
and answered the next cycle; a read is answered two cycles after its address. Unmapped addresses
answer DECERR (reads return 0); writes to read-only registers are ignored with OKAY. Byte strobes
are honoured on read-write registers.
"""

from amaranth import Cat, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from sparsa import protocol

from .pipeline import or_all

OKAY, DECERR = 0b00, 0b11


class RegisterBlock(wiring.Component):
    def __init__(self, registers=protocol.REGISTERS, address_width=protocol.ADDRESS_WIDTH):
        self.registers = registers
        self.address_width = address_width
        members = {
            "s_axi_awaddr": In(address_width),
            "s_axi_awvalid": In(1),
            "s_axi_awready": Out(1),
            "s_axi_wdata": In(32),
            "s_axi_wstrb": In(4),
            "s_axi_wvalid": In(1),
            "s_axi_wready": Out(1),
            "s_axi_bresp": Out(2),
            "s_axi_bvalid": Out(1),
            "s_axi_bready": In(1),
            "s_axi_araddr": In(address_width),
            "s_axi_arvalid": In(1),
            "s_axi_arready": Out(1),
            "s_axi_rdata": Out(32),
            "s_axi_rresp": Out(2),
            "s_axi_rvalid": Out(1),
            "s_axi_rready": In(1),
        }
        for register in registers:
            if register.access == "rw":
                members[register.name] = Out(32, init=register.reset)
            elif register.access == "ro":
                members[register.name] = In(32)
            else:
                members[register.name] = Out(32)
                members[f"{register.name}_write"] = Out(1)
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()

        def word(address):
            return address[2:]

        # Write channel: take address and data together, answer on B.
        take_write = self.s_axi_awvalid & self.s_axi_wvalid & ~self.s_axi_bvalid
        m.d.comb += [self.s_axi_awready.eq(take_write), self.s_axi_wready.eq(take_write)]
        with m.If(self.s_axi_bvalid & self.s_axi_bready):
            m.d.sync += self.s_axi_bvalid.eq(0)
        for register in self.registers:
            if register.access == "wo":
                m.d.sync += getattr(self, f"{register.name}_write").eq(0)
        with m.If(take_write):
            m.d.sync += [self.s_axi_bvalid.eq(1), self.s_axi_bresp.eq(DECERR)]
            with m.Switch(word(self.s_axi_awaddr)):
                for register in self.registers:
                    with m.Case(register.address >> 2):
                        m.d.sync += self.s_axi_bresp.eq(OKAY)
                        target = getattr(self, register.name)
                        if register.access == "rw":
                            for i in range(4):
                                with m.If(self.s_axi_wstrb[i]):
                                    m.d.sync += target[8 * i:8 * i + 8].eq(
                                        self.s_axi_wdata[8 * i:8 * i + 8])
                        elif register.access == "wo":
                            m.d.sync += [target.eq(self.s_axi_wdata),
                                         getattr(self, f"{register.name}_write").eq(1)]

        # Read channel: one outstanding read. The address is decoded when taken (one flag per
        # register, registered) and the word selected by those flags in the next cycle (an
        # AND-OR tree), so neither the decoder nor the multiplexer shares its cycle; R answers
        # two cycles after AR.
        selected = Signal(len(self.registers))
        reading = Signal()
        take_read = self.s_axi_arvalid & ~self.s_axi_rvalid & ~reading
        m.d.comb += self.s_axi_arready.eq(take_read)
        with m.If(self.s_axi_rvalid & self.s_axi_rready):
            m.d.sync += self.s_axi_rvalid.eq(0)
        m.d.sync += reading.eq(take_read)
        with m.If(take_read):
            address = word(self.s_axi_araddr)
            m.d.sync += selected.eq(Cat(*(address == register.address >> 2
                                          for register in self.registers)))
        with m.If(reading):
            # Write-only registers read as 0.
            value = or_all([Mux(flag, getattr(self, register.name), 0)
                            for flag, register in zip(selected, self.registers)
                            if register.access != "wo"])
            m.d.sync += [self.s_axi_rvalid.eq(1),
                         self.s_axi_rresp.eq(Mux(selected.any(), OKAY, DECERR)),
                         self.s_axi_rdata.eq(value)]
        return m
