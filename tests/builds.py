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
