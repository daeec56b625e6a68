"""Argument checks with errors that name the argument, what was expected and what was given."""

import numbers

import numpy as np

from .arith import INT32_MAX, INT32_MIN


def _describe(value):
    if isinstance(value, np.ndarray):
        return f"an array of dtype {value.dtype} and shape {value.shape}"
    return f"{type(value).__name__}"


def check_array(value, name, dtype, ndim=None):
    """``value`` as it is, if it is a NumPy array of ``dtype`` (and ``ndim``) with no empty axis."""
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray of {np.dtype(dtype)}, "
                        f"got {_describe(value)}")
    if value.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {np.dtype(dtype)}, got {value.dtype}"
                        + (" (quantize floats first, e.g. sparsa.quantize)"
                           if value.dtype.kind == "f" and np.dtype(dtype) == np.int8 else ""))
    if ndim is not None and value.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d array, got {value.ndim}-d of shape "
                         f"{value.shape}")
    if value.size == 0:
        raise ValueError(f"{name}: expected no empty dimension, got shape {value.shape}")
    return value


def check_int8_array(value, name):
    return check_array(value, name, np.int8)


def check_float_array(value, name):
    if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
        raise TypeError(f"{name}: expected a numpy.ndarray of floats, got {_describe(value)}")
    if value.size == 0:
        raise ValueError(f"{name}: expected a non-empty array, got shape {value.shape}")
    if not np.all(np.isfinite(value)):
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(value))[0])
        raise ValueError(f"{name}: expected finite values, got {value[bad]} at index {bad}")
    return value


def _check_int(value, name, low, high):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name}: expected {low}..{high}, got {value}")
    return int(value)


def _check_int_or_columns(value, name, low, high, n):
    """An integer in low..high, or an integer array of shape (n,) with values in low..high."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "iu":
            raise TypeError(f"requant {name}: expected integers, got dtype {value.dtype}")
        if value.shape != (n,):
            raise ValueError(f"requant {name}: expected a scalar or shape ({n},) (one per "
                             f"output column), got shape {value.shape}")
        if value.min() < low or value.max() > high:
            raise ValueError(f"requant {name}: expected values in {low}..{high}, got "
                             f"{value.min()}..{value.max()}")
        return value.astype(np.int64)
    return _check_int(value, f"requant {name}", low, high)


def check_requant(requant, n):
    """``(multiplier, shift, zero_point)``: multiplier int32, shift 0..31, zero point -128..127.
    Multiplier and shift may be arrays of one per output column (applied on the host)."""
    if requant is None:
        return None
    if not isinstance(requant, (tuple, list)) or len(requant) != 3:
        raise TypeError(f"requant: expected a (multiplier, shift, zero_point) tuple, "
                        f"got {requant!r}")
    multiplier, shift, zero_point = requant
    return (_check_int_or_columns(multiplier, "multiplier", INT32_MIN, INT32_MAX, n),
            _check_int_or_columns(shift, "shift", 0, 31, n),
            _check_int(zero_point, "requant zero_point", -128, 127))


def check_matmul(a, b, bias, requant, relu, sparse_skip, out=None):
    """Check ``matmul``'s arguments; returns the normalized ``requant``."""
    check_array(a, "A", np.int8, 2)
    check_array(b, "B", np.int8, 2)
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"B: expected {a.shape[1]} rows to match A's {a.shape[1]} columns "
                         f"(A is {a.shape}), got shape {b.shape}")
    n = b.shape[1]
    if bias is not None:
        check_array(bias, "bias", np.int32, 1)
        if bias.shape != (n,):
            raise ValueError(f"bias: expected shape ({n},) (one per column of B), "
                             f"got {bias.shape}")
    requant = check_requant(requant, n)
    for name, flag in (("relu", relu), ("sparse_skip", sparse_skip)):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"{name}: expected True or False, got {flag!r}")
    if out is not None:
        dtype = np.int8 if requant is not None else np.int32
        shape = (a.shape[0], n)
        if not isinstance(out, np.ndarray) or out.dtype != dtype or out.shape != shape:
            raise ValueError(f"out: expected a numpy.ndarray of dtype {np.dtype(dtype)} and "
                             f"shape {shape}, got {_describe(out)}")
        if not out.flags.writeable:
            raise ValueError("out: expected a writeable array, got a read-only one")
        if not out.flags.c_contiguous:
            raise ValueError("out: expected a C-contiguous array, got a non-contiguous view")
        if np.shares_memory(out, a) or np.shares_memory(out, b):
            raise ValueError("out: must not overlap A or B")
    return requant
