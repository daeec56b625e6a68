"""The PYNQ transport: the accelerator's AXI4-Lite registers through MMIO, its streams through an
AXI DMA in simple mode, buffers from ``pynq.allocate``.

:class:`PynqTransport` only needs objects that behave like PYNQ's: an ``mmio`` with
``read(offset)``/``write(offset, value)``, a ``dma`` with ``sendchannel``/``recvchannel``
(``transfer(buffer, start, nbytes)``, ``idle``) and an ``allocate(shape, dtype)``. On a board
they are PYNQ's own; in the test suite they are the simulated RTL
(:mod:`sparsa.host.simulation`), so this code is what runs in both places.

With PYNQ installed, :class:`SparsaIP` (a ``pynq.DefaultIP`` bound to :data:`IP_VLNV`) is the
driver PYNQ gives for the accelerator in ``Overlay("sparsa.bit")``.
"""

import time

import numpy as np

from sparsa.protocol import IP_VLNV

DMA_VLNV_PREFIX = "xilinx.com:ip:axi_dma:"


class PynqTransport:
    """Registers through ``mmio``, packets through ``dma``; waits poll the DMA channels."""

    def __init__(self, mmio, dma, allocate, cycles_per_second=100e6, poll_interval=0.0,
                 on_close=None):
        self.mmio = mmio
        self.dma = dma
        self._allocate = allocate
        self.cycles_per_second = cycles_per_second  # to turn a cycle budget into a timeout
        self.poll_interval = poll_interval
        self._on_close = on_close  # e.g. stopping the simulator behind stand-in MMIO and DMA
        # PYNQ's DMA driver knows its length register's width; one byte below its size is safe
        # whether it counts the limit inclusively or not.
        limit = getattr(dma, "buffer_max_size", None)
        self.max_transfer = limit - 1 if limit else None

    def read(self, address):
        return int(self.mmio.read(address))

    def write(self, address, value):
        self.mmio.write(address, int(value) & 0xFFFFFFFF)

    def allocate(self, nbytes):
        return self._allocate(shape=(nbytes,), dtype=np.uint8)

    def transfer(self, send, send_bytes, receive, receive_bytes, timeout):
        """Start the receive channel, then the send channel, and wait for both (``TimeoutError``
        after ``timeout`` seconds). PYNQ's channels flush the send buffer and invalidate the
        receive buffer themselves."""
        recv, sendc = self.dma.recvchannel, self.dma.sendchannel
        recv.transfer(receive, 0, receive_bytes)
        sendc.transfer(send, 0, send_bytes)
        deadline = time.monotonic() + timeout
        for name, channel in (("send", sendc), ("receive", recv)):
            while not channel.idle:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the DMA {name} channel is not idle after {timeout:.1f} s")
                if self.poll_interval:
                    time.sleep(self.poll_interval)
        if hasattr(recv, "wait"):
            recv.wait()  # returns at once when idle; lets PYNQ invalidate the receive buffer
        return None  # the output size is the job's: simple-mode PYNQ does not report it

    def recover(self):
        """Restart the DMA channels after a timeout, so the next job starts clean."""
        for channel in (self.dma.sendchannel, self.dma.recvchannel):
            if hasattr(channel, "stop") and hasattr(channel, "start"):
                channel.stop()
                channel.start()

    def close(self):
        if self._on_close is not None:
            self._on_close()
            self._on_close = None


try:  # PYNQ is only on boards; without it the driver class is not defined.
    from pynq import DefaultIP
except ImportError:  # pragma: no cover - depends on the machine
    DefaultIP = None

if DefaultIP is not None:  # pragma: no cover - needs a board
    class SparsaIP(DefaultIP):
        """PYNQ's driver for the accelerator IP: ``Overlay(...).<ip name>`` is one of these."""

        bindto = [IP_VLNV]

        def __init__(self, description):
            super().__init__(description=description)


def find_in_overlay(overlay, ip=None, dma=None):
    """The accelerator's and its DMA's names in a PYNQ overlay's ``ip_dict``."""
    entries = overlay.ip_dict
    if ip is None:
        found = [name for name, entry in entries.items() if entry.get("type") == IP_VLNV]
        if len(found) != 1:
            raise ValueError(f"overlay: expected one IP of type {IP_VLNV}, found "
                             f"{found or 'none'}; pass ip=<name>")
        ip = found[0]
    if dma is None:
        found = [name for name, entry in entries.items()
                 if str(entry.get("type", "")).startswith(DMA_VLNV_PREFIX)]
        if len(found) != 1:
            raise ValueError(f"overlay: expected one AXI DMA, found {found or 'none'}; "
                             f"pass dma=<name>")
        dma = found[0]
    return ip, dma


def open_board(overlay=None, ip=None, dma=None):
    """A :class:`PynqTransport` for the accelerator in ``overlay`` (an ``Overlay`` or a
    bitstream path; default: the overlay PYNQ has loaded)."""
    try:
        import pynq
    except ImportError:
        raise RuntimeError("backend 'pynq' needs the pynq package, which runs on PYNQ boards; "
                           "elsewhere use backend='sim' or 'reference'") from None

    if overlay is None:
        overlay = pynq.Overlay(pynq.PL.bitfile_name, download=False)
    elif isinstance(overlay, str):
        overlay = pynq.Overlay(overlay)
    ip, dma = find_in_overlay(overlay, ip, dma)
    return PynqTransport(getattr(overlay, ip), getattr(overlay, dma), pynq.allocate)


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
