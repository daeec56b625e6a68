"""The independent golden model the testbenches check against: plain NumPy integer arithmetic."""

import numpy as np


def matmul_int32(a, b):
    """``a @ b`` for int8 matrices, accumulated exactly in int64 and wrapped to int32 as hardware does."""
    a = np.asarray(a)
    b = np.asarray(b)
    return (a.astype(np.int64) @ b.astype(np.int64)).astype(np.int32)


INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1


def saturating_rounding_doubling_high_mul(x, multiplier):
    """gemmlowp's SaturatingRoundingDoublingHighMul, elementwise on int64 arrays."""
    x = np.asarray(x, np.int64)
    multiplier = np.int64(multiplier)
    product = x * multiplier
    nudge = np.where(product >= 0, np.int64(1 << 30), np.int64(1 - (1 << 30)))
    total = product + nudge
    high = np.where(total >= 0, total // (1 << 31), -((-total) // (1 << 31)))  # toward zero
    return np.where((x == INT32_MIN) & (multiplier == INT32_MIN), INT32_MAX, high)


def rounding_divide_by_pot(x, exponent):
    """gemmlowp's RoundingDivideByPOT: x / 2**exponent rounded half away from zero."""
    x = np.asarray(x, np.int64)
    mask = (1 << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> exponent) + (remainder > threshold)


def gemm(a, b, bias=None, requant=None, relu=False):
    """The accelerator's result for ``a @ b``: bias, requantization ``(multiplier, shift,
    zero_point)`` to int8 and ReLU as specified in :mod:`sparsa.protocol`."""
    acc = matmul_int32(a, b)
    if bias is not None:
        acc = (acc.astype(np.int64) + np.asarray(bias, np.int64)).astype(np.int32)
    if requant is None:
        return np.maximum(acc, 0) if relu else acc
    multiplier, shift, zero_point = requant
    scaled = rounding_divide_by_pot(saturating_rounding_doubling_high_mul(acc, multiplier), shift)
    out = np.clip(scaled + zero_point, -128, 127)
    if relu:
        out = np.maximum(out, zero_point)
    return out.astype(np.int8)
