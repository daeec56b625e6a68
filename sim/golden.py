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
    return postprocess(matmul_int32(a, b), bias, requant, relu)


def postprocess(acc, bias=None, requant=None, relu=False):
    """Bias, requantization and ReLU of int32 sums ``acc``; ``bias`` and the multiplier may
    have one value per column."""
    acc = np.asarray(acc, np.int32)
    if bias is not None:
        acc = (acc.astype(np.int64) + np.asarray(bias, np.int64)).astype(np.int32)
    if requant is None:
        return np.maximum(acc, 0) if relu else acc
    multiplier, shift, zero_point = requant
    multiplier = np.asarray(multiplier, np.int64)
    scaled = rounding_divide_by_pot(saturating_rounding_doubling_high_mul(acc, multiplier), shift)
    out = np.clip(scaled + zero_point, -128, 127)
    if relu:
        out = np.maximum(out, zero_point)
    return out.astype(np.int8)


def sparse_counters(a, b, rows, cols, skip=True, groups=False):
    """What the accelerator's counters must read after ``a @ b`` on a rows x cols array (B in
    the group format with ``groups``).

    ``MACS_SKIPPED``: products with a zero operand, over the real matrices. ``KSTEPS_SKIPPED``:
    per output tile, K less the steps issued (:func:`ksteps_issued`). ``MACS``: real products
    of the steps issued.
    """
    a = np.asarray(a)
    b = np.asarray(b)
    m, k = a.shape
    n = b.shape[1]
    products = m * k * n
    nonzero_pairs = int(((a != 0).sum(axis=0).astype(np.int64) * (b != 0).sum(axis=1)).sum())
    issued = ksteps_issued(a, b, rows, cols, skip, groups)
    m_tiles, n_tiles = issued.shape
    rows_real = np.minimum(rows, m - rows * np.arange(m_tiles))
    cols_real = np.minimum(cols, n - cols * np.arange(n_tiles))
    macs = int((issued * rows_real[:, None] * cols_real[None, :]).sum())
    return {"MACS": macs % 2**32, "MACS_SKIPPED": (products - nonzero_pairs) % 2**32,
            "KSTEPS_SKIPPED": int(m_tiles * n_tiles * k - issued.sum()) % 2**32}


def ksteps_issued(a, b, rows, cols, skip=True, groups=False):
    """Per output tile ([m-tile, n-tile], int64), the k-steps of ``a @ b`` a rows x cols array
    issues: those whose A column (the tile's rows) and B row (its columns) both have a nonzero,
    or all K without skipping. With ``groups`` (B in the group format), per group of four
    k-steps whose A columns are not all zero, as many steps as the tile's column with the most
    nonzeros of B in the group has."""
    a = np.asarray(a)
    b = np.asarray(b)
    m, k = a.shape
    n = b.shape[1]
    m_tiles, n_tiles = -(-m // rows), -(-n // cols)
    if not skip:
        return np.full((m_tiles, n_tiles), k, np.int64)
    a_pad = np.zeros((m_tiles * rows, k), bool)
    a_pad[:m] = a != 0
    b_pad = np.zeros((k, n_tiles * cols), bool)
    b_pad[:, :n] = b != 0
    a_live = a_pad.reshape(m_tiles, rows, k).any(axis=1).astype(np.int64)  # [m-tile, k]
    if groups:
        count = -(-k // 4)
        a_group = np.zeros((m_tiles, count * 4), np.int64)
        a_group[:, :k] = a_live
        a_group = a_group.reshape(m_tiles, count, 4).any(axis=2).astype(np.int64)
        b_group = np.zeros((count * 4, n_tiles * cols), np.int64)
        b_group[:k] = b_pad
        steps = b_group.reshape(count, 4, n_tiles, cols).sum(axis=1).max(axis=2)  # [group, t]
        return a_group @ steps
    b_live = b_pad.reshape(k, n_tiles, cols).any(axis=2).astype(np.int64)  # [k, n-tile]
    return a_live @ b_live
