"""The builds the tests share (each Verilator build is made once per session and reused)."""

from sparsa.protocol import DEFAULT_BUILD

DEFAULT = dict(DEFAULT_BUILD)  # 8x8, 64-bit streams, K and N up to 256
SMALL = {"rows": 4, "cols": 4, "stream_width": 32, "max_k": 64, "max_n": 48}
ODD = {"rows": 3, "cols": 5, "stream_width": 16, "max_k": 32, "max_n": 40}


def needs(simulator):
    """Skip the calling test, saying why, when ``simulator`` is not usable here."""
    import pytest

    from sparsa.sim import toolchain

    reason = toolchain.missing(simulator)
    if reason:
        pytest.skip(reason)


def concurrent_matmuls(acc, threads=2, calls=20, seed=0, max_size=40, timeout=300,
                       counters=None):
    """``threads`` threads calling ``acc.matmul`` at once, ``calls`` random GEMMs each (int32
    or requantized); every result is checked against the golden model, and every third call's
    counters (read under ``acc.lock``; those named in ``counters``, default all) against the
    same call's run alone afterwards. Returns the list of what was wrong (empty when
    nothing)."""
    import threading

    import numpy as np

    from sparsa.sim import golden

    wrong, kept = [], []
    barrier = threading.Barrier(threads)

    def worker(index):
        try:
            calls_of(index)
        except BaseException as error:  # reported, not lost in the thread
            wrong.append(f"thread {index}: {type(error).__name__}: {error}")

    def calls_of(index):
        rng = np.random.default_rng([seed, index])
        barrier.wait()
        for call in range(calls):
            m, k, n = (int(v) for v in rng.integers(1, max_size, 3))
            a = rng.integers(-128, 128, (m, k), dtype=np.int8)
            b = rng.integers(-128, 128, (k, n), dtype=np.int8)
            requant = (int(rng.integers(1 << 29, 1 << 30)), 10, 3) if call % 2 else None
            if call % 3:
                got = acc.matmul(a, b, requant=requant)
            else:
                with acc.lock:
                    got = acc.matmul(a, b, requant=requant)
                    kept.append((a, b, requant, dict(acc.last_counters)))
            if not np.array_equal(got, golden.gemm(a, b, None, requant, False)):
                wrong.append(f"thread {index}, call {call}: {m}x{k}x{n} result differs")

    workers = [threading.Thread(target=worker, args=(index,), daemon=True)
               for index in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(timeout)
    if any(thread.is_alive() for thread in workers):
        return wrong + [f"still running after {timeout} s"]
    for a, b, requant, during in kept:
        acc.matmul(a, b, requant=requant)
        names = counters or during.keys()
        during = {name: during[name] for name in names}
        alone = {name: acc.last_counters[name] for name in names}
        if during != alone:
            wrong.append(f"{a.shape[0]}x{a.shape[1]}x{b.shape[1]}: counters {during} read "
                         f"after the call, {alone} alone")
    return wrong
