"""The reference backend's onnxruntime kernels (sparsa.host.cpu) against the golden model."""

import numpy as np
import pytest

from sparsa.host import arith, cpu
from sparsa.sim import golden

pytest.importorskip("onnxruntime")


def conv_golden(x, w, pad_value, strides, pads, dilations, groups):
    """A grouped 2-d convolution of int8 ``x`` (B, C, H, W) by ``w`` (N, C/groups, KH, KW)
    summed in int64, ``x`` padded with ``pad_value``, wrapped to int32: tap by tap."""
    top, left, bottom, right = pads
    x = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (top, bottom), (left, right)),
               constant_values=pad_value)
    batch, channels, height, width = x.shape
    n, per_group, kh, kw = w.shape
    oh = (height - (kh - 1) * dilations[0] - 1) // strides[0] + 1
    ow = (width - (kw - 1) * dilations[1] - 1) // strides[1] + 1
    out = np.zeros((batch, n, oh, ow), np.int64)
    n_group = n // groups
    for g in range(groups):
        xg = x[:, g * per_group:(g + 1) * per_group]
        wg = w[g * n_group:(g + 1) * n_group].astype(np.int64)
        for i in range(kh):
            for j in range(kw):
                rows = slice(i * dilations[0], i * dilations[0] + strides[0] * oh, strides[0])
                cols = slice(j * dilations[1], j * dilations[1] + strides[1] * ow, strides[1])
                taps = xg[:, :, rows, cols]  # (B, C/groups, OH, OW)
                out[:, g * n_group:(g + 1) * n_group] += np.einsum("bchw,nc->bnhw", taps,
                                                                   wg[:, :, i, j])
    return out.astype(np.int32)


def compiled_weights(w, groups):
    """``w`` (N, C/groups, KH, KW) as a compiled model holds it: (groups, K, N/groups) with K
    in (C, KH, KW) order."""
    n = w.shape[0]
    return np.ascontiguousarray(
        w.reshape(groups, n // groups, -1).transpose(0, 2, 1))


def test_int8_gemm_is_exact_and_wraps_like_the_accumulators():
    assert cpu.available()
    rng = np.random.default_rng(0)
    for m, k, n in ((1, 1, 1), (3, 9, 1), (17, 1025, 33), (256, 300, 96), (64, 4096, 8)):
        a = rng.integers(-128, 128, (m, k), dtype=np.int8)
        b = rng.integers(-128, 128, (k, n), dtype=np.int8)
        assert np.array_equal(cpu.matmul(a, b), golden.matmul_int32(a, b)), (m, k, n)
        assert np.array_equal(arith.matmul(a, b), golden.matmul_int32(a, b)), (m, k, n)
    # Sums past int32: 140000 * 128 * 128 > 2**31 wraps as the device's accumulators do.
    a = np.full((2, 140_000), -128, np.int8)
    b = np.full((140_000, 3), -128, np.int8)
    assert np.array_equal(cpu.matmul(a, b), golden.matmul_int32(a, b))
    out = np.empty((2, 3), np.int32)
    assert cpu.matmul(a, b, out) is out and np.array_equal(out, golden.matmul_int32(a, b))


@pytest.mark.parametrize("b_signed", [True, False])
def test_both_onnxruntime_gemm_forms_are_checked_against_the_saturating_extremes(b_signed):
    """The probe accepts a kernel only when it is exact at every extreme pair; the form it
    picks here is exact on random operands too (the other form, where it passes, also)."""
    kernel = cpu._matmul_integer(b_signed)
    if not cpu._exact(kernel):
        pytest.skip("this CPU's kernel of this form saturates; the probe refuses it")
    rng = np.random.default_rng(1)
    a = rng.integers(-128, 128, (50, 700), dtype=np.int8)
    b = rng.integers(-128, 128, (700, 20), dtype=np.int8)
    assert np.array_equal(kernel(a, b), golden.matmul_int32(a, b))
    # A kernel that got a pair wrong is refused.
    assert not cpu._exact(lambda a, b: kernel(a, b) + (a[:, :1].astype(np.int32) == 127))


@pytest.mark.parametrize("shape, kernel, strides, pads, dilations, groups", [
    ((2, 3, 9, 11), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    ((1, 8, 10, 10), (3, 3), (2, 2), (0, 1, 2, 1), (1, 1), 8),      # depthwise, stride 2
    ((2, 12, 7, 9), (3, 2), (1, 2), (2, 0, 1, 3), (2, 1), 3),       # groups, dilation
    ((1, 4, 6, 6), (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1),        # pointwise, no padding
    ((1, 300, 5, 5), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),      # K = 2700: three chunks
])
def test_convolution_kernel_is_exact(shape, kernel, strides, pads, dilations, groups):
    rng = np.random.default_rng(2)
    channels = shape[1]
    n = 2 * groups
    x = rng.integers(-128, 128, shape, dtype=np.int8)
    w = rng.integers(-128, 128, (n, channels // groups, *kernel), dtype=np.int8)
    bias = rng.integers(-2**20, 2**20, n, dtype=np.int32)
    conv = {"kernel_shape": list(kernel), "strides": list(strides), "pads": list(pads),
            "dilations": list(dilations)}
    layer = cpu.conv_kernel(compiled_weights(w, groups), conv)
    assert layer is not None and layer.usable(bias)
    for pad_value in (0, -7, 127):
        expected = conv_golden(x, w, pad_value, strides, pads, dilations, groups)
        expected = expected + bias.reshape(1, n, 1, 1)
        assert np.array_equal(layer(x, pad_value, bias), expected), pad_value
    # The extremes: every float32 chunk sum at +-2**24 stays exact.
    for x_value, w_value in ((-128, -128), (127, -128)):
        x_full = np.full(shape, x_value, np.int8)
        w_full = np.full(w.shape, w_value, np.int8)
        extreme = cpu.conv_kernel(compiled_weights(w_full, groups), conv)
        expected = conv_golden(x_full, w_full, x_value, strides, pads, dilations, groups)
        assert np.array_equal(extreme(x_full, x_value, np.zeros(n, np.int32)), expected)


def test_convolutions_without_an_exact_float_form_are_left_to_numpy():
    conv = {"kernel_shape": [33, 33], "strides": [1, 1], "pads": [0, 0, 0, 0],
            "dilations": [1, 1]}
    assert cpu.conv_kernel(np.zeros((1, 33 * 33, 2), np.int8), conv) is None
    conv["kernel_shape"] = [3, 3]  # groups of more than 1024 products each
    assert cpu.conv_kernel(np.zeros((2, 9 * 120, 2), np.int8), conv) is None
    layer = cpu.conv_kernel(np.zeros((1, 9 * 4, 2), np.int8), conv)
    assert not layer.usable(np.array([2**31 - 2**20, 0], np.int32))  # the sum could wrap


def test_numpy_alone_when_turned_off(monkeypatch):
    monkeypatch.setenv("SPARSA_CPU_KERNELS", "numpy")
    assert not cpu.available() and cpu.matmul(np.ones((2, 2), np.int8),
                                              np.ones((2, 2), np.int8)) is None
    a = np.full((4, 2000), 127, np.int8)
    assert np.array_equal(arith.matmul(a, a.T.copy()), golden.matmul_int32(a, a.T))
