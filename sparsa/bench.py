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


def run_dense(shapes, cfg=DEFAULT_BUILD, simulator="verilator"):
    """Run dense int32 jobs of ``shapes`` on the simulated accelerator; returns table rows."""
    from sparsa.sim import runner

    g = protocol.Geometry(**cfg)
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "bench.json"
        result = runner.run(accelerator_design(cfg), simulator, "sparsa.sim.accel_tb",
                            "test_bench", {**cfg, "shapes": shapes, "report": str(report)})
        if not result.passed:
            raise RuntimeError(f"benchmark simulation failed; log: {result.log}\n"
                               f"{result.log_tail()}")
        measured = json.loads(report.read_text())
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
