"""The host driver on the simulated RTL: the PYNQ transport over simulated MMIO and AXI DMA.

``sparsa.open("sim")`` from this (plain Python) process, and the driver inside a cocotb test,
must give the reference backend's integers for every job, with the same work counters.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from builds import DEFAULT, ODD, SMALL, needs

import sparsa
from sparsa import protocol
from sparsa.host import driver, jobs, simulation
from sparsa.sim import golden, runner
from sparsa.sim.runner import accelerator_design as design



@pytest.fixture(scope="module")
def sim():
    needs("verilator")
    with sparsa.open("sim", **SMALL, idle=0.3, backpressure=0.3, seed=1) as acc:
        yield acc


def shapes():
    """Non-multiples of the 4x4 tile, K and N past the build's limits (split), tiny and tall."""
    return [(1, 1, 1), (5, 7, 9), (4, 64, 48), (13, 100, 50), (9, 30, 100), (70, 20, 3),
            (6, 150, 60)]


def test_sim_matches_reference(sim):
    rng = np.random.default_rng(2)
    reference = sparsa.open("reference", **SMALL)
    assert sim.info == reference.info
    for index, (m, k, n) in enumerate(shapes()):
        a = rng.integers(-128, 128, (m, k), dtype=np.int8)
        b = rng.integers(-128, 128, (k, n), dtype=np.int8)
        a[rng.random((m, k)) < 0.5] = 0
        a[rng.random(m) < 0.2] = 0  # padding rows and dead channels: left out by the driver
        b[:, rng.random(n) < 0.3] = 0
        bias = rng.integers(-2**31, 2**31, n, dtype=np.int64).astype(np.int32)
        options = [{}, {"bias": bias, "relu": True},
                   {"bias": bias, "requant": (int(rng.integers(1 << 30, 2**31)),
                                              int(rng.integers(0, 12)), -5), "relu": True},
                   {"requant": (-2**31, 0, 127), "sparse_skip": False},
                   {"bias": bias, "relu": True,  # per-column multipliers: CHANNEL_QUANT
                    "requant": (rng.integers(-2**31, 2**31, n), int(rng.integers(0, 12)), 3)}]
        for option in options:
            label = f"M={m} K={k} N={n} {sorted(option)}"
            got = sim.matmul(a, b, **option)
            want = reference.matmul(a, b, **option)
            assert got.dtype == want.dtype and np.array_equal(got, want), label
            assert np.array_equal(got, golden.gemm(a, b, option.get("bias"),
                                                   option.get("requant"),
                                                   option.get("relu", False))), label
            measured, estimated = sim.last_counters, reference.last_counters
            assert measured["estimated"] is False and estimated["estimated"] is True
            for key in ("macs", "macs_skipped", "ksteps_skipped"):
                assert measured[key] == estimated[key], (label, key)
            needs_job = bool(a.any() and b.any()) or option.get("sparse_skip") is False
            assert (measured["cycles"] > 0) == needs_job, label


def test_sim_sparse_weights_past_max_k(sim):
    """2:4 and 1:4 weights with K past MAX_K (64 here) run on the RTL as single jobs in fewer
    slots per group (up to MAX_K2 = 128 and MAX_K1 = 256), post-processing on the device:
    exact, with the reference's exact counters."""
    from sparsa.sim import patterns

    rng = np.random.default_rng(4)
    reference = sparsa.open("reference", **SMALL)
    assert (sim.info.max_k2, sim.info.max_k1) == (128, 256)
    written = []
    sim._write = lambda name, value: (  # noqa: E731  (the driver's register writes, recorded)
        written.append((name, value)), type(sim)._write(sim, name, value))
    try:
        for keep, k in ((2, 126), (1, 256)):
            a = patterns.relu_like(rng, (7, k), 0.3)
            b = patterns.n_of_m(rng, (k, 10), keep, 4)
            bias = rng.integers(-2**20, 2**20, 10, dtype=np.int32)
            requant = (1 << 30, 5, 2)
            written.clear()
            got = sim.matmul(a, b, bias=bias, requant=requant, relu=True)
            assert np.array_equal(got, golden.gemm(a, b, bias, requant, True)), (keep, k)
            steps = {2: protocol.Option.STEPS_2, 1: protocol.Option.STEPS_1}[keep]
            assert [value for name, value in written if name == "K"] == [k]
            (options,) = [value for name, value in written if name == "OPTIONS"]
            assert options & steps and options & protocol.Option.BIAS, (keep, k)
            reference.matmul(a, b, bias=bias, requant=requant, relu=True)
            measured, estimated = sim.last_counters, reference.last_counters
            for key in ("macs", "macs_skipped", "ksteps_skipped"):
                assert measured[key] == estimated[key], (keep, k, key)
            # B's steps per tile: at most keep per group of four k-steps.
            tiles = 2 * 3  # m-tiles x n-tiles of the 4x4 build
            assert measured["ksteps_skipped"] >= tiles * (k - keep * -(-k // 4))
    finally:
        del sim._write


def test_int8_cnn_on_sim_matches_reference(sim):
    """A quantized CNN (im2col convolutions, per-channel requantization on the device between
    layers) gives the reference backend's integers, with the same work counters."""
    from sparsa.host import model

    rng = np.random.default_rng(5)
    layers = [
        model.Conv2d(rng.normal(0, 0.3, (6, 2, 3, 3)), rng.normal(0, 0.1, 6), padding=1,
                     relu=True),
        model.Conv2d(rng.normal(0, 0.2, (5, 6, 3, 3)), rng.normal(0, 0.1, 5), stride=2,
                     relu=True),
        model.Flatten(),
        model.Linear(rng.normal(0, 0.1, (7, 5 * 3 * 3)), rng.normal(0, 0.1, 7)),
    ]
    qmodel = model.quantize_model(layers, rng.normal(0, 1, (16, 2, 7, 7)))
    x_q = qmodel.quantize_input(rng.normal(0, 1, (4, 2, 7, 7)))
    results = []
    for acc in (sim, sparsa.open("reference", **SMALL)):
        qmodel.reset_counters()
        results.append((qmodel.run_int(acc, x_q), [dict(c) for c in qmodel.counters]))
    (got, measured), (want, estimated) = results
    assert got.dtype == np.int32 and np.array_equal(got, want)
    for layer, (m, e) in enumerate(zip(measured, estimated)):
        for key in ("macs", "macs_skipped", "ksteps_skipped", "zero_activation_products"):
            assert m[key] == e[key], (layer, key)


def test_compiled_onnx_model_on_sim_matches_reference(sim, tmp_path):
    """An ONNX CNN quantized by onnxruntime (QOperator, uint8 activations, per-channel weights:
    grouped, 1x1 and padded convolutions, a Gemm, host pooling and residual ops) compiled by
    sparsa.onnx: the simulated RTL gives the reference backend's outputs and every
    intermediate tensor, with the same work counters."""
    pytest.importorskip("onnxruntime")
    import onnx_models  # tests/onnx_models.py

    from sparsa import onnx as sparsa_onnx

    rng = np.random.default_rng(6)
    model = onnx_models.quantize_static(
        onnx_models.cnn(rng), rng.standard_normal((32, 1, 8, 8)).astype(np.float32), tmp_path,
        "QOperator", "QUInt8", True)
    compiled = sparsa_onnx.compile(model)
    x = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
    names = [out for node in compiled.nodes for out in node.outputs]
    results = []
    for acc in (sim, sparsa.open("reference", **SMALL)):
        outputs, tensors = compiled.run(acc, x, keep=names)
        results.append((outputs, tensors, compiled.last_run))
    (got, got_tensors, measured), (want, want_tensors, estimated) = results
    assert all(np.array_equal(g, w) for g, w in zip(got, want))
    assert all(np.array_equal(got_tensors[n], want_tensors[n]) for n in names)
    for m, e in zip(measured, estimated):
        assert (m["macs"], m["macs_skipped"], m["jobs"]) == (e["macs"], e["macs_skipped"],
                                                              e["jobs"])
        assert m["estimated"] is False and (m["cycles"] > 0) == (m["jobs"] > 0)


def test_sim_refused_job_raises_device_error(sim):
    """A job the device refuses comes back as a DeviceError naming the error code, and the
    next job works."""
    a = np.ones((4, 70), np.int8)
    b = np.ones((70, 4), np.int8)
    job = jobs.Job(0, 4, 0, 70, 0, 4, 0, protocol.RESET_QUANT, 4 * 140, 4 * 16)
    with pytest.raises(driver.DeviceError, match="K_TOO_LARGE"):
        sim.run_job(job, a, b, None, np.zeros((4, 4), np.int32))
    assert np.array_equal(sim.matmul(a[:, :60], b[:60]), np.full((4, 4), 60, np.int32))


def test_driver_inside_cocotb(tmp_path, verilator):
    """The same driver, run by a cocotb test through cocotb.task.bridge, on the default build."""
    rng = np.random.default_rng(3)
    arrays = {}
    cases = [(1, 1, 1, False), (17, 40, 30, True), (8, 300, 9, True), (33, 20, 260, False)]
    for index, (m, k, n, options) in enumerate(cases):
        arrays[f"a{index}"] = rng.integers(-128, 128, (m, k), dtype=np.int8)
        arrays[f"b{index}"] = rng.integers(-128, 128, (k, n), dtype=np.int8)
        arrays[f"relu{index}"] = options
        if options:
            arrays[f"bias{index}"] = rng.integers(-9999, 9999, n, dtype=np.int32)
            arrays[f"requant{index}"] = np.array([1 << 30, 9, 3])
    np.savez(tmp_path / "jobs.npz", count=len(cases), **arrays)
    report = tmp_path / "report.json"
    runner.check(design(DEFAULT), "verilator", "sparsa.sim.host_tb", "test_driver",
                 {**DEFAULT, "jobs": str(tmp_path / "jobs.npz"), "report": str(report),
                  "idle": 0.2, "backpressure": 0.2})
    rows = json.loads(report.read_text())
    assert [(row["m"], row["k"], row["n"]) for row in rows] == [case[:3] for case in cases]
    assert all(row["cycles"] > 0 and row["estimated"] is False for row in rows)


def test_sim_backend_on_icarus(icarus):
    """The sim backend on the other simulator (the 3x5 build the Icarus smoke test uses)."""
    odd = ODD
    rng = np.random.default_rng(4)
    a = rng.integers(-128, 128, (7, 40), dtype=np.int8)  # K past max_k: two jobs
    b = rng.integers(-128, 128, (40, 12), dtype=np.int8)
    bias = rng.integers(-9999, 9999, 12, dtype=np.int32)
    with sparsa.open("sim", simulator="icarus", **odd, backpressure=0.3) as acc:
        got = acc.matmul(a, b, bias=bias, requant=(1 << 30, 6, 2), relu=True)
    assert np.array_equal(got, golden.gemm(a, b, bias, (1 << 30, 6, 2), True))


def test_demo_on_small_build(tmp_path, capsys, verilator):
    """The README's main job end to end on a 4x4 build (60 images on the simulated RTL): both
    models' outputs identical on both backends, INT8 accuracy within 2 points of float, equal
    to onnxruntime running the model's graph as written; the same with 2:4-pruned weights."""
    pytest.importorskip("skl2onnx")
    pytest.importorskip("onnxruntime")
    from sparsa import cli

    report = tmp_path / "demo.json"
    build = ["--rows", "4", "--cols", "4", "--stream-width", "32", "--max-k", "64",
             "--max-n", "48"]
    assert cli.main(["demo", *build, "--images", "60", "--json", str(report)]) == 0
    figures = json.loads(report.read_text())
    assert set(figures["models"]) == {"MLP", "CNN"}
    for name, row in figures["models"].items():
        assert row["identical"] == figures["sim_images"] == 60, name
        assert row["int8_accuracy"] >= row["float_accuracy"] - 0.02, name
        assert row["top1_agreement_unfused"] >= 0.995, name
        assert row["node_agreement"] >= 0.999 and row["node_max_difference"] <= 1, name
        assert 0 < row["macs_skipped"] < row["products"] and row["cycles"] > 0, name
        pruned = row["pruned"]  # its weights pruned 2:4: half of them zero, outputs exact
        assert pruned["identical"] == 60 and pruned["cycles"] > 0, name
        assert pruned["weight_zeros"] >= 0.45, name
        assert pruned["int8_accuracy"] >= pruned["float_accuracy"] - 0.03, name
    out = capsys.readouterr().out
    assert out.count("outputs identical to the reference for 60 of 60 images") == 2
    assert "per-layer report" in out and "conv2" in out


def test_bench_all_writes_results(tmp_path, verilator):
    """sparsa bench all (tiny sizes, 4x4 build): JSON, markdown table and three plots."""
    from sparsa import cli

    build = ["--rows", "4", "--cols", "4", "--stream-width", "32", "--max-k", "64",
             "--max-n", "48"]
    assert cli.main(["bench", "all", *build, "--sizes", "8", "24", "--size", "32",
                     "--host-sizes", "32", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [row["m"] for row in results["array"]] == [8, 24]
    for row in results["array"]:
        assert row["cycles"] >= max(row["bound_cycles"].values())  # no run beats its bound
    assert results["sparse"][0]["pattern"] == "dense" and len(results["sparse"]) == 13
    for row in results["sparse"]:
        assert row["cycles"] >= max(row["bound_cycles"].values()), row["pattern"]
    assert all(row["macs_skipped"] == row["macs_skipped_expected"] for row in results["sparse"])
    # The host's cases (half the rows of A or columns of B zero) take about half the cycles.
    host_rows = [row for row in results["sparse"] if "(host)" in row["pattern"]]
    assert len(host_rows) == 2 and all(row["speedup"] > 1.3 for row in host_rows)
    assert results["host"][0]["exact"] is True
    table = (tmp_path / "results.md").read_text()
    assert "| 24 | " in table and "block-sparse B 75%" in table and "1:4 B" in table
    for plot in ("utilization.png", "sparse_speedup.png", "host_speed.png"):
        assert (tmp_path / plot).read_bytes()[:4] == b"\x89PNG"


def test_selftest_on_sim(sim):
    """``sparsa selftest``'s job set on the simulated RTL (4x4 build, stream pauses): every
    job exact against the golden model, device cycles counted, the time split reported."""
    from sparsa import selftest

    report = selftest.run(sim, max_size=64)
    assert report["registers"]["ROWS"] == 4 and report["registers"]["MAX_K"] == 64
    assert [job["exact"] for job in report["jobs"]] == [True] * len(report["jobs"])
    assert len(report["jobs"]) == 14 and report["passed"]
    for job in report["jobs"]:
        assert job["cycles"] > 0 and not job["estimated"]
        assert job["device_s"] > 0 and job["pack_s"] > 0 and job["implied_mhz"] > 0
    assert report["overlap"] is None  # (the simulator's speed is no board's)


def test_unclosed_sim_exits_quietly(verilator):
    """``sparsa.open("sim")`` left open: closed at interpreter exit without output."""
    program = ("import numpy as np, sparsa\n"
               f"acc = sparsa.open('sim', **{SMALL!r})\n"
               "acc.matmul(np.ones((3, 3), np.int8), np.ones((3, 3), np.int8))\n")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""


def test_sim_shared_by_threads(sim):
    """Two threads on one simulated board take turns: each gets its own results, and its own
    calls' work counters under ``acc.lock`` (the cycles move with the random stream pauses)."""
    from builds import concurrent_matmuls

    assert concurrent_matmuls(sim, threads=2, calls=6, seed=3, max_size=20,
                              counters=("macs", "macs_skipped", "ksteps_skipped")) == []


def test_frozen_simulator_raises_instead_of_hanging(verilator, monkeypatch):
    """A simulator stopped (SIGSTOP) in the middle of a job: the job ends in a DeviceError
    naming the job and the simulator once a reply is overdue, and close() ends the simulator
    rather than waiting for it."""
    monkeypatch.setattr(simulation, "REPLY_SECONDS", 1.0)
    acc = sparsa.open("sim", **SMALL)
    pid = acc.transport.simulator.pid
    channel = acc.transport.dma.sendchannel
    original = channel.transfer

    def transfer_then_freeze(*args):
        original(*args)
        os.kill(pid, signal.SIGSTOP)

    channel.transfer = transfer_then_freeze
    a = np.ones((9, 20), np.int8)
    result = {}
    thread = threading.Thread(target=lambda: result.update(
        error=pytest.raises(driver.DeviceError, acc.matmul, a, a.T.copy())), daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "matmul still blocked on the stopped simulator"
    message = str(result["error"].value)
    assert time.monotonic() - started < 20
    assert "job M=9 K=20 N=9 timed out" in message and f"pid {pid}" in message
    assert "did not answer 'dma_idle' within" in message
    started = time.monotonic()
    acc.close()
    assert time.monotonic() - started < 30
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_grouped_benchmark_on_the_rtl(verilator):
    """``sparsa bench grouped`` on a small build: both layouts exact on the RTL and the
    reference, the block-diagonal one in fewer jobs and fewer cycles."""
    from sparsa import bench

    rows = bench.run_grouped(SMALL, channels=12, size=4)
    batched, per_channel = rows
    assert all(r["rtl_exact"] and r["estimate_exact"] for r in rows)
    assert batched["groups_per_call"] == 7 and per_channel["rtl_jobs"] == 12
    assert batched["rtl_jobs"] == 2 and batched["rtl_cycles"] < per_channel["rtl_cycles"]
    assert "| block-diagonal | 12 | 16 | 7 | 2 |" in bench.format_grouped(rows)


def test_cycle_estimate_on_random_compiler_jobs(verilator):
    """The reference's cycles, stalls and work counters against the RTL's on random jobs of the
    shapes compiled models give (small K, N = 1, int8 output with the output stream the limit,
    bias, per-tensor and per-channel requantization, 2:4 weights in the group format, several
    m- and n-tiles) on the default build: MACs and STALL_IN exact, cycles and STALL_OUT within
    1% of the job's cycles (one cycle on jobs of under a hundred)."""
    rng = np.random.default_rng(11)
    worst = 0.0
    with sparsa.open("sim") as sim, sparsa.open("reference") as reference:
        for index in range(40):
            m = int(rng.choice([8, 30, 64, 100, 256]))
            k = int(rng.choice([1, 3, 9, 16, 27, 64, 72, 150, 256]))
            n = int(rng.choice([1, 8, 16, 40, 100]))
            a = rng.integers(-128, 128, (m, k), dtype=np.int8)
            a[a == 0] = 1
            if index % 4 == 1:
                a[rng.random((m, k)) < 0.5] = 0  # ReLU-like activations
            b = rng.integers(-128, 128, (k, n), dtype=np.int8)
            b[b == 0] = 1
            if index % 3 == 2 and k >= 4:
                b = sparsa.prune(b, "2:4")
            bias = rng.integers(-1000, 1000, n, dtype=np.int32) if index % 2 else None
            requant = None
            if index % 5 != 4:
                multiplier = rng.integers(1 << 29, 1 << 30, n) if index % 3 else 1 << 30
                requant = (multiplier, 10, 0)
            counters = []
            for acc in (sim, reference):
                acc.matmul(a, b, bias=bias, requant=requant, relu=requant is not None)
                counters.append(acc.last_counters)
            rtl, estimate = counters
            label = (index, m, k, n, bias is not None, requant is not None)
            assert (estimate["macs"], estimate["macs_skipped"], estimate["jobs"],
                    estimate["stall_in"]) == (rtl["macs"], rtl["macs_skipped"], rtl["jobs"],
                                              rtl["stall_in"]), label
            for name in ("cycles", "stall_out"):
                allowed = max(1, 0.01 * rtl["cycles"])
                assert abs(estimate[name] - rtl[name]) <= allowed, (label, name, rtl, estimate)
            if rtl["cycles"] >= 100:
                worst = max(worst, abs(estimate["cycles"] / rtl["cycles"] - 1))
    print(f"the estimate's largest cycle error against the RTL: {worst:.3%}")
    assert worst <= 0.01
