"""Making weights sparse: magnitude pruning into the patterns pruning tools produce."""

import re

import numpy as np


def prune(weights, pattern):
    """A copy of ``weights`` (K x N, as ``matmul`` takes B; int or float) with the entries of
    smallest magnitude set to zero.

    ``pattern``: ``"n:m"`` (e.g. ``"2:4"``, ``"1:4"``): in every column, of each ``m``
    consecutive k (a last, shorter group included) keep the ``n`` largest; or a fraction in
    [0, 1): zero that share of all the entries, smallest first (unstructured). Ties keep the
    lower k (or the earlier entry)."""
    w = np.asarray(weights)
    if w.ndim != 2 or w.size == 0:
        raise ValueError(f"weights: expected a non-empty K x N matrix, got shape {w.shape}")
    if w.dtype.kind not in "iuf":
        raise TypeError(f"weights: expected integers or floats, got dtype {w.dtype}")
    magnitude = np.abs(w.astype(np.float64))
    out = w.copy()
    if isinstance(pattern, str):
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
        if not match or not 0 < int(match.group(1)) <= int(match.group(2)):
            raise ValueError(f"pattern: expected 'n:m' with 0 < n <= m (e.g. '2:4') or a "
                             f"fraction, got {pattern!r}")
        keep, group = int(match.group(1)), int(match.group(2))
        k = w.shape[0]
        for start in range(0, k, group):
            block = magnitude[start:start + group]  # (group, N)
            if block.shape[0] <= keep:
                continue
            # Rank within the group, largest first, the lower k first among equals.
            order = np.argsort(-block, axis=0, kind="stable")
            drop = order[keep:]
            np.put_along_axis(out[start:start + group], drop, 0, axis=0)
        return out
    if isinstance(pattern, (int, float, np.floating)) and not isinstance(pattern, bool) \
            and 0 <= pattern < 1:
        count = int(round(float(pattern) * w.size))
        if count:
            order = np.argsort(magnitude.reshape(-1), kind="stable")[:count]
            out.reshape(-1)[order] = 0
        return out
    raise ValueError(f"pattern: expected 'n:m' (e.g. '2:4') or a fraction in [0, 1), got "
                     f"{pattern!r}")
