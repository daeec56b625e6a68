"""The ``sparsa`` command line."""

import argparse
import functools
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def _dimension(text):
    from sparsa.hw.array import MAX_DIMENSION

    value = _positive(text)
    if value > MAX_DIMENSION:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_DIMENSION}, not {text}")
    return value


def cmd_verilog(args):
    from sparsa.hw.verilog import ARRAY_TOP, array_verilog

    text = array_verilog(args.rows, args.cols, name=args.name or ARRAY_TOP)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output} ({args.rows}x{args.cols} array, {len(text.splitlines())} lines)")
    if args.lint:
        from sparsa.sim import toolchain

        ok, report = toolchain.lint(args.output)
        print("verilator --lint-only -Wall: " + ("clean" if ok else "FAILED\n" + report))
        return 0 if ok else 1
    return 0


def tile_jobs(a, b, rows, cols):
    """Split C = A @ B into rows x cols output tiles (zero-padded); each tile is one array pass."""
    m, n = a.shape[0], b.shape[1]
    pad_m, pad_n = -m % rows, -n % cols
    a = np.pad(a, ((0, pad_m), (0, 0)))
    b = np.pad(b, ((0, 0), (0, pad_n)))
    return [(a[i:i + rows], b[:, j:j + cols])
            for i in range(0, a.shape[0], rows) for j in range(0, b.shape[1], cols)]


def untile(results, m, n, rows, cols):
    tiles_n = -(-n // cols)
    c = np.zeros((-(-m // rows) * rows, tiles_n * cols), np.int32)
    for t, tile in enumerate(results):
        i, j = divmod(t, tiles_n)
        c[i * rows:(i + 1) * rows, j * cols:(j + 1) * cols] = tile
    return c[:m, :n]


def cmd_demo(args):
    from sparsa.hw.verilog import ARRAY_TOP, array_verilog
    from sparsa.sim import golden, runner, toolchain

    reason = toolchain.missing(args.sim)
    if reason:
        print(f"cannot run the demo: {reason}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    a = rng.integers(-128, 128, (args.m, args.k), dtype=np.int8)
    b = rng.integers(-128, 128, (args.k, args.n), dtype=np.int8)
    b[rng.random(b.shape) < 0.25] = 0
    tiles = tile_jobs(a, b, args.rows, args.cols)

    design = runner.Design(f"array_{args.rows}x{args.cols}", ARRAY_TOP,
                           functools.partial(array_verilog, args.rows, args.cols))
    print(f"sparsa demo: C = A({args.m}x{args.k}) @ B({args.k}x{args.n}), int8 -> int32, "
          f"on a {args.rows}x{args.cols} output-stationary array simulated by {args.sim}")
    started = time.perf_counter()
    runner.build(design, args.sim)
    print(f"  Verilog generated and built in {time.perf_counter() - started:.1f} s "
          f"({runner.build_root()})")
    with tempfile.TemporaryDirectory() as folder:
        job, report = Path(folder) / "job.npz", Path(folder) / "report.npz"
        np.savez(job, tiles=len(tiles), **{f"a{t}": ta for t, (ta, _) in enumerate(tiles)},
                 **{f"b{t}": tb for t, (_, tb) in enumerate(tiles)})
        result = runner.run(design, args.sim, "sparsa.sim.array_tb", "test_job",
                            {"rows": args.rows, "cols": args.cols, "job": str(job),
                             "report": str(report)})
        if not result.passed:
            print(f"  simulation failed, see {result.results_xml}", file=sys.stderr)
            return 1
        out = np.load(report)
        c = untile([out[f"c{t}"] for t in range(len(tiles))], args.m, args.n, args.rows, args.cols)
        cycles, seconds = int(out["cycles"]), float(out["seconds"])
    want = golden.matmul_int32(a, b)
    exact = np.array_equal(c, want)
    macs = args.m * args.k * args.n
    print(f"  {len(tiles)} tiles of K={args.k}: {cycles} cycles, {macs} MACs "
          f"({macs / cycles:.1f} MACs/cycle), simulated at {cycles / seconds:,.0f} cycles/s")
    print(f"  check against NumPy (int64 matmul wrapped to int32): "
          f"{'bit-exact' if exact else 'MISMATCH'} ({np.count_nonzero(c != want)} of {c.size} differ)")
    print("  C[:4, :8] =\n" + "\n".join("    " + " ".join(f"{v:8d}" for v in row)
                                        for row in c[:4, :8]))
    return 0 if exact else 1


def build_parser():
    parser = argparse.ArgumentParser(prog="sparsa", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    verilog = commands.add_parser("verilog", help="write the Verilog of a systolic array")
    verilog.add_argument("--rows", type=_dimension, default=8)
    verilog.add_argument("--cols", type=_dimension, default=8)
    verilog.add_argument("--name", help="top module name (default sparsa_array)")
    verilog.add_argument("--lint", action="store_true", help="then run verilator --lint-only -Wall")
    verilog.add_argument("-o", "--output", type=Path, required=True)
    verilog.set_defaults(func=cmd_verilog)

    demo = commands.add_parser("demo", help="multiply random matrices on the simulated array")
    demo.add_argument("--rows", type=_dimension, default=8)
    demo.add_argument("--cols", type=_dimension, default=8)
    demo.add_argument("-m", type=_positive, default=16)
    demo.add_argument("-k", type=_positive, default=64)
    demo.add_argument("-n", type=_positive, default=16)
    demo.add_argument("--sim", choices=("verilator", "icarus"), default="verilator")
    demo.add_argument("--seed", type=int, default=2026)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv=None):
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
