"""The simulated RTL as a PYNQ board: MMIO and an AXI DMA in simple mode, for the host driver.

:class:`SimBoard` does in simulation what a board's MMIO and AXI DMA do: register reads and
writes through cocotbext-axi's AXI4-Lite master, DMA send/receive channels through its stream
source and sink (with optional random bubbles and backpressure). The host runtime's PYNQ
transport drives it through stand-ins for PYNQ's objects (:mod:`sparsa.host.simulation`):

- ``test_serve``: serves a host process over a local socket (``sparsa.open("sim")``); the
  simulator stops while it waits for the host's next request.
- ``test_driver``: runs the host driver inside this cocotb test, through ``cocotb.task.bridge``.
"""

import json
import os
from multiprocessing.connection import Client

import cocotb
import numpy as np
from cocotb.task import bridge, resume
from cocotb.triggers import ClockCycles
from cocotbext.axi import AxiStreamFrame

from .accel_tb import make_tb
from .golden import gemm, sparse_counters


class SimBoard:
    """MMIO and DMA channels of a board, on the simulated accelerator."""

    def __init__(self, tb):
        self.tb = tb
        self.sending = None
        self.receiving = None
        self.received = None

    async def pid(self):
        """This simulator's process id (the host stops it when it does not answer)."""
        return os.getpid()

    async def read(self, address):
        return await self.tb.axil.read_dword(address)

    async def write(self, address, value):
        await self.tb.axil.write_dword(address, value & 0xFFFFFFFF)

    async def _send(self, data):
        await self.tb.source.send(AxiStreamFrame(data))
        await self.tb.source.wait()

    async def _receive(self):
        frame = await self.tb.sink.recv()
        self.received = bytes(frame.tdata)

    async def dma_send(self, data):
        """Start sending ``data`` as one packet (TLAST on its last beat)."""
        self.sending = cocotb.start_soon(self._send(bytes(data)))

    async def dma_receive(self):
        """Start receiving one packet."""
        self.received = None
        self.receiving = cocotb.start_soon(self._receive())

    async def dma_idle(self, channel, cycles):
        """Whether the channel has finished, after ``cycles`` of simulated time (the time a poll
        takes on a board)."""
        await ClockCycles(self.tb.dut.aclk, cycles)
        task = self.sending if channel == "send" else self.receiving
        return task is None or task.done()

    async def dma_received(self):
        return self.received

    async def dma_reset(self):
        """Drop half-sent and half-received packets (a DMA reset)."""
        for task in (self.sending, self.receiving):
            if task is not None and not task.done():
                task.cancel()
        self.sending = self.receiving = self.received = None
        self.tb.source.clear()
        self.tb.sink.clear()


async def make_board(dut):
    cfg, tb = await make_tb(dut)
    tb.set_pauses(np.random.default_rng(cfg.get("seed", 0)), cfg.get("idle", 0.0),
                  cfg.get("backpressure", 0.0))
    return cfg, SimBoard(tb)


@cocotb.test()
async def test_serve(dut):
    """Answer a host's board requests until it closes the connection."""
    cfg, board = await make_board(dut)
    connection = Client(cfg["address"], authkey=bytes.fromhex(cfg["authkey"]))
    try:
        while True:
            try:
                request = connection.recv()  # blocks the simulator: no time passes meanwhile
            except EOFError:
                break  # the host went away
            if request[0] == "close":
                break
            try:
                reply = ("ok", await getattr(board, request[0])(*request[1:]))
            except Exception as error:  # report to the host rather than end the simulation
                reply = ("error", f"{type(error).__name__}: {error}")
            connection.send(reply)
    finally:
        connection.close()


@cocotb.test()
async def test_driver(dut):
    """The host driver, unchanged, in this cocotb test: jobs from ``jobs`` (an .npz of a0, b0,
    bias0, requant0, relu0, ...) through ``sparsa``'s PYNQ transport on the simulated RTL,
    each checked against the golden model; the results go to ``report`` (JSON)."""
    from sparsa.host import backends

    cfg, board = await make_board(dut)
    jobs = np.load(cfg["jobs"])

    def call(name, *args):
        return resume(getattr(board, name))(*args)

    def host_program():
        report = []
        with backends.sim_accelerator(call, max_transfer=cfg.get("max_transfer"),
                                    any_thread=False) as acc:  # (resume: this thread's)
            for index in range(int(jobs["count"])):
                a, b = jobs[f"a{index}"], jobs[f"b{index}"]
                bias = jobs[f"bias{index}"] if f"bias{index}" in jobs else None
                requant = tuple(int(v) for v in jobs[f"requant{index}"]) \
                    if f"requant{index}" in jobs else None
                relu = bool(jobs[f"relu{index}"])
                got = acc.matmul(a, b, bias=bias, requant=requant, relu=relu)
                want = gemm(a, b, bias, requant, relu)
                assert np.array_equal(got, want), f"job {index}: result differs from NumPy"
                expected = sparse_counters(a, b, acc.info.rows, acc.info.cols)
                counters = acc.last_counters
                for name, value in expected.items():
                    assert counters[name.lower()] == value, f"job {index}: {name}"
                report.append({"m": a.shape[0], "k": a.shape[1], "n": b.shape[1], **counters})
        return report

    report = await bridge(host_program)()
    with open(cfg["report"], "w") as f:
        json.dump(report, f)
