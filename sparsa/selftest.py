"""``sparsa selftest``: what to run first on a board, and paste into an issue.

It reads the ID and capability registers, then runs a fixed set of jobs (1x1x1 up to 512^3,
edge values, bias, per-tensor and per-channel requantization, ReLU, K and N past the build's
limits, sparse patterns) and checks each against the independent golden model
(:mod:`sparsa.sim.golden`: int64 NumPy, gemmlowp's rounding written out). For each job it
reports: exact or not, the device's cycle count, the wall time split into host packing,
transfer and device, and unpacking, the throughput and the clock the cycles imply.
"""

import platform
import time

import numpy as np

from sparsa import protocol
from sparsa.sim import golden, patterns

SIZES = (64, 128, 256, 512)  # the dense cubes; --max-size drops the larger ones


def _case(name, a, b, bias=None, requant=None, relu=False):
    return {"name": name, "a": a, "b": b, "bias": bias, "requant": requant, "relu": relu}


def cases(info, max_size=512, seed=0):
    """The fixed job set for a build described by ``info`` (shapes follow its limits)."""
    rng = np.random.default_rng(seed)
    rows, cols, max_k, max_n = info.rows, info.cols, info.max_k, info.max_n

    def ints(*shape):
        return rng.integers(-128, 128, shape, dtype=np.int8)

    def bias(n):
        return rng.integers(-2**20, 2**20, n, dtype=np.int32)

    per_channel = (rng.integers(1 << 29, 1 << 30, 29 * cols + 3).astype(np.int64), 12, -5)
    out = [
        _case("1x1x1", ints(1, 1), ints(1, 1)),
        _case("-128 x -128 everywhere", np.full((2 * rows + 1, max_k), -128, np.int8),
              np.full((max_k, cols + 1), -128, np.int8)),
        _case("127 x -128", np.full((rows, 3 * rows + 2), 127, np.int8),
              np.full((3 * rows + 2, 2 * cols - 1), -128, np.int8)),
        _case("bias + ReLU, int32", ints(37, 100), ints(100, 29), bias=bias(29), relu=True),
        _case("requant per tensor", ints(45, 77), ints(77, 31), bias=bias(31),
              requant=(1518500250, 16, 3)),
        _case("requant per channel + ReLU", ints(21, 90), ints(90, 29 * cols + 3),
              bias=bias(29 * cols + 3), requant=per_channel, relu=True),
        _case("K split (K > MAX_K), requant", ints(19, 2 * max_k + 5), ints(2 * max_k + 5, 11),
              bias=bias(11), requant=(1 << 30, 20, 0)),
        _case("N split (N > MAX_N)", ints(9, 33), ints(33, max_n + 3 * cols + 1)),
        # 1:4 weights past MAX_K: one job in one slot per group where the device has them.
        _case("1:4 B, K=MAX_K1, requant+ReLU", ints(19, info.max_k_for(1)),
              patterns.n_of_m(rng, (info.max_k_for(1), 2 * cols + 3), 1, 4),
              bias=bias(2 * cols + 3), requant=(1 << 30, 9, -2), relu=True),
    ]
    size = min(128, max_size)
    out += [
        # Whole k-steps of A zero (rows that are all zero never reach the device: the driver
        # leaves them out), so the device's schedule skips them.
        _case("A with 75% zero k-steps", ints(size, size) * (rng.random(size) < 0.25).astype(
            np.int8), ints(size, size)),
        _case("ReLU-like A, 90% zeros", patterns.relu_like(rng, (size, size), 0.9),
              ints(size, size)),
        _case("block-sparse B, 75%", ints(size, size),
              patterns.block_sparse(rng, (size, size), 0.75, rows, cols)),
        _case("2:4 B", ints(size, size), patterns.two_four(rng, (size, size))),
    ]
    out += [_case(f"dense {n}^3", ints(n, n), ints(n, n)) for n in SIZES if n <= max_size]
    return out


def run(acc, max_size=512, seed=0, progress=None):
    """Run the job set on ``acc``; returns the report (a dict, JSON-ready)."""
    identity = acc.identity()
    info = acc.info
    results = []
    for case in cases(info, max_size, seed):
        a, b = case["a"], case["b"]
        m, k = a.shape
        n = b.shape[1]
        expected = golden.gemm(a, b, case["bias"], case["requant"], case["relu"])
        started = time.perf_counter()
        c = acc.matmul(a, b, bias=case["bias"], requant=case["requant"], relu=case["relu"])
        wall = time.perf_counter() - started
        counters = acc.last_counters
        timing = getattr(acc, "last_timing", None)
        if timing is None:  # the reference backend: the arithmetic is all there is
            timing = {"pack": 0.0, "device": wall, "unpack": 0.0, "host": 0.0}
        mismatches = int(np.count_nonzero(c != expected))
        device = timing["device"]
        results.append({
            "name": case["name"], "m": m, "k": k, "n": n,
            "options": ", ".join(word for word, on in (
                ("bias", case["bias"] is not None), ("requant", case["requant"] is not None),
                ("relu", case["relu"])) if on) or "-",
            "exact": mismatches == 0, "mismatches": mismatches,
            "cycles": int(counters["cycles"]), "estimated": bool(counters["estimated"]),
            "macs_skipped": int(counters["macs_skipped"]),
            "wall_s": wall, "pack_s": timing["pack"], "device_s": device,
            "unpack_s": timing["unpack"] + timing.get("host", 0.0),
            "gops": 2 * m * k * n / wall / 1e9,
            "implied_mhz": (counters["cycles"] / device / 1e6
                            if device > 0 and not counters["estimated"] else None),
        })
        if progress is not None:
            progress(results[-1])
    overlap = _overlap(acc, [case for case in cases(info, max_size, seed)
                             if case["name"].startswith("dense")])
    return {"backend": acc.backend, "registers": identity, "features": list(info.features),
            "host": host_description(), "jobs": results, "overlap": overlap,
            "passed": all(result["exact"] for result in results)
            and (overlap is None or overlap["exact"])}


def _overlap(acc, dense):
    """The dense cubes again, from two threads at once (as a compiled model's micro-batches
    call): wall time against the same calls one after another, the device's busy time and
    fraction (its register writes and transfers), exactness. None where the accelerator
    takes one call at a time (the reference) and on the simulator."""
    import threading

    if not getattr(acc, "concurrent", False) or not dense or acc.backend == "sim":
        return None  # (on the simulator it would measure the simulator, twice over)
    work = dense
    busy, exact, errors = [], [], []
    expected = {id(case): golden.gemm(case["a"], case["b"]) for case in dense}

    def call(case):
        c = acc.matmul(case["a"], case["b"])
        busy.append(acc.last_timing["device"])
        exact.append(bool(np.array_equal(c, expected[id(case)])))

    started = time.perf_counter()
    for case in work:
        call(case)
    alone = time.perf_counter() - started
    busy.clear()

    def worker(share):
        try:
            for case in share:
                call(case)
        except BaseException as error:  # reported below, not lost in the thread
            errors.append(repr(error))
    threads = [threading.Thread(target=worker, args=(work[i::2],)) for i in range(2)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {"calls": len(work), "alone_s": alone, "wall_s": wall, "busy_s": sum(busy),
            "busy_fraction": sum(busy) / wall if wall else 0.0,
            "exact": not errors and len(exact) == 2 * len(work) and all(exact),
            "errors": errors}


def host_description():
    return f"Python {platform.python_version()}, NumPy {np.__version__}, {platform.machine()}"


def format_registers(report):
    r = report["registers"]
    version = r["VERSION"]
    return (f"ID={r['ID']:#010x} ({'sparsa' if r['ID'] == protocol.MAGIC else 'NOT sparsa'}) "
            f"VERSION={version >> 16}.{version & 0xFFFF} ROWS={r['ROWS']} COLS={r['COLS']} "
            f"STREAM_WIDTH={r['STREAM_WIDTH']} MAX_K={r['MAX_K']} "
            + "".join(f"{name}={r[name]} " for name in ("MAX_K2", "MAX_K1") if name in r)
            + f"MAX_N={r['MAX_N']} "
            f"FEATURES={r['FEATURES']:#x} ({'/'.join(report['features'])})")


HEADER = (f"{'job':<30} {'M':>4} {'K':>4} {'N':>4} {'exact':>5} {'cycles':>8} "
          f"{'pack ms':>8} {'dev ms':>9} {'unpk ms':>8} {'GOPS':>7} {'MHz':>7}")


def format_job(job):
    implied = f"{job['implied_mhz']:7.3g}" if job["implied_mhz"] else f"{'-':>7}"
    return (f"{job['name']:<30} {job['m']:>4} {job['k']:>4} {job['n']:>4} "
            f"{'yes' if job['exact'] else 'NO':>5} {job['cycles']:>8} "
            f"{job['pack_s'] * 1e3:8.2f} {job['device_s'] * 1e3:9.2f} "
            f"{job['unpack_s'] * 1e3:8.2f} {job['gops']:7.3f} {implied}")


def format_summary(report, clock_mhz=100.0):
    """The verdict, and what bounds throughput: host packing and unpacking as measured here
    against the transfer and device time measured here and the array's time at ``clock_mhz``
    (its cycle count: on a simulator or the reference the measured device time is not a
    board's)."""
    jobs = report["jobs"]
    host = sum(job["pack_s"] + job["unpack_s"] for job in jobs)
    device = sum(job["device_s"] for job in jobs)
    array = sum(job["cycles"] for job in jobs) / (clock_mhz * 1e6)
    exact = sum(job["exact"] for job in jobs)
    bound = "host packing" if host > array else "the array"
    wall = sum(job["wall_s"] for job in jobs)
    text = (f"{exact} of {len(jobs)} jobs exact: {'PASS' if report['passed'] else 'FAIL'}\n"
            f"  host packing+unpacking {host * 1e3:.1f} ms; transfer+device {device * 1e3:.1f} ms "
            f"as measured here ({device / wall if wall else 0:.0%} of the jobs' wall time); the "
            f"array's cycles at {clock_mhz:g} MHz: {array * 1e3:.1f} ms (so {bound} bounds "
            f"throughput with this host at that clock)")
    overlap = report.get("overlap")
    if overlap:
        text += (f"\n  overlapped: the dense jobs from two threads at once in "
                 f"{overlap['wall_s'] * 1e3:.1f} ms, one after another "
                 f"{overlap['alone_s'] * 1e3:.1f} ms; device busy "
                 f"{overlap['busy_s'] * 1e3:.1f} ms ({overlap['busy_fraction']:.0%}), "
                 f"{'exact' if overlap['exact'] else 'NOT EXACT ' + str(overlap['errors'])}")
    return text
