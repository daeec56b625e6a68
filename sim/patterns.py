"""Operand patterns for sparse-skip tests and benchmarks (inputs only; results come from NumPy)."""

import numpy as np


def dense(rng, shape):
    """Uniform int8 with no zeros."""
    values = rng.integers(1, 128, shape, dtype=np.int8)
    return np.where(rng.random(shape) < 0.5, -values, values).astype(np.int8)


def relu_like(rng, shape, zero_fraction):
    """Activations after a ReLU: a normal sample shifted so ``zero_fraction`` of it is <= 0,
    then scaled to 1..127; zeros fall anywhere (unstructured)."""
    x = rng.standard_normal(shape)
    shifted = x - np.quantile(x, zero_fraction)
    scale = 127 / max(shifted.max(), 1e-9)
    return np.where(shifted <= 0, 0, np.clip(np.ceil(shifted * scale), 1, 127)).astype(np.int8)


def block_sparse(rng, shape, zero_fraction, block_k, block_n):
    """Dense values with exactly ``zero_fraction`` of the block_k x block_n blocks zeroed."""
    k, n = shape
    out = dense(rng, shape)
    blocks_k, blocks_n = -(-k // block_k), -(-n // block_n)
    count = blocks_k * blocks_n
    zero = np.zeros(count, bool)
    zero[rng.choice(count, int(round(zero_fraction * count)), replace=False)] = True
    for index in np.flatnonzero(zero):
        bk, bn = divmod(index, blocks_n)
        out[bk * block_k:(bk + 1) * block_k, bn * block_n:(bn + 1) * block_n] = 0
    return out


def n_of_m(rng, shape, keep, group):
    """N:M structured sparsity along K: in every ``group`` consecutive k of a column, only
    ``keep`` values nonzero (the others chosen at random)."""
    k, n = shape
    out = dense(rng, shape)
    for g in range(-(-k // group)):
        for j in range(n):
            lanes = g * group + rng.choice(group, group - keep, replace=False)
            out[lanes[lanes < k], j] = 0
    return out


def two_four(rng, shape):
    """2:4 structured sparsity along K: in every group of 4 consecutive k of a column, 2 zeros."""
    return n_of_m(rng, shape, 2, 4)


def unstructured(rng, shape, zero_fraction):
    """Dense values with exactly ``zero_fraction`` of them, anywhere, zero (pruned weights)."""
    out = dense(rng, shape)
    count = int(round(zero_fraction * out.size))
    out.reshape(-1)[rng.choice(out.size, count, replace=False)] = 0
    return out


def mixed_groups(rng, shape, group=4):
    """Sparsity that changes across one matrix: each ``group`` consecutive k of each column
    keeps a random number (0 to ``group``) of its values, the number drawn per group of k and
    per column, with some groups all zero and some dense."""
    k, n = shape
    out = dense(rng, shape)
    groups = -(-k // group)
    keep = rng.integers(0, group + 1, (groups, n))
    keep[rng.random(groups) < 0.2] = 0
    keep[rng.random(groups) < 0.2] = group
    rank = rng.random((groups * group, n)).reshape(groups, group, n).argsort(axis=1).argsort(axis=1)
    zero = (rank >= keep[:, None, :]).reshape(groups * group, n)[:k]
    out[zero] = 0
    return out
