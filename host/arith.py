"""The device's arithmetic on the host, fast and bit-exact (see :mod:`sparsa.protocol`, "Arithmetic").

INT8 x INT8 products summed in INT32 go through floating-point BLAS, which is exact here: every
partial sum of ``K`` products is an integer of magnitude at most ``K * 2**14``, and float32
represents every integer up to ``2**24`` exactly, whatever order BLAS adds in. So K is cut into
chunks of at most :data:`FLOAT32_EXACT_K` = 1024, each chunk's float32 sums are converted to
int32 exactly, and the chunks are added in int32 with two's-complement wrap, as the device's
accumulators do.
"""

import concurrent.futures
import os
import threading

import numpy as np

from . import cpu

FLOAT32_EXACT_K = 1024  # 1024 * 128 * 128 == 2**24: the largest K whose sums float32 holds exactly
INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1


class Workspace:
    """Scratch arrays kept between calls. Fresh multi-megabyte arrays come from new pages that
    the kernel must fault in, which costs about as much as the float32 GEMM itself at 512^3."""

    def __init__(self):
        self._buffers = {}

    def get(self, name, shape, dtype):
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        buffer = self._buffers.get(name)
        if buffer is None or buffer.size < size:
            buffer = self._buffers[name] = np.empty(size, np.uint8)
        return buffer[:size].view(dtype).reshape(shape)


def matmul(a, b, out=None, workspace=None):
    """``a @ b`` for int8 ``a`` (M x K) and ``b`` (K x N) as int32 with wrap-around (wider
    integers go through int64, exactly but without BLAS; int8 products through onnxruntime's
    kernel when it is installed, :func:`sparsa.host.cpu.matmul`)."""
    (m, k), n = a.shape, b.shape[1]
    if a.dtype != np.int8 or b.dtype != np.int8:
        product = a.astype(np.int64) @ b.astype(np.int64)
        if out is None:
            return product.astype(np.int32)  # two's-complement wrap
        np.copyto(out, product, casting="unsafe")
        return out
    result = cpu.matmul(a, b, out)  # onnxruntime's kernel, when installed
    if result is not None:
        return result
    workspace = workspace or Workspace()
    if out is None:
        out = np.empty((m, n), np.int32)
    product = workspace.get("product", (m, n), np.float32)
    for start in range(0, k, FLOAT32_EXACT_K):
        stop = min(start + FLOAT32_EXACT_K, k)
        a_float = workspace.get("a", (m, stop - start), np.float32)
        b_float = workspace.get("b", (stop - start, n), np.float32)
        np.copyto(a_float, a[:, start:stop])
        np.copyto(b_float, b[start:stop])
        np.matmul(a_float, b_float, out=product)
        if start == 0:
            np.copyto(out, product, casting="unsafe")  # exact: |product| <= 2**24
        else:
            out += product.astype(np.int32)  # int32 addition wraps, like the accumulators
    return out


def requantize(x, multiplier, shift, zero_point):
    """gemmlowp requantization of int32 ``x`` to int8: saturating rounding doubling high multiply
    by ``multiplier``, rounding right shift by ``shift``, plus ``zero_point``, saturated.

    ``multiplier`` and ``shift`` may be scalars or arrays broadcasting against ``x`` (one per
    output column: per-channel requantization).
    """
    zero_point = np.asarray(zero_point)
    x = np.asarray(x)
    rows = max(1, BLOCK // max(1, x[:1].size))
    if x.ndim > 1 and x.shape[0] > rows and all(
            np.ndim(v) < x.ndim or np.shape(v)[0] == 1 for v in (multiplier, shift, zero_point)):
        # In blocks of leading rows, each block's int64 passes in the CPU's caches, the blocks
        # shared among the cores (NumPy's loops release the GIL).
        out = np.empty(x.shape, np.int8)

        def block(start):
            out[start:start + rows] = requantize(x[start:start + rows], multiplier, shift,
                                                 zero_point)
        list(_pool().map(block, range(0, x.shape[0], rows)))
        return out
    if zero_point.ndim:
        out = scale(x, multiplier, shift)
        out += zero_point
        np.clip(out, -128, 127, out=out)
        return out.astype(np.int8)
    scaled = _scaled(x, multiplier, shift)
    zero = int(zero_point)
    np.clip(scaled, -128 - zero, 127 - zero, out=scaled)  # then the zero point, in int8
    out = scaled.astype(np.int8)
    out += np.int8(zero)
    return out


def scale(x, multiplier, shift):
    """The multiply and shift of :func:`requantize`, before the zero point and the int8
    saturation (a new int64 array)."""
    return _scaled(x, multiplier, shift).copy()


_local = threading.local()
_pools = []


def _pool():
    """Threads for the blocks of large element-wise passes: one per core."""
    if not _pools:
        with _pool_lock:
            if not _pools:
                _pools.append(concurrent.futures.ThreadPoolExecutor(
                    os.cpu_count() or 1, thread_name_prefix="sparsa-arith"))
    return _pools[0]


_pool_lock = threading.Lock()
BLOCK = 1 << 19  # elements per block of a large requantization (4 MiB of int64)


def _scaled(x, multiplier, shift):
    """:func:`scale` into this thread's scratch int64 array (valid until its next call): the
    reference's costliest pass after the GEMM, in place on one array kept between calls
    (a fresh array of this size costs its page faults, as much again as the arithmetic).

    gemmlowp's doubling high multiply nudges the product by 2**30 (by 1 - 2**30 below zero)
    and divides by 2**31 truncating toward zero, which is ``floor((p + 2**30) / 2**31)`` for
    every ``p``; its rounding right shift rounds half away from zero, which is
    ``floor((high + 2**(shift-1) - (high < 0)) / 2**shift)`` for a shift of at least one
    (``high >> 63`` is ``-(high < 0)``)."""
    x = np.asarray(x)
    multiplier = np.asarray(multiplier, np.int64)
    shift = np.asarray(shift, np.int64)
    workspace = getattr(_local, "workspace", None)
    if workspace is None:
        workspace = _local.workspace = Workspace()
    p = workspace.get("scaled", x.shape, np.int64)
    np.copyto(p, x, casting="unsafe")  # (integers, of any type)
    saturate = (x == INT32_MIN) & (multiplier == INT32_MIN) if (
        multiplier == INT32_MIN).any() else None
    _multiply(p, multiplier, workspace)  # |p| <= 2**62: exact in int64
    p += 1 << 30
    p >>= 31
    if saturate is not None:
        p[np.broadcast_to(saturate, p.shape)] = INT32_MAX
    if shift.ndim:  # one shift per column
        mask = (np.int64(1) << shift) - 1
        nonnegative = (p >= 0) & (mask > 0)
        p += mask >> 1
        p += nonnegative
        p >>= shift
        return p
    if shift > 0:
        sign = workspace.get("sign", x.shape, np.int64)
        np.right_shift(p, 63, out=sign)
        p += sign
        p += 1 << (int(shift) - 1)
        p >>= shift
    return p


def _multiply(p, multiplier, workspace):
    """``p *= multiplier`` (int64). Multipliers along an axis other than the last (a
    convolution's channels in NCHW) are first spread over the axes after it, once for all
    the leading ones: NumPy's multiply by a broadcast array takes two to three times longer."""
    padded = multiplier.reshape((1,) * (p.ndim - multiplier.ndim) + multiplier.shape)
    first = next((axis for axis, size in enumerate(padded.shape) if size > 1), p.ndim)
    if first >= p.ndim - 1 or np.prod(p.shape[:first]) < 4:
        p *= multiplier
        return
    spread = workspace.get("multiplier", p.shape[first:], np.int64)
    np.copyto(spread, padded[(0,) * first])
    p *= spread


def postprocess(acc, bias=None, requant=None, relu=False):
    """Bias, requantization and ReLU of int32 accumulators, in the device's order."""
    if bias is not None:
        acc = acc + bias  # int32 + int32 wraps
    if requant is None:
        return np.maximum(acc, 0, out=acc if bias is not None else None) if relu else acc
    multiplier, shift, zero_point = requant
    out = requantize(acc, multiplier, shift, zero_point)
    if relu:
        np.maximum(out, np.int8(zero_point), out=out)
    return out


def gemm(a, b, bias=None, requant=None, relu=False, workspace=None):
    """The device's result for one job: ``postprocess(a @ b)``."""
    return postprocess(matmul(a, b, workspace=workspace), bias, requant, relu)
