"""The PYNQ transport: the accelerator's AXI4-Lite registers through MMIO, its streams through an
AXI DMA in simple mode, buffers from ``pynq.allocate``. (The driver PYNQ binds to the IP,
:data:`sparsa.host.backends.SparsaIP`, is above it.)

:class:`PynqTransport` only needs objects that behave like PYNQ's: an ``mmio`` with
``read(offset)``/``write(offset, value)``, a ``dma`` with ``sendchannel``/``recvchannel``
(``transfer(buffer, start, nbytes)``, ``wait()``, ``start()``) and the DMA's own register block
as ``dma.mmio``, and an ``allocate(shape, dtype)``. On a board they are PYNQ's own; in the test
suite they are the simulated RTL (:mod:`sparsa.host.simulation`) and stand-ins that fail the
ways a DMA fails, so this code is what runs in all three places.

The DMA's status is read from its registers (PG021, simple mode): each poll reads both
channels' DMASR, so a fault (DMAIntErr, DMASlvErr, DMADecErr) or a channel that halted raises
:class:`~sparsa.host.errors.TransferError` at once, naming it, instead of waiting out the
timeout. :meth:`PynqTransport.recover` soft-resets the DMA (DMACR.Reset) and starts both
channels again, each step with a deadline.
"""

import time

import numpy as np

from sparsa.protocol import DMA_CELL, IP_CELL, IP_VLNV

from .errors import DeviceError, TransferError

DMA_VLNV_PREFIX = "xilinx.com:ip:axi_dma:"
# Bytes per DMA buffer at most: the driver's two slots of a send and a receive buffer of this
# size (64 MiB) stay inside the PYNQ-Z2's 128 MB of contiguous memory; larger GEMMs are cut
# into more jobs.
DEFAULT_MAX_BUFFER = 16 * 2**20
DEFAULT_CLOCK_HZ = 100e6  # when the overlay's PL clock cannot be read

# The AXI DMA's registers (PG021): a block per channel, its control and status registers.
DMA_CHANNELS = (("send", 0x00), ("receive", 0x30))  # MM2S, S2MM
DMACR, DMASR = 0x00, 0x04
DMACR_RUN, DMACR_RESET = 0x1, 0x4
DMASR_HALTED, DMASR_IDLE = 0x1, 0x2
DMASR_FAULTS = ((0x10, "DMAIntErr (internal error: a zero length, or a stream packet that does "
                       "not fit the transfer)"),
                (0x20, "DMASlvErr (slave error: memory answered a burst with SLVERR)"),
                (0x40, "DMADecErr (decode error: the buffer's address is not mapped)"))


DMASR_FAULT_BITS = sum(bit for bit, _ in DMASR_FAULTS)


def dma_faults(status):
    """The fault names a DMASR value holds ('' when none)."""
    return ", ".join(name for bit, name in DMASR_FAULTS if status & bit)


class PynqTransport:
    """Registers through ``mmio``, packets through ``dma``; waits poll the DMA's status.

    ``pynq.allocate`` gives buffers the CPU does not cache (PYNQ v3.0's default), where every
    access goes to DDR: the driver touches each with one sequential write or read per job
    (``uncached_buffers``)."""

    uncached_buffers = True

    def __init__(self, mmio, dma, allocate, cycles_per_second=DEFAULT_CLOCK_HZ,
                 poll_interval=0.0, max_buffer=DEFAULT_MAX_BUFFER, reset_timeout=1.0,
                 on_close=None):
        if max_buffer < 4096:
            raise ValueError(f"max_buffer: expected at least 4096 bytes, got {max_buffer}")
        self.mmio = mmio
        self.dma = dma
        self._allocate = allocate
        self.cycles_per_second = cycles_per_second  # to turn a cycle budget into a timeout
        self.poll_interval = poll_interval
        self.reset_timeout = reset_timeout
        self._on_close = on_close  # e.g. stopping the simulator behind stand-in MMIO and DMA
        # PYNQ's DMA driver knows its length register's width; one byte below its size is safe
        # whether it counts the limit inclusively or not.
        limit = getattr(dma, "buffer_max_size", None)
        self.max_transfer = min(max_buffer, limit - 1) if limit else max_buffer
        self._checked = False  # the channels' state looked at before this transport's first job
        self._armed = False  # a channel may be writing into (or reading from) a buffer

    def read(self, address):
        return int(self.mmio.read(address))

    def write(self, address, value):
        self.mmio.write(address, int(value) & 0xFFFFFFFF)

    def allocate(self, nbytes):
        return self._allocate(shape=(nbytes,), dtype=np.uint8)

    def free(self, buffer):
        """Give a ``pynq.allocate`` buffer's contiguous memory back now, not at collection."""
        free = getattr(buffer, "freebuffer", None)
        if free is not None:
            free()

    def dma_status(self, name):
        return int(self.dma.mmio.read(dict(DMA_CHANNELS)[name] + DMASR))

    def transfer(self, send, send_bytes, receive, receive_bytes, timeout):
        """Start the receive channel, then the send channel, and wait for both to be idle.
        Raises :class:`TransferError` as soon as a channel reports a fault or halts, and
        ``TimeoutError`` after ``timeout`` seconds. PYNQ's channels flush the send buffer and
        invalidate the receive buffer themselves."""
        status = [self.dma_status(name) for name, _ in DMA_CHANNELS]
        if any(value & (DMASR_HALTED | DMASR_FAULT_BITS) for value in status) or (
                not self._checked and not all(value & DMASR_IDLE for value in status)):
            # Left halted or faulted, or (before this transport's first job) busy: a process
            # killed mid-job leaves its channels armed with buffers that are gone.
            self.recover()
        self._checked = True
        self._armed = True
        self.dma.recvchannel.transfer(receive, 0, receive_bytes)
        self.dma.sendchannel.transfer(send, 0, send_bytes)
        deadline = time.monotonic() + timeout
        pending = [name for name, _ in DMA_CHANNELS]
        while pending:
            for name in list(pending):
                status = self.dma_status(name)
                faults = dma_faults(status)
                if faults:
                    raise TransferError(f"the DMA {name} channel reports {faults} "
                                        f"(DMASR={status:#x})")
                if status & DMASR_IDLE:
                    pending.remove(name)
                elif status & DMASR_HALTED:
                    raise TransferError(f"the DMA {name} channel halted before its transfer "
                                        f"finished (DMASR={status:#x})")
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"the DMA {' and '.join(pending)} channel is not idle after "
                                   f"{timeout:.1f} s (DMASR " + ", ".join(
                                       f"{name}={self.dma_status(name):#x}" for name in pending)
                                   + ")")
            if pending and self.poll_interval:
                time.sleep(self.poll_interval)
        self.dma.recvchannel.wait()  # idle: returns at once, PYNQ invalidates the buffer
        self._armed = False
        return None  # the output size is the job's: simple-mode PYNQ does not report it

    def recover(self):
        """Soft-reset the DMA (both channels, PG021's DMACR.Reset) and start its channels again.
        Each step has a deadline of ``reset_timeout`` seconds; a DMA that does not come back
        raises :class:`DeviceError` (reload the overlay then)."""
        registers = self.dma.mmio
        control = {name: int(registers.read(offset + DMACR)) for name, offset in DMA_CHANNELS}
        self._reset()
        for name, offset in DMA_CHANNELS:  # RS again, with the interrupt enables PYNQ set
            registers.write(offset + DMACR, (control[name] & ~DMACR_RESET) | DMACR_RUN)
        self._until(lambda: not any(self.dma_status(name) & DMASR_HALTED
                                    for name, _ in DMA_CHANNELS),
                    "the DMA's channels did not start after its soft reset")
        for channel in (self.dma.sendchannel, self.dma.recvchannel):
            channel.start()  # running already, so PYNQ's spin ends at once; it resets its state

    def _reset(self):
        """DMACR.Reset, waited for: both channels stop and let go of their buffers (they come
        back halted)."""
        registers = self.dma.mmio
        registers.write(DMA_CHANNELS[0][1] + DMACR, DMACR_RESET)
        self._until(lambda: not any(int(registers.read(offset + DMACR)) & DMACR_RESET
                                    for _, offset in DMA_CHANNELS),
                    "the DMA's soft reset (DMACR.Reset) did not complete")
        self._armed = False

    def stop(self):
        """Before the buffers are freed: a DMA still armed by a job that never finished (an
        interrupt, a fault whose recovery failed) is reset, with a deadline, so it cannot
        write into memory that is given back. Raises :class:`DeviceError` when it does not
        stop."""
        if self._armed:
            self._reset()

    def _until(self, done, what):
        deadline = time.monotonic() + self.reset_timeout
        while not done():
            if time.monotonic() > deadline:
                raise DeviceError(f"{what} within {self.reset_timeout:.1f} s (DMASR " + ", ".join(
                    f"{name}={self.dma_status(name):#x}" for name, _ in DMA_CHANNELS)
                    + "); reload the overlay")
            if self.poll_interval:
                time.sleep(self.poll_interval)

    def close(self):
        if self._on_close is not None:
            self._on_close()
            self._on_close = None


def pl_clock_hz(pynq):
    """FCLK0's frequency, the clock the block design gives the accelerator."""
    try:
        return float(pynq.Clocks.fclk0_mhz) * 1e6
    except Exception:  # no PL clock control here (e.g. not a Zynq)
        return DEFAULT_CLOCK_HZ


def find_in_overlay(ip_dict, ip=None, dma=None):
    """The accelerator's and its DMA's names in a PYNQ ``ip_dict``: the cells sparsa's block
    design names (:data:`~sparsa.protocol.IP_CELL`, :data:`~sparsa.protocol.DMA_CELL`) where
    they are of the right type, else the one IP of each type."""
    def of_type(name, matches, what):
        entry = ip_dict.get(name)
        if entry is not None and matches(str(entry.get("type", ""))):
            return name
        found = [key for key, value in ip_dict.items() if matches(str(value.get("type", "")))]
        if len(found) != 1:
            raise ValueError(f"overlay: expected one {what}, found {found or 'none'}; "
                             f"pass {'ip' if name == IP_CELL else 'dma'}=<name>")
        return found[0]

    if ip is None:
        ip = of_type(IP_CELL, lambda vlnv: vlnv == IP_VLNV, f"IP of type {IP_VLNV}")
    if dma is None:
        dma = of_type(DMA_CELL, lambda vlnv: vlnv.startswith(DMA_VLNV_PREFIX), "AXI DMA")
    return ip, dma


def loaded_overlay_has_sparsa():
    """Why the board backend is (or is not) usable here: (usable, reason)."""
    try:
        import pynq
    except ImportError:
        return False, "pynq is not installed"
    try:
        types = {entry.get("type") for entry in pynq.PL.ip_dict.values()}
    except Exception as error:  # no board, no bitstream loaded, no permissions, ...
        return False, f"pynq cannot read the loaded overlay ({error})"
    if IP_VLNV not in types:
        return False, f"the loaded overlay has no {IP_VLNV} IP"
    return True, f"the loaded overlay ({pynq.PL.bitfile_name}) has the sparsa IP"
