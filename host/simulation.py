"""The simulated RTL behind PYNQ's interfaces, so the board's transport runs unchanged on it.

:class:`SimMMIO` and :class:`SimDMA` stand in for ``pynq.MMIO`` and ``pynq.lib.dma.DMA``; each
request goes through a ``call(name, *args)`` function to a :class:`sparsa.sim.host_tb.SimBoard`
in a cocotb simulation of the generated Verilog. ``call`` is either a socket to a simulator
this process started (:func:`open_sim`, i.e. ``sparsa.open("sim")``) or, inside a cocotb test,
``cocotb.task.resume`` on the board itself (:func:`accelerator`).
"""

import os
import secrets
import signal
import tempfile
import threading
from multiprocessing.connection import Listener
from pathlib import Path

import numpy as np

from . import board
from .board import PynqTransport
from .errors import DeviceError

POLL_CYCLES = 64  # simulated cycles per DMA status poll
# Simulated cycles per wall-clock second, at the least, to turn cycle budgets into timeouts.
SIM_CYCLES_PER_SECOND = 500
# Each request simulates a few cycles (a register access) or a poll's POLL_CYCLES; its reply is
# waited for ten times that at SIM_CYCLES_PER_SECOND, and at least this long. A simulator that
# does not answer by then is taken for stopped or hung.
REPLY_SECONDS = 10.0


class SimMMIO:
    """``pynq.MMIO``'s ``read``/``write`` on the simulated AXI4-Lite port."""

    def __init__(self, call):
        self._call = call

    def read(self, offset=0, length=4):
        return self._call("read", offset)

    def write(self, offset, value):
        self._call("write", offset, int(value))


class SimChannel:
    """One channel of an AXI DMA in simple mode, as ``pynq.lib.dma``'s channel drives it:
    ``transfer``, ``wait``, ``start``/``stop``, and the channel's DMACR/DMASR (PG021) that
    :class:`SimDMARegisters` shows."""

    def __init__(self, call, direction):
        self._call = call
        self.direction = direction  # "send" (MM2S) or "receive" (S2MM)
        self._target = None
        self._busy = False
        self._started = False  # a transfer since the channel was started (else Idle is 0)
        self.control = board.DMACR_RUN
        self.faults = 0  # DMASR fault bits

    @property
    def running(self):
        return bool(self.control & board.DMACR_RUN) and not self.faults

    def status(self):
        """DMASR: Halted when stopped or faulted, Idle once a transfer has finished."""
        if self._busy and not self.faults:
            self._poll()
        halted = 0 if self.running else board.DMASR_HALTED
        idle = board.DMASR_IDLE if self._started and not self._busy else 0
        return halted | idle | self.faults

    def transfer(self, array, start=0, nbytes=0):
        view = array.reshape(-1).view(np.uint8)
        nbytes = nbytes or view.size - start
        if not self.running:
            raise RuntimeError("DMA channel not started")
        if self._busy:
            raise RuntimeError("DMA channel not idle")
        self._busy = self._started = True
        if self.direction == "send":
            self._call("dma_send", view[start:start + nbytes].tobytes())
        else:
            self._target = view[start:start + nbytes]
            self._call("dma_receive")

    def _poll(self):
        if not self._call("dma_idle", self.direction, POLL_CYCLES):
            return
        if self.direction == "receive":
            data = self._call("dma_received")
            if len(data) > self._target.size:  # a packet longer than the transfer: S2MM halts
                self.faults |= 0x10  # DMAIntErr
                return
            self._target[:len(data)] = np.frombuffer(data, np.uint8)
            self._target = None
        self._busy = False

    def wait(self):
        if not self.running:
            raise RuntimeError("DMA channel not started")
        while not self.status() & board.DMASR_IDLE:
            pass

    def reset(self):
        """DMACR.Reset: flush what is in flight; the channel comes back halted."""
        if self._busy:
            self._call("dma_reset")
        self._busy = self._started = False
        self._target = None
        self.control = 0
        self.faults = 0

    def stop(self):
        self.control &= ~board.DMACR_RUN

    def start(self):
        self.control |= board.DMACR_RUN
        while not self.running:
            pass


class SimDMARegisters:
    """The DMA's register block (``pynq.lib.dma.DMA.mmio``): each channel's DMACR and DMASR;
    writing DMACR.Reset to either resets both channels, as on the AXI DMA."""

    def __init__(self, channels):
        self._channels = dict(zip((offset for _, offset in board.DMA_CHANNELS), channels))

    def _channel(self, offset):
        base = offset - offset % 0x30
        if base not in self._channels or offset - base not in (board.DMACR, board.DMASR):
            raise ValueError(f"offset: {offset:#x} is not a DMA control or status register")
        return self._channels[base], offset - base

    def read(self, offset, length=4):
        channel, register = self._channel(offset)
        return channel.control if register == board.DMACR else channel.status()

    def write(self, offset, value):
        channel, register = self._channel(offset)
        if register == board.DMASR:
            return  # only interrupt bits are writable there; none are modelled
        if value & board.DMACR_RESET:
            for each in self._channels.values():
                each.reset()
        else:
            channel.control = int(value)


class SimDMA:
    def __init__(self, call):
        self.sendchannel = SimChannel(call, "send")
        self.recvchannel = SimChannel(call, "receive")
        self.mmio = SimDMARegisters((self.sendchannel, self.recvchannel))


def allocate(shape, dtype):
    """``pynq.allocate`` for the simulation: plain host memory."""
    return np.zeros(shape, dtype)


class SimServer:
    """A simulator running ``sparsa.sim.host_tb.test_serve``, and the socket to it."""

    def __init__(self, cfg, simulator, settings):
        from sparsa.sim import runner

        self._folder = tempfile.TemporaryDirectory(prefix="sparsa-sim-")
        address = str(Path(self._folder.name) / "board.sock")
        authkey = secrets.token_bytes(16)
        self._listener = Listener(address, "AF_UNIX", authkey=authkey)
        design = runner.accelerator_design(cfg)
        runner.build(design, simulator)  # (it logs its progress when it takes long)
        self.result = None
        self._error = None

        def simulate():
            try:
                self.result = runner.run(design, simulator, "sparsa.sim.host_tb", "test_serve",
                                         {**cfg, **settings, "address": address,
                                          "authkey": authkey.hex()})
            except BaseException as error:  # reported by open/close
                self._error = error
            finally:
                self._listener.close()  # unblocks accept() if the simulator never connected

        self._thread = threading.Thread(target=simulate, name="sparsa-sim", daemon=True)
        self._thread.start()
        try:
            self._connection = self._listener.accept()
        except OSError:
            self._thread.join()
            raise RuntimeError(f"the simulator did not start: {self._failure()}") from None
        self._broken = None  # why the connection can no longer be used
        self.pid, self.name = None, f"{design.key} on {simulator}"
        self.pid = self.call("pid")
        self.name += f", pid {self.pid}"

    def _failure(self):
        if self._error is not None:
            return repr(self._error)
        if self.result is not None:
            return f"log {self.result.log}\n{self.result.log_tail()}"
        return "no result"

    def call(self, name, *args):
        """Send a request and wait for its reply, with a deadline (:data:`REPLY_SECONDS`, or
        more for a long poll): a simulator that stopped answering raises ``TimeoutError``
        naming it, and the connection is not used again."""
        if self._broken:
            raise DeviceError(f"the simulator ({self.name}) is not usable: {self._broken}; "
                              f"open a new one")
        cycles = args[1] if name == "dma_idle" else 0
        timeout = max(REPLY_SECONDS, 10 * cycles / SIM_CYCLES_PER_SECOND)
        try:
            self._connection.send((name, *args))
            status, value = self._reply(name, timeout)
        except TimeoutError:  # (an OSError, but the simulator is there: it does not answer)
            raise
        except (EOFError, OSError):
            self._broken = "it stopped"
            self._thread.join(timeout=30)
            raise RuntimeError(f"the simulator stopped: {self._failure()}") from None
        if status != "ok":
            raise RuntimeError(f"simulated board: {value}")
        return value

    def _reply(self, name, timeout):
        try:
            ready = self._connection.poll(timeout)
        except BaseException:
            # Interrupted while waiting (Ctrl-C): take the reply still on its way, so the next
            # request is not answered with this one's.
            if self._connection.poll(timeout):
                self._connection.recv()
            else:
                self._broken = f"no answer to {name!r} after an interrupt"
            raise
        if not ready:
            self._broken = f"no answer to {name!r} within {timeout:.1f} s"
            raise TimeoutError(f"the simulator ({self.name}) did not answer {name!r} within "
                               f"{timeout:.1f} s: stopped (SIGSTOP) or hung")
        return self._connection.recv()

    def close(self):
        if self._broken:
            self._kill()  # it cannot be asked to stop
        else:
            try:
                self._connection.send(("close",))
            except OSError:
                pass
        self._connection.close()
        self._thread.join(timeout=60)
        if self._thread.is_alive():
            self._kill()
            self._thread.join(timeout=30)
        self._folder.cleanup()

    def _kill(self):
        try:
            os.kill(self.pid, signal.SIGKILL)
        except (OSError, TypeError):
            pass  # gone already
