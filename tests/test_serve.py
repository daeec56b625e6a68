"""sparsa serve: the KServe v2 protocol through Triton's own client, dynamic batching, the CPU
fallback, a device that fails and comes back, a full queue, shutdown on SIGTERM. Every answer
is checked against ``CompiledModel.run`` on the reference backend (bit-exact)."""

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import sparsa
from sparsa.host import graph

pytest.importorskip("onnxruntime")
pytest.importorskip("starlette")
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

from sparsa import serve  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import onnx_models  # noqa: E402


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return compiled_cnn(tmp_path_factory.mktemp("serve"))


def compiled_cnn(folder):
    """A compiled CNN (x (N, 1, 8, 8) float32 -> prob (N, 10)) saved as .npz in ``folder``."""
    from sparsa import onnx as sparsa_onnx

    rng = np.random.default_rng(0)
    model = onnx_models.quantize_static(onnx_models.cnn(rng),
                                        rng.standard_normal((16, 1, 8, 8)).astype(np.float32),
                                        folder)
    sparsa_onnx.compile(model).save(folder / "cnn.npz")
    return folder / "cnn.npz"


def expected(path, x):
    """The outputs of ``CompiledModel.run`` on the reference backend."""
    with sparsa.open("reference") as acc:
        return graph.load(path).run(acc, x)[0]


def images(count, seed=1):
    return np.random.default_rng(seed).standard_normal((count, 1, 8, 8)).astype(np.float32)


def start(args, env=None):
    """``sparsa serve ARGS --port 0`` in a process; (process, port) once it listens."""
    process = subprocess.Popen(
        [sys.executable, "-m", "sparsa.cli", "serve", *map(str, args), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **(env or {})})
    lines = []
    for line in process.stdout:
        lines.append(line)
        if " on http://" in line:
            return process, int(line.rsplit(":", 1)[1].split("/")[0])
    raise AssertionError("sparsa serve did not start: " + "".join(lines)
                         + process.stderr.read())


def post(port, path, body, headers=None):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body,
                                     headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read(), dict(error.headers)


def test_tritonclient_against_sparsa_serve(model_path):
    """Triton's client unchanged: health, metadata, readiness, inference in binary and JSON
    (the same outputs as CompiledModel.run), the protocol's errors, metrics; then SIGTERM
    with requests in flight: each answered, exit status 0."""
    process, port = start([f"digits={model_path}", "--backend", "reference",
                           "--device-model", "--fallback", "reference"])
    try:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{port}", concurrency=8)
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("digits") and not client.is_model_ready("other")
        meta = client.get_model_metadata("digits")
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
        assert meta["outputs"] == [{"name": "prob", "datatype": "FP32", "shape": [-1, 10]}]
        assert client.get_model_config("digits")["max_batch_size"] == 8
        x = images(3)
        for binary in (True, False):
            given = httpclient.InferInput("x", list(x.shape), "FP32")
            given.set_data_from_numpy(x, binary_data=binary)
            asked = httpclient.InferRequestedOutput("prob", binary_data=binary)
            result = client.infer("digits", [given], outputs=[asked], request_id="r1")
            assert np.array_equal(result.as_numpy("prob"), expected(model_path, x))
            assert result.get_response()["id"] == "r1"
        # A plain JSON request, as curl sends it.
        status, body, _ = post(port, "/v2/models/digits/infer", json.dumps(
            {"inputs": [{"name": "x", "shape": [1, 1, 8, 8], "datatype": "FP32",
                         "data": x[:1].ravel().tolist()}]}).encode())
        assert status == 200
        answer = json.loads(body)["outputs"][0]
        assert answer["shape"] == [1, 10]
        assert np.array_equal(np.float32(answer["data"]), expected(model_path, x[:1])[0])
        # Mistakes: the protocol's error body, the reason named.
        wrong = httpclient.InferInput("x", [1, 1, 4, 4], "FP32")
        wrong.set_data_from_numpy(np.zeros((1, 1, 4, 4), np.float32))
        with pytest.raises(InferenceServerException, match=r"input 'x': expected float32"):
            client.infer("digits", [wrong])
        with pytest.raises(InferenceServerException, match="not served"):
            client.infer("other", [wrong])
        with pytest.raises(InferenceServerException, match="version 2: not served"):
            client.infer("digits", [wrong], model_version="2")
        for body, headers, fragment in [
                (b"{not json", {}, "JSON"),
                (json.dumps({"inputs": [{"name": "x", "shape": [1, 1, 8, 8],
                                         "datatype": "FP32",
                                         "parameters": {"binary_data_size": 256}}]}).encode(),
                 {}, "binary_data_size"),
                (json.dumps({"inputs": [{"name": "x", "shape": [1, 1, 8, 8],
                                         "datatype": "BYTES", "data": []}]}).encode(), {},
                 "datatype 'BYTES'"),
                (json.dumps({"inputs": [], "parameters": [1]}).encode(), {},
                 "parameters: expected a JSON object"),
                (json.dumps({"inputs": [{"name": "x", "shape": [1, 1, 8, 8],
                                         "datatype": "FP32", "data": [0.0] * 64}],
                             "parameters": {"timeout": -5}}).encode(), {},
                 "parameter 'timeout'")]:
            status, answer, _ = post(port, "/v2/models/digits/infer", body, headers)
            assert status == 400 and fragment in json.loads(answer)["error"], answer
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as page:
            text = page.read().decode()
        assert 'sparsa_requests_total{model="digits",outcome="success"} 3.0' in text
        assert 'sparsa_requests_total{model="digits",outcome="bad_request"} 6.0' in text
        assert 'sparsa_instance_up{instance="reference-device",kind="device"} 1.0' in text
        jobs = [line for line in text.splitlines()
                if line.startswith('sparsa_device_jobs_total{instance="reference-device"}')]
        assert jobs and float(jobs[0].split()[-1]) > 0
        # SIGTERM with requests in flight: every one answered, then exit 0.
        pending = []
        for index in range(12):
            given = httpclient.InferInput("x", [1, 1, 8, 8], "FP32")
            given.set_data_from_numpy(x[index % 3:index % 3 + 1])
            pending.append((index % 3, client.async_infer("digits", [given])))
        time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        reference = expected(model_path, x)
        for row, request in pending:
            assert np.array_equal(request.get_result().as_numpy("prob")[0], reference[row])
        assert process.wait(timeout=60) == 0
        assert "Traceback" not in process.stderr.read()
        client.close()
    finally:
        if process.poll() is None:
            process.kill()


def server_for(path, **options):
    return serve.build({"cnn": path}, **options)


def run_concurrently(server, model, inputs, threads=16, **submit):
    """Each row of ``inputs`` submitted from its own client thread; the answers in order."""
    def one(row):
        request = server.models[model].submit({"x": inputs[row:row + 1]}, **submit)
        return request.future.result(timeout=60)[0]
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return np.concatenate(list(pool.map(one, range(len(inputs)))))


def test_dynamic_batching_joins_requests(model_path):
    """Sixteen clients at once on the timed device model: requests join batches of up to 8,
    each client gets its own rows back, exactly."""
    server, metrics = server_for(model_path, backend="reference", device_model=True,
                                 clock_mhz=100, max_batch_size=8, max_queue_delay=0.02)
    try:
        x = images(64, seed=2)
        got = run_concurrently(server, "cnn", x)
        assert np.array_equal(got, expected(model_path, x))
        device = server.instances[0]
        assert device.batches < 64 / 2  # most batches joined requests
        sizes = metrics.batch_size.labels("cnn")
        assert sizes._sum.get() == 64
    finally:
        server.close()


def test_a_request_the_run_would_refuse_is_refused_alone(model_path):
    """A request with a non-finite value, or no rows, is refused when submitted, naming the
    input, so that it never joins (and fails) a batch of other clients' requests: those are
    answered exactly."""
    server, _ = server_for(model_path, backend="reference", device_model=True,
                           max_batch_size=8, max_queue_delay=0.05)
    try:
        x = images(4, seed=3)
        bad = x[:1].copy()
        bad[0, 0, 0, 0] = np.nan
        for value, words in ((bad, "expected finite values"),
                             (x[:0], "expected no empty dimension")):
            good = server.models["cnn"].submit({"x": x[1:2]})
            with pytest.raises(graph.ModelError, match=rf"inputs\['x'\]: {words}"):
                server.models["cnn"].submit({"x": value})
            later = server.models["cnn"].submit({"x": x[2:3]})
            for request, row in ((good, 1), (later, 2)):
                assert np.array_equal(request.future.result(timeout=60)[0],
                                      expected(model_path, x[row:row + 1]))
    finally:
        server.close()


def test_a_failing_device_loses_no_request(model_path):
    """Every 5th device batch fails as a device that stops answering: its requests go back to
    the queue and are answered (exactly) by the CPU instance or the recovered device; the
    device is back in service afterwards."""
    server, metrics = server_for(model_path, backend="reference", device_model=True,
                                 clock_mhz=100, fallback="reference", max_batch_size=4,
                                 max_queue_delay=0.002, fault_every=5)
    try:
        x = images(120, seed=3)
        got = run_concurrently(server, "cnn", x)
        assert np.array_equal(got, expected(model_path, x))
        device = server.instances[0]
        assert device.failures >= 2 and device.recoveries >= 1
        deadline = time.monotonic() + 10
        while not device.in_service and time.monotonic() < deadline:
            time.sleep(0.01)
        assert device.in_service
        assert metrics.failures.labels(device.name)._value.get() == device.failures
    finally:
        server.close()


def test_cpu_takes_requests_past_their_budget(model_path):
    """A slow device (the timed model at 0.05 MHz) and a 1 ms latency budget: the CPU instance
    answers requests that waited past it; every answer exact."""
    server, metrics = server_for(model_path, backend="reference", device_model=True,
                                 clock_mhz=0.05, fallback="reference", max_batch_size=2,
                                 max_queue_delay=0.0)
    try:
        x = images(24, seed=4)
        got = run_concurrently(server, "cnn", x, threads=8, budget=0.001)
        assert np.array_equal(got, expected(model_path, x))
        fallbacks = metrics.fallbacks.labels("cnn")._value.get()
        assert 0 < fallbacks < 24 and server.instances[0].batches > 0
    finally:
        server.close()


def test_full_queue_refuses_and_answers_the_accepted(model_path):
    """A burst of 10x the queue's capacity: the accepted requests answered exactly, the rest
    refused with QueueFull at once; a request past its timeout answered with RequestTimeout."""
    server, _ = server_for(model_path, backend="reference", device_model=True, clock_mhz=1,
                           max_batch_size=1, max_queue=4)
    try:
        x = images(40, seed=5)
        accepted, refused = [], 0
        for row in range(40):
            try:
                accepted.append((row, server.models["cnn"].submit({"x": x[row:row + 1]})))
            except serve.QueueFull:
                refused += 1
        assert 4 <= len(accepted) <= 6 and refused == 40 - len(accepted)
        reference = expected(model_path, x)
        for row, request in accepted:
            assert np.array_equal(request.future.result(timeout=60)[0][0], reference[row])
        blocker = [server.models["cnn"].submit({"x": x[:1]}) for _ in range(3)]
        late = server.models["cnn"].submit({"x": x[:1]}, timeout=0.001)
        with pytest.raises(serve.RequestTimeout):
            late.future.result(timeout=60)
        for request in blocker:
            request.future.result(timeout=60)
        with pytest.raises(graph.ModelError, match="input 'x': expected float32"):
            server.models["cnn"].submit({"x": x[:1].astype(np.float64)})
    finally:
        server.close()


def test_serve_command_line_mistakes(model_path, tmp_path, capsys):
    """Each mistake on sparsa serve's command line is one line and exit status 2, before
    anything listens."""
    from sparsa import cli

    taken = serve.bind("127.0.0.1", 0)
    port = taken.getsockname()[1]
    cases = [([str(tmp_path / "missing.npz")], "missing.npz: no such file"),
             ([f"a={model_path}", f"a={model_path}"], "model name 'a' given twice"),
             ([str(model_path), "--port", str(port)], f"--port {port}:"),
             ([str(model_path), "--fallback", "reference"], "already the CPU"),
             ([str(model_path), "--backend", "sim", "--device-model"],
              "--device-model is the reference backend's"),
             ([str(tmp_path / "bad.npz")], "bad.npz is not a model sparsa saved")]
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not a model")
    for args, fragment in cases:
        assert cli.main(["serve", "--backend", "reference", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert fragment in err and len(err.splitlines()) == 1, err
    with pytest.raises(SystemExit):
        cli.main(["serve", str(model_path), "--request-timeout-s", "0"])
    taken.close()


def test_a_device_that_stays_down_times_out_requests(model_path):
    """A device whose batch fails and that cannot be opened again, with no CPU instance: the
    server is not ready, a request gets RequestTimeout at its timeout (no hang), and close
    returns."""
    opened = []

    def opener():
        if opened:
            raise sparsa.DeviceError("the device is gone")
        opened.append(True)
        return sparsa.open("reference", device_model=True)
    device = serve.Instance(opener, fault_every=1)
    server = serve.Server([serve.ServedModel("cnn", model_path)], [device])
    try:
        x = images(1)
        first = server.models["cnn"].submit({"x": x}, timeout=0.5)
        with pytest.raises(serve.RequestTimeout):
            first.future.result(timeout=30)
        assert device.failures == 1 and not device.in_service and not server.ready
        late = server.models["cnn"].submit({"x": x}, timeout=0.2)
        with pytest.raises(serve.RequestTimeout):
            late.future.result(timeout=30)
    finally:
        started = time.monotonic()
        server.close()
        assert time.monotonic() - started < 20


def test_bench_serve_says_what_bounds_a_row():
    """``sparsa bench serve``'s limits: the device's (one over its time per image at the
    clock) and the machine's (its cores over the CPU time per image); the smaller binds, the
    table names it and by how much."""
    from sparsa.serve import loadgen

    # 4 ms per image at the clock: 250/s; 25 ms of CPU per image on 2 cores: 80/s.
    row = {"throughput": 40.0, "device_ms_per_image": 4.0, "cpu_ms_per_image": 25.0}
    row.update(loadgen._limits(row, cores=2))
    assert (row["device_limit"], row["cpu_limit"]) == (pytest.approx(250), pytest.approx(80))
    assert row["bound"] == "CPU" and row["bound_by"] == pytest.approx(250 / 80)
    assert row["of_limit"] == pytest.approx(0.5)
    assert row["of_device_limit"] == pytest.approx(40 / 250)
    assert loadgen._bound(row) == "CPU (3.1x below the device's limit)"
    # 80 ms per image at the clock: 12.5/s; 100 ms of CPU per image on 2 cores: 20/s.
    row = {"throughput": 11.0, "device_ms_per_image": 80.0, "cpu_ms_per_image": 100.0}
    row.update(loadgen._limits(row, cores=2))
    assert row["bound"] == "device" and loadgen._bound(row) == "device"
    assert row["of_limit"] == pytest.approx(11 / 12.5)


def test_bench_serve_end_to_end_on_one_model():
    """``sparsa bench serve``'s run on the digits MLP, briefly: a row per batching mode and
    concurrency with its limits and bound, one client against the direct run, a failing device
    losing and spoiling no request and coming back, a burst answered exactly or refused 503,
    every server stopped with status 0; the markdown has them."""
    from sparsa.serve import loadgen

    lines = []
    results = loadgen.run(duration=0.5, concurrencies=(4,), models=["digits-mlp"],
                          printer=lines.append)
    rows = results["rows"]
    assert [(r["batching"], r["concurrency"]) for r in rows] == [(True, 4), (False, 4)]
    for row in rows:
        assert row["model"] == "digits-mlp" and row["throughput"] > 0 and row["failed"] == 0
        assert row["p50_ms"] <= row["p99_ms"]
        assert row["device_ms_per_image"] > 0 and row["cpu_ms_per_image"] > 0
        assert row["bound"] == ("device" if row["device_limit"] <= row["cpu_limit"] else "CPU")
        if not row["batching"]:
            assert row["mean_batch"] == 1.0
    single = results["single"]["digits-mlp"]
    assert single["direct_ms"] > 0 and single["served_ms"] > 0
    faults = results["faults"]
    assert faults["answered"] > 0 and faults["lost"] == 0 and faults["wrong"] == 0
    assert faults["device_failures"] >= 1 and faults["device_back"]
    assert faults["exit_status"] == 0
    overload = results["overload"]
    assert overload["ok"] > 0 and overload["503"] > 0 and overload["ok"] + overload["503"] == 160
    assert overload["wrong"] == overload["other"] == 0 and overload["exit_status"] == 0
    text = loadgen.markdown(results)
    assert text.count("| digits-mlp | on |") == 1 and text.count("| digits-mlp | off |") == 1
    assert "Faults (digits-mlp" in text and "Overload (digits-mlp" in text
    assert sum(line.startswith(("faults:", "overload:")) for line in lines) == 2
    with pytest.raises(ValueError, match="models: lenet not among"):
        loadgen.compile_models(".", names=["lenet"])
