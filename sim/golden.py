"""The independent golden model the testbenches check against: plain NumPy integer arithmetic."""

import numpy as np


def matmul_int32(a, b):
    """``a @ b`` for int8 matrices, accumulated exactly in int64 and wrapped to int32 as hardware does."""
    a = np.asarray(a)
    b = np.asarray(b)
    return (a.astype(np.int64) @ b.astype(np.int64)).astype(np.int32)
