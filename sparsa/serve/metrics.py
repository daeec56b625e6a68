"""The server's metrics in Prometheus' text format (prometheus-client), one registry per
server: requests by outcome, queue and compute durations, batch sizes; per instance the device's
jobs, cycles, MACs issued and skipped, busy seconds and fraction, failures, whether it serves;
fallbacks to the CPU."""

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_SECONDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class Metrics:
    """What the server counts; :meth:`text` is the /metrics page."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("sparsa_requests", "Inference requests answered, by outcome "
                                "(success, bad_request, queue_full, timeout, error)",
                                ["model", "outcome"], registry=r)
        self.queue_seconds = Histogram("sparsa_queue_seconds", "Time a request waited before "
                                       "its batch started", ["model"], buckets=_SECONDS,
                                       registry=r)
        self.compute_seconds = Histogram("sparsa_compute_seconds", "Time a batch ran",
                                         ["model", "instance"], buckets=_SECONDS, registry=r)
        self.request_seconds = Histogram("sparsa_request_seconds", "Time from a request's "
                                         "arrival to its answer", ["model"], buckets=_SECONDS,
                                         registry=r)
        self.batch_size = Histogram("sparsa_batch_size", "Rows in a batch run",
                                    ["model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.fallbacks = Counter("sparsa_fallbacks", "Requests answered by a CPU instance "
                                 "(the device busy past their budget, or out of service)",
                                 ["model"], registry=r)
        self.jobs = Counter("sparsa_device_jobs", "Device jobs run", ["instance"], registry=r)
        self.cycles = Counter("sparsa_device_cycles", "Device cycles", ["instance"], registry=r)
        self.macs = Counter("sparsa_device_macs", "MACs issued on the device", ["instance"],
                            registry=r)
        self.skipped = Counter("sparsa_device_macs_skipped", "MACs skipped by sparse-skip",
                               ["instance"], registry=r)
        self.busy = Counter("sparsa_device_busy_seconds", "Seconds the device was busy",
                            ["instance"], registry=r)
        self.host = Counter("sparsa_host_seconds", "Seconds of host work for a device's "
                            "batches (host ops, im2col, the driver's packing and unpacking)",
                            ["instance"], registry=r)
        self.failures = Counter("sparsa_instance_failures", "Times an instance was taken out "
                                "of service", ["instance"], registry=r)
        self._up = Gauge("sparsa_instance_up", "1 while an instance serves, 0 while it is "
                         "recovered", ["instance", "kind"], registry=r)
        self._fraction = Gauge("sparsa_device_busy_fraction", "Device busy seconds over the "
                               "seconds since the server started", ["instance"], registry=r)
        self._queued = Gauge("sparsa_queue_requests", "Requests waiting", ["model"], registry=r)

    def watch(self, server):
        """Gauges read from ``server`` at each scrape."""
        for instance in server.instances:
            self._up.labels(instance.name, instance.kind).set_function(
                lambda i=instance: float(i.in_service))
            if instance.kind == "device":
                self._fraction.labels(instance.name).set_function(
                    lambda i=instance: i.busy_s / max(time.monotonic() - i.started, 1e-9))
        for model in server.models.values():
            self._queued.labels(model.name).set_function(lambda m=model: len(m.queue))

    def batch(self, model, instance, batch, seconds, counters):
        started = time.monotonic() - seconds
        for request in batch:
            self.queue_seconds.labels(model.name).observe(max(0.0, started - request.arrived))
        self.compute_seconds.labels(model.name, instance.name).observe(seconds)
        self.batch_size.labels(model.name).observe(sum(r.rows for r in batch))
        if instance.kind == "cpu":
            self.fallbacks.labels(model.name).inc(len(batch))
        if counters:
            self.jobs.labels(instance.name).inc(counters["jobs"])
            self.cycles.labels(instance.name).inc(counters["cycles"])
            self.macs.labels(instance.name).inc(counters["macs"])
            self.skipped.labels(instance.name).inc(counters["macs_skipped"])
            self.busy.labels(instance.name).inc(counters["busy_s"])
            self.host.labels(instance.name).inc(counters["host_s"])

    def failure(self, instance):
        self.failures.labels(instance.name).inc()

    def answered(self, model, outcome, seconds=None):
        self.requests.labels(model, outcome).inc()
        if seconds is not None:
            self.request_seconds.labels(model).observe(seconds)

    def text(self):
        return generate_latest(self.registry)
