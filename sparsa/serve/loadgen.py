"""``sparsa bench serve``: a load generator on Triton's HTTP client against ``sparsa serve``
processes on the timed device model: throughput and latency per model and concurrency, with
dynamic batching on and off; a device failing under load; a burst past the queue's capacity.

Closed loop: each of ``concurrency`` client threads sends one request (one sample) and waits for
its answer, for a fixed duration (at least four rounds of the clients' requests at the direct
run's time each) after a warm-up (one such round). The server's own figures (batch sizes, device
cycles, busy and host seconds) come from its /metrics page, read before and after each run; the
CPU time of the server and the client from /proc and the client's process. Each row names what
bounds it: the device (its time per image at the clock) or this machine's CPU (its cores over the
CPU time per image). A single client's latency is set against the direct run's in one window,
taking turns (:func:`side_by_side`).
"""

import concurrent.futures
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np


def compile_models(folder, seed=0, names=None):
    """The demo's digit classifiers (MLP, CNN) and the MobileNetV2- and ResNet-18-style
    networks (those of ``names`` when given), quantized by onnxruntime and compiled;
    ``{name: (path, sample inputs)}``."""
    from sparsa import models
    from sparsa import onnx as sparsa_onnx
    from sparsa.demo import cnn_onnx, digits, mlp_onnx, quantize_with_onnxruntime

    rng = np.random.default_rng(seed)
    (x_train, y_train), (x_test, _) = digits(seed)
    x_train, x_test = x_train.astype(np.float32), x_test.astype(np.float32)
    sources = {
        "digits-mlp": (mlp_onnx(x_train, y_train, seed=seed), x_train[:256], x_test[:64],
                       False, ["probabilities"]),
        "digits-cnn": (cnn_onnx(x_train, y_train, seed), x_train[:256].reshape(-1, 1, 8, 8),
                       x_test[:64].reshape(-1, 1, 8, 8), True, None)}
    calibration = rng.standard_normal((16, *models.INPUT)).astype(np.float32)
    samples = rng.standard_normal((16, *models.INPUT)).astype(np.float32)
    sources["mobilenetv2"] = (models.mobilenet_v2(rng), calibration, samples, True, None)
    sources["resnet18"] = (models.resnet18(rng), calibration, samples, False, None)
    unknown = sorted(set(names or ()) - set(sources))
    if unknown:
        raise ValueError(f"models: {', '.join(unknown)} not among the benchmark's "
                         f"({', '.join(sources)})")
    compiled = {}
    for name, (model, train, test, per_channel, outputs) in sources.items():
        if names and name not in names:
            continue
        quantized = quantize_with_onnxruntime(model, train, folder, per_channel)
        path = Path(folder) / f"{name}.npz"
        sparsa_onnx.compile(quantized, outputs=outputs).save(path)
        compiled[name] = (path, test)
    return compiled


class ServerProcess:
    """``sparsa serve`` in a child process on a free port."""

    def __init__(self, models, *options):
        command = [sys.executable, "-m", "sparsa.cli", "serve",
                   *(f"{name}={path}" for name, (path, _) in models.items()),
                   "--port", "0", *map(str, options)]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
        lines = []
        for line in self.process.stdout:
            lines.append(line)
            if " on http://" in line:
                self.port = int(line.rsplit(":", 1)[1].split("/")[0])
                self.url = f"127.0.0.1:{self.port}"
                return
        raise RuntimeError("sparsa serve did not start: " + "".join(lines)
                           + self.process.stderr.read())

    def metrics(self):
        """The /metrics page as ``{(name, labels...): value}``."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://{self.url}/metrics", timeout=30) as page:
            text = page.read().decode()
        values = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                values[(sample.name, *sorted(sample.labels.items()))] = sample.value
        return values

    def memory(self):
        """The server's resident and peak resident memory (bytes), from /proc."""
        fields = {}
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    fields[key] = int(value.split()[0]) * 1024
        return fields

    def cpu_seconds(self):
        """The server's CPU time so far (user and system, all threads), from /proc."""
        with open(f"/proc/{self.process.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self):
        """SIGTERM; the exit status."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=120)
        finally:
            self.process.stdout.close()
            self.process.stderr.close()


def _input(client_module, name, sample):
    given = client_module.InferInput(name, [1, *sample.shape], _DATATYPE[sample.dtype.name])
    given.set_data_from_numpy(sample[None])
    return given


_DATATYPE = {"float32": "FP32", "int8": "INT8", "uint8": "UINT8", "int64": "INT64"}


def load(url, model, input_name, samples, concurrency, duration, expected=None,
         warmup=0.5):
    """Closed-loop load: ``concurrency`` threads, each with its own client, sending samples
    in turn for ``warmup`` + ``duration`` seconds. Returns the latencies of the requests
    answered in the measured window (the last ``duration`` seconds),
    its length in seconds, and counts of answers that failed or (given ``expected``, the
    outputs per sample) differ."""
    import tritonclient.http as client_module

    start = time.monotonic() + warmup
    end = start + duration
    latencies, failed, wrong = [], [0], [0]
    lock = threading.Lock()

    def client_loop(index):
        client = client_module.InferenceServerClient(url, network_timeout=120,
                                                     connection_timeout=120)
        inputs = [_input(client_module, input_name, sample) for sample in samples]
        turn = index
        try:
            while True:
                sent = time.monotonic()
                if sent >= end:
                    return
                row = turn % len(samples)
                turn += 1
                try:
                    result = client.infer(model, [inputs[row]])
                except Exception:  # noqa: BLE001  (counted: the benchmark's figure)
                    with lock:
                        failed[0] += 1
                    continue
                done = time.monotonic()
                if expected is not None:
                    name = result.get_response()["outputs"][0]["name"]
                    if not np.array_equal(result.as_numpy(name)[0], expected[row]):
                        with lock:
                            wrong[0] += 1
                if start <= done <= end:  # answered in the measured window
                    with lock:
                        latencies.append(done - sent)
        finally:
            client.close()

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return np.array(latencies), duration, failed[0], wrong[0]


def _delta(after, before, name, **labels):
    key = (name, *sorted(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


def side_by_side(url, model_name, input_name, path, samples, clock_mhz, duration):
    """One client's latency against the direct run's, taken in turn in one window (so that a
    slower or faster spell of the machine falls on both): ``CompiledModel.run`` of a sample on
    the timed device model in this process, then the same sample through the server; for
    ``duration`` seconds, at least 16 of each (the samples in turn, as the clients send them:
    sparse-skip makes the time depend on the data). The medians, direct and served, in
    seconds."""
    import tritonclient.http as client_module

    import sparsa
    from sparsa.host.graph import load as load_model

    model = load_model(path)
    client = client_module.InferenceServerClient(url, network_timeout=120)
    inputs = [_input(client_module, input_name, sample) for sample in samples]
    direct, served = [], []
    try:
        with sparsa.open("reference", device_model=True, clock_mhz=clock_mhz) as device:
            end = time.monotonic() + duration
            index = 0
            while index < 18 or time.monotonic() < end:
                row = index % len(samples)
                started = time.perf_counter()
                model.run(device, samples[row][None])
                between = time.perf_counter()
                client.infer(model_name, [inputs[row]])
                done = time.perf_counter()
                if index >= 2:  # (the first runs choose the jobs' formats)
                    direct.append(between - started)
                    served.append(done - between)
                index += 1
    finally:
        client.close()
    return float(np.median(direct)), float(np.median(served))


def run(duration=3.0, concurrencies=(1, 4, 16, 64), clock_mhz=100.0, max_batch_size=16,
        max_queue_delay_us=500, models=None, seed=0, printer=print):
    """The benchmark's figures: ``{"rows": [...], "faults": {...}, "overload": {...}}``."""
    from sparsa.host.graph import load as load_model

    device = ["--backend", "reference", "--device-model", "--clock-mhz", clock_mhz]
    cores = len(os.sched_getaffinity(0))
    results = {"clock_mhz": clock_mhz, "duration_s": duration, "rows": [], "cores": cores,
               "max_batch_size": max_batch_size, "max_queue_delay_us": max_queue_delay_us}
    with tempfile.TemporaryDirectory() as folder:
        printer("compiling the models ...")
        compiled = compile_models(folder, seed, models)
        names = {name: load_model(path).inputs[0].name for name, (path, _) in compiled.items()}
        direct = {}
        results["single"] = {}
        for batching in (True, False):
            server = ServerProcess(compiled, *device, "--max-batch-size",
                                   max_batch_size if batching else 1,
                                   "--max-queue-delay-us", max_queue_delay_us,
                                   "--max-queue", 1024)
            instance = "reference-device"
            for name, (path, samples) in compiled.items():
                if batching:
                    direct[name], served = side_by_side(server.url, name, names[name], path,
                                                        samples, clock_mhz, duration)
                    results["single"][name] = {"direct_ms": 1e3 * direct[name],
                                               "served_ms": 1e3 * served}
                for concurrency in concurrencies:
                    before, scraped = server.metrics(), time.monotonic()
                    cpu = server.cpu_seconds() + time.process_time()
                    # Long enough for each client's requests to go round several times
                    # (a slow model at high concurrency answers in rounds of seconds).
                    rounds = concurrency * direct[name]
                    latencies, seconds, failed, _ = load(
                        server.url, name, names[name], samples, concurrency,
                        max(duration, 4 * rounds), warmup=max(0.5, rounds))
                    cpu = server.cpu_seconds() + time.process_time() - cpu
                    after, between = server.metrics(), time.monotonic() - scraped
                    batches = _delta(after, before, "sparsa_batch_size_count", model=name)
                    rows = _delta(after, before, "sparsa_batch_size_sum", model=name)
                    totals = {key: _delta(after, before, f"sparsa_{key}_total",
                                          instance=instance)
                              for key in ("device_cycles", "device_busy_seconds",
                                          "host_seconds")}
                    row = {"model": name, "batching": batching, "concurrency": concurrency,
                           "throughput": len(latencies) / seconds,
                           "p50_ms": 1e3 * float(np.percentile(latencies, 50)),
                           "p99_ms": 1e3 * float(np.percentile(latencies, 99)),
                           "mean_batch": rows / batches if batches else 0.0,
                           # (warm-up and tail too)
                           "busy_fraction": totals["device_busy_seconds"] / between,
                           "failed": failed}
                    per_image = {"device_ms": totals["device_cycles"] / (clock_mhz * 1e3),
                                 "busy_ms": 1e3 * totals["device_busy_seconds"],
                                 "host_ms": 1e3 * totals["host_seconds"], "cpu_ms": 1e3 * cpu}
                    row.update({f"{key}_per_image": value / rows if rows else 0.0
                                for key, value in per_image.items()})
                    row.update(_limits(row, cores))
                    results["rows"].append(row)
                    printer(_line(row))
            status = server.stop()
            if status != 0:
                raise RuntimeError(f"sparsa serve exited {status} on SIGTERM")
        results["faults"] = _faults(compiled, device, max_batch_size, max_queue_delay_us,
                                    duration, names, printer)
        results["overload"] = _overload(compiled, device, names, printer)
    return results


def _limits(row, cores):
    """A row's two limits in images per second: the device's (one over its time per image at
    the clock) and this machine's (its cores over the CPU time per image of the server and the
    client together: HTTP, batching, the model's host work, the device model's own
    arithmetic); which of them binds, by how much, and the throughput's share of it."""
    device = 1e3 / row["device_ms_per_image"] if row["device_ms_per_image"] else float("inf")
    cpu = 1e3 * cores / row["cpu_ms_per_image"] if row["cpu_ms_per_image"] else float("inf")
    bound = "device" if device <= cpu else "CPU"
    return {"device_limit": device, "cpu_limit": cpu, "bound": bound,
            "bound_by": max(device, cpu) / min(device, cpu),
            "of_device_limit": row["throughput"] / device,
            "of_limit": row["throughput"] / min(device, cpu)}


def _expected(path, samples):
    import sparsa
    from sparsa.host.graph import load as load_model

    with sparsa.open("reference") as acc:
        return load_model(path).run(acc, samples)[0]


def _faults(compiled, device, max_batch_size, max_queue_delay_us, duration, names, printer,
            every=50, concurrency=16):
    """A DeviceError in 1 of every ``every`` device batches under load: every answer checked
    against the reference; the device back in service afterwards."""
    name = "digits-cnn" if "digits-cnn" in compiled else next(iter(compiled))
    path, samples = compiled[name]
    expected = _expected(path, samples)
    server = ServerProcess({name: compiled[name]}, *device, "--fallback", "reference",
                           "--inject-faults", every, "--max-batch-size", max_batch_size,
                           "--max-queue-delay-us", max_queue_delay_us, "--max-queue", 1024)
    try:
        latencies, seconds, failed, wrong = load(server.url, name, names[name], samples,
                                                 concurrency, 3 * duration, expected)
        deadline = time.monotonic() + 10
        while True:
            metrics = server.metrics()
            up = metrics.get(("sparsa_instance_up", ("instance", "reference-device"),
                              ("kind", "device")))
            if up == 1.0 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        figures = {"model": name, "every": every, "concurrency": concurrency,
                   "answered": len(latencies), "lost": failed, "wrong": wrong,
                   "device_failures": metrics.get(("sparsa_instance_failures_total",
                                                   ("instance", "reference-device")), 0),
                   "fallbacks": metrics.get(("sparsa_fallbacks_total", ("model", name)), 0),
                   "device_back": up == 1.0, "throughput": len(latencies) / seconds}
    finally:
        figures["exit_status"] = server.stop()
    printer(f"faults: {figures}")
    return figures


def _overload(compiled, device, names, printer, queue=16, burst=160):
    """A burst of ``burst`` requests at once against a queue of ``queue``: each accepted one
    answered exactly, the rest 503; the server's memory before and after."""
    import tritonclient.http as client_module
    from tritonclient.utils import InferenceServerException

    name = "mobilenetv2" if "mobilenetv2" in compiled else next(iter(compiled))
    path, samples = compiled[name]
    expected = _expected(path, samples)
    server = ServerProcess({name: compiled[name]}, *device, "--max-queue", queue,
                           "--max-batch-size", 8)
    outcomes = {"ok": 0, "wrong": 0, "503": 0, "other": 0}
    try:
        warm = client_module.InferenceServerClient(server.url)
        warm.infer(name, [_input(client_module, names[name], samples[0])])
        warm.close()
        before = server.memory()
        barrier = threading.Barrier(burst)
        lock = threading.Lock()

        def one(index):
            client = client_module.InferenceServerClient(server.url, network_timeout=300)
            row = index % len(samples)
            given = _input(client_module, names[name], samples[row])
            barrier.wait()
            try:
                result = client.infer(name, [given])
                outcome = ("ok" if np.array_equal(result.as_numpy(
                    result.get_response()["outputs"][0]["name"])[0], expected[row])
                    else "wrong")
            except InferenceServerException as error:
                outcome = "503" if "queue holds" in str(error) else "other"
            finally:
                client.close()
            with lock:
                outcomes[outcome] += 1
        with concurrent.futures.ThreadPoolExecutor(burst) as pool:
            list(pool.map(one, range(burst)))
        after = server.memory()
    finally:
        status = server.stop()
    figures = {"model": name, "queue": queue, "burst": burst, **outcomes,
               "rss_before_mib": before["VmRSS"] / 2**20, "rss_after_mib": after["VmRSS"] / 2**20,
               "peak_mib": after["VmHWM"] / 2**20, "exit_status": status}
    printer(f"overload: {figures}")
    return figures


def _line(row):
    return (f"{row['model']:<12} {'batching' if row['batching'] else 'one by one':<10} "
            f"c={row['concurrency']:<3} {row['throughput']:8.1f} req/s  p50 {row['p50_ms']:7.1f} "
            f"ms  p99 {row['p99_ms']:7.1f} ms  batch {row['mean_batch']:5.2f}  busy "
            f"{row['busy_fraction']:.0%}  limits: device {row['device_limit']:7.1f}/s, CPU "
            f"{row['cpu_limit']:7.1f}/s  {row['bound']}-bound ({row['of_limit']:.0%})")


def _bound(row):
    if row["bound"] == "device":
        return "device"
    return f"CPU ({row['bound_by']:.1f}x below the device's limit)"


def markdown(results):
    """The README's table and the targets' figures."""
    lines = ["| model | batching | clients | requests/s | p50 ms | p99 ms | mean batch | "
             "device busy | device ms/image (clock) | device model busy ms/image | "
             "host ms/image | CPU ms/image | device limit /s | CPU limit /s | bound | "
             "of its limit |",
             "|:---|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---|---:|"]
    for r in results["rows"]:
        lines.append(f"| {r['model']} | {'on' if r['batching'] else 'off'} | "
                     f"{r['concurrency']} | {r['throughput']:.1f} | {r['p50_ms']:.1f} | "
                     f"{r['p99_ms']:.1f} | {r['mean_batch']:.2f} | {r['busy_fraction']:.0%} | "
                     f"{r['device_ms_per_image']:.3f} | {r['busy_ms_per_image']:.2f} | "
                     f"{r['host_ms_per_image']:.2f} | {r['cpu_ms_per_image']:.2f} | "
                     f"{r['device_limit']:.0f} | {r['cpu_limit']:.0f} | {r['bound']} | "
                     f"{r['of_limit']:.0%} |")
    lines += ["", "| model | c=16: batching on / off | device ms/image at c=16, off / on | "
              "bound (c=16, on) | of its limit | one client: p50 / direct run | "
              "one client: p50 - direct run |",
              "|:---|---:|---:|:---|---:|---:|---:|"]
    for name in dict.fromkeys(r["model"] for r in results["rows"]):
        pick = {(r["batching"], r["concurrency"]): r for r in results["rows"]
                if r["model"] == name}
        on, off, single = pick.get((True, 16)), pick.get((False, 16)), results["single"][name]
        if on is None or off is None:
            continue
        gain = off["device_ms_per_image"] / on["device_ms_per_image"]
        lines.append(f"| {name} | {on['throughput'] / off['throughput']:.1f}x | "
                     f"{off['device_ms_per_image']:.3f} / {on['device_ms_per_image']:.3f} "
                     f"({gain:.1f}x) | {_bound(on)} | {on['of_limit']:.0%} | "
                     f"{single['served_ms'] / single['direct_ms']:.2f} | "
                     f"{single['served_ms'] - single['direct_ms']:+.1f} ms |")
    f, o = results["faults"], results["overload"]
    lines += ["", f"Faults ({f['model']}, concurrency {f['concurrency']}, a DeviceError in 1 "
              f"of every {f['every']} device batches): {f['answered']} answered, {f['lost']} "
              f"lost, {f['wrong']} wrong; {f['device_failures']:.0f} device failures, "
              f"{f['fallbacks']:.0f} requests answered by the CPU instance; device back in "
              f"service: {'yes' if f['device_back'] else 'no'}.",
              "", f"Overload ({o['model']}, a burst of {o['burst']} requests against a queue "
              f"of {o['queue']}): {o['ok']} answered exactly, {o['wrong']} wrong, "
              f"{o['503']} refused 503, {o['other']} other; server memory "
              f"{o['rss_before_mib']:.0f} MiB before, {o['rss_after_mib']:.0f} MiB after "
              f"(peak {o['peak_mib']:.0f} MiB)."]
    return "\n".join(lines)


def plot(results, path):
    """Throughput and p99 latency against concurrency per model, batching on and off."""
    from sparsa.bench import _pyplot

    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=120)
    for name in dict.fromkeys(r["model"] for r in results["rows"]):
        for batching, style in ((True, "-"), (False, "--")):
            rows = [r for r in results["rows"] if r["model"] == name
                    and r["batching"] == batching]
            label = f"{name}, batching {'on' if batching else 'off'}"
            left.plot([r["concurrency"] for r in rows], [r["throughput"] for r in rows],
                      style, marker="o", label=label)
            right.plot([r["concurrency"] for r in rows], [r["p99_ms"] for r in rows], style,
                       marker="o", label=label)
    for ax, label in ((left, "requests / s"), (right, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    left.set_title(f"sparsa serve, timed device model ({results['clock_mhz']:g} MHz)",
                   fontsize=10)
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
