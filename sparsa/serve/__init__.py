"""``sparsa serve``: compiled models behind the KServe v2 / Triton HTTP/REST inference protocol,
with dynamic batching, a device instance and a CPU fallback, and Prometheus metrics.

The batching core (:mod:`.batching`) needs NumPy alone; the HTTP side (:mod:`.http`, Starlette
on uvicorn) and the metrics (prometheus-client) come with ``pip install 'sparsa[serve]'``.
"""

import contextlib
import signal
import socket

from .batching import Instance, QueueFull, RequestTimeout, Server, ServedModel  # noqa: F401

__all__ = ["Instance", "Server", "ServedModel", "QueueFull", "RequestTimeout", "build", "bind",
           "run"]


def build(models, *, backend="reference", backend_options=None, device_model=False,
          clock_mhz=None, fallback=None, device_workers=1, max_batch_size=8,
          max_queue_delay=0.0005, max_queue=256, fault_every=0):
    """A :class:`Server` and its :class:`~.metrics.Metrics` for ``models`` (a dict of name to
    compiled-model path): an instance on ``backend`` (the CPU when it opens the reference
    without ``device_model``, else a device) and, with ``fallback="reference"``, a CPU
    instance.
    ``fault_every``: every that-many-th device batch fails (for measuring recovery)."""
    import sparsa

    from .metrics import Metrics

    options = dict(backend_options or {})
    if device_model:
        if backend != "reference":
            raise ValueError("--device-model is the reference backend's (--backend reference)")
        options.update(device_model=True, clock_mhz=clock_mhz)
    served = [ServedModel(name, path, max_batch_size=max_batch_size,
                          max_queue_delay=max_queue_delay, max_queue=max_queue)
              for name, path in models.items()]
    instances = [Instance(lambda: sparsa.open(backend, **options), workers=None,
                          fault_every=fault_every)]
    if instances[0].kind == "device":
        instances[0].workers = device_workers
    if fallback is not None:
        if instances[0].kind == "cpu":
            instances[0].close()
            raise ValueError(f"--fallback {fallback}: the {backend} backend is already the CPU")
        try:
            instances.append(Instance(lambda: sparsa.open(fallback), "cpu"))
        except BaseException:
            instances[0].close()
            raise
    metrics = Metrics()
    server = Server(served, instances, metrics)
    metrics.watch(server)
    return server, metrics


def bind(host, port):
    """A listening socket on ``host``:``port`` (0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # (IPPROTO_TCP named: asyncio sets TCP_NODELAY only on connections of such a socket, and
    # without it a response's body waits for the client's delayed ACK of its headers.)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


def run(server, metrics, sock, *, request_timeout=30.0, latency_budget=None,
        on_ready=None):
    """Serve on ``sock`` until SIGTERM or SIGINT: then accept no more, answer every request
    already accepted, close the instances (buffers freed, DMA stopped)."""
    import uvicorn

    from .http import app

    application = app(server, metrics, request_timeout=request_timeout,
                      latency_budget=latency_budget)
    config = uvicorn.Config(application, log_level="warning", lifespan="off",
                            timeout_graceful_shutdown=request_timeout + 5, access_log=False)

    class Web(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            # SIGTERM and SIGINT start the graceful shutdown, and the process then exits 0
            # (uvicorn's own handling raises the signal again once it has stopped).
            previous = {sig: signal.signal(sig, self.handle_exit)
                        for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
    web = Web(config)
    if on_ready is not None:
        started = web.startup

        async def startup(sockets=None):
            await started(sockets=sockets)
            on_ready()
        web.startup = startup
    try:
        web.run(sockets=[sock])
    finally:
        server.close()
