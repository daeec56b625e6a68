# amaranth: UnusedElaboratable=no
"""The protocol module's stream layouts and the golden model's arithmetic, in plain Python."""

import numpy as np
import pytest

from sparsa import protocol
from sparsa.hw import Accelerator
from sparsa.sim import golden

GEOMETRIES = [protocol.Geometry(8, 8, 64, 256, 256), protocol.Geometry(3, 5, 16, 32, 40),
              protocol.Geometry(4, 4, 256, 64, 48)]


@pytest.mark.parametrize("g", GEOMETRIES, ids=str)
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (9, 7, 13), (16, 3, 8)])
def test_input_packet_layout(g, m, k, n):
    rng = np.random.default_rng(m * k * n)
    a = rng.integers(-128, 128, (m, k), dtype=np.int8)
    b = rng.integers(-128, 128, (k, n), dtype=np.int8)
    bias = rng.integers(-2**31, 2**31, n, dtype=np.int64).astype(np.int32)
    packet = protocol.pack_input(g, a, b, bias)
    assert packet.dtype == np.uint8
    assert packet.size == g.input_beats(m, k, n, bias=True) * g.beat_bytes
    # Spot-check the documented layout element by element.
    m_tiles, n_tiles = g.tiles(m, n)
    bias_vec = g.vector_beats(4 * g.cols) * g.beat_bytes
    b_vec = g.vector_beats(g.cols) * g.beat_bytes
    a_vec = g.vector_beats(g.rows) * g.beat_bytes
    b_start = n_tiles * bias_vec
    a_start = b_start + n_tiles * k * b_vec
    j = n - 1
    t, col = divmod(j, g.cols)
    assert packet[t * bias_vec + 4 * col:t * bias_vec + 4 * col + 4].view("<i4")[0] == bias[j]
    kk = k - 1
    assert packet[b_start + (t * k + kk) * b_vec + col].view(np.int8) == b[kk, j]
    i = m - 1
    t, row = divmod(i, g.rows)
    assert packet[a_start + (t * k + kk) * a_vec + row].view(np.int8) == a[i, kk]
    assert packet[a_start + (t * k + kk) * a_vec + g.rows:a_start + (t * k + kk + 1) * a_vec].sum() == 0


@pytest.mark.parametrize("g", GEOMETRIES, ids=str)
@pytest.mark.parametrize("requant", [False, True])
def test_output_packet_round_trip(g, requant):
    m, n = 11, 9
    m_tiles, n_tiles = g.tiles(m, n)
    dtype = np.int8 if requant else np.int32
    full = np.arange(m_tiles * g.rows * n_tiles * g.cols).astype(dtype).reshape(
        m_tiles * g.rows, n_tiles * g.cols)
    row_bytes = g.vector_beats(np.dtype(dtype).itemsize * g.cols) * g.beat_bytes
    # Build the packet the way the device emits it: tile by tile, row by row, padded vectors.
    packet = bytearray()
    for ti in range(m_tiles):
        for tj in range(n_tiles):
            for r in range(g.rows):
                row = full[ti * g.rows + r, tj * g.cols:(tj + 1) * g.cols].astype(
                    np.dtype(dtype).newbyteorder("<")).tobytes()
                packet += row + bytes(row_bytes - len(row))
    assert len(packet) == g.output_beats(m, n, requant) * g.beat_bytes
    assert np.array_equal(protocol.unpack_output(g, bytes(packet), m, n, requant), full[:m, :n])
    with pytest.raises(ValueError, match="output packet has"):
        protocol.unpack_output(g, bytes(packet[:-1]), m, n, requant)


@pytest.mark.parametrize("g", GEOMETRIES, ids=str)
def test_group_format_layout(g):
    """B in the group format, checked byte by byte against the module docstring's layout for
    one n-tile, then read back (``read_groups``) for random shapes and densities: the same B,
    ``group_beats`` beats, and a ValueError when the data ends inside it."""
    rng = np.random.default_rng(g.rows)
    b = np.zeros((6, g.cols), np.int8)  # one n-tile, two groups: K = 6
    b[1, 0], b[3, 0], b[0, g.cols - 1] = 5, -7, 9  # column 0: lanes 1 and 3; the last: lane 0
    parts, _ = protocol.group_vectors(g, b)
    data = parts[0]
    header = g.vector_beats(2) * g.beat_bytes
    vector = g.vector_beats(g.cols) * g.beat_bytes
    assert data[:header].tolist() == [2, 0] + [0] * (header - 2)  # group 1 has no step
    # Group 0's codes (3 bits per column): column 0 lanes (1, 3), pair 4; the last column lane
    # 0 and its lowest zero lane, (0, 1), pair 0; then its two steps.
    code_beats = -(-3 * g.cols // g.stream_width)
    codes = np.unpackbits(data[header:header + code_beats * g.beat_bytes], bitorder="little")
    assert codes[:3].tolist() == [0, 0, 1] and not codes[3:].any()
    step0, step1 = (data[header + code_beats * g.beat_bytes + i * vector:][:g.cols]
                    for i in range(2))
    assert data.size == header + code_beats * g.beat_bytes + 2 * vector
    assert (step0.view(np.int8)[0], step1.view(np.int8)[0]) == (5, -7)
    assert (step0.view(np.int8)[g.cols - 1], step1.view(np.int8)[g.cols - 1]) == (9, 0)
    # One count in every group (2:4): a uniform header, one beat.
    b = np.zeros((8, g.cols), np.int8)
    b[[0, 3, 5, 6]] = 1
    data = protocol.group_vectors(g, b)[0][0]
    assert data[0] == protocol.UNIFORM | 2 and not data[1:g.beat_bytes].any()
    assert data.size == (1 + -(-6 * g.cols // g.stream_width)) * g.beat_bytes + 4 * vector
    for k, n, zeros in ((1, 1, 0.0), (7, 13, 0.5), (g.max_k, 2 * g.cols + 1, 0.8), (9, 3, 1.0)):
        b = rng.integers(-128, 128, (k, n), dtype=np.int8)
        b[rng.random((k, n)) < zeros] = 0
        data = np.concatenate(protocol.group_vectors(g, b)[0])
        beats = protocol.group_beats(g, protocol.group_counts(b, g.cols))
        assert data.size == beats * g.beat_bytes
        got, taken = protocol.read_groups(g, np.concatenate([data, np.ones(8, np.uint8)]), k, n)
        assert taken == data.size and got.dtype == np.int8 and np.array_equal(got, b)
        with pytest.raises(ValueError, match="ends inside B"):
            protocol.read_groups(g, data[:-1], k, n)


def test_requantization_by_hand():
    # (2**30 * 2**30 + 2**30) / 2**31 = 2**29 + 0.5, truncated toward zero.
    assert golden.saturating_rounding_doubling_high_mul(2**30, 2**30) == 2**29
    assert golden.saturating_rounding_doubling_high_mul(-(2**30), 2**30) == -(2**29)
    assert golden.saturating_rounding_doubling_high_mul(-(2**31), -(2**31)) == 2**31 - 1
    # Ties: +1.5 rounds up to 2, but gemmlowp's nudge 1 - 2**30 sends -1.5 to -1.
    assert golden.saturating_rounding_doubling_high_mul(3, 2**30) == 2
    assert golden.saturating_rounding_doubling_high_mul(-3, 2**30) == -1
    assert golden.saturating_rounding_doubling_high_mul(-5, 2**30) == -2  # -2.5 -> -2
    assert list(golden.rounding_divide_by_pot(np.array([5, -5, 6, -6, 7, -7]), 2)) == \
        [1, -1, 2, -2, 2, -2]
    a = np.array([[100]], np.int8)
    b = np.array([[100]], np.int8)
    # 10000 * 0.5 / 2**5 = 156.25 -> 156, + zero point 10 -> 166 -> saturates to 127.
    assert golden.gemm(a, b, requant=(1 << 30, 5, 10))[0, 0] == 127
    assert golden.gemm(a, -b, requant=(1 << 30, 8, 10))[0, 0] == -10  # -19.53 -> -20, +10
    assert golden.gemm(a, -b, requant=(1 << 30, 8, 10), relu=True)[0, 0] == 10
    assert golden.gemm(a, -b, relu=True)[0, 0] == 0
    assert golden.gemm(a, b, bias=[2**31 - 1])[0, 0] == -(2**31) + 9999  # INT32 wrap


@pytest.mark.parametrize("kwargs,message", [
    ({"stream_width": 48}, "stream_width must be one of"),
    ({"max_k": 0}, "max_k must be an int between 1 and 65536"),
    ({"max_n": 70000}, "max_n must be an int between 1 and 65536"),
    ({"rows": 0}, "rows must be between 1 and 32"),
])
def test_accelerator_rejects_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Accelerator(**kwargs)


def test_importing_the_protocol_loads_no_runtime():
    """``import sparsa.protocol`` (what the gateware imports) loads no part of the host
    runtime; ``sparsa.open`` and the other runtime names load it on first use."""
    import subprocess
    import sys

    program = ("import sys, sparsa.protocol\n"
               "print(sorted(m for m in sys.modules if m.startswith('sparsa.')))\n"
               "import sparsa\n"
               "print(sparsa.open('reference').info.rows, 'sparsa.host' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["['sparsa.protocol']", "8 True"]


def test_importing_sparsa_on_a_board_registers_the_ip_driver(tmp_path):
    """Where pynq is installed, ``import sparsa`` loads the runtime at once, so the IP's driver
    class (``SparsaIP``, a ``pynq.DefaultIP``) exists before an ``Overlay`` is made."""
    import os
    import subprocess
    import sys

    fake = tmp_path / "pynq"
    fake.mkdir()
    (fake / "__init__.py").write_text("class DefaultIP:\n    bindto = []\n")
    program = ("import sys, sparsa\n"
               "loaded = 'sparsa.host.backends' in sys.modules\n"
               "from sparsa.host import backends\n"
               "print(loaded, backends.SparsaIP.bindto)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path),
                                                       os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "['sparsa.dev:sparsa:sparsa_accel:1.0']"]


@pytest.mark.parametrize("seed", range(4))
def test_fast_requantization_is_gemmlowps(seed, monkeypatch):
    """The reference's requantization (sparsa.host.arith, rewritten as floors of shifted sums)
    against the golden transcription of gemmlowp's two steps, on int32 extremes, ties, every
    shift, multipliers from INT32_MIN up, per tensor and per column."""
    from sparsa.host import arith

    rng = np.random.default_rng(seed)
    low, high = -2**31, 2**31 - 1
    edges = [0, 1, -1, 2, -2, 3, -3, low, high, low + 1, 1 << 30, -(1 << 30), (1 << 30) + 1]
    for shift in range(32):
        x = rng.integers(low, high + 1, (40, 24), dtype=np.int64)
        x[:len(edges), 0] = x[0, :len(edges)] = edges
        x = x.astype(np.int32)
        for multiplier in (low, high, 0, 1, -1, int(rng.integers(low, high + 1)),
                           rng.integers(low, high + 1, 24)):
            column_shift = rng.integers(0, 32, 24) if shift == 31 else shift
            for zero_point in (0, -128, 127, 9):
                scaled = golden.rounding_divide_by_pot(
                    golden.saturating_rounding_doubling_high_mul(x, np.asarray(multiplier)),
                    np.asarray(column_shift))
                want = np.clip(scaled + zero_point, -128, 127).astype(np.int8)
                got = arith.requantize(x, multiplier, column_shift, zero_point)
                assert np.array_equal(got, want), (shift, multiplier, zero_point)
                assert np.array_equal(arith.scale(x, multiplier, column_shift), scaled)
    # Per channel of an NCHW tensor (the reference's whole convolutions): multipliers along
    # axis 1, spread over the spatial axes when the batch is large enough, or broadcast; in
    # blocks of a few images (as large tensors are).
    monkeypatch.setattr(arith, "BLOCK", 4 * 5 * 32 * 40)
    for shape in ((6, 5, 32, 40), (2, 3, 4, 5), (9, 5, 32, 40)):
        x = rng.integers(low, high + 1, shape, dtype=np.int64)
        x.reshape(-1)[:len(edges)] = edges
        x = x.astype(np.int32)
        for shift in (0, 1, 7, 31):
            multiplier = rng.integers(low, high + 1, (shape[1], 1, 1))
            multiplier[0] = low
            scaled = golden.rounding_divide_by_pot(
                golden.saturating_rounding_doubling_high_mul(x, multiplier), shift)
            want = np.clip(scaled - 5, -128, 127).astype(np.int8)
            assert np.array_equal(arith.requantize(x, multiplier, shift, -5), want), shape
