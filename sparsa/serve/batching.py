"""The serving core, without HTTP: models with a bounded request queue each, dynamic batching
(Triton's, but for when the oldest request waits), and instances (a device, a CPU fallback)
whose workers take batches from the queues. NumPy and the standard library only.

A request waits in its model's queue until a worker takes it in a batch: requests with the same
input shapes (but for the batch axis) and dtypes join, oldest first, up to ``max_batch_size``
rows, the oldest waiting at most ``max_queue_delay`` for company, and only when there is
company about: other requests queued, or another batch of the model running on that instance (a
lone request gains nothing by waiting). A device instance's workers take any request; the CPU
instance's take requests only once they have waited past their latency budget, or while no
device instance is in service. A batch whose device fails goes back to the front of the queue
(no accepted request is lost) and the instance is recovered in the background: closed, opened
again, checked with a GEMM against NumPy, put back. A request the model's run would refuse is
refused when submitted, so that it never fails a batch of other requests.
"""

import collections
import concurrent.futures
import itertools
import logging
import threading
import time

import numpy as np

from sparsa.host.errors import DeviceError, ModelError
from sparsa.host.graph import check_input, load, loads

log = logging.getLogger("sparsa.serve")

DEVICE_FAILURES = (DeviceError, TimeoutError, OSError)
"""What takes a device instance out of service (its batch goes back to the queue)."""


class QueueFull(Exception):
    """The model's queue holds ``max_queue`` requests; the request was not accepted."""


class RequestTimeout(Exception):
    """The request was not answered within its timeout."""


class Request:
    """One client request: its inputs by name, rows (its batch), the key of the requests it may
    join, when it came, its deadlines and the future its outputs go to."""

    def __init__(self, inputs, rows, key, budget, timeout):
        self.inputs, self.rows, self.key = inputs, rows, key
        self.arrived = time.monotonic()
        self.budget_at = None if budget is None else self.arrived + budget
        self.expires = None if timeout is None else self.arrived + timeout
        self.future = concurrent.futures.Future()
        self.running = False  # taken by a worker once (a failed batch's requests run again)


class Instance:
    """An accelerator that serves: ``opener()`` gives it (again, after a failure); ``kind`` is
    "device" (requests go here first) or "cpu" (the fallback; by default, the reference
    backend without its device model); ``workers`` threads per model take batches (one: a
    batch runs as micro-batches on a device, one's host work beside the other's device jobs,
    and fewer, larger batches serve more than two at once); ``name`` defaults to the
    accelerator's backend."""

    def __init__(self, opener, kind=None, workers=None, fault_every=0, name=None):
        from sparsa.host.driver import ReferenceAccelerator

        accelerator = opener()
        self.opener = opener
        self.kind = kind or ("cpu" if isinstance(accelerator, ReferenceAccelerator)
                             else "device")
        self.name = name or accelerator.backend
        self.workers = workers or 1
        self.fault_every = fault_every if self.kind == "device" else 0
        self.accelerator = (_FaultInjector(accelerator, fault_every) if self.fault_every
                            else accelerator)
        self.in_service = True
        self.failures = 0
        self.recoveries = 0
        self.batches = 0
        self.busy_s = 0.0
        self.started = time.monotonic()
        self._lock = threading.Condition()
        self._active = 0  # batches running on the accelerator
        self._servers = []  # the Server whose queues wait for this instance
        self._recovering = None
        self._closing = False

    def fail(self, error):
        """Take the instance out of service and recover it in the background."""
        with self._lock:
            self.failures += 1
            if not self.in_service:
                return
            self.in_service = False
            log.warning("instance %s out of service: %s", self.name, error)
            self._recovering = threading.Thread(target=self._recover, daemon=True,
                                                name=f"sparsa-recover-{self.name}")
            self._recovering.start()
        self._notify()

    def acquire(self):
        """The accelerator for a batch about to run, or None while out of service; a batch
        that got one ends with :meth:`release`."""
        with self._lock:
            if not self.in_service:
                return None
            self._active += 1
            return self.accelerator

    def release(self):
        with self._lock:
            self._active -= 1
            self._lock.notify_all()

    def _recover(self):
        with self._lock:  # the batches still running on the failed device end first
            self._lock.wait_for(lambda: self._active == 0, timeout=60)
        _close_quietly(self.accelerator)
        delay = 0.05
        while not self._closing:
            accelerator = None
            try:
                accelerator = self.opener()
                if self.fault_every:
                    accelerator = _FaultInjector(accelerator, self.fault_every,
                                                 self.accelerator.count)
                _probe(accelerator)
            except Exception as error:  # noqa: BLE001  (any failure: try again later)
                if accelerator is not None:
                    _close_quietly(accelerator)
                log.warning("instance %s: recovery failed (%s); again in %.1f s", self.name,
                            error, delay)
                time.sleep(delay)
                delay = min(2 * delay, 5.0)
                continue
            with self._lock:
                self.accelerator = accelerator
                self.in_service = True
                self.recoveries += 1
            log.warning("instance %s back in service", self.name)
            self._notify()
            return

    def _notify(self):
        for server in self._servers:
            server.wake()

    def close(self):
        self._closing = True
        if self._recovering is not None:
            self._recovering.join(timeout=10)
        try:
            self.accelerator.close()
        except Exception as error:  # noqa: BLE001  (closing a failed device: log, go on)
            log.warning("instance %s: close: %s", self.name, error)


def _close_quietly(accelerator):
    """Close a failed device's accelerator: it may fail to close, and is replaced anyway."""
    try:
        accelerator.close()
    except Exception as error:  # noqa: BLE001
        log.info("closing a failed accelerator: %s", error)


def _probe(accelerator):
    """A small GEMM on ``accelerator``, checked against NumPy (raises DeviceError if wrong)."""
    rng = np.random.default_rng(0)
    a = rng.integers(-128, 128, (8, 16), dtype=np.int8)
    b = rng.integers(-128, 128, (16, 8), dtype=np.int8)
    got = accelerator.matmul(a, b)
    if not np.array_equal(got, a.astype(np.int32) @ b.astype(np.int32)):
        raise DeviceError("the probe GEMM gave a wrong result")


class _FaultInjector:
    """An accelerator whose next ``matmul`` after an ``arm()`` that comes up raises DeviceError,
    as a device that stops answering does: for measuring the server's recovery (``sparsa
    bench serve``, the tests). Everything else is the accelerator's."""

    def __init__(self, accelerator, every, count=None):
        self._accelerator, self.every = accelerator, every
        self.count = count or itertools.count(1)
        self._armed = False
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._accelerator, name)

    def arm(self):
        """Called per batch: every ``every``-th batch, the next matmul (of any thread: a
        batch runs in parts) fails."""
        if next(self.count) % self.every == 0:
            self._armed = True

    def matmul(self, *args, **kwargs):
        with self._lock:
            armed, self._armed = self._armed, False
        if armed:
            raise DeviceError("injected fault: the device did not answer")
        return self._accelerator.matmul(*args, **kwargs)



class ServedModel:
    """A compiled model behind a queue: ``submit`` accepts a request (or refuses it), the
    instances' workers ``take`` batches."""

    def __init__(self, name, path, max_batch_size=8, max_queue_delay=0.0005, max_queue=256):
        self.name, self.path = name, path
        self.model = load(path)  # (errors name the file)
        with open(path, "rb") as file:  # each worker's own copy is loaded from these bytes
            self.data = file.read()
        # Inputs with an open batch axis; requests join along it only where the model treats
        # each sample on its own (a model that mixes a batch's samples is served one request
        # at a time).
        self.open_batch = all(t.shape and t.shape[0] is None for t in self.model.inputs)
        self.batching = self.open_batch and self.model.separable() and max_batch_size > 1
        self.max_rows = max_batch_size if self.batching else None
        self.max_queue_delay = max_queue_delay
        self.max_queue = max_queue
        self.queue = collections.deque()
        self.running = collections.Counter()  # batches running, per instance
        self.cond = threading.Condition()
        self.closing = False

    # -- requests --

    def submit(self, inputs, *, budget=None, timeout=None):
        """Queue ``inputs`` (a dict by input name of arrays of the model's dtypes); a
        :class:`Request` whose future gets the outputs (a list of arrays, this request's
        rows). :class:`ModelError` for inputs that are not the model's, :class:`QueueFull`."""
        inputs = self._check(inputs)
        rows = None
        if self.open_batch:
            rows = {value.shape[0] for value in inputs.values()}
            if len(rows) != 1:
                raise ModelError(f"inputs: expected one batch size for all inputs, got "
                                 f"{sorted(rows)}")
            rows = rows.pop()
            if self.max_rows and rows > self.max_rows:
                raise ModelError(f"inputs: a batch of {rows} is more than the model's "
                                 f"max_batch_size {self.max_rows}")
        key = tuple((name, value.dtype.str, value.shape[1:] if rows is not None
                     else value.shape) for name, value in sorted(inputs.items()))
        request = Request(inputs, rows or 1, key, budget, timeout)
        with self.cond:
            if self.closing:
                raise QueueFull(f"model {self.name!r}: the server is shutting down")
            if len(self.queue) >= self.max_queue:
                raise QueueFull(f"model {self.name!r}: the queue holds {self.max_queue} "
                                f"requests")
            self.queue.append(request)
            self.cond.notify_all()
        return request

    def _check(self, inputs):
        """The inputs, each of the model's dtype and shape and one the model's run takes
        (:func:`~sparsa.host.graph.check_input`: a request the run would refuse is refused
        here, alone, not in a batch with others), or ModelError naming the input."""
        names = {t.name for t in self.model.inputs}
        unknown = sorted(set(inputs) - names)
        if unknown:
            raise ModelError(f"input {unknown[0]!r}: not an input of model {self.name!r} "
                             f"(its inputs: {', '.join(sorted(names))})")
        checked = {}
        for t in self.model.inputs:
            if t.name not in inputs:
                raise ModelError(f"input {t.name!r}: missing")
            value = np.asarray(inputs[t.name])
            if value.dtype != np.dtype(t.dtype) or value.ndim != len(t.shape) or any(
                    d is not None and d != s for d, s in zip(t.shape, value.shape)):
                raise ModelError(f"input {t.name!r}: expected {t.dtype} of shape "
                                 f"{_shape_text(t.shape)}, got {value.dtype} {value.shape}")
            checked[t.name] = check_input(t, value)
        return checked

    # -- batches --

    def take(self, instance):
        """The next batch for ``instance``'s worker (a list of requests), waiting for one;
        None once the model is closing and its queue is empty."""
        with self.cond:
            while True:
                now = time.monotonic()
                self._expire(now)
                if not instance.in_service:
                    if self.closing and not self.queue:
                        return None
                    self.cond.wait(0.05)
                    continue
                first, wake, joins = self._eligible(instance, now)
                if first is None:
                    if self.closing and not self.queue:
                        return None
                    self.cond.wait(None if wake is None else max(wake - now, 0.0005))
                    continue
                batch, rows = [first], first.rows
                if self.batching:
                    for request in self.queue:
                        if request is not first and request.key == first.key \
                                and rows + request.rows <= self.max_rows and joins(request):
                            batch.append(request)
                            rows += request.rows
                    # Waiting for company only when there is company about: other requests
                    # queued, or another of the model's batches running on this instance (a
                    # lone request gains nothing by waiting).
                    due = first.arrived + self.max_queue_delay
                    if rows < self.max_rows and now < due and not self.closing \
                            and (len(self.queue) > 1 or self.running[instance.name]):
                        self.cond.wait(due - now)
                        continue
                for request in batch:
                    self.queue.remove(request)
                self.running[instance.name] += 1
                return batch

    def done(self, instance):
        """A batch ``take`` gave ``instance`` has ended."""
        with self.cond:
            self.running[instance.name] -= 1
            self.cond.notify_all()

    def _eligible(self, instance, now):
        """``(request, wake, joins)``: the oldest request ``instance`` may take (or None, and
        when one becomes takeable) and which others may join its batch."""
        if not self.queue:
            return None, None, None
        devices = [i for i in self.server.instances if i.kind == "device"]
        if instance.kind == "device" or not any(i.in_service for i in devices):
            return self.queue[0], None, lambda request: True

        def past_budget(request):
            return request.budget_at is not None and request.budget_at <= now
        wake = None
        for request in self.queue:
            if past_budget(request):
                return request, None, past_budget
            if request.budget_at is not None:
                wake = request.budget_at if wake is None else min(wake, request.budget_at)
        return None, wake, None

    def _expire(self, now):
        """Requests past their timeout, or whose client went, leave the queue answered."""
        for request in [r for r in self.queue if r.future.done()
                        or (r.expires is not None and r.expires <= now)]:
            self.queue.remove(request)
            _settle(request.future, exception=RequestTimeout(
                f"model {self.name!r}: no answer within the request's timeout"))

    def requeue(self, batch):
        """A failed batch back at the front of the queue, in its order."""
        with self.cond:
            self.queue.extendleft(reversed(batch))
            self.cond.notify_all()


def _settle(future, result=None, exception=None):
    """A request's answer, unless it already has one (its timeout)."""
    try:
        if exception is not None:
            future.set_exception(exception)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


def _shape_text(shape):
    return "(" + ", ".join("N" if d is None else str(d) for d in shape) + ")"


class Server:
    """Models and instances: each model's workers on each instance, metrics, shutdown."""

    def __init__(self, models, instances, metrics=None):
        self.models = {model.name: model for model in models}
        self.instances = list(instances)
        self.metrics = metrics
        self._threads = []
        for instance in self.instances:
            instance._servers.append(self)
        for model in self.models.values():
            model.server = self
            for instance in self.instances:
                for index in range(instance.workers):
                    thread = threading.Thread(target=self._work, args=(model, instance),
                                              name=f"sparsa-{model.name}-{instance.name}-{index}",
                                              daemon=True)
                    thread.start()
                    self._threads.append(thread)

    @property
    def ready(self):
        return any(i.in_service for i in self.instances)

    def wake(self):
        for model in self.models.values():
            with model.cond:
                model.cond.notify_all()

    def _work(self, model, instance):
        compiled = loads(model.data)  # a worker's own: its run's figures are its own
        while True:
            batch = model.take(instance)
            if batch is None:
                return
            ended = []  # (the batch counts as running until its run ends, not its answers)
            try:
                self._run(model, instance, compiled, batch, ended)
            except Exception as error:  # noqa: BLE001  (the worker goes on serving)
                log.exception("model %s on %s: a batch failed", model.name, instance.name)
                self._answer_error(batch, error)
            finally:
                if not ended:
                    model.done(instance)

    def _run(self, model, instance, compiled, batch, ended):
        """One batch on ``instance``: each request answered, or (the device failed) the batch
        back in the queue. The model hears that the batch ended before its requests are
        answered (a client's next request then finds no batch running)."""
        batch = [r for r in batch if r.running or r.future.set_running_or_notify_cancel()]
        if not batch:
            return
        for request in batch:
            request.running = True
        feeds = {name: np.concatenate([r.inputs[name] for r in batch]) if len(batch) > 1
                 else batch[0].inputs[name] for name in batch[0].inputs}
        accelerator = instance.acquire()
        if accelerator is None:  # failed since the batch was taken
            model.requeue(batch)
            return
        started = time.perf_counter()
        try:
            if isinstance(accelerator, _FaultInjector):
                accelerator.arm()
            outputs = compiled.run(accelerator, feeds)
        except DEVICE_FAILURES as error:
            instance.release()
            if instance.kind == "cpu":
                self._answer_error(batch, error)
                return
            model.requeue(batch)
            instance.fail(error)
            if self.metrics:
                self.metrics.failure(instance)
            return
        except Exception as error:  # noqa: BLE001  (the requests get the error)
            instance.release()
            self._answer_error(batch, error)
            return
        instance.release()
        model.done(instance)
        ended.append(True)
        seconds = time.perf_counter() - started
        counters = compiled.run_counters() if instance.kind == "device" else None
        instance.batches += 1
        if counters:
            instance.busy_s += counters["busy_s"]
        row = 0
        for request in batch:
            if len(batch) > 1:
                part = [value[row:row + request.rows] for value in outputs]
            else:
                part = outputs
            row += request.rows
            _settle(request.future, result=part)
        if self.metrics:
            self.metrics.batch(model, instance, batch, seconds, counters)

    @staticmethod
    def _answer_error(batch, error):
        for request in batch:
            _settle(request.future, exception=error)

    def close(self, timeout=30.0):
        """Accept no more; answer every request already accepted; stop the workers; close
        the instances."""
        for model in self.models.values():
            with model.cond:
                model.closing = True
                model.cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        for model in self.models.values():
            with model.cond:
                for request in model.queue:
                    _settle(request.future, exception=RequestTimeout("the server shut down"))
                model.queue.clear()
        for instance in self.instances:
            instance.close()
