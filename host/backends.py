"""What ``sparsa.open`` returns, by backend: the drivers over the transports (the board's PYNQ
objects, the simulated RTL, the reference device model) and the reference itself, and
:data:`SparsaIP`, the driver PYNQ binds to the accelerator's IP. Transports
(:mod:`~sparsa.host.board`, :mod:`~sparsa.host.simulation`, :mod:`~sparsa.host.reference`)
sit below the driver (:mod:`~sparsa.host.driver`) and import nothing of it; this module puts
them together.
"""

import logging

from sparsa.protocol import IP_VLNV

from . import board, reference, simulation
from .board import DEFAULT_CLOCK_HZ, DEFAULT_MAX_BUFFER, PynqTransport, find_in_overlay, pl_clock_hz
from .driver import Accelerator, DeviceAccelerator, ReferenceAccelerator

log = logging.getLogger("sparsa")


class IPDriver(Accelerator):
    """The accelerator API on PYNQ's object for the IP (``Overlay(...).sparsa``): ``matmul``,
    ``info``, ``last_counters``, ``last_timing``, ``close``. :data:`SparsaIP` is this class
    with ``pynq.DefaultIP``, bound to :data:`~sparsa.protocol.IP_VLNV`.

    The DMA is found on first use: the one AXI DMA of the loaded overlay, unless
    :meth:`attach` named it (``sparsa.open("pynq")`` does).
    """

    backend = "pynq"

    def __init__(self, description):
        self._device = None
        Accelerator.__init__(self)
        # The next class after Accelerator in SparsaIP's bases is PYNQ's DefaultIP: self.mmio.
        super(Accelerator, self).__init__(description=description)

    def attach(self, dma, allocate, cycles_per_second=DEFAULT_CLOCK_HZ,
               max_buffer=DEFAULT_MAX_BUFFER):
        """Drive the accelerator through ``dma`` (a ``pynq.lib.dma.DMA``)."""
        with self.lock:
            if self._device is not None:
                self._device.close()
            transport = PynqTransport(self.mmio, dma, allocate, cycles_per_second,
                                      max_buffer=max_buffer)
            self._device = DeviceAccelerator(transport, "pynq")
            self.closed = False
            return self

    def _connect(self):
        if self._device is None:
            import pynq
            from pynq.lib.dma import DMA

            entries = pynq.PL.ip_dict
            _, name = find_in_overlay(entries)
            self.attach(DMA(entries[name]), pynq.allocate, pl_clock_hz(pynq))
        return self._device

    @property
    def info(self):
        return self._connect().info

    @property
    def concurrent(self):
        return True  # the driver's matmul, which overlaps calls from several threads

    def matmul(self, A, B, *, bias=None, requant=None, relu=False, sparse_skip=True, out=None):
        if self.closed:
            raise RuntimeError("matmul on a closed accelerator")
        return self._connect().matmul(A, B, bias=bias, requant=requant, relu=relu,
                                      sparse_skip=sparse_skip, out=out)

    @property
    def last_counters(self):
        return self._device.last_counters if self._device is not None else None

    @last_counters.setter
    def last_counters(self, value):
        pass  # Accelerator.__init__'s; the counters are the driver's

    def _add_skipped(self, products):
        self._connect()._add_skipped(products)

    def _no_job(self, products):
        self._connect()._no_job(products)

    @property
    def last_timing(self):
        return self._device.last_timing if self._device is not None else None

    @property
    def transport(self):
        return self._connect().transport

    def _matmul(self, a, b, bias, requant, relu, sparse_skip, out, prepared=None):
        return self._connect()._matmul(a, b, bias, requant, relu, sparse_skip, out, prepared)

    def _register_source(self):
        return self._connect().transport

    def close(self):
        """Free the DMA buffers; :meth:`attach` opens the IP again."""
        with self.lock:
            if self._device is not None:
                self._device.close()
                self._device = None
            self.closed = True


def ip_driver_class(default_ip):
    """:class:`IPDriver` on ``default_ip`` (``pynq.DefaultIP``; a stand-in in the tests),
    bound to the accelerator's VLNV. Creating it registers it with PYNQ."""
    return type("SparsaIP", (IPDriver, default_ip), {"bindto": [IP_VLNV],
                                                     "__module__": __name__})


def _pynq_default_ip():
    import importlib.util

    if importlib.util.find_spec("pynq") is None:
        return None
    try:
        from pynq import DefaultIP
    except Exception:  # pynq installed but not usable on this machine
        return None
    return DefaultIP


_DEFAULT_IP = _pynq_default_ip()
# PYNQ's driver for the IP: importing sparsa before Overlay(...) binds it.
SparsaIP = ip_driver_class(_DEFAULT_IP) if _DEFAULT_IP is not None else None


def open_board(overlay=None, ip=None, dma=None, max_buffer=DEFAULT_MAX_BUFFER):
    """The accelerator in ``overlay`` (an ``Overlay`` or a bitstream path; default: the overlay
    PYNQ has loaded): PYNQ's :data:`SparsaIP` object for it, attached to its DMA."""
    try:
        import pynq
    except ImportError:
        raise RuntimeError("backend 'pynq' needs the pynq package, which runs on PYNQ boards; "
                           "elsewhere use backend='sim' or 'reference'") from None

    if overlay is None:
        overlay = pynq.Overlay(pynq.PL.bitfile_name, download=False)
    elif isinstance(overlay, str):
        overlay = pynq.Overlay(overlay)
    ip, dma = find_in_overlay(overlay.ip_dict, ip, dma)
    accelerator, channel = getattr(overlay, ip), getattr(overlay, dma)
    if isinstance(accelerator, IPDriver):
        return accelerator.attach(channel, pynq.allocate, pl_clock_hz(pynq), max_buffer)
    # An Overlay made before sparsa was imported gave the IP PYNQ's DefaultIP.
    transport = PynqTransport(accelerator.mmio, channel, pynq.allocate, pl_clock_hz(pynq),
                              max_buffer=max_buffer)
    return DeviceAccelerator(transport, "pynq")


def sim_accelerator(call, backend="sim", max_transfer=None, on_close=None, simulator=None,
                any_thread=True):
    """The driver on the PYNQ transport over simulated MMIO/DMA reached through ``call``;
    ``on_close`` runs when it is closed; ``simulator`` (the :class:`SimServer`, if any) is kept
    as the transport's ``simulator``. ``any_thread=False``: ``call`` works only on the
    caller's thread (a cocotb bridge), so jobs run on the device from there too."""
    transport = PynqTransport(simulation.SimMMIO(call), simulation.SimDMA(call),
                              simulation.allocate,
                              cycles_per_second=simulation.SIM_CYCLES_PER_SECOND,
                              on_close=on_close)
    transport.simulator = simulator
    transport.any_thread = any_thread
    return DeviceAccelerator(transport, backend, max_transfer)


def open_sim(simulator="verilator", idle=0.0, backpressure=0.0, seed=0, max_transfer=None,
             **build):
    """``sparsa.open("sim", ...)``: start a simulation of the build and return its driver."""
    from sparsa.protocol import DEFAULT_BUILD, check_build
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
    check_build(**{name: cfg[name] for name in DEFAULT_BUILD})
    server = simulation.SimServer(cfg, simulator, {"idle": idle, "backpressure": backpressure,
                                        "seed": seed})
    try:
        return sim_accelerator(server.call, "sim", max_transfer, on_close=server.close,
                               simulator=server)
    except BaseException:
        server.close()
        raise



def open(backend="auto", **config):
    """An :class:`Accelerator`.

    - ``"pynq"``: the board (PYNQ's object for the IP, ``Overlay(...).sparsa``); ``overlay``
      (an ``Overlay`` or bitstream path; default the loaded one), ``ip``/``dma`` (names in the
      overlay; default found by type), ``max_transfer`` (bytes per DMA buffer, default 16 MiB).
    - ``"sim"``: the generated Verilog in a cocotb simulation started for this object;
      ``simulator`` (``"verilator"`` or ``"icarus"``), the build's ``rows``, ``cols``,
      ``stream_width``, ``max_k``, ``max_n``, ``sparse_skip``, and stream ``idle``/
      ``backpressure`` probabilities.
    - ``"reference"``: NumPy, bit-exact and fast; the build's geometry (for counters).
      ``device_model=True`` runs the full driver against the byte-level device model instead;
      with ``clock_mhz`` its jobs take their estimated cycles at that clock in wall time.
    - ``"auto"``: the board when PYNQ is importable and an overlay is given or loaded with the
      sparsa IP, else the reference; logs which and why.
    """
    if backend == "auto":
        if config.get("overlay") is not None:
            backend, why = "pynq", "an overlay was given"
        else:
            usable, why = board.loaded_overlay_has_sparsa()
            backend = "pynq" if usable else "reference"
        log.info("sparsa backend: %s (%s)", backend, why)
    opener = BACKENDS.get(backend) if isinstance(backend, str) else None
    if opener is None:
        raise ValueError(f"backend: expected 'auto', {', '.join(map(repr, BACKENDS))}, got "
                         f"{backend!r}")
    return opener(**config)


def _open_pynq(**config):
    _no_unknown(set(config) - {"overlay", "ip", "dma", "max_transfer"}, "pynq")
    return open_board(config.get("overlay"), config.get("ip"), config.get("dma"),
                      config.get("max_transfer") or DEFAULT_MAX_BUFFER)


def _open_reference(device_model=False, max_transfer=None, clock_mhz=None, **config):
    _no_unknown(set(config) - {"rows", "cols", "stream_width", "max_k", "max_n",
                               "sparse_skip"}, "reference")
    if clock_mhz is not None and not device_model:
        raise ValueError("clock_mhz: the reference takes time only as a device model: "
                         "pass device_model=True too")
    if device_model:
        return DeviceAccelerator(reference.ReferenceDevice(**config, clock_mhz=clock_mhz),
                                 "reference-device", max_transfer)
    if max_transfer is not None:
        raise TypeError("open(backend='reference'): max_transfer is the device model's: "
                        "pass device_model=True too")
    return ReferenceAccelerator(**config)


BACKENDS = {"pynq": _open_pynq, "sim": open_sim, "reference": _open_reference}
"""``sparsa.open``'s backends: name to opener (each takes that backend's options)."""


def _no_unknown(unknown, backend):
    if unknown:
        raise TypeError(f"open(backend={backend!r}): unexpected options {sorted(unknown)}")
