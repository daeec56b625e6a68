"""Benchmarks: cycle counts measured on the simulated RTL, printed as tables."""

import contextlib
import json
import os
import tempfile
from pathlib import Path

from sparsa import protocol
from sparsa.protocol import DEFAULT_BUILD
from sparsa.sim.runner import accelerator_design

def bounds(geometry, m, k, n):
    """Lower bounds on a job's cycles: the array's issue slots and each stream's beats."""
    g = geometry
    m_tiles, n_tiles = g.tiles(m, n)
    return {
        "compute": m_tiles * n_tiles * max(k, g.rows, g.cols),
        "input": g.input_beats(m, k, n, bias=False),
        "output": g.output_beats(m, n, requant=False),
    }


def run_jobs(jobs, cfg=DEFAULT_BUILD, simulator="verilator"):
    """Run ``jobs`` ((a, b, skip), (a, b, skip, groups): B in the group format with ``groups``,
    or (a, b, skip, groups, slots): with ``slots`` per group, by default the fewest that keep
    B's groups) on the simulated accelerator, without pauses; returns the counters of each
    (dicts with m, k, n, skip, groups and the protocol's COUNTERS)."""
    import numpy as np

    from sparsa.sim import runner

    with tempfile.TemporaryDirectory() as folder:
        job_file, report = Path(folder) / "jobs.npz", Path(folder) / "bench.json"
        arrays = {"count": len(jobs)}
        for index, (a, b, skip, *rest) in enumerate(jobs):
            arrays.update({f"a{index}": a, f"b{index}": b, f"skip{index}": skip,
                           f"groups{index}": bool(rest and rest[0])})
            if len(rest) > 1:
                arrays[f"slots{index}"] = rest[1]
        np.savez(job_file, **arrays)
        result = runner.run(accelerator_design(cfg), simulator, "sparsa.sim.accel_tb",
                            "test_bench", {**cfg, "jobs": str(job_file), "report": str(report)})
        if not result.passed:
            raise RuntimeError(f"benchmark simulation failed; log: {result.log}\n"
                               f"{result.log_tail()}")
        return json.loads(report.read_text())


def run_dense(shapes, cfg=DEFAULT_BUILD, simulator="verilator", seed=0):
    """Run dense int32 jobs of ``shapes`` on the simulated accelerator; returns table rows."""
    import numpy as np

    g = protocol.Geometry(**cfg)
    rng = np.random.default_rng(seed)
    measured = run_jobs([(rng.integers(-128, 128, (m, k), dtype=np.int8),
                          rng.integers(-128, 128, (k, n), dtype=np.int8), True)
                         for m, k, n in shapes], cfg, simulator)
    rows = []
    for job in measured:
        m, k, n = job["m"], job["k"], job["n"]
        limits = bounds(g, m, k, n)
        macs = m * k * n
        rows.append({
            "m": m, "k": k, "n": n, "rows": g.rows, "cols": g.cols,
            "stream_width": g.stream_width, "cycles": job["CYCLES"], "macs": macs,
            "utilization": macs / (job["CYCLES"] * g.rows * g.cols),
            "bound": max(limits, key=limits.get), "bound_cycles": limits,
            "stall_in": job["STALL_IN"], "stall_out": job["STALL_OUT"],
        })
    return rows


def format_dense(rows):
    lines = ["|   M |   K |   N | array | stream | cycles | MACs/cycle | utilization | "
             "bound (compute / in / out cycles) | stall in | stall out |",
             "|---:|---:|---:|:---:|---:|---:|---:|---:|:---|---:|---:|"]
    for r in rows:
        b = r["bound_cycles"]
        lines.append(
            f"| {r['m']} | {r['k']} | {r['n']} | {r['rows']}x{r['cols']} | "
            f"{r['stream_width']}b | {r['cycles']} | {r['macs'] / r['cycles']:.1f} | "
            f"{100 * r['utilization']:.1f}% | {r['bound']} ({b['compute']} / {b['input']} / "
            f"{b['output']}) | {r['stall_in']} | {r['stall_out']} |")
    return "\n".join(lines)


def sparse_jobs(cfg, size, seed=0):
    """The sparse benchmark's operand patterns: (name, sparse operand, zero fraction, a, b)."""
    import numpy as np

    from sparsa.sim import patterns

    rng = np.random.default_rng(seed)
    shape_a, shape_b = (size, size), (size, size)
    jobs = [("dense", "-", 0.0, patterns.dense(rng, shape_a), patterns.dense(rng, shape_b))]
    for fraction in (0.5, 0.9):
        a = patterns.relu_like(rng, shape_a, fraction)
        jobs.append((f"unstructured A {fraction:.0%}", "A", float(np.mean(a == 0)), a,
                     patterns.dense(rng, shape_b)))
    for fraction in (0.5, 0.75):
        b = patterns.block_sparse(rng, shape_b, fraction, cfg["rows"], cfg["cols"])
        jobs.append((f"block-sparse B {fraction:.0%}", "B", float(np.mean(b == 0)),
                     patterns.dense(rng, shape_a), b))
    b = patterns.two_four(rng, shape_b)
    jobs.append(("2:4 B", "B", float(np.mean(b == 0)), patterns.dense(rng, shape_a), b))
    b = patterns.n_of_m(rng, shape_b, 1, 4)
    jobs.append(("1:4 B", "B", float(np.mean(b == 0)), patterns.dense(rng, shape_a), b))
    for fraction in (0.5, 0.75, 0.9, 0.95):
        b = patterns.unstructured(rng, shape_b, fraction)
        jobs.append((f"unstructured B {fraction:.0%}", "B", float(np.mean(b == 0)),
                     patterns.dense(rng, shape_a), b))
    return jobs


def sparse_bounds(geometry, a, b, groups=False):
    """Lower bounds on the cycles of ``a @ b`` with sparse-skip (B in the group format with
    ``groups``): ``compute``, per output tile its issued steps (:func:`.golden.ksteps_issued`),
    at least one and at least the array's issue gap (``max(rows, cols)``); the streams' beats
    as for a dense job (:func:`bounds`), B's in its format."""
    import numpy as np

    from sparsa.sim import golden

    g = geometry
    (m, k), n = a.shape, b.shape[1]
    steps = golden.ksteps_issued(a, b, g.rows, g.cols, True, groups)  # [m-tile, n-tile]
    limits = bounds(g, m, k, n)
    limits["compute"] = int(np.maximum(steps, max(1, g.rows, g.cols)).sum())
    if groups:
        b_beats = protocol.group_beats(g, protocol.group_counts(b, g.cols))
        limits["input"] = g.input_beats(m, k, n, False, False, b_beats)
    return limits


def run_sparse(cfg=DEFAULT_BUILD, size=256, simulator="verilator", seed=0):
    """Cycles of each sparse pattern on the simulated RTL against the dense job, B in the
    format the driver picks for it (:func:`sparsa.host.reference.choose_format`); table rows
    (the device's patterns, then the host's cases of :func:`run_structural`)."""
    from sparsa.host import reference

    jobs = sparse_jobs(cfg, size, seed)
    g = protocol.Geometry(**cfg)
    formats = [reference.choose_format(g, a, b)[0] for *_, a, b in jobs]
    measured = run_jobs([(a, b, True, groups) for (*_, a, b), groups in zip(jobs, formats)],
                        cfg, simulator)
    dense_cycles = measured[0]["CYCLES"]
    rows = [_sparse_row(job, {name.lower(): value for name, value in counters.items()
                              if name in protocol.COUNTERS},
                        dense_cycles, g, groups=counters["groups"])
            for job, counters in zip(jobs, measured)]
    return rows + run_structural(cfg, size, simulator, seed, dense_cycles)


def _sparse_row(job, counters, dense_cycles, geometry, device_job=None, groups=False):
    """A sparse-benchmark table row: ``job`` (name, operand, zero fraction, a, b) and its
    counters (the driver's lower-case names); ``device_job``, the (a, b) the device ran, when
    the host changed it; ``groups``, B went in the group format."""
    from sparsa.host import reference
    from sparsa.sim import golden

    name, operand, fraction, a, b = job
    expected = golden.sparse_counters(a, b, geometry.rows, geometry.cols, True, groups)
    device_a, device_b = device_job or (a, b)
    limits = sparse_bounds(geometry, device_a, device_b, groups)
    estimate = reference.counters(geometry, device_a, device_b, True, False, groups)["CYCLES"]
    g, k = geometry, device_b.shape[0]
    plain_bytes = g.tiles(1, device_b.shape[1])[1] * k * g.vector_beats(g.cols) * g.beat_bytes
    group_bytes = protocol.group_beats(g, protocol.group_counts(device_b, g.cols)) * g.beat_bytes
    return {
        "pattern": name, "operand": operand, "zero_fraction": fraction,
        "b_format": "groups" if groups else "plain",
        "cycles": counters["cycles"], "dense_cycles": dense_cycles,
        "speedup": dense_cycles / counters["cycles"],
        "estimated_cycles": estimate,
        "macs_skipped": counters["macs_skipped"],
        "macs_skipped_expected": expected["MACS_SKIPPED"],
        "macs_skipped_fraction": counters["macs_skipped"] / (a.size * b.shape[1]),
        "ksteps_skipped": counters["ksteps_skipped"],
        "stall_in": counters["stall_in"], "stall_out": counters["stall_out"],
        "bound": max(limits, key=limits.get), "bound_cycles": limits,
        "b_plain_bytes": plain_bytes, "b_group_bytes": group_bytes,
    }


def structural_jobs(size, seed=0):
    """The host's cases: (name, operand, zero fraction, a, b) with whole rows of A (padding
    tokens, masked samples) or whole columns of B (dead output channels) zero."""
    import numpy as np

    from sparsa.sim import patterns

    rng = np.random.default_rng(seed)
    a, b = patterns.dense(rng, (size, size)), patterns.dense(rng, (size, size))
    dead = rng.permutation(size)[:size // 2]
    a_rows, b_cols = a.copy(), b.copy()
    a_rows[dead] = 0
    b_cols[:, dead] = 0
    return [("50% all-zero rows of A (host)", "A", 0.5, a_rows, b),
            ("50% all-zero columns of B (host)", "B", 0.5, a, b_cols)]


def run_structural(cfg=DEFAULT_BUILD, size=256, simulator="verilator", seed=0,
                   dense_cycles=None):
    """The host's cases through the driver on the simulated RTL (``sparsa.open("sim")``):
    the driver leaves the zero rows or columns out of the job; table rows like
    :func:`run_sparse`'s, against ``dense_cycles`` (default: the dense job run here)."""
    import numpy as np

    import sparsa
    from sparsa.host import reference
    from sparsa.sim import patterns

    g = protocol.Geometry(**cfg)
    rows = []
    with sparsa.open("sim", simulator=simulator, **cfg) as acc:
        if dense_cycles is None:
            rng = np.random.default_rng(seed)
            acc.matmul(patterns.dense(rng, (size, size)), patterns.dense(rng, (size, size)))
            dense_cycles = acc.last_counters["cycles"]
        for job in structural_jobs(size, seed):
            a, b = job[3], job[4]
            acc.matmul(a, b)
            # The job the device ran: the driver leaves out A's zero rows and B's zero columns.
            device_job = (a[a.any(axis=1)], b[:, b.any(axis=0)])
            groups = reference.choose_format(g, *device_job)[0]  # as the driver chose
            rows.append(_sparse_row(job, acc.last_counters, dense_cycles, g, device_job, groups))
    return rows


def run_long_k(cfg=DEFAULT_BUILD, size=128, simulator="verilator", seed=0):
    """2:4 and 1:4 weights with K past MAX_K on the simulated RTL (M = N = ``size``): one job
    with K = MAX_K2 (MAX_K1), B kept in 2 (1) slots per group, against the same product as
    jobs of K = MAX_K (what the device takes with 4 slots per group: B in the group format,
    the partial sums added on the host) and the dense product as such jobs (plain B); table
    rows."""
    import numpy as np

    from sparsa.sim import patterns

    g = protocol.Geometry(**cfg)
    rng = np.random.default_rng(seed)
    cases = []
    for name, keep in (("2:4 B", 2), ("1:4 B", 1)):
        k = g.max_k_for(protocol.slots_for(keep))
        a = patterns.dense(rng, (size, k))
        b, dense_b = patterns.n_of_m(rng, (k, size), keep, 4), patterns.dense(rng, (k, size))
        chunks = [slice(k0, k0 + g.max_k) for k0 in range(0, k, g.max_k)]
        cases.append((name, k, len(chunks), [(a, b, True, True)],
                      [(a[:, c], b[c], True, True, protocol.GROUP) for c in chunks],
                      [(a[:, c], dense_b[c], True) for c in chunks]))
    jobs = [job for case in cases for part in case[3:] for job in part]
    measured = iter(run_jobs(jobs, cfg, simulator))
    rows = []
    for name, k, split, *parts in cases:
        one, pieces, dense = ([next(measured) for _ in part] for part in parts)
        cycles = one[0]["CYCLES"]
        split_cycles = sum(job["CYCLES"] for job in pieces)
        dense_cycles = sum(job["CYCLES"] for job in dense)
        rows.append({"pattern": name, "m": size, "k": k, "n": size, "split_jobs": split,
                     "cycles": cycles, "split_cycles": split_cycles,
                     "dense_cycles": dense_cycles, "speedup": dense_cycles / cycles,
                     "over_split": split_cycles / cycles})
    return rows


def run_grouped(cfg=DEFAULT_BUILD, channels=96, size=8, simulator="verilator", seed=0):
    """A 3x3 depthwise convolution (``channels`` channels, a ``size`` x ``size`` int8 input,
    pads 1, requantized with ReLU: the jobs a compiled MobileNet block gives) through the
    driver on the simulated RTL: its groups side by side in block-diagonal B
    (:func:`sparsa.host.graph.group_batches`, what compiled models run) against one job per
    channel; table rows with the RTL's jobs and cycles and the reference's estimate."""
    import numpy as np

    import sparsa
    from sparsa.host.graph import block_diagonal, group_batches, im2col
    from sparsa.sim import golden

    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, (1, channels, size, size), dtype=np.int8)
    w = rng.integers(-128, 128, (channels, 9, 1), dtype=np.int8)
    patches, _ = im2col(x, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 0)
    requant = (1 << 30, 12, 0)
    want = np.concatenate([golden.gemm(patches[:, 9 * c:9 * c + 9], w[c], None, requant, True)
                           for c in range(channels)], axis=1)
    rows = []
    with sparsa.open("sim", simulator=simulator, **cfg) as sim, \
            sparsa.open("reference", **cfg) as reference:
        for layout, per_call in (("block-diagonal", group_batches(sim.info, channels, 9, 1)),
                                 ("one job per channel", 1)):
            row = {"layout": layout, "channels": channels, "m": patches.shape[0],
                   "groups_per_call": per_call, "calls": 0}
            for name, acc in (("rtl", sim), ("estimate", reference)):
                outs, totals = [], {"jobs": 0, "cycles": 0}
                for first in range(0, channels, per_call):
                    last = min(channels, first + per_call)
                    outs.append(acc.matmul(patches[:, 9 * first:9 * last],
                                           block_diagonal(w[first:last]), requant=requant,
                                           relu=True))
                    for key in totals:
                        totals[key] += acc.last_counters[key]
                row["calls"] = len(outs)
                row[f"{name}_jobs"], row[f"{name}_cycles"] = totals["jobs"], totals["cycles"]
                row[f"{name}_exact"] = bool(np.array_equal(np.concatenate(outs, axis=1), want))
            rows.append(row)
    return rows


def format_grouped(rows):
    lines = ["| layout | channels | M | groups per call | device jobs | cycles (RTL) | reference "
             "estimate | exact (RTL / reference) |", "|:---|---:|---:|---:|---:|---:|---:|:---|"]
    for r in rows:
        error = r["estimate_cycles"] / r["rtl_cycles"] - 1
        lines.append(f"| {r['layout']} | {r['channels']} | {r['m']} | {r['groups_per_call']} | "
                     f"{r['rtl_jobs']} | {r['rtl_cycles']} | {r['estimate_cycles']} "
                     f"({100 * error:+.1f}%) | {'yes' if r['rtl_exact'] else 'NO'} / "
                     f"{'yes' if r['estimate_exact'] else 'NO'} |")
    return "\n".join(lines)


def run_models(batches=(1, 32), repeats=5, seed=0, clock_mhz=100):
    """``sparsa bench models``: the MobileNetV2- and ResNet-18-style networks of
    :mod:`sparsa.models`, quantized by onnxruntime (QDQ; weights per channel and per tensor),
    compiled by sparsa; per model and batch, the reference backend's time against onnxruntime's
    on the same quantized model (best of ``repeats``, side by side, same machine), and per
    image the device jobs, the estimated device cycles (dense and with 2:4 weights) and the
    host's time; and on the timed device model at ``clock_mhz`` (8x8), the run's wall time
    against its host and device-busy totals. Table rows."""
    import tempfile
    import time

    import numpy as np
    import onnxruntime

    import sparsa
    from sparsa import models
    from sparsa import onnx as sparsa_onnx
    from sparsa.demo import quantize_with_onnxruntime

    rng = np.random.default_rng(seed)
    calibration = rng.standard_normal((16, *models.INPUT)).astype(np.float32)
    rows = []
    timed = sparsa.open("reference", device_model=True, clock_mhz=clock_mhz)
    with tempfile.TemporaryDirectory() as folder, sparsa.open("reference") as acc, timed:
        for name, build, per_channel in (("MobileNetV2-style", models.mobilenet_v2, True),
                                         ("ResNet-18-style", models.resnet18, False)):
            float_model = build(rng)
            compiled = {}
            for label, source in (("dense", float_model),
                                  ("2:4", sparsa_onnx.prune_weights(float_model, "2:4")[0])):
                source.graph.name = f"{float_model.graph.name}_{label.replace(':', 'of')}"
                quantized = quantize_with_onnxruntime(source, calibration, folder, per_channel)
                compiled[label] = (quantized, sparsa_onnx.compile(quantized))
            quantized, model = compiled["dense"]
            session = onnxruntime.InferenceSession(quantized.SerializeToString(),
                                                   providers=["CPUExecutionProvider"])
            for batch in batches:
                x = rng.standard_normal((batch, *models.INPUT)).astype(np.float32)
                ours, theirs = [], []
                for _ in range(repeats):  # side by side, each best of the repeats
                    started = time.perf_counter()
                    model.run(acc, x)
                    ours.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    session.run(None, {"x": x})
                    theirs.append(time.perf_counter() - started)
                counters = model.run_counters()
                host = sum(stats["host_s"] for stats in model.last_run)
                pruned = compiled["2:4"][1]
                pruned.run(acc, x)
                # The timed device model: host work beside the device's (micro-batches), the
                # run's wall time against the larger of its host and device-busy totals. (The
                # first run chooses each job's B format; the second is timed.)
                model.run(timed, x)
                model.run(timed, x)
                overlap = model.run_counters()
                rows.append({
                    "model": name, "batch": batch, "quantization": "QDQ, weights per " + (
                        "channel" if per_channel else "tensor"),
                    "jobs_per_image": counters["jobs"] / batch,
                    "cycles_per_image": counters["cycles"] / batch,
                    "cycles_2of4_per_image": pruned.run_counters()["cycles"] / batch,
                    "host_ms_per_image": 1e3 * host / batch,
                    "reference_ms": 1e3 * min(ours), "onnxruntime_ms": 1e3 * min(theirs),
                    "ratio": min(ours) / min(theirs),
                    "timed_wall_s": overlap["wall_s"], "timed_host_s": overlap["host_s"],
                    "timed_busy_s": overlap["busy_s"],
                    "timed_device_s": overlap["cycles"] / (clock_mhz * 1e6),
                    "timed_over_max": overlap["wall_s"] / max(overlap["host_s"],
                                                              overlap["busy_s"])})
    return rows


def format_models(rows):
    lines = ["| model | batch | device jobs per image | device cycles per image (estimated) | "
             "with 2:4 weights | reference ms | onnxruntime ms | reference / onnxruntime | "
             "timed device: wall s | host s | device busy s (at the clock) | wall / max |",
             "|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} ({r['quantization']}) | {r['batch']} | "
                     f"{r['jobs_per_image']:.4g} | {r['cycles_per_image']:.0f} | "
                     f"{r['cycles_2of4_per_image']:.0f} | "
                     f"{r['reference_ms']:.1f} | {r['onnxruntime_ms']:.1f} | "
                     f"{r['ratio']:.1f}x | {r['timed_wall_s']:.3f} | {r['timed_host_s']:.3f} | "
                     f"{r['timed_busy_s']:.3f} ({r['timed_device_s']:.3f}) | "
                     f"{r['timed_over_max']:.2f} |")
    return "\n".join(lines)


def plot_models(rows, path):
    """The networks' time: the reference against onnxruntime per model and batch, and on the
    timed device model the run's wall time against its host and device-busy totals, as a
    PNG."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=120)
    labels = [f"{r['model'].split('-')[0]}\nbatch {r['batch']}" for r in rows]
    at = range(len(rows))
    width = 0.38
    left.bar([x - width / 2 for x in at], [r["reference_ms"] / r["batch"] for r in rows],
             width, label="sparsa reference (bit-exact)")
    left.bar([x + width / 2 for x in at], [r["onnxruntime_ms"] / r["batch"] for r in rows],
             width, label="onnxruntime (same quantized model)")
    left.set_yscale("log")
    left.set_ylabel("ms per image (best of several)")
    left.set_xticks(list(at), labels, fontsize=8)
    left.set_title("CPU: reference backend vs onnxruntime", fontsize=10)
    left.legend(fontsize=8)
    width = 0.27
    for offset, key, label in ((-width, "timed_host_s", "host total"),
                               (0, "timed_busy_s", "device busy total"),
                               (width, "timed_wall_s", "run wall time")):
        right.bar([x + offset for x in at], [r[key] / r["batch"] * 1e3 for r in rows], width,
                  label=label)
    right.set_yscale("log")
    right.set_ylabel("ms per image")
    right.set_xticks(list(at), labels, fontsize=8)
    right.set_title("timed device model (8x8, 100 MHz), micro-batches",
                    fontsize=10)
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3, axis="y", which="both")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def format_long_k(rows):
    lines = ["| B | M x K x N | one job: cycles | jobs of K = MAX_K: cycles | dense, jobs of "
             "K = MAX_K: cycles | speedup over dense | over the split |",
             "|:---|:---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['pattern']} | {r['m']} x {r['k']} x {r['n']} | {r['cycles']} | "
                     f"{r['split_cycles']} ({r['split_jobs']} jobs) | {r['dense_cycles']} | "
                     f"{r['speedup']:.2f}x | {r['over_split']:.2f}x |")
    return "\n".join(lines)


def format_sparse(rows):
    lines = ["| pattern | zeros | B format | cycles | speedup | bound (compute / in / out cycles) "
             "| reference estimate | MACs skipped (RTL = NumPy) | k-steps skipped | "
             "stall in / out | B bytes: group format / plain |",
             "|:---|---:|:---|---:|---:|:---|---:|---:|---:|---:|---:|"]
    for r in rows:
        exact = "=" if r["macs_skipped"] == r["macs_skipped_expected"] else "!="
        b = r["bound_cycles"]
        error = r["estimated_cycles"] / r["cycles"] - 1
        lines.append(
            f"| {r['pattern']} | {100 * r['zero_fraction']:.1f}% | {r['b_format']} | "
            f"{r['cycles']} | {r['speedup']:.2f}x | {r['bound']} ({b['compute']} / "
            f"{b['input']} / {b['output']}) | {r['estimated_cycles']} ({100 * error:+.2f}%) | "
            f"{100 * r['macs_skipped_fraction']:.1f}% ({r['macs_skipped']} "
            f"{exact} {r['macs_skipped_expected']}) | {r['ksteps_skipped']} | "
            f"{r['stall_in']} / {r['stall_out']} | {r['b_group_bytes']} / {r['b_plain_bytes']} "
            f"({r['b_group_bytes'] / r['b_plain_bytes']:.3f}x) |")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sparse(rows, path, title="sparsa sparse-skip"):
    """Speedup against zero fraction, with the ideal 1 / (1 - zeros) line, as a PNG."""
    import numpy as np

    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    ideal = np.linspace(0, 0.92, 100)
    ax.plot(100 * ideal, 1 / (1 - ideal), "--", color="gray", label="ideal: 1 / (1 - zeros)")
    placed = []
    for r in rows:
        x, y = 100 * r["zero_fraction"], r["speedup"]
        # Points that coincide get their labels stacked instead of overprinted.
        stack = sum(1 for px, py in placed if abs(px - x) < 3 and abs(py - y) < 0.2)
        placed.append((x, y))
        ax.scatter(x, y, s=40)
        ax.annotate(r["pattern"], (x, y), textcoords="offset points",
                    xytext=(6, 6 - 12 * stack), fontsize=8)
    ax.set_xlabel("zero fraction of the sparse operand (%)")
    ax.set_ylabel("speedup over dense (cycles, RTL)")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(0, 6)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _best(function, budget=0.4, runs=(3, 50)):
    """The fastest of several runs of ``function`` (seconds): at least ``runs[0]``, then more
    while the total stays within ``budget`` seconds, at most ``runs[1]``."""
    import time

    best = float("inf")
    spent = 0.0
    count = 0
    while count < runs[0] or (count < runs[1] and spent < budget):
        started = time.perf_counter()
        function()
        elapsed = time.perf_counter() - started
        best = min(best, elapsed)
        spent += elapsed
        count += 1
    return best


def _onnxruntime_matmul_integer():
    """A runner of onnxruntime's fastest exact int8 x int8 -> int32 product, or None without
    it: ``MatMulInteger`` of A shifted to uint8 (``a ^ 0x80``, a zero point of 128, which MLAS
    corrects for in its kernel) and int8 B."""
    try:
        import onnxruntime
        from onnx import TensorProto, helper
    except ImportError:
        return None
    import numpy as np

    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["A", "B", "a_zero"], ["C"])], "matmul_integer",
        [helper.make_tensor_value_info("A", TensorProto.UINT8, ["M", "K"]),
         helper.make_tensor_value_info("B", TensorProto.INT8, ["K", "N"]),
         helper.make_tensor_value_info("a_zero", TensorProto.UINT8, [])],
        [helper.make_tensor_value_info("C", TensorProto.INT32, ["M", "N"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    options = onnxruntime.SessionOptions()
    # Its worker threads otherwise spin after each run, stealing the cores from what is timed next.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
    zero = np.array(128, np.uint8)
    return lambda a, b: session.run(None, {"A": a.view(np.uint8) ^ np.uint8(0x80), "B": b,
                                           "a_zero": zero})[0]


@contextlib.contextmanager
def _numpy_only():
    """The reference backend without onnxruntime's kernels (as on a board), for a while."""
    saved = os.environ.get("SPARSA_CPU_KERNELS")
    os.environ["SPARSA_CPU_KERNELS"] = "numpy"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["SPARSA_CPU_KERNELS"]
        else:
            os.environ["SPARSA_CPU_KERNELS"] = saved


def run_host(sizes=(256, 512, 1024), seed=0):
    """The host runtime's speed: the reference backend against NumPy int32 and float32 matmul
    (and onnxruntime's MatMulInteger when installed), plus the driver's packing throughput
    against ``np.copyto`` on the same bytes. Table rows."""
    import numpy as np

    import sparsa
    from sparsa.host import jobs
    from sparsa.sim import golden

    acc = sparsa.open("reference")
    g = acc.info.geometry
    onnx_matmul = _onnxruntime_matmul_integer()
    rng = np.random.default_rng(seed)
    rows = []
    for size in sizes:
        m = k = n = size
        a = rng.integers(-128, 128, (m, k), dtype=np.int8)
        b = rng.integers(-128, 128, (k, n), dtype=np.int8)
        # What the driver does on the host for a device run of this GEMM: pack every job's
        # input packet, unpack every output packet (adding K chunks). Measured before the
        # GEMMs: BLAS threads still spinning after a GEMM slow a copy down.
        plan = jobs.plan(g, m, k, n)
        send = np.empty(max(job.input_bytes for job in plan.jobs), np.uint8)
        receive = np.zeros(max(job.output_bytes for job in plan.jobs), np.uint8)
        out = np.empty((m, n), np.int32)

        def pack_and_unpack():
            for job in plan.jobs:
                jobs.pack_into(g, send, *job.operands(a, b))
                jobs.unpack_into(g, receive, out[job.m0:job.m0 + job.m, job.n0:job.n0 + job.n],
                                 False, accumulate=job.k0 > 0)

        moved = sum(job.input_bytes + job.output_bytes for job in plan.jobs)
        source, target = np.ones(moved, np.uint8), np.ones(moved, np.uint8)
        row = {"m": m, "k": k, "n": n,
               "pack_gbps": moved / _best(pack_and_unpack) / 1e9,
               "copy_gbps": moved / _best(lambda: np.copyto(target, source)) / 1e9}
        a_float, b_float = a.astype(np.float32), b.astype(np.float32)
        result = acc.matmul(a, b)
        exact = bool(np.array_equal(result, golden.matmul_int32(a, b)))
        with _numpy_only():
            numpy_only = sparsa.open("reference")
            exact = exact and bool(np.array_equal(numpy_only.matmul(a, b), result))
            reference_numpy = _best(lambda: numpy_only.matmul(a, b))
        row.update({
            "reference_s": _best(lambda: acc.matmul(a, b)),
            "reference_numpy_s": reference_numpy,
            "numpy_int32_s": _best(lambda: a.astype(np.int32) @ b.astype(np.int32),
                                   budget=2.0, runs=(2, 10)),
            "numpy_float32_s": _best(lambda: a_float @ b_float),
            "exact": exact})
        if onnx_matmul is not None:
            row["onnxruntime_s"] = _best(lambda: onnx_matmul(a, b))
            row["exact"] = exact and bool(np.array_equal(onnx_matmul(a, b), result))
        rows.append(row)
    return rows


def format_host(rows):
    onnx = any("onnxruntime_s" in r for r in rows)
    lines = ["| M=K=N | reference | reference, NumPy only | NumPy int32 | NumPy float32 | "
             + ("onnxruntime MatMulInteger (uint8 A) | reference / onnxruntime | " if onnx else "")
             + "bit-exact | pack+unpack | np.copyto | ratio |",
             "|---:|---:|---:|---:|---:|" + ("---:|---:|" if onnx else "") + ":---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['m']} | {1e3 * r['reference_s']:.2f} ms | "
            f"{1e3 * r['reference_numpy_s']:.2f} ms | {1e3 * r['numpy_int32_s']:.1f} ms | "
            f"{1e3 * r['numpy_float32_s']:.2f} ms | "
            + (f"{1e3 * r['onnxruntime_s']:.2f} ms | "
               f"{r['reference_s'] / r['onnxruntime_s']:.2f}x | " if onnx else "")
            + f"{'yes' if r['exact'] else 'NO'} | {r['pack_gbps']:.2f} GB/s | "
            f"{r['copy_gbps']:.2f} GB/s | {100 * r['pack_gbps'] / r['copy_gbps']:.0f}% |")
    return "\n".join(lines)


def plot_dense(rows, path, title):
    """Utilization against size for dense cubes, as a PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    sizes = [r["m"] for r in rows]
    ax.plot(sizes, [100 * r["utilization"] for r in rows], "o-", label="measured (RTL cycles)")
    for r in rows:
        ax.annotate(f"{100 * r['utilization']:.1f}%", (r["m"], 100 * r["utilization"]),
                    textcoords="offset points", xytext=(-10, -14), fontsize=8)
    ax.axhline(100, color="gray", ls="--", label="peak: rows x cols MACs per cycle")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("M = K = N")
    ax.set_ylabel("array utilization (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_host(rows, path, title):
    """Time per GEMM of the reference backend against NumPy (and onnxruntime), as a PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    sizes = [r["m"] for r in rows]
    series = [("reference_s", "sparsa reference backend (int8, bit-exact)", "o-"),
              ("reference_numpy_s", "sparsa reference backend, NumPy only", "o:"),
              ("numpy_int32_s", "NumPy int32 matmul", "s--"),
              ("numpy_float32_s", "NumPy float32 matmul (BLAS, not exact)", "^:"),
              ("onnxruntime_s", "onnxruntime MatMulInteger (uint8 A)", "d-.")]
    for key, label, style in series:
        if all(key in r for r in rows):
            ax.plot(sizes, [1e3 * r[key] for r in rows], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("M = K = N")
    ax.set_ylabel("time per GEMM (ms, best of several runs)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def machine():
    """Where the figures were measured."""
    import os
    import platform

    import numpy as np

    from sparsa.sim import toolchain

    return {"python": platform.python_version(), "numpy": np.__version__,
            "machine": platform.machine(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "verilator": toolchain.version("verilator")}


def markdown(results):
    """The short tables the README quotes, each with how it was measured."""
    build = results["build"]
    where = results["measured_on"]
    geometry = f"{build['rows']}x{build['cols']} array, {build['stream_width']}-bit streams"
    lines = [f"Measured with `sparsa bench all` on {where['cpus']} {where['machine']} cores, "
             f"Python {where['python']}, NumPy {where['numpy']}, "
             f"Verilator {where['verilator']}.", ""]
    lines += [f"**Dense GEMM on the RTL** ({geometry}; int32 output; cycles from START to the "
              f"last output beat, counted by the device):", "",
              "| M=K=N | cycles | MACs/cycle | utilization |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['m']} | {r['cycles']} | {r['macs'] / r['cycles']:.1f} | "
              f"{100 * r['utilization']:.1f}% |" for r in results["array"]]
    size = results["sparse"][0]["size"] if results["sparse"] else ""
    lines += ["", f"**Sparse-skip on the RTL** ({geometry}, M=K=N={size}; speedup = dense "
              f"cycles / cycles; B in the format the driver picks; reference estimate: the "
              f"reference backend's cycles against the RTL's; MACs skipped counted by the "
              f"device):", "",
              "| pattern | zeros | B format | cycles | speedup | bound | reference estimate | "
              "MACs skipped |",
              "|:---|---:|:---|---:|---:|:---|---:|---:|"]
    lines += [f"| {r['pattern']} | {100 * r['zero_fraction']:.0f}% | {r['b_format']} | "
              f"{r['cycles']} | {r['speedup']:.2f}x | {r['bound']} | "
              f"{100 * (r['estimated_cycles'] / r['cycles'] - 1):+.2f}% | "
              f"{100 * r['macs_skipped_fraction']:.1f}% |"
              for r in results["sparse"]]
    onnx = all("onnxruntime_s" in r for r in results["host"])
    lines += ["", "**Reference backend on the CPU** (int8 x int8 -> int32, bit-exact; best of "
              "several runs):", "",
              "| M=K=N | reference | NumPy int32 | speedup | NumPy float32 | ref / float32 |"
              + (" onnxruntime |" if onnx else ""),
              "|---:|---:|---:|---:|---:|---:|" + ("---:|" if onnx else "")]
    lines += [f"| {r['m']} | {1e3 * r['reference_s']:.2f} ms | {1e3 * r['numpy_int32_s']:.1f} ms "
              f"| {r['numpy_int32_s'] / r['reference_s']:.0f}x | "
              f"{1e3 * r['numpy_float32_s']:.2f} ms | "
              f"{r['reference_s'] / r['numpy_float32_s']:.2f}x |"
              + (f" {1e3 * r['onnxruntime_s']:.2f} ms |" if onnx else "")
              for r in results["host"]]
    return "\n".join(lines) + "\n"


def run_all(cfg=DEFAULT_BUILD, simulator="verilator", out=Path("bench"),
            array_sizes=(16, 32, 64, 128, 256), sparse_size=256, host_sizes=(256, 512, 1024),
            log=print):
    """Every benchmark: writes ``results.json``, ``results.md`` and three PNG plots into
    ``out``; returns the results."""
    import time

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    geometry = f"{cfg['rows']}x{cfg['cols']} array, {cfg['stream_width']}-bit streams"
    results = {"build": dict(cfg), "simulator": simulator, "measured_on": machine(),
               "date": time.strftime("%Y-%m-%d")}
    started = time.perf_counter()
    log(f"bench array: dense cubes {list(array_sizes)} on the simulated RTL ({simulator}) ...")
    results["array"] = run_dense([[s, s, s] for s in array_sizes], cfg, simulator)
    log(format_dense(results["array"]))
    log(f"bench sparse: M=K=N={sparse_size} ...")
    results["sparse"] = [{**r, "size": sparse_size}
                         for r in run_sparse(cfg, sparse_size, simulator)]
    log(format_sparse(results["sparse"]))
    log(f"bench host: {list(host_sizes)} ...")
    results["host"] = run_host(host_sizes)
    log(format_host(results["host"]))
    results["seconds"] = round(time.perf_counter() - started, 1)

    plot_dense(results["array"], out / "utilization.png",
               f"sparsa dense GEMM: {geometry}, RTL cycles ({simulator})")
    plot_sparse(results["sparse"], out / "sparse_speedup.png",
                f"sparsa sparse-skip: {geometry}, M=K=N={sparse_size}, RTL cycles ({simulator})")
    plot_host(results["host"], out / "host_speed.png",
              f"sparsa reference backend vs NumPy: {results['measured_on']['cpus']} CPU cores")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    log(f"wrote {out}/results.json, results.md, utilization.png, sparse_speedup.png, "
        f"host_speed.png ({results['seconds']:.0f} s)")
    return results
