"""The PYNQ transport and driver against stand-ins for PYNQ's AXI DMA that fail the ways a DMA
fails (PG021's status bits, a channel that never finishes, a soft reset that never completes,
channels that do not start again), and PYNQ's IP driver binding; the device behind them is the
byte-level reference device, so good jobs are checked against the golden model too.

These run with NumPy only (the board's Python 3.10 + NumPy 1.21.5 job runs them too).
"""

import importlib.util
import json
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest
from builds import SMALL

import sparsa
from sparsa import protocol
from sparsa.host import backends, board, driver, reference
from sparsa.sim import golden

FAULTS = [(bit, name.split()[0]) for bit, name in board.DMASR_FAULTS]


class Buffer(np.ndarray):
    """A ``pynq.allocate`` buffer stand-in that counts ``freebuffer`` calls."""

    freed = 0

    def freebuffer(self):
        Buffer.freed += 1


def allocate(shape, dtype):
    allocate.count += 1
    return np.zeros(shape, dtype).view(Buffer)


allocate.count = 0


class FakeChannel:
    """A simple-mode AXI DMA channel as ``pynq.lib.dma`` drives it; DMASR as PG021 defines it.
    ``start`` spins until the channel runs, as PYNQ's does (so a caller that starts a channel
    the DMA will not run hangs, which the tests catch)."""

    def __init__(self, dma):
        self.dma = dma
        self.control = board.DMACR_RUN  # PYNQ's DMA driver starts both channels
        self.faults = 0
        self.busy = self.started = False
        self.array = self.nbytes = None

    def status(self):
        running = self.control & board.DMACR_RUN and not self.faults and not self.dma.dead
        idle = self.started and not self.busy
        return (0 if running else board.DMASR_HALTED) | (board.DMASR_IDLE if idle else 0) \
            | self.faults

    @property
    def running(self):
        return not self.status() & board.DMASR_HALTED

    def transfer(self, array, start=0, nbytes=0):
        if not self.running:
            raise RuntimeError("DMA channel not started")
        if self.busy:
            raise RuntimeError("DMA channel not idle")  # as PYNQ's channel refuses it
        self.array, self.nbytes = array, nbytes
        self.busy = self.started = True
        self.dma.kick(self)

    def wait(self):
        while not self.status() & board.DMASR_IDLE:
            if self.faults:
                raise RuntimeError("DMA error")

    def start(self):
        self.control |= board.DMACR_RUN
        while not self.running:
            pass

    def stop(self):
        self.control &= ~board.DMACR_RUN


class FakeDMA:
    """``pynq.lib.dma.DMA`` in front of the reference device. ``fault=(channel, bits)`` makes
    the next job's channel fault (it halts with those DMASR bits), ``stuck`` makes transfers
    never finish, ``reset_sticks`` leaves DMACR.Reset set for ever, ``dead_after_reset`` keeps
    the channels halted after a reset."""

    buffer_max_size = 1 << 26

    def __init__(self, device, fault=None, stuck=False, reset_sticks=False,
                 dead_after_reset=False):
        self.device = device
        self.sendchannel, self.recvchannel = FakeChannel(self), FakeChannel(self)
        self.mmio = self
        self.fault, self.stuck = fault, stuck
        self.reset_sticks, self.dead_after_reset = reset_sticks, dead_after_reset
        self.resetting = self.dead = False
        self.resets = 0

    def _channel(self, offset):
        return (self.sendchannel, self.recvchannel)[offset // 0x30], offset % 0x30

    def read(self, offset, length=4):
        channel, register = self._channel(offset)
        if register == board.DMACR:
            return channel.control | (board.DMACR_RESET if self.resetting else 0)
        return channel.status()

    def write(self, offset, value):
        channel, register = self._channel(offset)
        if register != board.DMACR:
            return
        if value & board.DMACR_RESET:
            self.resets += 1
            if self.reset_sticks:
                self.resetting = True
                return
            for each in (self.sendchannel, self.recvchannel):
                each.control, each.faults, each.busy, each.started = 0, 0, False, False
            self.dead = self.dead_after_reset
        else:
            channel.control = value

    def kick(self, channel):
        """Both channels are programmed once the send channel is: run the job (or fail)."""
        send, receive = self.sendchannel, self.recvchannel
        if channel is not send or self.stuck:
            return
        if self.fault is not None:
            name, bits = self.fault
            self.fault = None  # the next job goes through
            failing = send if name == "send" else receive
            failing.faults |= bits
            if name == "receive":
                send.busy = False  # MM2S finished; S2MM failed
            return
        # (The device's accesses to the buffers, through plain arrays: not the host's.)
        self.device.transfer(np.asarray(send.array), send.nbytes, np.asarray(receive.array),
                             receive.nbytes)
        send.busy = receive.busy = False


def transport(dma, **options):
    options.setdefault("cycles_per_second", 1e9)
    return board.PynqTransport(dma.device, dma, allocate, **options)


def operands(rng, m, k, n):
    return (rng.integers(-128, 128, (m, k), dtype=np.int8),
            rng.integers(-128, 128, (k, n), dtype=np.int8))


def outcome(function, seconds=10):
    """``function()``'s exception (None if it returned) and the time it took; fails the test
    instead of hanging when it does not return within ``seconds``."""
    result = {}

    def run():
        try:
            function()
        except BaseException as error:  # handed to the test
            result["error"] = error

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s"
    return result.get("error"), time.monotonic() - started


def test_good_jobs_and_buffer_reuse():
    """Jobs through the stand-in DMA match the golden model; buffers are allocated once per
    size class and reused, and freed on close."""
    rng = np.random.default_rng(1)
    acc = driver.DeviceAccelerator(transport(FakeDMA(reference.ReferenceDevice(**SMALL))), "pynq")
    allocate.count, Buffer.freed = 0, 0
    for m, k, n in ((5, 7, 3), (6, 9, 4), (5, 7, 3), (40, 60, 40), (3, 3, 3)):
        a, b = operands(rng, m, k, n)
        assert np.array_equal(acc.matmul(a, b), golden.matmul_int32(a, b))
    sizes = acc.buffers.sizes()
    assert allocate.count == 4 and Buffer.freed == 2  # two classes each, the first pair freed
    assert all(size & (size - 1) == 0 and size >= 4096 for size in sizes.values())
    acc.close()
    assert Buffer.freed == 4 and acc.buffers.sizes() == {}


def test_transfers_capped_by_max_buffer():
    """A GEMM whose packets would outgrow the buffer cap is cut into more jobs; no buffer is
    larger than the cap, and the result is the same."""
    rng = np.random.default_rng(2)
    a, b = operands(rng, 300, 64, 48)
    small = driver.DeviceAccelerator(
        transport(FakeDMA(reference.ReferenceDevice(**SMALL)), max_buffer=8192), "pynq")
    assert small.max_transfer == 8192
    assert np.array_equal(small.matmul(a, b), golden.matmul_int32(a, b))
    assert max(small.buffers.sizes().values()) <= 8192
    default = transport(FakeDMA(reference.ReferenceDevice(**SMALL)))
    assert default.max_transfer == board.DEFAULT_MAX_BUFFER == 16 * 2**20
    with pytest.raises(ValueError, match="max_buffer: expected at least 4096"):
        transport(FakeDMA(reference.ReferenceDevice(**SMALL)), max_buffer=100)


@pytest.mark.parametrize("channel", ["send", "receive"])
@pytest.mark.parametrize("bit,name", FAULTS)
def test_dma_fault_is_named_at_once_and_recovered(channel, bit, name):
    """A DMA fault raises DeviceError naming it right away (the timeout here is hours long),
    the DMA is soft-reset and the next job runs."""
    rng = np.random.default_rng(3)
    dma = FakeDMA(reference.ReferenceDevice(**SMALL), fault=(channel, bit))
    acc = driver.DeviceAccelerator(transport(dma, cycles_per_second=1.0), "pynq")
    a, b = operands(rng, 9, 20, 7)
    error, seconds = outcome(lambda: acc.matmul(a, b))
    assert isinstance(error, driver.DeviceError), error
    message = str(error)
    assert f"DMA {channel} channel reports {name}" in message and "timed out" not in message
    assert "soft-reset and the transport recovered" in message and seconds < 5
    assert dma.resets == 2  # before the first job (its channels not idle yet), after the fault
    assert np.array_equal(acc.matmul(a, b), golden.matmul_int32(a, b))


def test_halted_channel_is_reported():
    dma = FakeDMA(reference.ReferenceDevice(**SMALL))
    acc = driver.DeviceAccelerator(transport(dma, cycles_per_second=1.0), "pynq")
    dma.stuck = True
    a, b = operands(np.random.default_rng(4), 4, 4, 4)
    original = dma.kick
    dma.kick = lambda channel: (original(channel), dma.recvchannel.stop())
    error, seconds = outcome(lambda: acc.matmul(a, b))
    assert "DMA receive channel halted before its transfer finished" in str(error)
    assert seconds < 5


def test_stuck_transfer_times_out_quoting_registers():
    """A DMA that never finishes: the driver gives up after its timeout (one second here),
    quotes STATUS and ERROR and the DMA status, soft-resets the device and the DMA."""
    device = reference.ReferenceDevice(**SMALL)
    dma = FakeDMA(device, stuck=True)
    acc = driver.DeviceAccelerator(transport(dma), "pynq")
    error, seconds = outcome(lambda: acc.matmul(*operands(np.random.default_rng(5), 4, 4, 4)))
    assert isinstance(error, driver.DeviceError)
    assert "timed out (the DMA send and receive channel is not idle after 1.0 s" in str(error)
    assert "STATUS=0x1, ERROR=NONE" in str(error) and "soft-reset" in str(error)
    assert 1.0 <= seconds < 5 and device.registers["STATUS"] == 0 and dma.resets == 2


@pytest.mark.parametrize("failure,words", [
    ({"reset_sticks": True}, "soft reset (DMACR.Reset) did not complete within 0.2 s"),
    ({"dead_after_reset": True}, "channels did not start after its soft reset within 0.2 s")])
def test_recovery_that_fails_raises_within_its_deadline(failure, words):
    """A second fault during recovery (the reset never completes, or the channels never run
    again) raises within the reset deadline; nothing spins on the DMA without one."""
    dma = FakeDMA(reference.ReferenceDevice(**SMALL))
    acc = driver.DeviceAccelerator(transport(dma, cycles_per_second=1.0, reset_timeout=0.2),
                                   "pynq")
    acc.matmul(*operands(np.random.default_rng(6), 4, 4, 4))  # the DMA checked and reset
    dma.fault = ("receive", 0x20)
    for name in failure:
        setattr(dma, name, True)
    error, seconds = outcome(lambda: acc.matmul(*operands(np.random.default_rng(6), 4, 4, 4)))
    assert isinstance(error, driver.DeviceError)
    assert "DMASlvErr" in str(error) and "recovery failed" in str(error) and words in str(error)
    assert "reload the overlay" in str(error) and seconds < 5


class FakeDefaultIP:
    """``pynq.DefaultIP``'s constructor: ``mmio`` from the IP's description."""

    def __init__(self, description):
        self.mmio = description["mmio"]


def test_ip_driver_is_the_accelerator():
    """PYNQ's object for the IP is the driver: matmul, info, counters, timing, close."""
    ip_class = backends.ip_driver_class(FakeDefaultIP)
    assert ip_class.bindto == [protocol.IP_VLNV] and ip_class.__name__ == "SparsaIP"
    device = reference.ReferenceDevice(**SMALL)
    ip = ip_class({"mmio": device})
    assert isinstance(ip, sparsa.Accelerator) and ip.last_counters is None
    ip.attach(FakeDMA(device), allocate, cycles_per_second=1e9)
    assert (ip.info.rows, ip.info.cols, ip.info.max_k) == (4, 4, 64)
    a, b = operands(np.random.default_rng(7), 13, 70, 9)
    assert np.array_equal(ip.matmul(a, b), golden.matmul_int32(a, b))
    assert ip.last_counters["macs"] > 0 and set(ip.last_timing) >= {"pack", "device", "unpack"}
    Buffer.freed = 0
    with ip:
        pass
    assert Buffer.freed == 4  # K = 70 took two jobs: both slots' send and receive buffers
    with pytest.raises(RuntimeError, match="closed"):
        ip.matmul(a, b)


def test_open_pynq_returns_the_ip_object_with_the_pl_clock(monkeypatch):
    """``sparsa.open("pynq")`` gives the overlay's SparsaIP object, attached to the overlay's
    DMA, its timeouts from the PL clock."""
    ip_class = backends.ip_driver_class(FakeDefaultIP)
    device = reference.ReferenceDevice(**SMALL)

    class Overlay:  # PYNQ's attributes are named after the block design's cells
        ip_dict = {protocol.IP_CELL: {"type": protocol.IP_VLNV},
                   protocol.DMA_CELL: {"type": "xilinx.com:ip:axi_dma:7.1"},
                   "ps7": {"type": "xilinx.com:ip:processing_system7:5.5"}}

    setattr(Overlay, protocol.IP_CELL, ip_class({"mmio": device}))
    setattr(Overlay, protocol.DMA_CELL, FakeDMA(device))

    fake = types.ModuleType("pynq")
    fake.allocate = allocate
    fake.Clocks = types.SimpleNamespace(fclk0_mhz=142.0)
    monkeypatch.setitem(sys.modules, "pynq", fake)
    acc = sparsa.open("pynq", overlay=Overlay(), max_transfer=1 << 20)
    assert acc is getattr(Overlay, protocol.IP_CELL)
    assert acc.transport.cycles_per_second == 142e6 and acc.transport.max_transfer == 1 << 20
    a, b = operands(np.random.default_rng(8), 6, 6, 6)
    assert np.array_equal(acc.matmul(a, b), golden.matmul_int32(a, b))
    acc.close()


def test_overlay_lookup():
    entries = {protocol.IP_CELL: {"type": protocol.IP_VLNV},
               protocol.DMA_CELL: {"type": "xilinx.com:ip:axi_dma:7.1"},
               "ps7": {"type": "xilinx.com:ip:processing_system7:5.5"}}
    assert board.find_in_overlay(entries) == (protocol.IP_CELL, protocol.DMA_CELL)
    with pytest.raises(ValueError, match="expected one IP of type"):
        board.find_in_overlay({"ps7": entries["ps7"]})
    # An overlay with a second DMA (e.g. for video): sparsa's block design's cell is the one.
    two = {**entries, "video_dma": {"type": "xilinx.com:ip:axi_dma:7.1"}}
    assert board.find_in_overlay(two) == (protocol.IP_CELL, protocol.DMA_CELL)
    with pytest.raises(ValueError, match="expected one AXI DMA, found .*pass dma=<name>"):
        board.find_in_overlay({key: two[key] for key in (protocol.IP_CELL, "video_dma",
                                                          "ps7")} | {"dma2": two["video_dma"]})
    # Another design's names: found by type.
    renamed = {"accel": entries[protocol.IP_CELL], "dma": entries[protocol.DMA_CELL]}
    assert board.find_in_overlay(renamed) == ("accel", "dma")
    with pytest.raises(ValueError, match="expected one AXI DMA, found none"):
        board.find_in_overlay({protocol.IP_CELL: entries[protocol.IP_CELL]})


def test_unclosed_driver_exits_quietly():
    """A driver left open is closed at interpreter exit, without output."""
    program = ("import numpy as np, sparsa\n"
               "acc = sparsa.open('reference', device_model=True)\n"
               "acc.matmul(np.ones((3, 3), np.int8), np.ones((3, 3), np.int8))\n")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout == "" and done.stderr == ""


@pytest.mark.skipif(importlib.util.find_spec("amaranth") is not None,
                    reason="Amaranth is installed (the board-Python job runs this without it)")
def test_hardware_commands_say_what_to_install_without_amaranth(capsys):
    """Where only the host runtime is installed (a board), a command that builds hardware says
    which extra brings what it needs, instead of a traceback."""
    from sparsa import cli

    assert cli.main(["verilog", "-o", "unused.v"]) == 2
    assert "needs the amaranth package: pip install 'sparsa[hw]'" in capsys.readouterr().err


def test_selftest_on_the_board_python_runs_without_hardware_packages(capsys, tmp_path):
    """``sparsa selftest --backend reference`` (what the board runs first, minus the board):
    every job exact, registers printed, the JSON report written."""
    from sparsa import cli

    assert cli.main(["selftest", "--backend", "reference", "--max-size", "128",
                     "--json", str(tmp_path / "report.json")]) == 0
    out = capsys.readouterr().out
    assert "ID=0x53505253 (sparsa) VERSION=1.4 ROWS=8 COLS=8" in out
    assert "15 of 15 jobs exact: PASS" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["passed"] and [job["exact"] for job in report["jobs"]] == [True] * 15
    # The dense jobs again from two threads at once, on the device model at the clock: exact,
    # the device busy for at least the jobs' cycles at 100 MHz, within the wall time.
    overlap = report["overlap"]
    dense = [job for job in report["jobs"] if job["name"].startswith("dense")]
    assert overlap["exact"] and overlap["calls"] == len(dense) == 2
    assert overlap["busy_s"] >= sum(job["cycles"] for job in dense) / 100e6
    assert 0 < overlap["busy_fraction"] <= 1 and "overlapped: the dense jobs" in out


def test_dma_left_faulted_is_reset_before_the_first_job():
    """A DMA an earlier process left faulted and halted is reset before the next job runs."""
    dma = FakeDMA(reference.ReferenceDevice(**SMALL))
    dma.recvchannel.faults = 0x40
    acc = driver.DeviceAccelerator(transport(dma, reset_timeout=0.2), "pynq")
    a, b = operands(np.random.default_rng(9), 6, 10, 5)
    error, _ = outcome(lambda: np.testing.assert_array_equal(acc.matmul(a, b),
                                                             golden.matmul_int32(a, b)))
    assert error is None and dma.resets == 1


class Interrupting(FakeDMA):
    """A DMA whose transfers never finish, and whose ``interrupt_after``-th status read from
    then on raises ``KeyboardInterrupt`` (Ctrl-C while the driver polls); ``events`` records
    resets, for the order of a reset and the buffers' release."""

    def __init__(self, device, interrupt_after=3, **options):
        super().__init__(device, **options)
        self.interrupt_after = interrupt_after
        self.polls = None  # counting from the next transfer
        self.events = []

    def kick(self, channel):
        super().kick(channel)
        if channel is self.sendchannel and self.stuck:
            self.polls = 0

    def read(self, offset, length=4):
        if self.polls is not None and offset % 0x30 == board.DMASR:
            self.polls += 1
            if self.polls == self.interrupt_after:
                self.polls = None
                raise KeyboardInterrupt
        return super().read(offset, length)

    def write(self, offset, value):
        if value & board.DMACR_RESET:
            self.events.append("reset")
        super().write(offset, value)


def test_interrupted_job_leaves_the_board_usable():
    """Ctrl-C while a job runs: the KeyboardInterrupt reaches the caller as it is, the device
    is soft-reset and the DMA reset (no channel left armed), and the next job runs exactly."""
    device = reference.ReferenceDevice(**SMALL)
    dma = Interrupting(device)
    acc = driver.DeviceAccelerator(transport(dma), "pynq")
    rng = np.random.default_rng(10)
    a, b = operands(rng, 7, 12, 5)
    assert np.array_equal(acc.matmul(a, b), golden.matmul_int32(a, b))
    dma.stuck = True
    resets = dma.resets
    error, seconds = outcome(lambda: acc.matmul(a, b))
    assert isinstance(error, KeyboardInterrupt) and seconds < 5
    assert dma.resets == resets + 1 and not dma.recvchannel.busy and not dma.sendchannel.busy
    assert device.registers["STATUS"] == 0  # soft-reset: no job
    dma.stuck = False
    a, b = operands(rng, 9, 30, 6)
    assert np.array_equal(acc.matmul(a, b), golden.matmul_int32(a, b))


def test_close_resets_an_armed_dma_before_freeing_its_buffers():
    """Buffers are never freed while a channel may still write into them: a transfer that was
    interrupted outside the driver leaves the channels armed, and close() resets the DMA
    before the buffers go; a DMA that does not reset keeps its buffers (and says so)."""
    for sticks in (False, True):
        dma = Interrupting(reference.ReferenceDevice(**SMALL))
        acc = driver.DeviceAccelerator(transport(dma, reset_timeout=0.2), "pynq")
        acc.matmul(*operands(np.random.default_rng(13), 4, 4, 4))  # the DMA checked
        send, receive = acc.buffers.get("send", 64), acc.buffers.get("receive", 64)
        dma.stuck = True
        dma.events.clear()
        with pytest.raises(KeyboardInterrupt):
            acc.transport.transfer(send, 64, receive, 64, 10.0)
        assert dma.recvchannel.busy  # armed with ``receive``
        dma.reset_sticks = sticks
        Buffer.freed = 0
        original = Buffer.freebuffer
        try:
            Buffer.freebuffer = lambda self: (dma.events.append("free"), original(self))
            acc.close()
        finally:
            Buffer.freebuffer = original
        if sticks:
            assert dma.events == ["reset"] and Buffer.freed == 0
        else:
            assert dma.events == ["reset", "free", "free"] and Buffer.freed == 2


def test_dma_left_busy_by_a_killed_process_is_reset_before_the_first_job():
    """Channels running but not idle (armed by a process that was killed mid-job) are reset
    before this process's first job, which then runs exactly."""
    dma = FakeDMA(reference.ReferenceDevice(**SMALL))
    for channel in (dma.sendchannel, dma.recvchannel):
        channel.busy = channel.started = True
    acc = driver.DeviceAccelerator(transport(dma), "pynq")
    a, b = operands(np.random.default_rng(11), 6, 10, 5)
    error, _ = outcome(lambda: np.testing.assert_array_equal(acc.matmul(a, b),
                                                             golden.matmul_int32(a, b)))
    assert error is None and dma.resets == 1


class Counted(np.ndarray):
    """A DMA buffer the host cannot cache, as ``pynq.allocate`` gives by default: it counts
    each indexing of it or of a view of it (a read or a write), and each NumPy function or
    ufunc handed it, in ``accesses`` of the buffer it came from."""

    inside = False  # within a counted access (NumPy's own indexing under it is not another)

    def __array_finalize__(self, obj):
        self.accesses = getattr(obj, "accesses", None)

    def _count(self):
        if self.accesses is not None and not Counted.inside:
            self.accesses.append(1)

    def __getitem__(self, key):
        self._count()
        return super().__getitem__(key)

    def __setitem__(self, key, value):
        self._count()
        Counted.inside = True
        try:
            super().__setitem__(key, value)
        finally:
            Counted.inside = False

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        self._count()
        plain = [np.asarray(x) if isinstance(x, Counted) else x for x in inputs]
        if "out" in kwargs:
            kwargs["out"] = tuple(np.asarray(x) for x in kwargs["out"])
        return getattr(ufunc, method)(*plain, **kwargs)

    def __array_function__(self, function, types, args, kwargs):
        self._count()
        return super().__array_function__(function, types, args, kwargs)


@pytest.mark.parametrize("case", ["int32", "requant per channel", "group format"])
def test_each_dma_buffer_is_touched_once_per_job(case):
    """Packing writes each send buffer once, sequentially, and unpacking reads each receive
    buffer once (a sequential copy into cached memory), whatever the job: never the strided
    element-wise accesses that cost a trip to DDR each on an uncached buffer."""
    buffers = []

    def counted(shape, dtype):
        buffer = np.zeros(shape, dtype).view(Counted)
        buffer.accesses = []
        buffers.append(buffer)
        return buffer

    rng = np.random.default_rng(12)
    dma = FakeDMA(reference.ReferenceDevice(**SMALL))
    acc = driver.DeviceAccelerator(board.PynqTransport(dma.device, dma, counted,
                                                       cycles_per_second=1e9), "pynq")
    a, b = operands(rng, 21, 40, 19)
    options = {}
    if case == "requant per channel":
        options = {"bias": rng.integers(-1000, 1000, 19, dtype=np.int32),
                   "requant": (rng.integers(1 << 29, 1 << 30, 19), 8, 3), "relu": True}
    elif case == "group format":
        b = sparsa.prune(b, "2:4")
    got = acc.matmul(a, b, **options)
    assert np.array_equal(got, golden.gemm(a, b, options.get("bias"), options.get("requant"),
                                           options.get("relu", False)))
    assert len(buffers) == 2
    assert [len(buffer.accesses) for buffer in buffers] == [1, 1]


def test_one_board_shared_by_threads():
    """Two threads on one board (the PYNQ transport over the stand-in DMA): each gets its
    own results, and its own calls' counters under ``acc.lock``."""
    from builds import concurrent_matmuls

    acc = driver.DeviceAccelerator(transport(FakeDMA(reference.ReferenceDevice(**SMALL))),
                                   "pynq")
    assert concurrent_matmuls(acc, threads=2, calls=20, seed=2) == []
    acc.close()


def test_close_from_another_thread_waits_for_the_running_job():
    """close() while another thread's job is on the DMA waits for that job (its buffers are
    not freed under it), then frees them; the job's result is exact."""
    dma = FakeDMA(reference.ReferenceDevice(**SMALL))
    acc = driver.DeviceAccelerator(transport(dma), "pynq")
    a, b = operands(np.random.default_rng(14), 8, 12, 6)
    acc.matmul(a, b)  # the DMA checked
    dma.stuck = True
    result = {}
    job = threading.Thread(target=lambda: result.update(c=acc.matmul(a, b)), daemon=True)
    job.start()
    deadline = time.monotonic() + 5
    while not dma.sendchannel.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    Buffer.freed = 0
    closing = threading.Thread(target=acc.close, daemon=True)
    closing.start()
    closing.join(0.3)
    assert closing.is_alive() and Buffer.freed == 0  # waiting for the job
    dma.stuck = False
    dma.kick(dma.sendchannel)  # the transfer completes
    job.join(5)
    closing.join(5)
    assert not closing.is_alive() and Buffer.freed == 2
    assert np.array_equal(result["c"], golden.matmul_int32(a, b))
