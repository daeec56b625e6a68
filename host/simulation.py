"""The simulated RTL behind PYNQ's interfaces, so the board's transport runs unchanged on it.

:class:`SimMMIO` and :class:`SimDMA` stand in for ``pynq.MMIO`` and ``pynq.lib.dma.DMA``; each
request goes through a ``call(name, *args)`` function to a :class:`sparsa.sim.host_tb.SimBoard`
in a cocotb simulation of the generated Verilog. ``call`` is either a socket to a simulator
this process started (:func:`open_sim`, i.e. ``sparsa.open("sim")``) or, inside a cocotb test,
``cocotb.task.resume`` on the board itself (:func:`accelerator`).
"""

import logging
import secrets
import tempfile
import threading
from multiprocessing.connection import Listener
from pathlib import Path

import numpy as np

from .board import PynqTransport
from .driver import DeviceAccelerator

log = logging.getLogger("sparsa")

POLL_CYCLES = 64  # simulated cycles per DMA status poll
# Simulated cycles per wall-clock second, at the least, to turn cycle budgets into timeouts.
SIM_CYCLES_PER_SECOND = 500


class SimMMIO:
    """``pynq.MMIO``'s ``read``/``write`` on the simulated AXI4-Lite port."""

    def __init__(self, call):
        self._call = call

    def read(self, offset=0, length=4):
        return self._call("read", offset)

    def write(self, offset, value):
        self._call("write", offset, int(value))


class SimChannel:
    """One channel of an AXI DMA in simple mode (``transfer``, ``idle``, ``wait``)."""

    def __init__(self, call, direction):
        self._call = call
        self.direction = direction  # "send" (MM2S) or "receive" (S2MM)
        self._target = None
        self._done = True

    def transfer(self, array, start=0, nbytes=0):
        view = array.reshape(-1).view(np.uint8)
        nbytes = nbytes or view.size - start
        if not self._done:
            raise RuntimeError(f"DMA {self.direction} channel is busy")
        self._done = False
        if self.direction == "send":
            self._call("dma_send", view[start:start + nbytes].tobytes())
        else:
            self._target = view[start:start + nbytes]
            self._call("dma_receive")

    @property
    def idle(self):
        if self._done:
            return True
        if not self._call("dma_idle", self.direction, POLL_CYCLES):
            return False
        if self.direction == "receive":
            data = self._call("dma_received")
            if len(data) > self._target.size:  # S2MM: packet longer than the transfer length
                raise RuntimeError(f"DMA receive overflow: a {len(data)}-byte packet for a "
                                   f"{self._target.size}-byte transfer")
            self._target[:len(data)] = np.frombuffer(data, np.uint8)
            self._target = None
        self._done = True
        return True

    def wait(self):
        while not self.idle:
            pass

    def stop(self):
        if not self._done:
            self._call("dma_reset")
        self._done = True
        self._target = None

    def start(self):
        pass


class SimDMA:
    def __init__(self, call):
        self.sendchannel = SimChannel(call, "send")
        self.recvchannel = SimChannel(call, "receive")


def allocate(shape, dtype):
    """``pynq.allocate`` for the simulation: plain host memory."""
    return np.zeros(shape, dtype)


def accelerator(call, backend="sim", max_transfer=None, on_close=None):
    """The driver on the PYNQ transport over simulated MMIO/DMA reached through ``call``;
    ``on_close`` runs when it is closed."""
    transport = PynqTransport(SimMMIO(call), SimDMA(call), allocate,
                              cycles_per_second=SIM_CYCLES_PER_SECOND, on_close=on_close)
    return DeviceAccelerator(transport, backend, max_transfer)


class SimServer:
    """A simulator running ``sparsa.sim.host_tb.test_serve``, and the socket to it."""

    def __init__(self, cfg, simulator, settings):
        from sparsa import bench
        from sparsa.sim import runner

        self._folder = tempfile.TemporaryDirectory(prefix="sparsa-sim-")
        address = str(Path(self._folder.name) / "board.sock")
        authkey = secrets.token_bytes(16)
        self._listener = Listener(address, "AF_UNIX", authkey=authkey)
        design = bench.accelerator_design(cfg)
        log.info("sparsa sim: building %s for %s", design.key, simulator)
        runner.build(design, simulator)
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

    def _failure(self):
        if self._error is not None:
            return repr(self._error)
        if self.result is not None:
            return f"log {self.result.log}\n{self.result.log_tail()}"
        return "no result"

    def call(self, name, *args):
        try:
            self._connection.send((name, *args))
            status, value = self._connection.recv()
        except (EOFError, OSError):
            self._thread.join(timeout=30)
            raise RuntimeError(f"the simulator stopped: {self._failure()}") from None
        if status != "ok":
            raise RuntimeError(f"simulated board: {value}")
        return value

    def close(self):
        try:
            self._connection.send(("close",))
        except OSError:
            pass
        self._connection.close()
        self._thread.join(timeout=60)
        self._folder.cleanup()


def open_sim(simulator="verilator", idle=0.0, backpressure=0.0, seed=0, max_transfer=None,
             **build):
    """``sparsa.open("sim", ...)``: start a simulation of the build and return its driver."""
    from sparsa.bench import DEFAULT_BUILD
    from sparsa.sim import toolchain

    unknown = set(build) - set(DEFAULT_BUILD) - {"sparse_skip"}
    if unknown:
        raise TypeError(f"open(backend='sim'): unexpected options {sorted(unknown)}")
    for name, value in (("idle", idle), ("backpressure", backpressure)):
        if not 0 <= value < 1:
            raise ValueError(f"{name}: expected a probability in [0, 1), got {value}")
    reason = toolchain.missing(simulator)
    if reason:
        raise RuntimeError(f"simulator: {reason}")
    cfg = {**DEFAULT_BUILD, **build}
    server = SimServer(cfg, simulator, {"idle": idle, "backpressure": backpressure,
                                        "seed": seed})
    try:
        return accelerator(server.call, "sim", max_transfer, on_close=server.close)
    except BaseException:
        server.close()
        raise

