"""Benchmarks: cycle counts measured on the simulated RTL, printed as tables."""

import functools
import json
import tempfile
from pathlib import Path

from sparsa import protocol

DEFAULT_BUILD = {"rows": 8, "cols": 8, "stream_width": 64, "max_k": 256, "max_n": 256}


def accelerator_design(cfg):
    from sparsa.hw.verilog import ACCELERATOR_TOP, accelerator_verilog
    from sparsa.sim import runner

    key = "accel_{rows}x{cols}_w{stream_width}_k{max_k}_n{max_n}".format(**cfg)
    if not cfg.get("sparse_skip", True):
        key += "_dense"
    return runner.Design(key, ACCELERATOR_TOP, functools.partial(accelerator_verilog, **cfg))


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
    """Run ``jobs`` ((a, b, skip) triples) on the simulated accelerator, without pauses;
    returns the counters of each (dicts with m, k, n, skip and the protocol's COUNTERS)."""
    import numpy as np

    from sparsa.sim import runner

    with tempfile.TemporaryDirectory() as folder:
        job_file, report = Path(folder) / "jobs.npz", Path(folder) / "bench.json"
        arrays = {"count": len(jobs)}
        for index, (a, b, skip) in enumerate(jobs):
            arrays.update({f"a{index}": a, f"b{index}": b, f"skip{index}": skip})
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
    return jobs


def run_sparse(cfg=DEFAULT_BUILD, size=256, simulator="verilator", seed=0):
    """Cycles of each sparse pattern on the simulated RTL against the dense job; table rows."""
    from sparsa.sim import golden

    jobs = sparse_jobs(cfg, size, seed)
    measured = run_jobs([(a, b, True) for *_, a, b in jobs], cfg, simulator)
    dense_cycles = measured[0]["CYCLES"]
    g = protocol.Geometry(**cfg)
    rows = []
    for (name, operand, fraction, a, b), counters in zip(jobs, measured):
        expected = golden.sparse_counters(a, b, g.rows, g.cols)
        products = a.shape[0] * a.shape[1] * b.shape[1]
        rows.append({
            "pattern": name, "operand": operand, "zero_fraction": fraction,
            "cycles": counters["CYCLES"], "dense_cycles": dense_cycles,
            "speedup": dense_cycles / counters["CYCLES"],
            "macs_skipped": counters["MACS_SKIPPED"],
            "macs_skipped_expected": expected["MACS_SKIPPED"],
            "macs_skipped_fraction": counters["MACS_SKIPPED"] / products,
            "ksteps_skipped": counters["KSTEPS_SKIPPED"],
            "stall_in": counters["STALL_IN"], "stall_out": counters["STALL_OUT"],
        })
    return rows


def format_sparse(rows):
    lines = ["| pattern | zeros | cycles | vs dense | speedup | MACs skipped (RTL = NumPy) | "
             "k-steps skipped | stall in / out |",
             "|:---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        exact = "=" if r["macs_skipped"] == r["macs_skipped_expected"] else "!="
        lines.append(
            f"| {r['pattern']} | {100 * r['zero_fraction']:.1f}% | {r['cycles']} | "
            f"{r['cycles'] / r['dense_cycles']:.3f}x | {r['speedup']:.2f}x | "
            f"{100 * r['macs_skipped_fraction']:.1f}% ({r['macs_skipped']} {exact} "
            f"{r['macs_skipped_expected']}) | {r['ksteps_skipped']} | "
            f"{r['stall_in']} / {r['stall_out']} |")
    return "\n".join(lines)


def plot_sparse(rows, path, title="sparsa sparse-skip"):
    """Speedup against zero fraction, with the ideal 1 / (1 - zeros) line, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

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
