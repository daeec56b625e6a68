"""The host runtime without a simulator: the reference backend and the full driver over the
byte-level device model, checked against the golden model (sparsa.sim.golden); packing against
the protocol's plain layout; argument errors; quantization helpers; the PYNQ transport's timeout.
"""

import dataclasses
import logging
import time

import numpy as np
import pytest
from builds import ODD, SMALL

import sparsa
from sparsa import protocol
from sparsa.host import driver, jobs, quant, reference
from sparsa.sim import golden



def operands(rng, m, k, n, zeros=0.0):
    a = rng.integers(-128, 128, (m, k), dtype=np.int8)
    b = rng.integers(-128, 128, (k, n), dtype=np.int8)
    if zeros:
        a[rng.random((m, k)) < zeros] = 0
        b[:, rng.random(n) < zeros / 2] = 0
    return a, b


def random_options(rng, n):
    bias = rng.integers(-2**31, 2**31, n, dtype=np.int64).astype(np.int32) \
        if rng.random() < 0.5 else None
    requant = (int(rng.integers(-2**31, 2**31)), int(rng.integers(0, 32)),
               int(rng.integers(-128, 128))) if rng.random() < 0.5 else None
    if requant is not None and rng.random() < 0.4:  # per-column multipliers, one shift
        requant = (rng.integers(-2**31, 2**31, n), *requant[1:])
    return bias, requant, bool(rng.random() < 0.5)


def assert_same(got, want, label):
    assert got.dtype == want.dtype and got.shape == want.shape, label
    if not np.array_equal(got, want):
        bad = tuple(np.argwhere(got != want)[0])
        raise AssertionError(f"{label}: C{bad} = {got[bad]}, expected {want[bad]}")


def backends():
    return [("reference", {}), ("reference", {"device_model": True}),
            ("reference", {**SMALL, "device_model": True}),
            ("reference", {**ODD, "device_model": True, "max_transfer": 4000})]


@pytest.mark.parametrize("backend,config", backends(),
                         ids=["fast", "device-model", "device-model-4x4", "device-model-3x5-split-m"])
def test_random_shapes_bit_exact(backend, config):
    """Random shapes (splits of K, N and M where the build is small), values and options."""
    rng = np.random.default_rng(len(config))
    with sparsa.open(backend, **config) as acc:
        for trial in range(40):
            m, k, n = (int(rng.integers(1, high)) for high in (70, 150, 120))
            a, b = operands(rng, m, k, n, zeros=float(rng.choice([0, 0.5, 0.95])))
            bias, requant, relu = random_options(rng, n)
            got = acc.matmul(a, b, bias=bias, requant=requant, relu=relu,
                             sparse_skip=bool(trial % 3))
            assert_same(got, golden.gemm(a, b, bias, requant, relu),
                        f"{acc.backend} trial {trial}: M={m} K={k} N={n} requant={requant}")


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 2048, 1), (3, 1025, 5), (64, 3000, 9),
                                   (257, 300, 513)])
def test_extremes_and_long_k(shape):
    """-128 everywhere (the largest sums) and K past float32's exact range (1024) and past the
    build's MAX_K: exact, with INT32 wrap where the true sum overflows."""
    m, k, n = shape
    a = np.full((m, k), -128, np.int8)
    b = np.full((k, n), -128, np.int8)
    b[:, ::2] = 127
    bias = np.full(n, 2**31 - 1, np.int32)
    for backend in (sparsa.open("reference"), sparsa.open("reference", device_model=True)):
        assert_same(backend.matmul(a, b), golden.matmul_int32(a, b), f"{backend.backend} {shape}")
        assert_same(backend.matmul(a, b, bias=bias, requant=(2**31 - 1, 3, 5), relu=True),
                    golden.gemm(a, b, bias, (2**31 - 1, 3, 5), True), f"{backend.backend} {shape}")
    big = np.full((1, 2**17 + 1), -128, np.int8)  # 2**31 + 2**14: wraps once
    assert sparsa.open("reference").matmul(big, big.T)[0, 0] == golden.matmul_int32(big, big.T)[0, 0]


def test_per_channel_requant():
    rng = np.random.default_rng(3)
    a, b = operands(rng, 20, 300, 37)
    bias = rng.integers(-5000, 5000, 37, dtype=np.int32)
    multipliers = rng.integers(1 << 30, 2**31, 37)
    shifts = rng.integers(0, 20, 37)
    want = np.stack([golden.gemm(a, b[:, [j]], bias[[j]], (int(multipliers[j]), int(shifts[j]), -4),
                                 True)[:, 0] for j in range(37)], axis=1)
    for acc in (sparsa.open("reference"), sparsa.open("reference", device_model=True)):
        got = acc.matmul(a, b, bias=bias, requant=(multipliers, shifts, -4), relu=True)
        assert_same(got, want, acc.backend)


def test_counters():
    """Work counts are the golden ones; sub-jobs (split K and N) add up to the whole job. With
    skipping, all-zero rows of A and columns of B never reach the device: MACS and
    KSTEPS_SKIPPED are those of the job without them, MACS_SKIPPED counts every product with a
    zero operand of the whole matrices."""
    rng = np.random.default_rng(4)
    for config in ({}, SMALL, ODD):
        for device_model in (False, True):
            acc = sparsa.open("reference", device_model=device_model, **config)
            a, b = operands(rng, 45, 130, 100, zeros=0.8)
            a[::7] = 0  # padding rows
            b[:, ::5] = 0  # dead output channels
            for skip in (True, False):
                acc.matmul(a, b, sparse_skip=skip)
                counters = acc.last_counters
                live_a = a[a.any(axis=1)] if skip else a
                live_b = b[:, b.any(axis=0)] if skip else b
                # (B in the group format where the driver's rule picks it.)
                groups = skip and reference.choose_format(acc.info.geometry, live_a, live_b)[0]
                want = golden.sparse_counters(live_a, live_b, acc.info.rows, acc.info.cols,
                                              skip, groups)
                want["MACS_SKIPPED"] = golden.sparse_counters(
                    a, b, acc.info.rows, acc.info.cols, skip)["MACS_SKIPPED"]
                for name, value in want.items():
                    assert counters[name.lower()] == value, (config, device_model, skip, name)
                assert counters["estimated"] is True and counters["cycles"] > 0
                assert set(counters) == {"cycles", "macs", "macs_skipped", "stall_in",
                                         "stall_out", "ksteps_skipped", "jobs", "estimated"}
                assert counters["jobs"] == len(jobs.plan(
                    acc.info.geometry, *live_a.shape, live_b.shape[1], False, None, False, skip,
                    k_size=driver._k_chunk(acc.info, live_b, skip)).jobs)


def test_reference_counters_are_the_device_models():
    """The fast reference reports what the driver over the device model reports, all counters
    (estimated cycles too), also when the job is split."""
    rng = np.random.default_rng(13)
    for config in ({}, SMALL, ODD):
        fast = sparsa.open("reference", **config)
        model = sparsa.open("reference", device_model=True, **config)
        for m, k, n in [(5, 7, 9), (40, 300, 100), (9, 70, 45)]:
            a, b = operands(rng, m, k, n, zeros=0.5)
            for options in ({}, {"bias": np.ones(n, np.int32), "requant": (1 << 30, 3, 0)},
                            {"sparse_skip": False}):
                fast.matmul(a, b, **options)
                model.matmul(a, b, **options)
                assert fast.last_counters == model.last_counters, (config, m, k, n, options)


def test_cycle_estimate_matches_measured_dense_figures():
    """The estimate against the RTL's dense cycle counts quoted in the README (8x8, 64-bit)."""
    measured = {64: 4947, 128: 35803, 256: 273771}  # sparsa bench array, Verilator
    g = protocol.Geometry(8, 8, 64, 256, 256)
    rng = np.random.default_rng(0)
    for size, cycles in measured.items():
        a, b = operands(rng, size, size, size)
        estimate = reference.counters(g, a, b)["CYCLES"]
        assert abs(estimate - cycles) <= 0.001 * cycles, (size, estimate, cycles)


def test_cycle_estimate_matches_measured_sparse_figures():
    """The estimate, in the format the driver picks, against the RTL's cycle counts of the
    sparse benchmark quoted in the README (8x8, 64-bit, M=K=N=256, its seed-0 matrices)."""
    from sparsa import bench

    measured = {"unstructured A 90%": (False, 159883), "block-sparse B 75%": (True, 72811),
                "2:4 B": (True, 139403), "1:4 B": (True, 71563),
                "unstructured B 50%": (True, 229848), "unstructured B 95%": (True, 67038)}
    g = protocol.Geometry(**protocol.DEFAULT_BUILD)
    for name, _, _, a, b in bench.sparse_jobs(protocol.DEFAULT_BUILD, 256):
        if name in measured:
            groups, counters, _ = reference.choose_format(g, a, b)
            assert (groups, counters["CYCLES"]) == pytest.approx(measured[name], rel=0.001), name


def test_info_and_repr():
    acc = sparsa.open("reference", **ODD, sparse_skip=False)
    assert (acc.info.rows, acc.info.cols, acc.info.stream_width, acc.info.max_k,
            acc.info.max_n) == (3, 5, 16, 32, 40)
    assert acc.info.features == ("BIAS", "REQUANT", "RELU", "CHANNEL_QUANT")
    assert acc.info.version == protocol.VERSION
    assert "3x5" in repr(acc)
    acc.close()
    with pytest.raises(RuntimeError, match="closed"):
        acc.matmul(np.ones((1, 1), np.int8), np.ones((1, 1), np.int8))


def test_info_of_older_devices():
    """A device of protocol 1.2 (an earlier group format of B) is driven with plain B only, one
    before 1.4 (no MAX_K2 / MAX_K1 registers: its reads would fail) with K up to MAX_K in any
    format; another major version is refused."""
    from sparsa.host import driver

    registers = {"ID": protocol.MAGIC, "ROWS": 8, "COLS": 8, "STREAM_WIDTH": 64, "MAX_K": 256,
                 "MAX_N": 256, "FEATURES": protocol.features()}
    by_address = {protocol.REGISTER[name].address: name for name in protocol.REGISTER}

    class Transport:
        def read(self, address):
            return registers[by_address[address]]

    for version, groups, limits in (((1, 3), True, (256, 256)), ((1, 2), False, (256, 256)),
                                    ((1, 4), True, (512, 1024)), ((1, 7), True, (512, 1024))):
        registers["VERSION"] = version[0] << 16 | version[1]
        registers.pop("MAX_K2", None), registers.pop("MAX_K1", None)
        if version >= (1, 4):
            registers.update(MAX_K2=512, MAX_K1=1024)
        info = driver.read_info(Transport())
        assert ("GROUPS" in info.features, "SPARSE_SKIP" in info.features) == (groups, True)
        assert (info.max_k_for(2), info.max_k_for(1), info.max_k_for(4)) == (*limits, 256)
    registers["VERSION"] = 2 << 16
    with pytest.raises(driver.DeviceError, match="protocol 2.0"):
        driver.read_info(Transport())


@pytest.mark.parametrize("geometry", [(8, 8, 64), (4, 4, 32), (3, 5, 16), (16, 16, 64),
                                      (4, 8, 8), (8, 8, 128)])
def test_pack_and_unpack_match_protocol_layout(geometry):
    """The driver's vectorized packing writes exactly the bytes of the protocol's plain
    layout (sparsa.protocol.pack_input), for whole arrays and for views into larger ones."""
    g = protocol.Geometry(*geometry, 256, 256)
    rng = np.random.default_rng(sum(geometry))
    for m, k, n in [(1, 1, 1), (8, 8, 8), (16, 5, 16), (13, 7, 29), (33, 100, 20)]:
        big_a, big_b = operands(rng, m + 3, k + 5, n + 9)
        a, b = big_a[1:m + 1, 2:k + 2], big_b[3:k + 3, 4:n + 4]  # non-contiguous views
        bias = rng.integers(-2**31, 2**31, n, dtype=np.int64).astype(np.int32)
        mult = rng.integers(-2**31, 2**31, n)
        for with_bias, with_mult in ((None, None), (bias, None), (None, mult), (bias, mult)):
            want = protocol.pack_input(g, np.ascontiguousarray(a), np.ascontiguousarray(b),
                                       with_bias, with_mult)
            buffer = np.full(want.size + 7, 0xA5, np.uint8)
            assert jobs.pack_into(g, buffer, a, b, with_bias, with_mult) == want.size
            assert np.array_equal(buffer[:want.size], want), (geometry, m, k, n)
            assert (buffer[want.size:] == 0xA5).all()
        for requant in (False, True):
            c = rng.integers(-2**31, 2**31, (m, n)).astype(np.int8 if requant else np.int32)
            packet = np.zeros(g.output_beats(m, n, requant) * g.beat_bytes, np.uint8)
            reference.pack_output(g, c, packet, requant)
            assert np.array_equal(protocol.unpack_output(g, packet, m, n, requant), c)
            out = np.zeros((m + 2, n + 6), c.dtype)
            view = out[1:m + 1, 3:n + 3]
            jobs.unpack_into(g, packet, view, requant)
            assert np.array_equal(view, c) and not out[0].any() and not out[:, :3].any()
            if not requant:
                jobs.unpack_into(g, packet, view, requant, accumulate=True)
                assert np.array_equal(view, c * np.int32(2))  # int32 wrap, as the device


def test_plan_splits():
    g = protocol.Geometry(**SMALL)
    plan = jobs.plan(g, 10, 150, 100, bias=True, requant=(1 << 30, 1, 0), relu=True)
    assert plan.split_k and not plan.on_device
    assert {(job.k0, job.k) for job in plan.jobs} == {(0, 64), (64, 64), (128, 22)}
    assert {(job.n0, job.n) for job in plan.jobs} == {(0, 48), (48, 48), (96, 4)}
    assert all(job.options == 0 for job in plan.jobs)  # post-processing on the host
    plan = jobs.plan(g, 10, 50, 40, bias=True, requant=(1 << 30, 1, 0), relu=True,
                     sparse_skip=False)
    (job,) = plan.jobs
    assert plan.on_device and job.options == (protocol.Option.BIAS | protocol.Option.REQUANT
                                              | protocol.Option.RELU | protocol.Option.NO_SKIP)
    assert dict(job.registers())["QUANT_MULT"] == 1 << 30
    # Per-column multipliers with one shift: on the device (when it has CHANNEL_QUANT).
    mult = np.full(40, 1 << 30)
    (job,) = jobs.plan(g, 10, 50, 40, requant=(mult, 3, -1)).jobs
    assert job.channel_quant and job.requant and dict(job.registers())["QUANT_SHIFT"] == 3
    assert job.input_bytes == g.input_beats(10, 50, 40, False, True) * g.beat_bytes
    assert not jobs.plan(g, 10, 50, 40, requant=(mult, 3, -1), channel_quant=False).on_device
    assert not jobs.plan(g, 10, 50, 40, requant=(mult, np.full(40, 3), -1)).on_device
    plan = jobs.plan(g, 100, 50, 40, max_transfer=3000)  # M cut to fit the DMA's limit
    assert len(plan.jobs) > 1 and all(job.input_bytes <= 3000 and job.output_bytes <= 3000
                                      for job in plan.jobs)
    assert sum(job.m for job in plan.jobs) == 100
    with pytest.raises(ValueError, match="max_transfer"):
        jobs.plan(g, 100, 50, 40, max_transfer=100)


def test_inputs_never_modified_and_views_accepted():
    rng = np.random.default_rng(6)
    a, b = operands(rng, 30, 70, 50)
    bias = rng.integers(-100, 100, 50, dtype=np.int32)
    for array in (a, b, bias):
        array.flags.writeable = False  # read-only inputs are fine; writing would raise
    copies = [array.copy() for array in (a, b, bias)]
    for acc in (sparsa.open("reference"), sparsa.open("reference", device_model=True)):
        got = acc.matmul(a[::2, ::3], b[::3, 1::2], bias=bias[1::2], requant=(1 << 30, 4, 1))
        assert_same(got, golden.gemm(a[::2, ::3], b[::3, 1::2], bias[1::2], (1 << 30, 4, 1)),
                    acc.backend)
        out = np.full((30, 50), 99, np.int32)
        assert acc.matmul(a, b, out=out) is out
        assert_same(out, golden.matmul_int32(a, b), acc.backend)
    for array, copy in zip((a, b, bias), copies):
        assert np.array_equal(array, copy)


A8 = np.ones((4, 6), np.int8)
B8 = np.ones((6, 5), np.int8)


@pytest.mark.parametrize("kwargs,error,words", [
    ({"A": A8.astype(np.int16)}, TypeError, ["A", "int8", "int16"]),
    ({"A": A8.astype(np.float32)}, TypeError, ["A", "int8", "float32", "quantize"]),
    ({"A": A8.tolist()}, TypeError, ["A", "numpy.ndarray", "list"]),
    ({"A": A8[0]}, ValueError, ["A", "2-d", "1-d"]),
    ({"B": np.ones((2, 3, 4), np.int8)}, ValueError, ["B", "2-d", "3-d"]),
    ({"B": np.ones((7, 5), np.int8)}, ValueError, ["B", "6 rows", "(7, 5)"]),
    ({"A": np.ones((0, 6), np.int8)}, ValueError, ["A", "empty", "(0, 6)"]),
    ({"B": np.ones((6, 0), np.int8)}, ValueError, ["B", "empty", "(6, 0)"]),
    ({"bias": np.ones(5, np.int64)}, TypeError, ["bias", "int32", "int64"]),
    ({"bias": np.ones(4, np.int32)}, ValueError, ["bias", "(5,)", "(4,)"]),
    ({"requant": (1, 2)}, TypeError, ["requant", "(multiplier, shift, zero_point)"]),
    ({"requant": (2**31, 2, 0)}, ValueError, ["multiplier", "2147483648"]),
    ({"requant": (1, 32, 0)}, ValueError, ["shift", "0..31", "32"]),
    ({"requant": (1, -1, 0)}, ValueError, ["shift", "-1"]),
    ({"requant": (1, 2, 128)}, ValueError, ["zero_point", "-128..127", "128"]),
    ({"requant": (1.5, 2, 0)}, TypeError, ["multiplier", "integer", "float"]),
    ({"requant": (np.ones(4, np.int64), 2, 0)}, ValueError, ["multiplier", "(5,)", "(4,)"]),
    ({"relu": 1}, TypeError, ["relu", "True or False"]),
    ({"sparse_skip": "no"}, TypeError, ["sparse_skip", "True or False"]),
    ({"out": np.zeros((4, 5), np.int8)}, ValueError, ["out", "int32", "(4, 5)"]),
    ({"out": np.zeros((5, 4), np.int32)}, ValueError, ["out", "(4, 5)"]),
    ({"out": np.zeros((4, 10), np.int32)[:, ::2]}, ValueError, ["out", "contiguous"]),
])
def test_bad_arguments(kwargs, error, words):
    for acc in (sparsa.open("reference"), sparsa.open("reference", device_model=True)):
        args = {"A": A8, "B": B8, **kwargs}
        a, b = args.pop("A"), args.pop("B")
        with pytest.raises(error) as caught:
            acc.matmul(a, b, **args)
        for word in words:
            assert word in str(caught.value), (str(caught.value), word)


def test_read_only_out_rejected():
    out = np.zeros((4, 5), np.int32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out: expected a writeable"):
        sparsa.open("reference").matmul(A8, B8, out=out)


def test_open_arguments(caplog):
    with pytest.raises(ValueError, match="backend: expected"):
        sparsa.open("gpu")
    with pytest.raises(TypeError, match="unexpected options.*'colz'"):
        sparsa.open("reference", colz=4)
    with pytest.raises(RuntimeError, match="needs the pynq package"):
        sparsa.open("pynq")
    with caplog.at_level(logging.INFO, logger="sparsa"):
        acc = sparsa.open("auto")
    assert acc.backend == "reference"
    assert "sparsa backend: reference (pynq is not installed)" in caplog.text


@pytest.mark.parametrize("device_model", [False, True])
@pytest.mark.parametrize("argument,value,words", [
    ("rows", 0, "rows must be between 1 and 32, not 0"),
    ("cols", 0, "cols must be between 1 and 32, not 0"),
    ("cols", 33, "cols must be between 1 and 32, not 33"),
    ("max_k", 0, "max_k must be an int between 1 and 65536, not 0"),
    ("max_k", 30, "max_k must be a multiple of 4"),
    ("max_n", 0, "max_n must be an int between 1 and 65536, not 0"),
    ("stream_width", 7, "stream_width must be one of (8, 16, 32, 64, 128, 256, 512, 1024), "
                        "not 7"),
])
def test_open_refuses_a_bad_geometry(device_model, argument, value, words):
    """A geometry no build can have is refused at open, naming the argument and its range
    (the gateware's own check), rather than failing later inside a job."""
    with pytest.raises(ValueError) as error:
        sparsa.open("reference", device_model=device_model, **{argument: value})
    assert str(error.value) == words or str(error.value).startswith(words)
    with pytest.raises(TypeError, match="rows must be an int, not float"):
        sparsa.open("reference", device_model=device_model, rows=4.0)


def test_timed_device_model_takes_its_cycles():
    """``clock_mhz``: each job of the device model takes its estimated cycles at that clock in
    wall time, with the same results and counters as without; refused without the model."""
    rng = np.random.default_rng(7)
    a, b = operands(rng, 200, 100, 60)
    with sparsa.open("reference", device_model=True) as quick:
        want = quick.matmul(a, b)
        counters = quick.last_counters
    with sparsa.open("reference", device_model=True, clock_mhz=1.0) as timed:
        started = time.monotonic()
        assert np.array_equal(timed.matmul(a, b), want)
        elapsed = time.monotonic() - started
        assert timed.last_counters == counters
    assert elapsed >= counters["cycles"] / 1e6  # a microsecond a cycle at 1 MHz
    with pytest.raises(ValueError, match="clock_mhz: the reference takes time only as a "
                                         "device model"):
        sparsa.open("reference", clock_mhz=100)
    with pytest.raises(ValueError, match="clock_mhz: expected a clock in MHz"):
        sparsa.open("reference", device_model=True, clock_mhz=0)


@pytest.mark.parametrize("device_model", [False, True])
def test_one_accelerator_shared_by_threads(device_model):
    """Two threads calling one accelerator at once get exactly their own results, and the
    counters of their own calls when they read them under ``acc.lock``."""
    from builds import concurrent_matmuls

    with sparsa.open("reference", device_model=device_model, **SMALL) as acc:
        assert concurrent_matmuls(acc, threads=2, calls=30, seed=1) == []


def test_group_format_on_the_device_model():
    """Jobs with B in the group format on the device model: the golden model's result and
    counters (the group schedule's k-steps) for n:4, unstructured, mixed and dense B; a packet
    cut short is TLAST_EARLY; malformed ones are read as the device reads them."""
    from sparsa.sim import patterns

    rng = np.random.default_rng(31)
    for config in ({}, SMALL, ODD):
        device = reference.ReferenceDevice(**config)
        acc = driver.DeviceAccelerator(device, "reference-device")
        g = acc.geometry
        for kind in ("2:4", "1:4", "unstructured", "mixed", "dense"):
            m, k, n = (int(rng.integers(1, high)) for high in (30, g.max_k + 1, 40))
            b = {"2:4": lambda: patterns.n_of_m(rng, (k, n), 2, 4),
                 "1:4": lambda: patterns.n_of_m(rng, (k, n), 1, 4),
                 "unstructured": lambda: patterns.unstructured(rng, (k, n), 0.7),
                 "mixed": lambda: patterns.mixed_groups(rng, (k, n)),
                 "dense": lambda: patterns.dense(rng, (k, n))}[kind]()
            a = patterns.relu_like(rng, (m, k), 0.3)
            job = jobs.plan(g, m, k, n).jobs[0]
            forced = dataclasses.replace(job, options=job.options | protocol.Option.GROUPS,
                                         input_bytes=jobs.pack_into(g, np.zeros(2**20, np.uint8),
                                                                    a, b, groups=True))
            out = np.zeros((m, n), np.int32)
            counts = acc.run_job(forced, a, b, None, out)
            assert_same(out, golden.matmul_int32(a, b), f"{config} {kind} {m}x{k}x{n}")
            want = golden.sparse_counters(a, b, g.rows, g.cols, True, True)
            assert {name: counts[name] for name in want} == want
            short = dataclasses.replace(forced, input_bytes=forced.input_bytes - g.beat_bytes)
            with pytest.raises(driver.DeviceError, match="TLAST_EARLY"):
                acc.run_job(short, a, b, None, out)
    # Malformed, one n-tile of 4 columns, 32-bit beats, B added up here from the lanes the
    # protocol's table gives: counts past 4 (7: no codes, 3 steps past the group; 10: 2 steps),
    # 2-step codes 6 and 7 (read as 0: lanes 0, 1), steps and lanes past K (K = 10), and a
    # uniform header with its other bytes set.
    g = protocol.Geometry(4, 4, 32, 64, 64)
    device = reference.ReferenceDevice(4, 4, 32, 64, 64)

    def run(k, header, code_beats, steps):
        """``steps``: per group, per step its values and lanes (None: dropped)."""
        a = rng.integers(-128, 128, (3, k), dtype=np.int8)
        b = np.zeros((k + 3, 4), np.int64)
        packet = [np.array(header, np.uint8)]
        for group, (codes, group_steps) in enumerate(zip(code_beats, steps)):
            packet += [np.array([code], "<u4").view(np.uint8) for code in codes]
            for lanes in group_steps:
                values = rng.integers(-128, 128, 4, dtype=np.int8)
                packet.append(values.view(np.uint8))
                if lanes is not None:
                    b[4 * group + np.array(lanes), np.arange(4)] += values
        packet = np.concatenate(packet + [protocol.pack_input(g, a, np.zeros((k, 4), np.int8))[
            -k * 4:]])
        for name, value in (("M", 3), ("K", k), ("N", 4), ("OPTIONS", protocol.Option.GROUPS)):
            device.write(protocol.REGISTER[name].address, value)
        device.write(protocol.REGISTER["CONTROL"].address, protocol.Control.START)
        received = np.zeros(1024, np.uint8)
        size = device.transfer(packet, packet.size, received, received.size)
        assert device.registers["ERROR"] == protocol.Error.NONE
        assert_same(protocol.unpack_output(g, received[:size], 3, 4, False),
                    (a.astype(np.int64) @ b[:k]).astype(np.int32), "malformed group packet")

    # Group 1's codes (3 bits a column: 6, 4, 0, 7) and group 2's (2 bits: 0, 1, 2, 3, the lane
    # each column leaves out) share one code beat.
    codes = (6 | 4 << 3 | 0 << 6 | 7 << 9) | (0 | 1 << 2 | 2 << 4 | 3 << 6) << 12
    run(10, [7, 8 + 2, 3, 0], [[], [codes], []],
        [[[0] * 4, [1] * 4, [2] * 4, [3] * 4, None, None, None],
         [[0, 1, 0, 0], [1, 3, 1, 1]],
         [[1, 0, 0, 0], [2, 2, 1, 1], None]])
    # Uniform: 0x89 is one step per group (count 9 modulo 8), both groups' codes (2 bits a
    # column) in one beat; lanes 2 and 3 of group 1 past K.
    codes = (3 | 2 << 2 | 1 << 4) | (0 | 1 << 2 | 2 << 4 | 3 << 6) << 8
    run(6, [0x89, 0xFF, 0x07, 0x55], [[codes], []],
        [[[3, 2, 1, 0]], [[0, 1, 2, 3]]])


def test_driver_picks_the_group_format():
    """The driver sends B in the group format where it saves cycles (n:4 and very sparse B),
    plain otherwise (dense B, sparse A, ``sparse_skip=False``, a build without it); prepared
    weights are packed once per format; the fast reference reports the same counters."""
    from sparsa.sim import patterns

    rng = np.random.default_rng(32)
    a = patterns.dense(rng, (40, 128))
    cases = [("2:4", a, patterns.n_of_m(rng, (128, 64), 2, 4), True, {}),
             ("1:4", a, patterns.n_of_m(rng, (128, 64), 1, 4), True, {}),
             ("unstructured 90%", a, patterns.unstructured(rng, (128, 64), 0.9), True, {}),
             ("dense", a, patterns.dense(rng, (128, 64)), False, {}),
             ("ReLU-sparse A", patterns.relu_like(rng, (40, 128), 0.9),
              patterns.dense(rng, (128, 64)), False, {}),
             ("2:4, no skipping", a, patterns.n_of_m(rng, (128, 64), 2, 4), False,
              {"sparse_skip": False})]
    for sparse_skip in (True, False):
        device = reference.ReferenceDevice(sparse_skip=sparse_skip)
        acc = driver.DeviceAccelerator(device, "reference-device")
        fast = sparsa.open("reference", sparse_skip=sparse_skip)
        options = []
        write = device.write
        device.write = lambda address, value: (  # noqa: E731
            options.append(value) if address == protocol.REGISTER["OPTIONS"].address else None,
            write(address, value))
        for label, a_case, b_case, groups, option in cases:
            for weights in (b_case, acc.prepare(b_case)):
                options.clear()
                got = acc.matmul(a_case, weights, **option)
                assert_same(got, golden.matmul_int32(a_case, b_case), label)
                chosen = {bool(value & protocol.Option.GROUPS) for value in options}
                assert chosen == {groups and sparse_skip}, (label, sparse_skip)
            fast.matmul(a_case, b_case, **option)
            assert fast.last_counters == acc.last_counters, label
        prepared = acc.prepare(cases[0][2])
        acc.matmul(a, prepared)
        acc.matmul(a, prepared)
        assert [key[-1] for key in prepared._packed] == [sparse_skip]


def test_k_past_max_k_with_fewer_slots():
    """B whose groups of four k-steps hold at most two (one) nonzeros per column runs as one
    job up to MAX_K2 (MAX_K1), in the group format with STEPS_2 (STEPS_1), post-processing on
    the device; past that, or with a denser group, K is split at MAX_K as before. Exact, with
    the fast reference's counters."""
    from sparsa.sim import patterns

    rng = np.random.default_rng(33)
    device = reference.ReferenceDevice(**SMALL)
    acc = driver.DeviceAccelerator(device, "reference-device")
    fast = sparsa.open("reference", **SMALL)
    assert (acc.info.max_k, acc.info.max_k2, acc.info.max_k1) == (64, 128, 256)
    assert "K <= 64 (2:4 128, 1:4 256)" in repr(acc)
    written = []
    write = device.write
    device.write = lambda address, value: (  # noqa: E731
        written.append((protocol.REGISTERS[[r.address for r in protocol.REGISTERS]
                                           .index(address)].name, value)), write(address, value))
    Option = protocol.Option
    denser = patterns.n_of_m(rng, (120, 20), 2, 4)
    denser[4:7, 3] = 9  # one group of one column with three nonzeros
    cases = [  # label, B, sparse_skip, the jobs' (K, OPTIONS' group bits)
        ("2:4, K=120", patterns.n_of_m(rng, (120, 20), 2, 4), True,
         [(120, Option.GROUPS | Option.STEPS_2)]),
        ("1:4, K=256", patterns.n_of_m(rng, (256, 20), 1, 4), True,
         [(256, Option.GROUPS | Option.STEPS_1)]),
        ("1:4, K=300", patterns.n_of_m(rng, (300, 20), 1, 4), True,
         [(256, Option.GROUPS | Option.STEPS_1), (44, Option.GROUPS | Option.STEPS_1)]),
        ("2:4 but one group of 3", denser, True, [(64, Option.GROUPS)] * 1 + [(56, None)]),
        ("2:4, no skipping", patterns.n_of_m(rng, (120, 20), 2, 4), False, [(64, 0), (56, 0)]),
    ]
    for label, b, sparse_skip, want in cases:
        k, n = b.shape
        a = patterns.dense(rng, (9, k))
        bias = rng.integers(-2**20, 2**20, n, dtype=np.int32)
        requant = (1 << 30, 6, -3)
        written.clear()
        got = acc.matmul(a, b, bias=bias, requant=requant, relu=True, sparse_skip=sparse_skip)
        assert_same(got, golden.gemm(a, b, bias, requant, True), label)
        ks = [value for name, value in written if name == "K"]
        options = [value for name, value in written if name == "OPTIONS"]
        group_bits = Option.GROUPS | Option.STEPS_2 | Option.STEPS_1
        for (k_job, bits), k_got, options_got in zip(want, ks, options):
            assert k_got == k_job, label
            if bits is not None:  # (None: the format is the driver's estimate's choice)
                assert options_got & group_bits == bits, label
            # Bias, requantization and ReLU on the device when K is not split.
            assert bool(options_got & Option.BIAS) == (len(want) == 1), label
        assert len(ks) == len(want), label
        fast.matmul(a, b, bias=bias, requant=requant, relu=True, sparse_skip=sparse_skip)
        assert fast.last_counters == acc.last_counters, label
    # A device of protocol 1.3 (no slots options) gets B in the group format with K <= MAX_K
    # and no STEPS bit.
    older = reference.ReferenceDevice(**SMALL)
    older.registers["VERSION"] = 1 << 16 | 3
    old_acc = driver.DeviceAccelerator(older, "reference-device")
    b = patterns.n_of_m(rng, (120, 20), 1, 4)
    options = []
    older_write = older.write
    older.write = lambda address, value: (  # noqa: E731
        options.append(value) if address == protocol.REGISTER["OPTIONS"].address else None,
        older_write(address, value))
    a = patterns.dense(rng, (9, 120))
    assert_same(old_acc.matmul(a, b), golden.matmul_int32(a, b), "protocol 1.3")
    assert len(options) == 2 and all(value & group_bits == Option.GROUPS for value in options)
    # The device model's checks of the slots.
    device.write = write
    for k, options, code in ((129, Option.GROUPS | Option.STEPS_2, "K_TOO_LARGE"),
                             (128, Option.GROUPS | Option.STEPS_2, "NONE"),
                             (257, Option.GROUPS | Option.STEPS_1, "K_TOO_LARGE"),
                             (65, Option.GROUPS, "K_TOO_LARGE"),
                             (8, Option.STEPS_1, "BAD_OPTION"),
                             (8, Option.GROUPS | Option.STEPS_1 | Option.STEPS_2, "BAD_OPTION")):
        for name, value in (("M", 1), ("K", k), ("N", 1), ("OPTIONS", options)):
            device.write(protocol.REGISTER[name].address, value)
        device.write(protocol.REGISTER["CONTROL"].address, protocol.Control.START)
        assert protocol.Error(device.registers["ERROR"]).name == code, (k, options)
        device.write(protocol.REGISTER["CONTROL"].address, protocol.Control.SOFT_RESET)


def test_device_model_errors():
    """The device model refuses bad jobs as the RTL does; the driver reports them by name."""
    device = reference.ReferenceDevice(**SMALL)
    acc = driver.DeviceAccelerator(device, "reference-device")
    a, b = operands(np.random.default_rng(8), 5, 70, 9)
    job = jobs.Job(0, 5, 0, 70, 0, 9, 0, protocol.RESET_QUANT, 4 * 1000, 4 * 100)
    with pytest.raises(driver.DeviceError, match="K_TOO_LARGE"):
        acc.run_job(job, a, b, None, np.zeros((5, 9), np.int32))
    short = jobs.Job(0, 5, 0, 7, 0, 9, 0, protocol.RESET_QUANT, 8, 4 * 100)
    with pytest.raises(driver.DeviceError, match="TLAST_EARLY"):
        acc.run_job(short, a, b, None, np.zeros((5, 9), np.int32))
    assert_same(acc.matmul(a[:, :7], b[:7]), golden.matmul_int32(a[:, :7], b[:7]), "after errors")
    write = lambda name, value: device.write(protocol.REGISTER[name].address, value)  # noqa: E731
    for name, value, code in (("M", 0, "ZERO_DIMENSION"), ("N", 49, "N_TOO_LARGE"),
                              ("OPTIONS", 1 << 8, "BAD_OPTION")):
        write("M", 1), write("K", 1), write("N", 1), write("OPTIONS", 0)
        write(name, value)
        write("CONTROL", protocol.Control.START)
        assert device.transfer(np.zeros(4, np.uint8), 4, np.zeros(64, np.uint8), 64) == 4
        assert protocol.Error(device.registers["ERROR"]).name == code


def test_quantize_round_trip():
    rng = np.random.default_rng(10)
    x = rng.normal(0, 3, (50, 20)).astype(np.float32)
    for symmetric in (True, False):
        for axis in (None, 1):
            scale, zero_point = quant.choose_qparams(x, symmetric=symmetric, axis=axis)
            q = quant.quantize(x, scale, zero_point, axis=axis)
            assert q.dtype == np.int8
            back = quant.dequantize(q, scale, zero_point, axis=axis)
            step = scale if axis is None else np.asarray(scale)[None, :]
            assert np.all(np.abs(back - x) <= step / 2 + 1e-6), (symmetric, axis)
            if symmetric:
                assert q.min() >= -127 and np.all(zero_point == 0)
    assert quant.quantize(np.array([0.5, 1.5, -0.5]), 1.0).tolist() == [0, 2, 0]  # half to even


@pytest.mark.parametrize("call,error,words", [
    (lambda: quant.quantize(np.array([1.0, np.nan]), 0.1), ValueError, ["x", "finite", "nan"]),
    (lambda: quant.quantize(np.array([1.0, np.inf]), 0.1), ValueError, ["x", "finite", "inf"]),
    (lambda: quant.quantize(np.array([1, 2]), 0.1), TypeError, ["x", "floats"]),
    (lambda: quant.quantize(np.ones(3), 0.0), ValueError, ["scale", "> 0"]),
    (lambda: quant.quantize(np.ones(3), 0.1, 200), ValueError, ["zero_point", "-128..127"]),
    (lambda: quant.quantize(np.ones((2, 3)), np.ones(2), axis=1), ValueError, ["scale", "(3,)"]),
    (lambda: quant.dequantize(np.ones(3, np.int32), 0.1), TypeError, ["q", "int8"]),
    (lambda: quant.quantize_multiplier(1.5), ValueError, ["real_multiplier", "(0, 1)"]),
    (lambda: quant.quantize_multiplier(float("nan")), ValueError, ["real_multiplier"]),
    (lambda: quant.quantize_multiplier(1e-12), ValueError, ["real_multiplier", "smallest"]),
])
def test_quantization_errors(call, error, words):
    with pytest.raises(error) as caught:
        call()
    for word in words:
        assert word in str(caught.value), (str(caught.value), word)


def test_quantize_multiplier_accuracy():
    rng = np.random.default_rng(11)
    for real in list(rng.uniform(1e-9, 1, 200)) + [0.5, 0.999999999, 2**-31]:
        multiplier, shift = quant.quantize_multiplier(real)
        assert 2**30 <= multiplier < 2**31 and 0 <= shift <= 31
        assert abs(multiplier * 2.0**-31 * 2.0**-shift - real) <= real * 2**-30
        # Applied by the device's arithmetic to a large accumulator, it scales as the float does.
        x = np.array([1 << 24], np.int32)
        got = int(golden.rounding_divide_by_pot(
            golden.saturating_rounding_doubling_high_mul(x, multiplier), shift)[0])
        assert abs(got - (1 << 24) * real) <= 1
    multipliers, shifts = quant.quantize_multiplier(np.array([0.25, 0.75]))
    assert multipliers.tolist() == [2**30, 3 * 2**29] and shifts.tolist() == [1, 0]
    multipliers, shift = quant.quantize_multiplier(np.array([0.25, 0.75, 2**-20]),
                                                   shared_shift=True)
    assert multipliers.tolist() == [2**29, 3 * 2**29, 2**11] and shift == 0


def test_shared_shift_matches_per_column_shifts():
    """Per-channel requantization with one shared shift (what the device takes) gives the
    per-column-shift result to within one step, and exactly the golden model's result for the
    parameters it uses."""
    rng = np.random.default_rng(12)
    a, b = operands(rng, 40, 200, 30)
    real = rng.uniform(1e-6, 1e-4, 30)
    per_column = quant.quantize_multiplier(real)
    shared = quant.quantize_multiplier(real, shared_shift=True)
    assert isinstance(shared[1], int) and np.all(shared[0] < 2**31)
    acc = sparsa.open("reference", device_model=True)
    got = acc.matmul(a, b, requant=(*shared, 3))
    assert_same(got, golden.gemm(a, b, None, (*shared, 3)), "shared shift")
    separate = acc.matmul(a, b, requant=(*per_column, 3))
    assert np.abs(got.astype(int) - separate).max() <= 1
    assert np.mean(got == separate) > 0.99


def test_quantized_linear_layer_end_to_end():
    """Float layer -> int8 operands -> device requantization -> dequantized output close to
    the float result (within a few output steps)."""
    rng = np.random.default_rng(12)
    x = np.maximum(rng.normal(0, 1, (32, 64)), 0).astype(np.float32)
    w = rng.normal(0, 0.2, (64, 24)).astype(np.float32)
    sx, zx = quant.choose_qparams(x, symmetric=False)
    sw, _ = quant.choose_qparams(w)
    qx, qw = quant.quantize(x, sx, zx), quant.quantize(w, sw)
    y = x @ w
    sy, zy = quant.choose_qparams(y, symmetric=False)
    # The input zero point folds into the bias: sum_k (qx - zx) qw = qx @ qw - zx * colsum(qw).
    bias = (-int(zx) * qw.astype(np.int32).sum(axis=0)).astype(np.int32)
    requant = quant.requant_params(sx, sw, sy, int(zy))
    with sparsa.open("reference") as acc:
        qy = acc.matmul(qx, qw, bias=bias, requant=requant)
    error = np.abs(quant.dequantize(qy, sy, zy) - y)
    assert error.max() <= 3 * float(sy), error.max() / float(sy)


def test_cli_run_and_bench_host(capsys, tmp_path):
    from sparsa import cli

    assert cli.main(["run", "--backend", "reference", "-m", "40", "-k", "300", "-n", "30",
                     "--sparsity", "0.5", "--bias", "--requant", "--relu"]) == 0
    printed = capsys.readouterr().out
    assert "check against NumPy: bit-exact (0 of 1200 differ)" in printed
    assert "macs_skipped" in printed and "(estimated)" in printed
    report = tmp_path / "host.json"
    assert cli.main(["bench", "host", "--sizes", "48", "--json", str(report)]) == 0
    import json

    (row,) = json.loads(report.read_text())
    assert {"m", "k", "n", "reference_s", "numpy_int32_s", "numpy_float32_s", "exact",
            "pack_gbps", "copy_gbps"} <= set(row)
    assert row["exact"] is True and row["m"] == 48


def test_sparse_benchmark_patterns_and_bounds():
    """The benchmark's patterns have the zeros they are named for, and its compute bound counts
    the k-steps whose A and B vectors are both nonzero, tile by tile (checked here against a
    loop over the tiles)."""
    from sparsa import bench
    from sparsa.sim import patterns

    rng = np.random.default_rng(8)
    for keep in (1, 2, 3):
        b = patterns.n_of_m(rng, (37, 11), keep, 4)
        groups = np.pad(b != 0, ((0, 3), (0, 0)))[:40].reshape(10, 4, 11).sum(axis=1)
        assert (groups[:9] == keep).all() and (groups[9] <= 1).all()  # the last group: one k
    b = patterns.unstructured(rng, (64, 40), 0.9)
    assert (b == 0).sum() == 2304
    g = protocol.Geometry(4, 4, 32, 64, 64)
    a = patterns.relu_like(rng, (13, 50), 0.8)
    b = patterns.unstructured(rng, (50, 18), 0.7)
    a[4:8] = 0  # a whole m-tile with nothing to issue: its tiles still take the issue gap
    want = 0
    for i in range(0, 13, 4):
        for j in range(0, 18, 4):
            steps = sum(a[i:i + 4, k].any() and b[k, j:j + 4].any() for k in range(50))
            want += max(steps, 4)
    limits = bench.sparse_bounds(g, a, b)
    assert limits["compute"] == want
    assert {name: limits[name] for name in ("input", "output")} == {
        name: value for name, value in bench.bounds(g, 13, 50, 18).items() if name != "compute"}
    dense = patterns.dense(rng, (50, 18))
    assert bench.sparse_bounds(g, patterns.dense(rng, (13, 50)), dense) == bench.bounds(g, 13,
                                                                                        50, 18)
    # The group format: per group whose A is not all zero, the steps of its densest column;
    # B's beats: per n-tile its counts (one beat if they are all the same), the beats of its
    # codes (2, 3, 2 bits a column for 1, 2, 3 steps) and a beat per step.
    want, b_beats = 0, 0
    for j in range(0, 18, 4):
        counts = [int((b[k:k + 4, j:j + 4] != 0).sum(axis=0).max()) for k in range(0, 50, 4)]
        code_bits = sum({1: 2, 2: 3, 3: 2}.get(c, 0) * g.cols for c in counts)
        b_beats += (1 if len(set(counts)) == 1 else g.vector_beats(len(counts)))
        b_beats += -(-code_bits // g.stream_width) + sum(counts)
        for i in range(0, 13, 4):
            live = [a[i:i + 4, k:k + 4].any() for k in range(0, 50, 4)]
            want += max(sum(c for c, on in zip(counts, live) if on), 4)
    limits = bench.sparse_bounds(g, a, b, groups=True)
    assert limits["compute"] == want
    assert limits["input"] == g.input_beats(13, 50, 18, False) - 5 * 50 + b_beats


def test_rounding_multiplier_rounds_like_one_rounding():
    """The device's requantization with rounding_multiplier's (multiplier, shift) equals one
    rounding of acc * real (NumPy, float64) on at least 99.99% of outputs, where the
    normalized multiplier of quantize_multiplier (its double rounding) does not."""
    from sparsa.host import arith, quant

    rng = np.random.default_rng(21)
    # Products of float32 scales, as models give them (a decimal like 0.21 would make exact
    # ties, where half-to-even and the device's half-away-from-zero differ by design).
    for real in rng.uniform(0, 1, (6, 3)).astype(np.float32).prod(axis=1).astype(np.float64):
        acc = np.rint(rng.uniform(-127, 127, 100_000) / real).astype(np.int32)
        exact = np.clip(np.rint(acc.astype(np.float64) * real), -128, 127)
        multiplier, shift = quant.rounding_multiplier(real)
        once = np.mean(arith.requantize(acc, multiplier, shift, 0) == exact)
        normalized = np.mean(arith.requantize(acc, *quant.quantize_multiplier(real), 0) == exact)
        assert once >= 0.9999 and once >= normalized, (real, once, normalized)
    # Per column, one shift: a column of tiny weights (its output constant, its bias large)
    # does not force a shift that double-rounds the others.
    reals = np.array([0.004, 0.006, 5e-10])
    multipliers, shift = quant.rounding_multiplier(reals, magnitude=[128, 128, 0.6],
                                                   spread=[128, 128, 0.01],
                                                   center=[0, 0, -1.1e9])
    assert shift == 0 and multipliers.shape == (3,)
    with pytest.raises(ValueError, match="real_multiplier"):
        quant.rounding_multiplier(1.5)
    # requant_params gives rounding_multiplier's pair.
    assert quant.requant_params(0.02, 0.01, 0.5)[:2] == quant.rounding_multiplier(0.02 * 0.01 / 0.5)


def _golden_by_column(a, b, bias, requant, relu):
    """The golden model one column at a time (per-column multipliers and shifts)."""
    if requant is None:
        return golden.gemm(a, b, bias, None, relu)
    mult, shift, zero = requant
    return np.stack([golden.gemm(a, b[:, [j]], None if bias is None else bias[[j]],
                                 (int(np.broadcast_to(mult, b.shape[1])[j]),
                                  int(np.broadcast_to(shift, b.shape[1])[j]), zero),
                                 relu)[:, 0] for j in range(b.shape[1])], axis=1)


def test_structural_zeros_are_left_out_of_the_job():
    """All-zero rows of A (padding) and columns of B (dead channels) never reach the device:
    the result is the golden model's on the whole matrices for every option, plain or prepared
    weights; the cycles and MACs are those of the job without them, MACS_SKIPPED counts all
    products with a zero operand; sparse_skip=False runs the whole job; an all-zero A needs
    no job."""
    rng = np.random.default_rng(22)
    m, k, n = 60, 70, 50
    a = rng.integers(-128, 128, (m, k), dtype=np.int8)
    b = rng.integers(-128, 128, (k, n), dtype=np.int8)
    dead_rows, dead_cols = rng.random(m) < 0.5, rng.random(n) < 0.5
    a[dead_rows] = 0
    b[:, dead_cols] = 0
    bias = rng.integers(-5000, 5000, n, dtype=np.int32)
    mult = rng.integers(1 << 29, 1 << 31, n)
    options = [{}, {"bias": bias, "relu": True},
               {"bias": bias, "requant": (1 << 30, 12, -3), "relu": True},
               {"bias": bias, "requant": (mult, 14, 5)},
               {"bias": bias, "requant": (mult, rng.integers(8, 16, n), 0), "relu": True}]
    for config, device_model in (({}, False), (SMALL, True)):
        with sparsa.open("reference", device_model=device_model, **config) as acc:
            for option in options:
                want = _golden_by_column(a, b, option.get("bias"), option.get("requant"),
                                         option.get("relu", False))
                for weights in (b, acc.prepare(b)):
                    got = acc.matmul(a, weights, **option)
                    assert_same(got, want, f"{acc.backend} {sorted(option)}")
            acc.matmul(a, b)
            whole = acc.last_counters
            acc.matmul(np.ascontiguousarray(a[~dead_rows]), np.ascontiguousarray(b[:, ~dead_cols]))
            live = acc.last_counters
            assert whole["cycles"] == live["cycles"] > 0 and whole["macs"] == live["macs"]
            assert whole["macs_skipped"] == golden.sparse_counters(
                a, b, acc.info.rows, acc.info.cols)["MACS_SKIPPED"]
            acc.matmul(a, b, sparse_skip=False)
            assert acc.last_counters["cycles"] > 1.5 * whole["cycles"]
            zero = np.zeros((5, k), np.int8)
            got = acc.matmul(zero, b, bias=bias, relu=True)
            assert_same(got, golden.gemm(zero, b, bias, None, True), acc.backend)
            counters = acc.last_counters
            assert counters["cycles"] == counters["macs"] == 0
            assert counters["macs_skipped"] == 5 * k * n


def test_prune_patterns():
    """sparsa.prune: n:m keeps the n largest magnitudes of every m consecutive k of a column
    (checked against a plain loop), a fraction zeros that share smallest first; bad patterns
    and weights are named."""
    rng = np.random.default_rng(23)
    w = rng.integers(-128, 128, (10, 7), dtype=np.int8)  # K = 10: a last group of 2
    for pattern, keep, group in (("2:4", 2, 4), ("1:4", 1, 4), ("3:8", 3, 8)):
        pruned = sparsa.prune(w, pattern)
        assert pruned.dtype == w.dtype and w.shape == pruned.shape
        for j in range(w.shape[1]):
            for start in range(0, 10, group):
                column = w[start:start + group, j].astype(int)
                kept = sorted(range(len(column)), key=lambda i: (-abs(column[i]), i))[:keep]
                want = [column[i] if i in kept else 0 for i in range(len(column))]
                assert list(pruned[start:start + group, j]) == want, (pattern, j, start)
    floats = rng.normal(size=(64, 32))
    pruned = sparsa.prune(floats, 0.9)
    assert np.count_nonzero(pruned == 0) == round(0.9 * floats.size)
    assert np.abs(floats[pruned == 0]).max() <= np.abs(pruned[pruned != 0]).min()
    for bad, words in (("2:0", "pattern"), ("5:4", "pattern"), ("half", "pattern"),
                       (1.0, "pattern"), (True, "pattern")):
        with pytest.raises(ValueError, match=words):
            sparsa.prune(w, bad)
    with pytest.raises(ValueError, match="weights"):
        sparsa.prune(np.ones(5), "2:4")


def test_simulator_reply_after_an_interrupt_is_not_taken_for_the_next():
    """Ctrl-C while waiting for the simulator's reply: the reply still on its way is taken and
    dropped, so the next request gets its own answer; a simulator that does not answer even
    then is marked unusable."""
    from sparsa.host import simulation

    class Connection:
        def __init__(self, replies, interrupt_first=True):
            self.replies, self.interrupt = list(replies), interrupt_first

        def send(self, message):
            pass

        def poll(self, timeout):
            if self.interrupt:
                self.interrupt = False
                raise KeyboardInterrupt
            return bool(self.replies)

        def recv(self):
            return self.replies.pop(0)

    server = object.__new__(simulation.SimServer)
    server.name, server._broken = "test", None
    server._connection = Connection([("ok", 7), ("ok", 42)])
    with pytest.raises(KeyboardInterrupt):
        server.call("read", 0)
    assert server.call("read", 4) == 42
    server._connection = Connection([])
    with pytest.raises(KeyboardInterrupt):
        server.call("read", 0)
    with pytest.raises(driver.DeviceError, match="not usable: no answer to 'read' after an "
                                                 "interrupt"):
        server.call("read", 4)


class Recorded(reference.ReferenceDevice):
    """The device model with each transfer taking ``seconds`` of wall time, recorded as
    (start, end, thread) intervals."""

    def __init__(self, seconds, **build):
        super().__init__(**build)
        self.seconds = seconds
        self.transfers = []

    def transfer(self, *args, **kwargs):
        import threading

        started = time.perf_counter()
        size = super().transfer(*args, **kwargs)
        time.sleep(self.seconds)
        self.transfers.append((started, time.perf_counter(), threading.get_ident()))
        return size


def test_jobs_are_double_buffered(monkeypatch):
    """A GEMM of several jobs packs job n+1 while job n is on the device (and unpacks job n
    while job n+1 is). Calls from
    several threads share the device one job at a time (no two transfers overlap), each
    thread's counters its own, results exact."""
    import threading

    device = Recorded(0.05, **SMALL)
    acc = driver.DeviceAccelerator(device, "reference-device", max_transfer=4096)
    packs, unpacks = [], []

    def recorder(function, log):
        def recorded(*args, **kwargs):
            started = time.perf_counter()
            result = function(*args, **kwargs)
            log.append((started, time.perf_counter()))
            return result
        return recorded
    monkeypatch.setattr(jobs, "pack_into", recorder(jobs.pack_into, packs))
    monkeypatch.setattr(jobs, "unpack_into", recorder(jobs.unpack_into, unpacks))
    rng = np.random.default_rng(5)
    a, b = operands(rng, 600, 40, 12)
    assert np.array_equal(acc.matmul(a, b), golden.matmul_int32(a, b))
    transfers = sorted(device.transfers)
    assert len(transfers) >= 4 and len(packs) == len(unpacks) == len(transfers)
    # Job n + 1 is packed before job n leaves the device (one after another, it would be
    # packed once job n is done and unpacked); each job is unpacked after its transfer.
    assert all(pack[1] < transfer[1] for pack, transfer in zip(packs[1:], transfers))
    assert all(unpack[0] >= transfer[1] for unpack, transfer in zip(unpacks, transfers))
    timing = acc.last_timing
    assert timing["device"] >= 0.05 * len(transfers)

    # Two threads at once: device jobs in turn, each thread's counters and timing its own.
    device.transfers.clear()
    shapes = {0: (64, 40, 12), 1: (30, 20, 7)}
    seen, errors, barrier = {}, [], threading.Barrier(2)

    def worker(index):
        try:
            x, y = operands(np.random.default_rng(index), *shapes[index])
            barrier.wait()
            for _ in range(3):
                ok = np.array_equal(acc.matmul(x, y), golden.matmul_int32(x, y))
                seen[index] = (ok, acc.last_counters["macs"], acc.last_counters["jobs"])
        except BaseException as error:
            errors.append(repr(error))
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == [] and all(seen[i][0] for i in range(2))
    for index, (m, k, n) in shapes.items():
        x, y = operands(np.random.default_rng(index), m, k, n)
        alone = sparsa.open("reference", **SMALL)
        alone.matmul(x, y)
        assert seen[index][1] == alone.last_counters["macs"]
    ordered = sorted(device.transfers)
    assert all(first[1] <= second[0] for first, second in zip(ordered, ordered[1:]))
    acc.close()
    with pytest.raises(RuntimeError, match="closed"):
        acc.matmul(a, b)


def test_transports_sit_below_the_driver():
    """The transports (board, simulation, the reference device) and what they use import
    nothing of the driver or of the module that puts drivers and transports together."""
    import ast
    from pathlib import Path

    import sparsa.host

    folder = Path(sparsa.host.__file__).parent
    for name in ("board", "simulation", "reference", "jobs", "arith", "cpu", "errors"):
        tree = ast.parse((folder / f"{name}.py").read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = "." * node.level + (node.module or "")
                imported.add(module)
                imported.update(f"{module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
        above = {m for m in imported
                 if m.split(".")[-1] in ("driver", "backends", "graph")
                 and (m.startswith(".") or m.startswith("sparsa.host"))}
        assert not above, (name, above)
    assert sparsa.open is sparsa.host.backends.open and set(sparsa.host.backends.BACKENDS) == {
        "pynq", "sim", "reference"}
    with pytest.raises(ValueError, match="backend: expected 'auto', 'pynq', 'sim', 'reference'"):
        sparsa.open("fpga")
    with pytest.raises(TypeError, match="max_transfer is the device model's"):
        sparsa.open("reference", max_transfer=4096)


@pytest.mark.parametrize("failure", [KeyboardInterrupt, TimeoutError])
def test_a_job_failing_inside_a_double_buffered_gemm_leaves_the_device_usable(failure):
    """The second of several jobs fails on the device (Ctrl-C while it waits, a device that
    stops answering): the call raises (KeyboardInterrupt as it is, a timeout as DeviceError),
    the jobs already on their way end and both slots come back, the device is soft-reset, and
    the next call is exact."""
    class Failing(reference.ReferenceDevice):
        def __init__(self, **build):
            super().__init__(**build)
            self.transfers = 0

        def transfer(self, *args, **kwargs):
            self.transfers += 1
            if self.transfers == 2:
                raise failure("stopped")
            return super().transfer(*args, **kwargs)

    device = Failing(**SMALL)
    acc = driver.DeviceAccelerator(device, "reference-device", max_transfer=4096)
    a, b = operands(np.random.default_rng(6), 600, 40, 12)
    with pytest.raises(KeyboardInterrupt if failure is KeyboardInterrupt else driver.DeviceError):
        acc.matmul(a, b)
    assert acc._slots.qsize() == driver.SLOTS and device.transfers >= 2
    assert np.array_equal(acc.matmul(a, b), golden.matmul_int32(a, b))
    acc.close()


def test_device_model_decodes_each_b_once():
    """The device model's decoded-B cache (a model's weights are the B of job after job): a
    B whose bytes were decoded before is taken from it, equal to a fresh decode; a B that
    differs in one byte, or whose packet differs past B only, is read as a fresh decode reads
    it; the cache keeps within its limit; results and counters stay the golden model's."""
    from sparsa.sim import patterns

    rng = np.random.default_rng(5)
    g = protocol.Geometry(**protocol.DEFAULT_BUILD)
    for groups in (False, True):
        decoded = reference.DecodedB()
        k, n = 40, 20
        b = patterns.n_of_m(rng, (k, n), 2, 4)
        for trial in range(3):
            a = rng.integers(-128, 128, (5, k), dtype=np.int8)  # A differs job to job
            packet = protocol.pack_input(g, a, b, groups=groups)
            fresh, span = reference.read_b(g, packet, k, n, groups)
            got, got_span, terms = decoded.read(g, packet, k, n, groups, protocol.GROUP)
            assert got_span == span and np.array_equal(got, fresh) and np.array_equal(got, b)
            assert not got.flags.writeable
            want = reference.b_terms(g, b, groups)
            assert np.array_equal(terms[0], want[0])
            assert (terms[1] is None) == (not groups)
            if groups:
                assert np.array_equal(terms[1], want[1])
            assert len(decoded._entries) == 1, trial  # decoded once
        for place in range(span - 1, 0, -1):  # B's last byte that is a value of B
            changed = packet.copy()
            changed[place] ^= 0x01
            fresh, _ = reference.read_b(g, changed, k, n, groups)
            if not np.array_equal(fresh, b):
                break
        got, _, _ = decoded.read(g, changed, k, n, groups, protocol.GROUP)
        assert np.array_equal(got, fresh) and not np.array_equal(got, b)
        assert len(decoded._entries) == 2
    small = reference.DecodedB(limit=3000)
    for _ in range(20):
        b = rng.integers(-128, 128, (64, 8), dtype=np.int8)
        packet = protocol.pack_input(g, np.ones((1, 64), np.int8), b)
        assert np.array_equal(small.read(g, packet, 64, 8, False, protocol.GROUP)[0], b)
        assert small.size <= 3000
    # Through the driver, job after job: the golden model's results, and the counters the
    # fast reference works out on the host (no packet, no cache).
    device = reference.ReferenceDevice()
    acc = driver.DeviceAccelerator(device, "reference-device")
    fast = sparsa.open("reference")
    for pattern in ((1, 4), (4, 4)):  # the group format, the plain one
        b = patterns.n_of_m(rng, (96, 24), *pattern)
        for trial in range(3):
            a = patterns.relu_like(rng, (9, 96), 0.3)
            assert_same(acc.matmul(a, b), golden.matmul_int32(a, b), f"{pattern} job {trial}")
            fast.matmul(a, b)
            assert acc.last_counters == fast.last_counters, (pattern, trial)
    assert len(device._decoded._entries) == 2
    device.close()
    assert device._decoded.size == 0


def test_cycle_estimate_at_once_is_the_tile_by_tile_one():
    """The cycle estimate's schedule worked out for all tiles at once (jobs whose tiles never
    wait for a panel or for room in the row FIFO) gives the tile-by-tile walk's cycles and
    stalls, and declines the jobs where a tile would wait; on random jobs of dense, sparse and
    mostly-dense-with-empty tiles, on four geometries."""
    rng = np.random.default_rng(17)
    s = reference.SCHEDULE
    taken = declined = 0
    for trial in range(1200):
        g = (protocol.Geometry(**protocol.DEFAULT_BUILD), protocol.Geometry(4, 4, 32, 64, 64),
             protocol.Geometry(3, 5, 16, 64, 64), protocol.Geometry(16, 16, 128, 512, 512))[
            trial % 4]
        m_tiles, n_tiles, k = (int(rng.integers(1, high)) for high in (80, 12, 300))
        issued = (rng.integers(0, k + 1, (m_tiles, n_tiles)), np.full((m_tiles, n_tiles), k),
                  np.where(rng.random((m_tiles, n_tiles)) < 0.2,
                           rng.integers(0, 5, (m_tiles, n_tiles)), k))[trial % 3]
        issued = issued.astype(np.int64)
        panel, stall_in = k * g.vector_beats(g.rows), int(rng.integers(5, 5000))
        requant, groups = bool(rng.integers(2)), bool(rng.integers(2))
        steps = issued + s["setup"]
        cycles = np.maximum(steps, max(g.rows, g.cols) + 1)
        cycles[0, 0] = steps[0, 0]
        reload = (max(panel + s["group_panel"], s["group_reload"]) if groups
                  else panel + s["panel"])
        timing = dict(tile_out=g.rows * g.vector_beats((1 if requant else 4) * g.cols),
                      reload=reload, panel_step=panel + s["panel"], room_delay=s["room"],
                      m_tile=s["m_tile"], read_out=g.cols + s["enter"])
        walked = reference._schedule_tiles(steps.tolist(), cycles.tolist(), stall_in, **timing)
        at_once = reference._schedule_unstalled(steps, cycles, stall_in, **timing)
        if at_once is None:
            declined += 1
        else:
            taken += 1
            assert at_once == walked, trial
        assert reference._schedule(g, issued, panel, stall_in, requant, groups) == walked
    assert taken > 300 and declined > 300, (taken, declined)
