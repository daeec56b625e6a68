"""Compiled models: a graph of accelerator GEMMs and NumPy host ops, one ``.npz`` file, NumPy only.

:func:`sparsa.onnx.compile` turns a quantized ONNX model into a :class:`CompiledModel`; this
module runs one (and loads a saved one) with nothing but NumPy and sparsa's host package, so it
is what a PYNQ board needs.

The graph is a list of :class:`Node` in execution order over named tensors. Two kinds of node:

- ``QGemm``, the accelerator's: an int8 activation (a matrix, the rows of an ``[..., K]`` tensor
  or a convolution's im2col patches) times int8 weights prepared once, with the int32 bias,
  requantization and ReLU the device applies. The activation's zero point folds into the bias
  (``sum((x - zx) * w) = sum(x * w) - zx * colsum(w)``), exactly.
- host ops, ONNX's semantics in NumPy (:data:`HOST_OPS`): pooling, residual adds, reshapes,
  softmax, (de)quantization and the like.

Quantized tensors are int8 inside the graph. A tensor the ONNX model holds as uint8 is held as
``q - 128`` with its zero point less 128 (the same real values); model inputs and outputs of
uint8 are converted at the edges. Every backend gives identical outputs: the host ops are the
same NumPy on each, and the accelerators are bit-exact with each other.
"""

import concurrent.futures
import contextlib
import io
import json
import threading
import time
import weakref
import zipfile
from dataclasses import dataclass, field

import numpy as np

from . import arith, cpu
from .errors import ModelError
from .schema import RECORDS, WINDOW, bad_window, is_int

FORMAT = "sparsa-compiled-model"
VERSION = 1


@dataclass
class Node:
    """One step: ``op`` applied to the tensors named ``inputs`` ("" for an absent optional
    input) giving ``outputs``. ``attrs`` are JSON values; arrays live in the model's constants
    and are named in ``attrs`` or ``inputs``."""

    op: str
    name: str
    inputs: list
    outputs: list
    attrs: dict = field(default_factory=dict)
    spec: object = field(default=None, compare=False, repr=False)
    """A device node's typed attributes (:mod:`sparsa.host.schema`), set when the model
    is checked."""

    def describe(self):
        return f"{self.attrs.get('source_op', self.op)} node {self.name!r}"


# ---- host ops -------------------------------------------------------------------------------

def _int(value):
    return int(np.asarray(value).reshape(-1)[0])


def _axis(node, ndim, name="axis", default=0):
    axis = node.attrs.get(name, default)
    return axis + ndim if axis < 0 else axis


def _per_axis(values, x, axis):
    values = np.asarray(values)
    if values.size == 1:
        return values.reshape(())
    shape = [1] * x.ndim
    shape[axis if axis >= 0 else axis + x.ndim] = values.size
    return values.reshape(shape)


def quantize_linear(x, scale, zero_point, axis=1):
    """ONNX QuantizeLinear to the graph's int8 (``zero_point`` already in int8 terms): round
    half to even, saturate to -128..127. (In float32: the rounded quotient plus a zero point
    is exact below 2**23, and saturates alike above.)"""
    x = np.asarray(x, np.float32)
    scale = _per_axis(np.asarray(scale, np.float32), x, axis)
    zero_point = _per_axis(np.asarray(zero_point, np.int64), x, axis)
    q = np.divide(x, scale, dtype=np.float32)
    np.rint(q, out=q)
    q += zero_point.astype(np.float32)
    np.clip(q, -128, 127, out=q)
    return q.astype(np.int8)


def dequantize_linear(q, scale, zero_point=0, axis=1):
    """ONNX DequantizeLinear: ``(q - zero_point) * scale`` as float32 (the difference of two
    int8 is exact in float32)."""
    scale = _per_axis(np.asarray(scale, np.float32), q, axis)
    zero_point = _per_axis(np.asarray(zero_point, np.int64), q, axis)
    if q.dtype.itemsize > 2:  # int32 (a bias): the difference first, as ONNX defines it
        return (q.astype(np.int64) - zero_point).astype(np.float32) * scale
    y = q.astype(np.float32)
    y -= zero_point.astype(np.float32)
    y *= scale
    return y


def _quantize(node, x, scale, zero_point=None):
    return quantize_linear(x, scale, 0 if zero_point is None else zero_point,
                           node.attrs.get("axis", 1))


def _dequantize(node, q, scale, zero_point=None):
    return dequantize_linear(q, scale, 0 if zero_point is None else zero_point,
                             node.attrs.get("axis", 1))


def _dynamic_quantize(node, x):
    """ONNX DynamicQuantizeLinear (uint8 in ONNX; here int8 with the zero point less 128)."""
    x = np.asarray(x, np.float32)
    low = min(0.0, float(x.min()))
    high = max(0.0, float(x.max()))
    scale = np.float32((high - low) / 255.0) if high > low else np.float32(1.0)
    zero_point = int(np.clip(np.rint(np.float32(-low) / scale), 0, 255))
    q = np.clip(np.rint(x / scale) + zero_point, 0, 255) - 128
    return q.astype(np.int8), np.asarray(scale, np.float32), np.asarray(zero_point - 128, np.int64)


def _windows(x, kernel, strides, pads, dilations, pad_value):
    """``x`` (N, C, H, W) padded and cut into windows: (N, C, OH, OW, KH, KW)."""
    top, left, bottom, right = pads
    if any(pads):
        x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=pad_value)
    kh, kw = kernel
    dh, dw = dilations
    span = ((kh - 1) * dh + 1, (kw - 1) * dw + 1)
    if x.shape[2] < span[0] or x.shape[3] < span[1]:
        raise ModelError(f"input of spatial size {x.shape[2]}x{x.shape[3]} (padded) is smaller "
                         f"than the {span[0]}x{span[1]} window")
    windows = np.lib.stride_tricks.sliding_window_view(x, span, axis=(2, 3))
    return windows[:, :, ::strides[0], ::strides[1], ::dh, ::dw]


def _check_4d(node, x):
    if x.ndim != 4:
        raise ModelError(f"{node.describe()}: expected a 4-d NCHW input, got shape {x.shape}")


def _max_pool(node, x):
    _check_4d(node, x)
    a = node.attrs
    low = np.iinfo(x.dtype).min if x.dtype.kind in "iu" else -np.inf
    windows = _windows(x, a["kernel_shape"], a["strides"], a["pads"], a["dilations"], low)
    return windows.max(axis=(4, 5))


def _average_pool(node, x):
    _check_4d(node, x)
    a = node.attrs
    x = np.asarray(x, np.float32)
    windows = _windows(x, a["kernel_shape"], a["strides"], a["pads"], (1, 1), 0.0)
    total = windows.sum(axis=(4, 5), dtype=np.float32)
    if a.get("count_include_pad", 0) or not any(a["pads"]):
        return total / np.float32(a["kernel_shape"][0] * a["kernel_shape"][1])
    ones = np.ones((1, 1) + x.shape[2:], np.float32)
    counts = _windows(ones, a["kernel_shape"], a["strides"], a["pads"], (1, 1), 0.0)
    return total / counts.sum(axis=(4, 5))


def _global_average_pool(node, x):
    if x.ndim < 3:
        raise ModelError(f"{node.describe()}: expected an (N, C, spatial...) input, got shape "
                         f"{x.shape}")
    return np.mean(np.asarray(x, np.float32), axis=tuple(range(2, x.ndim)), keepdims=True,
                   dtype=np.float32)


def _reshape(node, x, shape):
    shape = [int(s) for s in np.asarray(shape).reshape(-1)]
    if not node.attrs.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    try:
        return x.reshape(shape)
    except ValueError as error:
        raise ModelError(f"{node.describe()}: cannot reshape {x.shape} to {shape}") from error


def _flatten(node, x):
    axis = _axis(node, x.ndim, default=1)
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


def _transpose(node, x):
    perm = node.attrs.get("perm") or list(range(x.ndim))[::-1]
    return np.ascontiguousarray(np.transpose(x, perm))


def _squeeze(node, x, axes=None):
    if axes is None and "axes" in node.attrs:
        axes = node.attrs["axes"]
    if axes is None:
        return np.squeeze(x)
    return np.squeeze(x, axis=tuple(int(a) % x.ndim for a in np.asarray(axes).reshape(-1)))


def _unsqueeze(node, x, axes=None):
    axes = node.attrs["axes"] if axes is None else axes
    axes = sorted(int(a) % (x.ndim + len(np.asarray(axes).reshape(-1)))
                  for a in np.asarray(axes).reshape(-1))
    for a in axes:
        x = np.expand_dims(x, a)
    return x


def _pad(node, x, pads=None, value=None, axes=None):
    pads = np.asarray(pads if pads is not None else node.attrs["pads"]).reshape(-1)
    rank = x.ndim if axes is None else len(np.asarray(axes).reshape(-1))
    axes = list(range(x.ndim)) if axes is None else [int(a) % x.ndim
                                                     for a in np.asarray(axes).reshape(-1)]
    width = [(0, 0)] * x.ndim
    for i, a in enumerate(axes):
        width[a] = (int(pads[i]), int(pads[i + rank]))
    if any(w < 0 for pair in width for w in pair):
        raise ModelError(f"{node.describe()}: negative pads are not supported, got {list(pads)}")
    value = node.attrs.get("value", 0) if value is None else _scalar(value)
    return np.pad(x, width, constant_values=np.asarray(value).astype(x.dtype))


def _scalar(value):
    return np.asarray(value).reshape(-1)[0]


def _softmax(node, x):
    """ONNX Softmax over ``axis`` (opset 13 on), or with ``through_last`` over every axis from
    ``axis`` on together (before opset 13)."""
    axis = _axis(node, x.ndim, default=-1)
    axes = tuple(range(axis, x.ndim)) if node.attrs.get("through_last") else axis
    x = np.asarray(x, np.float32)
    shifted = np.exp(x - x.max(axis=axes, keepdims=True))
    return (shifted / shifted.sum(axis=axes, keepdims=True)).astype(np.float32)


def _argmax(node, x):
    axis = _axis(node, x.ndim)
    if node.attrs.get("select_last_index", 0):
        flipped = np.flip(x, axis)
        index = x.shape[axis] - 1 - np.argmax(flipped, axis=axis)
    else:
        index = np.argmax(x, axis=axis)
    index = index.astype(np.int64)
    return np.expand_dims(index, axis) if node.attrs.get("keepdims", 1) else index


def _clip(node, x, low=None, high=None):
    low = node.attrs.get("min") if low is None else _scalar(low)
    high = node.attrs.get("max") if high is None else _scalar(high)
    if low is not None:
        x = np.maximum(x, np.asarray(low).astype(x.dtype))
    if high is not None:
        x = np.minimum(x, np.asarray(high).astype(x.dtype))
    return x


def _concat(node, *xs):
    return np.concatenate(xs, axis=_axis(node, xs[0].ndim))


def _sum(node, *xs):
    total = xs[0]
    for x in xs[1:]:
        total = total + x
    return total


def hold_uint8(value):
    """uint8 values as the graph holds them: int8, less 128."""
    return (np.asarray(value).astype(np.int16) - 128).astype(np.int8)


def release_uint8(value):
    """Held values (int8, less 128) back to uint8."""
    return (np.asarray(value).astype(np.int16) + 128).astype(np.uint8)


def _cast(node, x):
    """ONNX Cast; a uint8 tensor (held as int8 less 128) is taken back to uint8 first, and
    one cast to uint8 is held as int8 less 128."""
    if node.attrs.get("from_shifted"):
        x = release_uint8(x)
    y = x.astype(node.attrs["to"])
    return hold_uint8(y) if node.attrs.get("to_shifted") else y


def _reduce_mean(node, x, axes=None):
    """ONNX ReduceMean in float32: ``axes`` an attribute (before opset 18) or an input; none
    reduce every axis, or nothing with ``noop_with_empty_axes``."""
    axes = _axes(node, axes)
    x = np.asarray(x, np.float32)
    if not axes:
        if node.attrs.get("noop_with_empty_axes", 0):
            return x
        axes = range(x.ndim)
    return np.mean(x, axis=tuple(a % x.ndim for a in axes),
                   keepdims=bool(node.attrs.get("keepdims", 1)), dtype=np.float32)


def _shape(node, x):
    start, end = node.attrs.get("start", 0), node.attrs.get("end")
    return np.array(np.shape(x)[start:end], np.int64)


def _gather(node, x, indices):
    axis = _axis(node, np.ndim(x))
    return np.take(x, np.asarray(indices, np.int64) % np.shape(x)[axis], axis=axis)


def _batch_norm(node, x, scale, bias, mean, var):
    """ONNX BatchNormalization (inference) in float32 over axis 1."""
    x = np.asarray(x, np.float32)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    params = [np.asarray(v, np.float32).reshape(shape) for v in (scale, bias, mean, var)]
    scale, bias, mean, var = params
    inverse = np.float32(1) / np.sqrt(var + np.float32(node.attrs.get("epsilon", 1e-5)))
    return ((x - mean) * (inverse * scale) + bias).astype(np.float32)


def _erf(x):
    """The error function in float32, from float64 (Abramowitz and Stegun 7.1.26: an error
    below 1.5e-7, about a float32 step near 1)."""
    x = np.asarray(x, np.float64)
    t = 1.0 / (1.0 + 0.3275911 * np.abs(x))
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027
                                                                          + t * 1.061405429))))
    return (np.sign(x) * (1.0 - poly * np.exp(-x * x))).astype(np.float32)


def _layer_norm(node, x, scale, bias=None):
    """ONNX LayerNormalization in float32: over the axes from ``axis`` on."""
    x = np.asarray(x, np.float32)
    axes = tuple(range(_axis(node, x.ndim, default=-1), x.ndim))
    mean = x.mean(axis=axes, keepdims=True, dtype=np.float32)
    centered = x - mean
    variance = np.mean(centered * centered, axis=axes, keepdims=True, dtype=np.float32)
    y = centered / np.sqrt(variance + np.float32(node.attrs.get("epsilon", 1e-5)))
    y = y * np.asarray(scale, np.float32)
    if bias is not None:
        y = y + np.asarray(bias, np.float32)
    return y.astype(np.float32)


def _float(function):
    """An element-wise float op as a host op (float32 in, float32 out)."""
    return lambda node, *xs: np.asarray(function(*(np.asarray(x, np.float32) for x in xs)),
                                        np.float32)


def _div(node, a, b):
    """ONNX Div: integers divide truncating toward zero (as onnxruntime's C++ does), floats as
    floats."""
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind in "iu" and b.dtype.kind in "iu":
        dtype = np.result_type(a, b)
        quotient = np.abs(a.astype(np.int64)) // np.abs(b.astype(np.int64))
        return (quotient * (np.sign(a) * np.sign(b))).astype(dtype)
    return a / b


def _gelu(node, x):
    """ONNX Gelu (opset 20): exact (the error function) or, with approximate="tanh", its tanh
    form, in float32."""
    x = np.asarray(x, np.float32)
    if node.attrs.get("approximate", "none") == "tanh":
        inner = np.float32(np.sqrt(2 / np.pi)) * (x + np.float32(0.044715) * x * x * x)
        return (np.float32(0.5) * x * (np.float32(1) + np.tanh(inner))).astype(np.float32)
    return (np.float32(0.5) * x * (np.float32(1) + _erf(x / np.float32(np.sqrt(2))))).astype(
        np.float32)


def _hard_sigmoid(node, x):
    alpha = np.float32(node.attrs.get("alpha", 0.2))
    beta = np.float32(node.attrs.get("beta", 0.5))
    return np.clip(alpha * np.asarray(x, np.float32) + beta, 0, 1).astype(np.float32)


def _slice(node, x, starts, ends, axes=None, steps=None):
    """ONNX Slice (starts, ends, axes and steps as inputs: opset 10 on)."""
    starts, ends = np.asarray(starts).reshape(-1), np.asarray(ends).reshape(-1)
    axes = range(len(starts)) if axes is None else np.asarray(axes).reshape(-1)
    steps = np.ones(len(starts), np.int64) if steps is None else np.asarray(steps).reshape(-1)
    index = [slice(None)] * np.ndim(x)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = int(axis) % np.ndim(x)
        if step == 0:
            raise ModelError(f"{node.describe()}: a step of 0")
        index[axis] = slice(*slice(int(start), int(end), int(step)).indices(np.shape(x)[axis]))
    return np.ascontiguousarray(np.asarray(x)[tuple(index)])


def _split(node, x, split=None):
    """ONNX Split along ``axis``: sizes from the ``split`` input (opset 13 on) or attribute,
    else equal parts (``num_outputs`` from opset 18, else one per output)."""
    axis = _axis(node, np.ndim(x))
    size = np.shape(x)[axis]
    sizes = split if split is not None else node.attrs.get("split")
    if sizes is None:
        parts = node.attrs.get("num_outputs") or len(node.outputs)
        chunk = -(-size // parts)
        sizes = [min(chunk, size - i * chunk) for i in range(parts)]
    bounds = np.cumsum([0] + [int(v) for v in np.asarray(sizes).reshape(-1)])
    if bounds[-1] != size:
        raise ModelError(f"{node.describe()}: split sizes {list(np.diff(bounds))} do not add "
                         f"up to axis {axis}'s {size}")
    return tuple(np.ascontiguousarray(np.take(x, range(low, high), axis=axis))
                 for low, high in zip(bounds[:-1], bounds[1:]))


def _relu(node, x):
    return np.maximum(x, np.zeros((), x.dtype))


HOST_OPS = {
    "QuantizeLinear": _quantize,
    "DequantizeLinear": _dequantize,
    "DynamicQuantizeLinear": _dynamic_quantize,
    "MaxPool": _max_pool,
    "AveragePool": _average_pool,
    "GlobalAveragePool": _global_average_pool,
    "Add": lambda node, a, b: a + b,
    "Sub": lambda node, a, b: a - b,
    "Mul": lambda node, a, b: a * b,
    "Sum": _sum,
    "Concat": _concat,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Pad": _pad,
    "Softmax": _softmax,
    "ArgMax": _argmax,
    "Cast": _cast,
    "Relu": _relu,
    "Clip": _clip,
    "Identity": lambda node, x: x,
    "Dropout": lambda node, x, *rest: x,
    "ReduceMean": _reduce_mean,
    "Div": _div,
    "Erf": _float(_erf),
    "Sqrt": _float(np.sqrt),
    "Pow": _float(np.power),
    "Sigmoid": _float(lambda x: np.float32(1) / (np.float32(1) + np.exp(-x))),
    "Tanh": _float(np.tanh),
    "LayerNormalization": _layer_norm,
    "Gelu": _gelu,
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": _float(lambda x: x * np.clip(x / np.float32(6) + np.float32(0.5), 0, 1)),
    "Slice": _slice,
    "Split": _split,
    "Where": lambda node, condition, x, y: np.where(np.asarray(condition, bool), x, y),
    "Expand": lambda node, x, shape: np.array(np.broadcast_to(
        x, np.broadcast_shapes(np.shape(x), tuple(int(v) for v in np.asarray(shape))))),
    "Shape": _shape,
    "Gather": _gather,
    "BatchNormalization": _batch_norm,
}
"""ONNX ops the host runs, by ONNX op type: ``f(node, *inputs) -> output(s)``."""


def run_host_op(node, tensors):
    """A host node's outputs (a tuple, one per output) for its inputs taken by name from
    ``tensors`` (absent optional inputs at the end are left out of the call)."""
    args = [tensors[name] if name else None for name in node.inputs]
    while args and args[-1] is None:
        args.pop()
    result = HOST_OPS[node.op](node, *args)
    return result if isinstance(result, tuple) else (result,)


# ---- shapes without running -------------------------------------------------------------------

def _window_shape(node, shape, dilations):
    a = node.attrs
    (kh, kw), (sh, sw), (top, left, bottom, right) = a["kernel_shape"], a["strides"], a["pads"]
    dh, dw = dilations
    oh = (shape[2] + top + bottom - (kh - 1) * dh - 1) // sh + 1
    ow = (shape[3] + left + right - (kw - 1) * dw - 1) // sw + 1
    return (shape[0], shape[1], oh, ow)


def _axes(node, value, name="axes"):
    if value is not None:
        return [int(v) for v in np.asarray(value).reshape(-1)]
    return node.attrs.get(name)


def _reshape_shape(node, x, shape):
    shape = [int(v) for v in np.asarray(shape).reshape(-1)]
    if not node.attrs.get("allowzero", 0):
        shape = [x[i] if v == 0 else v for i, v in enumerate(shape)]
    if -1 in shape:
        known = int(np.prod([v for v in shape if v != -1]))
        shape[shape.index(-1)] = int(np.prod(x)) // max(1, known)
    return tuple(shape)


def _squeeze_shape(node, x, axes=None):
    axes = _axes(node, axes)
    if axes is None:
        return tuple(d for d in x if d != 1)
    axes = {a % len(x) for a in axes}
    return tuple(d for i, d in enumerate(x) if i not in axes)


def _unsqueeze_shape(node, x, axes=None):
    axes = _axes(node, axes)
    rank = len(x) + len(axes)
    out = list(x)
    for a in sorted(a % rank for a in axes):
        out.insert(a, 1)
    return tuple(out)


def _pad_shape(node, x, pads=None, value=None, axes=None):
    pads = [int(v) for v in np.asarray(pads if pads is not None
                                       else node.attrs["pads"]).reshape(-1)]
    axes = list(range(len(x))) if axes is None else [a % len(x) for a in _axes(node, axes)]
    out = list(x)
    for i, a in enumerate(axes):
        out[a] += pads[i] + pads[i + len(axes)]
    return tuple(out)


def _argmax_shape(node, x):
    axis = _axis(node, len(x))
    keep = node.attrs.get("keepdims", 1)
    return tuple(1 if i == axis else d for i, d in enumerate(x) if keep or i != axis)


def _concat_shape(node, *xs):
    axis = _axis(node, len(xs[0]))
    out = list(xs[0])
    out[axis] = sum(x[axis] for x in xs)
    return tuple(out)


def _reduce_mean_shape(node, x, axes=None):
    axes = _axes(node, axes)
    if not axes:
        if node.attrs.get("noop_with_empty_axes", 0):
            return tuple(x)
        axes = range(len(x))
    axes = {a % len(x) for a in axes}
    keep = node.attrs.get("keepdims", 1)
    return tuple(1 if i in axes else d for i, d in enumerate(x) if keep or i not in axes)


def _qgemm_shape(node, x):
    spec = node.spec
    if spec.conv:
        return (x[0], spec.n) + _window_shape(Node("", "", [], [], spec.conv), x,
                                              spec.conv["dilations"])[2:]
    return tuple(x[:-1]) + (spec.n,)


_SAME = lambda node, x, *rest: x  # noqa: E731
SHAPES = {
    "QuantizeLinear": _SAME, "DequantizeLinear": _SAME, "Relu": _SAME, "Clip": _SAME,
    "Cast": _SAME, "Identity": _SAME, "Softmax": _SAME,
    "Dropout": lambda node, x, *rest: (x, x),
    "DynamicQuantizeLinear": lambda node, x: (x, (), ()),
    "MaxPool": lambda node, x: _window_shape(node, x, node.attrs["dilations"]),
    "AveragePool": lambda node, x: _window_shape(node, x, (1, 1)),
    "GlobalAveragePool": lambda node, x: tuple(x[:2]) + (1,) * (len(x) - 2),
    "Add": lambda node, *xs: np.broadcast_shapes(*xs),
    "Sub": lambda node, *xs: np.broadcast_shapes(*xs),
    "Mul": lambda node, *xs: np.broadcast_shapes(*xs),
    "Sum": lambda node, *xs: np.broadcast_shapes(*xs),
    "Concat": _concat_shape,
    "Flatten": lambda node, x: (int(np.prod(x[:_axis(node, len(x), default=1)])),
                                int(np.prod(x[_axis(node, len(x), default=1):]))),
    "Reshape": _reshape_shape,
    "Transpose": lambda node, x: tuple(x[i] for i in (node.attrs.get("perm")
                                                       or list(range(len(x)))[::-1])),
    "Squeeze": _squeeze_shape,
    "Unsqueeze": _unsqueeze_shape,
    "Pad": _pad_shape,
    "ArgMax": _argmax_shape,
    "QGemm": _qgemm_shape,
    "QMatMul": lambda node, a, b: (tuple(np.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2])))
                                   + (a[-2], b[-1])),
    "ReduceMean": _reduce_mean_shape,
    "Shape": lambda node, x: (len(x[node.attrs.get("start", 0):node.attrs.get("end")]),),
    "Gather": lambda node, x, indices: (tuple(x[:_axis(node, len(x))]) + tuple(indices)
                                        + tuple(x[_axis(node, len(x)) + 1:])),
    "BatchNormalization": _SAME,
    "Div": lambda node, *xs: np.broadcast_shapes(*xs),
    "Pow": lambda node, *xs: np.broadcast_shapes(*xs),
    "Erf": _SAME, "Sqrt": _SAME, "Sigmoid": _SAME, "Tanh": _SAME, "LayerNormalization": _SAME,
    "Gelu": _SAME, "HardSigmoid": _SAME, "HardSwish": _SAME,
    "Where": lambda node, *xs: np.broadcast_shapes(*xs),
    "Expand": lambda node, x, shape: np.broadcast_shapes(
        tuple(x), tuple(int(v) for v in np.asarray(shape).reshape(-1))),
    "Slice": lambda node, x, *rest: _slice(node, np.broadcast_to(np.int8(0), x), *rest).shape,
    "Split": lambda node, x, split=None: tuple(part.shape for part in _split(
        node, np.broadcast_to(np.int8(0), x), split)),
}
"""Output shapes of each op from its input shapes (a constant input as its value), without
running it: ``f(node, *inputs) -> shape`` (or a tuple of shapes, one per output)."""
_SHAPE_VALUE_OPS = ("Gather", "Unsqueeze", "Squeeze", "Concat", "Cast", "Slice", "Reshape",
                    "Mul", "Add", "Sub", "Div")
"""Ops that shape rules follow the values of, on small integer tensors made from shapes."""
_VALUE_INPUTS = {"Reshape": (1,), "Squeeze": (1,), "Unsqueeze": (1,), "Pad": (1, 2, 3),
                 "ReduceMean": (1,), "Slice": (1, 2, 3, 4), "Split": (1,), "Expand": (1,)}


# ---- the accelerator's node -----------------------------------------------------------------

def im2col(x, kernel, strides, pads, dilations, pad_value):
    """Convolution patches of ``x`` (N, C, H, W): ``(A, (N, OH, OW))`` with one row of ``A``
    per output pixel, its ``C x KH x KW`` values in the weight's (C, KH, KW) order."""
    windows = _windows(x, kernel, strides, pads, dilations, pad_value)
    batch, channels, oh, ow, kh, kw = windows.shape
    a = windows.transpose(0, 2, 3, 1, 4, 5).reshape(batch * oh * ow, channels * kh * kw)
    return np.ascontiguousarray(a), (batch, oh, ow)


def group_batches(info, groups, k, n):
    """How many of a convolution's ``groups`` (each ``k`` x ``n``) one ``matmul`` takes side by
    side: as many as keep K within the device's ``max_k`` and N within its ``max_n`` (one
    device job, but for M), at least one."""
    return max(1, min(groups, info.max_k // k, info.max_n // n))


def block_diagonal(w):
    """The groups' weights ``w`` (G, K, N) as one (G*K, G*N) matrix, group g's block at rows
    g*K and columns g*N, zeros elsewhere."""
    groups, k, n = w.shape
    if groups == 1:
        return w[0]
    out = np.zeros((groups * k, groups * n), w.dtype)
    for g in range(groups):
        out[g * k:(g + 1) * k, g * n:(g + 1) * n] = w[g]
    return out


class _Run:
    """What one :meth:`CompiledModel.run` measures, per node."""

    def __init__(self, nodes):
        self.stats = [{"host_s": 0.0, "device_s": 0.0, "busy_s": 0.0, "driver_s": 0.0,
                       "cycles": 0, "macs": 0, "macs_skipped": 0, "products": 0, "jobs": 0,
                       "calls": 0, "estimated": False, "counters": []} for _ in nodes]
        self.wall_s = 0.0

    def add(self, other):
        """Another run's figures (a micro-batch's) into these."""
        for mine, theirs in zip(self.stats, other.stats):
            for key, value in theirs.items():
                mine[key] = (mine[key] + value if key != "estimated"
                             else mine[key] or value)

    @staticmethod
    def settle(stats):
        """Add each node's pending device counters (callables, see
        :meth:`~sparsa.host.driver.Accelerator.counters_later`) into its figures."""
        for entry in stats:
            for counters in entry.pop("counters", ()):
                counters = counters()
                for key in ("cycles", "macs", "macs_skipped", "jobs"):
                    entry[key] += int(counters[key])
                entry["estimated"] |= bool(counters.get("estimated"))
        return stats


def _bias(node, constants, zero_point):
    """The device's int32 bias: the model's, less ``zero_point * colsum(w)`` (exact)."""
    bias = constants[node.spec.bias].astype(np.int64)
    if zero_point:
        bias = bias - int(zero_point) * constants[node.spec.colsum]
    if bias.min(initial=0) < -2**31 or bias.max(initial=0) > 2**31 - 1:
        raise ModelError(f"{node.describe()}: the int32 bias with the input zero point "
                         f"{zero_point} folded in exceeds int32 ({bias.min()}..{bias.max()})")
    return bias.astype(np.int32)


def _qgemm(model, node, env, accelerator, stats):
    """Run a QGemm node: im2col or flatten, one ``matmul`` per group of groups, the output
    mode; on the reference backend a convolution runs whole (:func:`_whole_conv`)."""
    spec = node.spec
    consts = model.constants
    x = env[node.inputs[0]]
    if x.dtype != np.int8:
        raise ModelError(f"{node.describe()}: expected an int8 input, got {x.dtype}")
    zero_point = (_int(env[node.inputs[1]]) if len(node.inputs) > 1 and node.inputs[1]
                  else spec.x_zero)
    k, n, conv = spec.k, spec.n, spec.conv
    started = time.perf_counter()  # host time: the operands (im2col) and the output's layout
    if conv:
        _check_4d(node, x)
        channels = k // (conv["kernel_shape"][0] * conv["kernel_shape"][1]) * spec.groups
        if x.shape[1] != channels:
            raise ModelError(f"{node.describe()}: expected {channels} input channels, got "
                             f"shape {x.shape}")
    elif x.shape[-1] != k:
        raise ModelError(f"{node.describe()}: expected the input's last axis of {k}, got "
                         f"shape {x.shape}")
    bias = _bias(node, consts, zero_point)
    requant = _requant(spec, consts)
    if conv and getattr(accelerator, "whole_layers", False):
        kernel = model._cpu_kernel(node)
        if kernel is not None and kernel.usable(bias):
            stats["host_s"] += time.perf_counter() - started
            return _whole_conv(model, node, kernel, x, zero_point, bias, requant, accelerator,
                               stats)
    patches, shape = _patches(node, x, zero_point)
    stats["host_s"] += time.perf_counter() - started
    outs = []
    # This call's counters, not another thread's: a concurrent accelerator keeps them per
    # thread; another is held for the call and its counters.
    concurrent = getattr(accelerator, "concurrent", False)
    for args in _calls(model, node, accelerator, patches, bias, requant):
        started = time.perf_counter()
        with contextlib.nullcontext() if concurrent else accelerator.lock:
            outs.append(accelerator.matmul(*args[:2], bias=args[2], requant=args[3],
                                           relu=args[4]))
            stats["counters"].append(accelerator.counters_later())  # summed when asked for
            timing = getattr(accelerator, "last_timing", None)
        stats["device_s"] += time.perf_counter() - started
        if timing is not None:  # a device's: its busy time, and the driver's on the host
            stats["busy_s"] += timing["device"]
            stats["driver_s"] += timing["pack"] + timing["unpack"] + timing.get("host", 0.0)
        stats["calls"] += 1
    stats["products"] += patches.shape[0] * k * n
    y = outs[0] if len(outs) == 1 else np.concatenate(outs, axis=1)
    started = time.perf_counter()
    y = _output(node, consts, y, -1)
    if conv:
        batch, oh, ow = shape
        y = np.ascontiguousarray(y.reshape(batch, oh, ow, n).transpose(0, 3, 1, 2))
    else:
        y = y.reshape(tuple(shape) + (n,))
    stats["host_s"] += time.perf_counter() - started
    return y


def _qmatmul(node, env, accelerator, stats):
    """A QMatMul node: int8 ``a`` (..., M, K) times int8 ``b`` (..., K, N), the leading axes
    broadcast, each pair's product on the accelerator (int32); then on the host the zero
    points' terms, ``sum((a - za)(b - zb)) = sum(ab) - za colsum(b) - zb rowsum(a) + K za zb``
    (exact, int64), and gemmlowp's requantization to int8."""
    spec = node.spec
    a, b = env[node.inputs[0]], env[node.inputs[1]]
    if a.dtype != np.int8 or b.dtype != np.int8 or a.ndim < 2 or b.ndim < 2 \
            or a.shape[-1] != b.shape[-2]:
        raise ModelError(f"{node.describe()}: expected int8 (..., M, K) and (..., K, N), got "
                         f"{a.dtype} {a.shape} and {b.dtype} {b.shape}")
    lead = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    (m, k), n = a.shape[-2:], b.shape[-1]
    pairs = zip(np.broadcast_to(a, lead + (m, k)).reshape(-1, m, k),
                np.broadcast_to(b, lead + (k, n)).reshape(-1, k, n))
    out = np.empty((int(np.prod(lead, dtype=np.int64)), m, n), np.int8)
    za, zb = spec.a_zero, spec.b_zero
    concurrent = getattr(accelerator, "concurrent", False)
    for index, (x, y) in enumerate(pairs):
        x, y = np.ascontiguousarray(x), np.ascontiguousarray(y)
        started = time.perf_counter()
        with contextlib.nullcontext() if concurrent else accelerator.lock:
            product = accelerator.matmul(x, y)
            stats["counters"].append(accelerator.counters_later())
        stats["device_s"] += time.perf_counter() - started
        stats["calls"] += 1
        started = time.perf_counter()
        acc = product.astype(np.int64)
        if za:
            acc -= za * y.sum(axis=0, dtype=np.int64)
        if zb:
            acc -= zb * x.sum(axis=1, dtype=np.int64)[:, None]
        acc += k * za * zb
        out[index] = arith.requantize(np.clip(acc, arith.INT32_MIN, arith.INT32_MAX),
                                      spec.multiplier, spec.shift, spec.out_zero)
        stats["host_s"] += time.perf_counter() - started
    stats["products"] += out.size * k
    return out.reshape(lead + (m, n))


def _patches(node, x, zero_point):
    """The node's A: a convolution's im2col patches (with the output's batch and spatial
    shape) or the rows of an ``[..., K]`` input (with its leading shape)."""
    conv = node.spec.conv
    if conv:
        # (A group's channels are consecutive, so its patches are the columns g*k:(g+1)*k.)
        return im2col(x, conv["kernel_shape"], conv["strides"], conv["pads"],
                      conv["dilations"], zero_point)
    return x.reshape(-1, node.spec.k), x.shape[:-1]


def _calls(model, node, accelerator, patches, bias, requant):
    """The node's ``matmul`` calls on ``accelerator``, as (A, prepared B, bias, requant, relu):
    one per batch of groups (:meth:`CompiledModel._prepared_weights`)."""
    spec = node.spec
    groups, k, n = spec.groups, spec.k, spec.n
    per_call, weights = model._prepared_weights(accelerator)[node.name]
    n_group = n // groups
    relu = spec.relu and spec.mode == "device"
    for first, w in zip(range(0, groups, per_call), weights):
        last = min(groups, first + per_call)
        cols = slice(first * n_group, last * n_group)
        call_requant = requant
        if requant is not None and isinstance(requant[0], np.ndarray):
            call_requant = (np.ascontiguousarray(requant[0][cols]), requant[1], requant[2])
        yield patches[:, first * k:last * k], w, bias[cols].copy(), call_requant, relu


def _whole_conv(model, node, kernel, x, zero_point, bias, requant, accelerator, stats):
    """A convolution on the reference backend in one call of its CPU kernel
    (:class:`sparsa.host.cpu.ConvKernel`, NCHW in and out, no im2col), with the device's
    requantization along the channel axis; its device counters are those of the device's
    calls (:func:`_calls`), worked out from the input when they are asked for."""
    spec = node.spec
    started = time.perf_counter()
    acc = kernel(x, zero_point, bias)
    if requant is not None:
        mult = requant[0]
        if isinstance(mult, np.ndarray):
            mult = mult.reshape(-1, 1, 1)
        acc = arith.postprocess(acc, None, (mult, requant[1], requant[2]), spec.relu)
    stats["device_s"] += time.perf_counter() - started
    started = time.perf_counter()
    y = _output(node, model.constants, acc, 1)
    stats["host_s"] += time.perf_counter() - started
    stats["calls"] += -(-spec.groups // model._prepared_weights(accelerator)[node.name][0])
    stats["products"] += acc.size // spec.n * spec.k * spec.n

    def counters():
        patches, _ = _patches(node, x, zero_point)
        reports = [accelerator.counters_of(*args[:2], bias=args[2], requant=args[3],
                                           relu=args[4])
                   for args in _calls(model, node, accelerator, patches, bias, requant)]
        return {key: sum(r[key] for r in reports)
                for key in ("cycles", "macs", "macs_skipped", "jobs", "estimated")}
    stats["counters"].append(counters)
    return y


def _output(node, consts, y, axis):
    """The node's output from the device's (``y``: int8 in the device mode, else int32) along
    channel axis ``axis``: requantized on the host (a multiplier the device cannot take),
    dequantized to float32 (the float mode), clipped."""
    spec = node.spec

    def per_channel(values):
        return values.reshape((-1,) + (1,) * (y.ndim - 1 - axis)) if axis != -1 else values
    if spec.mode == "host":  # requantization the device cannot apply (a multiplier >= 1)
        q = np.rint(y.astype(np.float64) * per_channel(consts[spec.scale])) + spec.out_zero
        y = np.clip(q, -128, 127).astype(np.int8)
        if spec.relu:
            y = np.maximum(y, np.int8(spec.out_zero))
    elif spec.mode == "float":
        y = y.astype(np.float32) * per_channel(consts[spec.scale]).astype(np.float32)
        if spec.relu:
            y = np.maximum(y, np.float32(0))
    if spec.clip:
        low, high = spec.clip
        y = np.clip(y, np.int8(low), np.int8(high))
    return y


def _requant(spec, constants):
    """A device-mode QGemm's requantization as the accelerator takes it: (multiplier, a
    scalar when all channels share it, shift, output zero point), else None."""
    if spec.mode != "device":
        return None
    mult = constants[spec.multiplier]
    return (mult if mult.size > 1 else int(mult[0]), spec.shift, spec.out_zero)


# ---- checks of host nodes -----------------------------------------------------------------

def _check_window(node):
    """A pooling node's kernel_shape, strides (and dilations): 2 ints >= 1; pads: 4 >= 0."""
    key = bad_window(node.attrs, ("kernel_shape", "strides", "pads")
                      + (("dilations",) if node.op == "MaxPool" else ()))
    if key is not None:
        count, low = WINDOW[key]
        raise ModelError(f"{node.describe()}: attribute {key!r}: expected {count} ints of "
                         f"at least {low}, got {node.attrs.get(key)!r}")


def _check_quantization(node, constants):
    """A (De)QuantizeLinear's constant scale and zero point: scales finite and > 0, zero
    points in int8 (the graph's terms)."""
    names = (node.inputs + ["", ""])[1:3]
    for role, name in zip(("scale", "zero point"), names):
        value = constants.get(name) if name else None
        if value is None:
            continue
        if role == "scale" and (value.dtype.kind != "f" or not np.all(np.isfinite(value))
                                or not np.all(value > 0)):
            raise ModelError(f"{node.describe()}: the scale {name!r} must be finite and > 0")
        if role == "zero point" and node.op == "QuantizeLinear" and (
                value.dtype.kind not in "iu" or value.min(initial=0) < -128
                or value.max(initial=0) > 127):
            raise ModelError(f"{node.describe()}: the zero point {name!r} must be in "
                             f"-128..127 (int8)")


# ---- the model ------------------------------------------------------------------------------

@dataclass
class TensorInfo:
    """A model input or output: its name, ONNX element type (e.g. "float32", "uint8") and
    shape (None for a dimension the model leaves open, such as the batch)."""

    name: str
    dtype: str
    shape: list


_FUSED_AWAY = object()


class _QuantizedAdd:
    """``QuantizeLinear(DequantizeLinear(a) + DequantizeLinear(b))`` (then a ``Relu``) of int8
    ``a`` and ``b`` of one shape, per tensor: one lookup in the table of its value for every
    pair (computed by the same functions, so identical). Other inputs (other types, shapes
    that broadcast) take the nodes one by one."""

    def __init__(self, model, dequantize, add, chain):
        self.nodes = list(dequantize) + [add] + list(chain)
        self.inputs = [dq.inputs[0] for dq in dequantize]
        self.output = chain[-1].outputs[0]
        values = np.arange(-128, 128, dtype=np.int8)
        env = dict(model.constants)
        env[self.inputs[0]] = values.reshape(256, 1)
        env[self.inputs[1]] = values.reshape(1, 256)
        table = self._unfused(env).astype(np.int8)
        # Indexed by the two inputs' bits: (a as uint8) * 256 + (b as uint8).
        self.table = np.roll(table, (-128, -128), axis=(0, 1)).reshape(-1)

    def _unfused(self, env):
        env = dict(env)
        for node in self.nodes:
            for name, value in zip(node.outputs, run_host_op(node, env)):
                env[name] = value
        return env[self.output]

    def __call__(self, env):
        a, b = env[self.inputs[0]], env[self.inputs[1]]
        if not (a.dtype == b.dtype == np.int8 and a.shape == b.shape):
            return self._unfused(env)
        index = a.view(np.uint8).astype(np.uint16)
        index <<= 8
        index |= b.view(np.uint8)
        return self.table[index]


class CompiledModel:
    """A model compiled for the accelerator: run it with :meth:`run`, save it with
    :meth:`save`, see it with :meth:`summary`."""

    def __init__(self, nodes, constants, inputs, outputs, source="", shifted=()):
        self.nodes = list(nodes)
        self.constants = dict(constants)
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.source = source
        self.shifted = set(shifted)  # uint8 tensors of the ONNX model, held as int8 less 128
        self._last_run = None
        self._prepared = weakref.WeakKeyDictionary()
        self._building = threading.RLock()  # what runs build once, from any thread
        self._last_wall = 0.0
        self._check()

    def _check(self):
        known = set(self.constants) | {t.name for t in self.inputs}
        for node in self.nodes:
            if node.op not in ("QGemm", "QMatMul") and node.op not in HOST_OPS:
                raise ModelError(f"{node.describe()}: not an op this runtime has")
            if node.op in RECORDS:
                node.spec = RECORDS[node.op].parse(node.attrs, self.constants,
                                                   node.describe())
            elif node.op in ("QuantizeLinear", "DequantizeLinear"):
                _check_quantization(node, self.constants)
            elif node.op in ("MaxPool", "AveragePool"):
                _check_window(node)
            for name in node.inputs:
                if name and name not in known:
                    raise ModelError(f"{node.describe()}: input {name!r} is produced by no "
                                     f"earlier node")
            known.update(node.outputs)
        for t in self.outputs:
            if t.name not in known:
                raise ModelError(f"output {t.name!r} is produced by no node")

    # -- running --

    @property
    def last_run(self):
        """Per node, what the last :meth:`run` measured: host and accelerator seconds, device
        jobs, cycles, MACs issued and skipped (the reference's estimate is worked out when this
        is first read), products, ``matmul`` calls (None before a run)."""
        if self._last_run is not None:
            _Run.settle(self._last_run)
        return self._last_run

    @last_run.setter
    def last_run(self, value):
        self._last_run = value

    def _prepared_weights(self, accelerator):
        """Each QGemm's weights prepared for ``accelerator`` (once per accelerator): the groups
        per ``matmul`` call and a list of weight matrices, one per call. The groups of a
        grouped convolution go side by side, as many as one device job takes
        (:func:`group_batches`), in a block-diagonal B: the device skips the k-steps whose B
        vector is all zero in an n-tile, and the driver leaves out columns of B that are all
        zero, so the zeros between groups cost little."""
        prepared = self._prepared.get(accelerator)
        if prepared is not None:
            return prepared
        with self._building:
            prepared = self._prepared.get(accelerator)
            if prepared is None:
                prepared = {}
                for node in self.nodes:
                    if node.op == "QGemm":
                        w = self.constants[node.spec.weight]
                        per_call = group_batches(accelerator.info, *w.shape)
                        prepared[node.name] = per_call, [
                            accelerator.prepare(block_diagonal(w[first:first + per_call]))
                            for first in range(0, w.shape[0], per_call)]
                self._prepared[accelerator] = prepared
        return prepared

    def _cpu_kernel(self, node):
        """The CPU kernel of a convolution node for the reference backend (built once), or
        None (no onnxruntime, or no exact form; the node then runs as the device's calls)."""
        if not cpu.available():
            return None
        kernels = self.__dict__.setdefault("_cpu_kernels", {})
        if node.name not in kernels:
            with self._building:
                if node.name not in kernels:
                    kernels[node.name] = cpu.conv_kernel(self.constants[node.spec.weight],
                                                         node.spec.conv)
        return kernels[node.name]

    def _fused(self):
        """Planned once: the node indices that run fused, each mapped to its step or to
        :data:`_FUSED_AWAY` (its work done by another's step). Fused: a residual add of two
        int8 tensors in real terms, ``DequantizeLinear`` of each, ``Add``,
        ``QuantizeLinear`` (and an int8 ``Relu`` after it), all per tensor, as one lookup
        in a table of the 65,536 input pairs (:class:`_QuantizedAdd`) where the float tensors
        between them have no other use."""
        if "_fusion" in self.__dict__:
            return self._fusion
        with self._building:
            if "_fusion" not in self.__dict__:
                self._fusion = self._plan_fusion()
        return self._fusion

    def _plan_fusion(self):
        consumers = {}
        producer = {}
        for index, node in enumerate(self.nodes):
            for name in node.inputs:
                if name:
                    consumers.setdefault(name, []).append(index)
            for name in node.outputs:
                producer[name] = index
        outputs = {t.name for t in self.outputs}

        def only_use(name):
            """The one node that reads ``name`` (not a model output), or None."""
            users = consumers.get(name, [])
            return self.nodes[users[0]] if len(users) == 1 and name not in outputs else None

        def scalar(name):
            value = self.constants.get(name) if name else np.zeros(1, np.int64)
            return value is not None and value.size == 1

        def per_tensor(node, op):
            return (node is not None and node.op == op and len(node.inputs) >= 2
                    and all(scalar(n) for n in (node.inputs[1:] + [""])[:2]))

        plan = {}
        for index, node in enumerate(self.nodes):
            if node.op != "Add" or len(node.inputs) != 2:
                continue
            dequantize = [self.nodes[producer[n]] if n in producer else None
                          for n in node.inputs]
            quantize = only_use(node.outputs[0])
            if not (all(per_tensor(dq, "DequantizeLinear") for dq in dequantize)
                    and per_tensor(quantize, "QuantizeLinear")):
                continue
            relu = only_use(quantize.outputs[0])
            relu = relu if relu is not None and relu.op == "Relu" else None
            chain = [quantize] + ([relu] if relu is not None else [])
            plan[index] = _QuantizedAdd(self, dequantize, node, chain)
            for later in chain:
                plan[self.nodes.index(later)] = _FUSED_AWAY
            for dq in dequantize:  # dequantized only for this add: not at all
                if only_use(dq.outputs[0]) is node:
                    plan[self.nodes.index(dq)] = _FUSED_AWAY
        return plan

    def _feeds(self, inputs):
        values = by_name(self.inputs, inputs, "inputs")
        return {t.name: _input_array(t, values[t.name]) for t in self.inputs}

    def run(self, accelerator, inputs, *, keep=(), micro_batches=None):
        """The model's outputs for ``inputs`` (an array, or a dict by input name; any batch
        size) on ``accelerator`` (from ``sparsa.open``): a list of arrays in the order of
        :attr:`outputs`, typed as the ONNX model types them. Per-node device cycles, MACs
        and host time go to :attr:`last_run` (see :meth:`summary`). ``keep``: names of
        intermediate tensors to return too, as a second value (a dict).

        ``micro_batches``: on a device (an accelerator that overlaps calls from several
        threads), the batch is cut into this many parts run two at a time, so one part's
        host work (its host ops, im2col, packing) runs while the device runs the other's
        jobs. The default is two parts of a batch of 2 or more (one on the reference
        backend, or when the model mixes the samples of a batch: :meth:`separable`); the
        outputs are the same either way."""
        if getattr(accelerator, "closed", False):
            raise ModelError("accelerator: closed")
        feeds = self._feeds(inputs)
        parts = self._parts(accelerator, feeds, keep, micro_batches)
        self.last_run = None  # (the previous run's pending counters and their operands go)
        started = time.perf_counter()
        if parts > 1:
            outputs, run = self._run_parts(accelerator, feeds, parts)
        else:
            outputs, env, run = self._run_graph(accelerator, feeds, bool(keep))
        run.wall_s = time.perf_counter() - started
        self._last_wall = run.wall_s
        self.last_run = run.stats
        outputs = [_output_array(t, value) for t, value in zip(self.outputs, outputs)]
        if keep:
            unknown = [name for name in keep if name not in env]
            if unknown:
                raise ModelError(f"keep: no tensor {unknown[0]!r} in the compiled model")
            return outputs, {name: self._onnx_value(name, env[name]) for name in keep}
        return outputs

    def _parts(self, accelerator, feeds, keep, micro_batches):
        batch = {value.shape[0] for value in feeds.values() if value.ndim}
        batch = batch.pop() if len(batch) == 1 else 1
        if micro_batches is not None:
            if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) \
                    or micro_batches < 1:
                raise ModelError(f"micro_batches: expected a positive int, got "
                                 f"{micro_batches!r}")
            if micro_batches > 1 and not self.separable():
                raise ModelError("micro_batches: this model mixes the samples of a batch "
                                 "(see separable()); it runs whole")
            return min(micro_batches, batch) if not keep else 1
        if keep or not getattr(accelerator, "concurrent", False) or batch < 2 \
                or not self.separable():
            return 1
        return 2

    def separable(self):
        """Whether every sample of a batch goes through the model on its own (so a batch may
        run in parts): every tensor's first axis is the batch's (by the shape rules, for two
        batch sizes) and no op reduces, normalizes or reorders along it."""
        if "_separable" not in self.__dict__:
            self._separable = self._check_separable()
        return self._separable

    def _check_separable(self):
        if not self.inputs or any(not t.shape or t.shape[0] is not None for t in self.inputs):
            return False
        (two, shape_values), (three, _) = (self._infer(batch) for batch in (2, 3))
        shapes = [two, three]
        for node in self.nodes:
            if all(name in shape_values for name in node.outputs if name):
                continue  # a shape's numbers: each micro-batch works out its own
            if node.op in ("DynamicQuantizeLinear",):
                return False
            if node.op in ("Softmax", "ArgMax", "Concat") and node.attrs.get("axis", 0) == 0:
                return False  # (a negative axis names a later one: shapes keep the batch)
            if node.op == "Transpose" and (node.attrs.get("perm") or [1])[0] != 0:
                return False
            for name in node.outputs:
                if name in shape_values:
                    continue
                if name and any(name not in s or not s[name] or s[name][0] != batch
                                for s, batch in zip(shapes, (2, 3))):
                    return False
        return True

    def _run_parts(self, accelerator, feeds, parts):
        batch = next(iter(feeds.values())).shape[0]
        bounds = np.linspace(0, batch, parts + 1).astype(int)
        chunks = [{name: value[low:high] for name, value in feeds.items()}
                  for low, high in zip(bounds[:-1], bounds[1:])]
        with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="sparsa-run") as pool:
            done = [pool.submit(self._run_graph, accelerator, chunk, False) for chunk in chunks]
            concurrent.futures.wait(done)
            results = [future.result() for future in done]  # (the first error, once all end)
        run = _Run(self.nodes)
        for _, _, part in results:
            run.add(part)
        outputs = [np.concatenate([outs[i] for outs, _, _ in results])
                   for i in range(len(self.outputs))]
        return outputs, run

    def _run_graph(self, accelerator, feeds, unfused):
        """One pass over the graph: the outputs, the tensors and the figures (a :class:`_Run`)."""
        env = dict(self.constants)
        env.update(feeds)
        run = _Run(self.nodes)
        fused = {} if unfused else self._fused()  # (kept tensors need every node to run)
        for index, node in enumerate(self.nodes):
            step = fused.get(index)
            if step is _FUSED_AWAY:
                continue
            try:
                if step is not None:
                    started = time.perf_counter()
                    env[step.output] = step(env)
                    run.stats[index]["host_s"] += time.perf_counter() - started
                    continue
                results = self._step(node, env, accelerator, run.stats[index])
            except ModelError as error:
                if node.name in str(error):
                    raise
                raise ModelError(f"{node.describe()}: {error}") from error
            for name, value in zip(node.outputs, results):
                if name:
                    env[name] = value
        return [env[t.name] for t in self.outputs], env, run

    def _step(self, node, env, accelerator, stats):
        """One node's outputs (a tuple), its host and device time added to ``stats``."""
        if node.op == "QGemm":
            return (_qgemm(self, node, env, accelerator, stats),)
        if node.op == "QMatMul":
            return (_qmatmul(node, env, accelerator, stats),)
        started = time.perf_counter()
        results = run_host_op(node, env)
        stats["host_s"] += time.perf_counter() - started
        return results

    def _onnx_value(self, name, value):
        return release_uint8(value) if name in self.shifted else value

    def node(self, name):
        """The node called ``name``."""
        for node in self.nodes:
            if node.name == name:
                return node
        raise ModelError(f"node: no node {name!r} in the model")

    def run_node(self, accelerator, name, tensors):
        """One node on its own: its outputs (a list, typed as the ONNX model types them) for
        input tensors given by name in ``tensors`` (ONNX-typed, e.g. taken from another
        runtime), constants from the model. For comparing one layer against another runtime."""
        node = self.node(name)
        env = dict(self.constants)
        for input_name in node.inputs:
            if input_name and input_name not in env:
                if input_name not in tensors:
                    raise ModelError(f"tensors: {node.describe()} needs {input_name!r}")
                value = np.asarray(tensors[input_name])
                if input_name in self.shifted:
                    if value.dtype != np.uint8:
                        raise ModelError(f"tensors[{input_name!r}]: expected uint8, got "
                                         f"{value.dtype}")
                    value = hold_uint8(value)
                env[input_name] = value
        results = self._step(node, env, accelerator, _Run([node]).stats[0])
        return [self._onnx_value(out, value) for out, value in zip(node.outputs, results)]

    # -- reports --

    def summary(self, batch=1, accelerator=None):
        """A per-node table (str) worked out without running the model: op, output shape,
        device (``g=N``: a convolution of N groups) or host, MACs for a batch of ``batch``,
        weight zeros, and per image the device jobs and cycles it is projected to take
        (:meth:`projection`: every activation nonzero) on ``accelerator``'s build (default:
        the default build); after a :meth:`run`, that run's device jobs and cycles, MACs
        issued and skipped and host milliseconds too. Totals at the end."""
        shapes = self._shapes(batch)
        projected = self.projection(accelerator)
        ran = self.last_run
        lines = [f"{'node':<28} {'op':<18} {'output':<18} {'where':<11} {'MACs':>11} "
                 f"{'w zeros':>7} {'jobs/img':>8} {'cycles/img':>10}"
                 + (f" {'jobs':>5} {'cycles':>10} {'MACs run':>11} {'skipped':>11} "
                    f"{'host ms':>8} {'dev ms':>8}" if ran else "")]
        layers = {"device": 0, "grouped": 0, "macs": 0, "weights": 0, "zeros": 0}
        for index, node in enumerate(self.nodes):
            shape = shapes.get(node.outputs[0])
            macs = zeros = jobs = cycles = ""
            where = "host"
            if node.op == "QGemm":
                spec = node.spec
                groups = spec.groups
                where = "device" + (f" g={groups}" if groups > 1 else "")
                w = self.constants[spec.weight]
                zeros = f"{np.mean(w == 0):.0%}"
                layers["device"] += 1
                layers["grouped"] += groups > 1
                layers["weights"] += w.size
                layers["zeros"] += int(np.count_nonzero(w == 0))
                if shape is not None:
                    pixels = int(np.prod(shape)) // spec.n
                    macs = f"{pixels * spec.k * spec.n}"
                    layers["macs"] += int(macs)
                if node.name in projected:
                    jobs, cycles = (projected[node.name][key] for key in ("jobs", "cycles"))
            elif node.op == "QMatMul":
                where = "device"
                layers["device"] += 1
                a_shape = shapes.get(node.inputs[0])
                if shape is not None and a_shape is not None:
                    macs = f"{int(np.prod(shape)) * a_shape[-1]}"
                    layers["macs"] += int(macs)
                if node.name in projected:
                    jobs, cycles = (projected[node.name][key] for key in ("jobs", "cycles"))
            line = (f"{node.name[:28]:<28} {node.attrs.get('source_op', node.op)[:18]:<18} "
                    f"{str(tuple(shape)) if shape is not None else '?':<18} {where:<11} "
                    f"{macs:>11} {zeros:>7} {jobs:>8} {cycles:>10}")
            if ran:
                s = ran[index]
                device = node.op in ("QGemm", "QMatMul")
                busy = s["busy_s"] or s["device_s"]  # (the reference: its CPU kernels' time)
                line += (f" {s['jobs'] if device else '':>5} {s['cycles'] if device else '':>10}"
                         f" {s['macs'] if device else '':>11} "
                         f"{s['macs_skipped'] if device else '':>11} "
                         f"{1e3 * (s['host_s'] + s['driver_s']):>8.2f} "
                         + (f"{1e3 * busy:>8.2f}" if device else f"{'':>8}"))
            lines.append(line)
        per_image = {key: sum(p[key] for p in projected.values()) for key in ("jobs", "cycles")}
        lines.append(f"model: {layers['device']} of {len(self.nodes)} nodes on the device "
                     f"({layers['grouped']} grouped), "
                     + (f"{layers['macs']} MACs for a batch of {batch}, " if shapes else "")
                     + f"{layers['zeros'] / max(1, layers['weights']):.0%} of the weights zero; "
                     + (f"per image {per_image['jobs']} device jobs, {per_image['cycles']} "
                        f"cycles projected" if projected else "no projection (the input's "
                        "shape is open)"))
        if ran:
            total = self.run_counters()
            line = (f"total: {total['jobs']} device jobs, {total['cycles']} device cycles"
                    f"{' (estimated)' if any(s['estimated'] for s in ran) else ''}, "
                    f"{total['macs']} MACs issued, {total['macs_skipped']} skipped; run "
                    f"{1e3 * total['wall_s']:.1f} ms: ")
            if total["busy_s"]:  # a device's
                line += (f"host {1e3 * total['host_s']:.1f} ms (ops {1e3 * total['ops_s']:.1f}, "
                         f"driver {1e3 * total['driver_s']:.1f}), device busy "
                         f"{1e3 * total['busy_s']:.1f} ms ({total['busy_fraction']:.0%} of the "
                         f"run)")
            else:
                line += (f"host ops {1e3 * total['ops_s']:.1f} ms, accelerator calls "
                         f"{1e3 * total['device_s']:.1f} ms")
            lines.append(line)
        return "\n".join(lines)

    def projection(self, accelerator=None):
        """Per device node, the device jobs and cycles of one image with every activation
        nonzero (the weights as they are: their zeros skip), as the reference estimates them
        for ``accelerator``'s build (default: the default build): ``{node: {"jobs", "cycles",
        "macs"}}``, worked out once per build. Empty when the input's shape is open."""
        from .driver import ReferenceAccelerator

        info = accelerator.info if accelerator is not None else None
        key = None if info is None else (info.rows, info.cols, info.stream_width, info.max_k,
                                         info.max_n)
        cache = self.__dict__.setdefault("_projections", {})
        if key in cache:
            return cache[key]
        shapes = self._shapes(1)
        geometry = {} if info is None else dict(zip(
            ("rows", "cols", "stream_width", "max_k", "max_n"), key))
        result = {}
        with ReferenceAccelerator(**geometry) as reference:
            for node in self.nodes:
                if node.op == "QMatMul" and node.outputs[0] in shapes \
                        and node.inputs[0] in shapes:
                    out, k = shapes[node.outputs[0]], shapes[node.inputs[0]][-1]
                    counts = reference.counters_of(np.broadcast_to(np.int8(1), out[-2:-1] + (k,)),
                                                   np.ones((k, out[-1]), np.int8))
                    pairs = int(np.prod(out[:-2], dtype=np.int64))
                    result[node.name] = {name: pairs * int(counts[name])
                                         for name in ("jobs", "cycles", "macs")}
                if node.op != "QGemm" or node.outputs[0] not in shapes:
                    continue
                spec = node.spec
                rows = int(np.prod(shapes[node.outputs[0]])) // spec.n
                dense = np.broadcast_to(np.int8(1), (rows, spec.groups * spec.k))
                requant = _requant(spec, self.constants)
                bias = np.zeros(spec.n, np.int32)
                counts = [reference.counters_of(*args[:2], bias=args[2], requant=args[3],
                                                relu=args[4])
                          for args in _calls(self, node, reference, dense, bias, requant)]
                result[node.name] = {k: sum(int(c[k]) for c in counts)
                                     for k in ("jobs", "cycles", "macs")}
        cache[key] = result
        return result

    def _shapes(self, batch):
        """The shape of every tensor for a batch of ``batch``, from the inputs' shapes through
        each op's shape rule (:data:`SHAPES`), nothing run; a tensor whose shape a rule
        cannot tell (an input the model leaves open, an op without a rule) is left out."""
        return self._infer(batch)[0]

    def _infer(self, batch):
        """:meth:`_shapes`, and the names of the small integer tensors made from shapes
        whose values the rules followed."""
        shapes = {}
        for t in self.inputs:
            if any(d is None for d in t.shape[1:]):
                return {}, set()
            if t.shape and t.shape[0] is not None and int(t.shape[0]) != batch:
                raise ModelError(f"batch: the model's input {t.name!r} has a fixed batch of "
                                 f"{t.shape[0]} (shape {t.shape}); ask for summary(batch="
                                 f"{t.shape[0]})")
            shapes[t.name] = (batch,) + tuple(int(d) for d in t.shape[1:])
        for name, value in self.constants.items():
            shapes[name] = value.shape
        # The values of small integer tensors computed from shapes (Shape, then Gather,
        # Unsqueeze, Concat and the like: PyTorch's flatten), worked out too.
        values = {}
        for node in self.nodes:
            if node.op == "Shape" and node.inputs[0] in shapes:
                values[node.outputs[0]] = _shape(node, np.broadcast_to(np.int8(0),
                                                                       shapes[node.inputs[0]]))
            elif node.op in _SHAPE_VALUE_OPS and node.inputs and all(
                    not name or name in values or (name in self.constants
                                                   and self.constants[name].size <= 64)
                    for name in node.inputs) and any(name in values for name in node.inputs):
                env = {name: values.get(name, self.constants.get(name))
                       for name in node.inputs if name}
                try:
                    results = run_host_op(node, env)
                except (ValueError, KeyError, TypeError, IndexError, ModelError):
                    continue
                values.update((name, value) for name, value in zip(node.outputs, results)
                              if name)
            for name in node.outputs:
                if name in values:
                    shapes[name] = np.shape(values[name])
            rule = SHAPES.get(node.op)
            if rule is None or any(name and name not in shapes for name in node.inputs):
                continue
            args = []
            for i, name in enumerate(node.inputs):
                if i in _VALUE_INPUTS.get(node.op, ()):
                    value = self.constants.get(name, values.get(name)) if name else None
                    args.append(value)
                    if name and value is None:
                        break  # a shape worked out at run time
                else:
                    args.append(shapes[name] if name else None)
            else:
                while args and args[-1] is None:
                    args.pop()
                try:
                    out = rule(node, *args)
                except (ValueError, KeyError, TypeError, IndexError):
                    continue
                outs = out if out and isinstance(out[0], tuple) else (out,)
                for name, shape in zip(node.outputs, outs):
                    if name:
                        shapes[name] = tuple(int(d) for d in shape)
        return shapes, set(values)

    def run_counters(self):
        """The last run's figures summed over nodes: device cycles, MACs issued and skipped,
        products, jobs; and its times: ``wall_s`` (the run), ``ops_s`` (host ops, im2col,
        layouts), ``driver_s`` (the driver's packing and unpacking), ``host_s`` (the two),
        ``busy_s`` (the device's busy time: registers, transfers; 0 on the reference),
        ``device_s`` (time in accelerator calls), ``busy_fraction`` (busy over wall)."""
        if not self.last_run:
            raise ModelError("run_counters: the model has not been run")
        totals = {key: sum(s[key] for s in self.last_run)
                  for key in ("cycles", "macs", "macs_skipped", "products", "jobs", "host_s",
                              "driver_s", "busy_s", "device_s")}
        totals["ops_s"] = totals.pop("host_s")
        totals["host_s"] = totals["ops_s"] + totals["driver_s"]
        totals["wall_s"] = self._last_wall
        totals["busy_fraction"] = totals["busy_s"] / self._last_wall if self._last_wall else 0.0
        return totals

    # -- saving --

    def save(self, path):
        """Write the model to one ``.npz`` file (the graph as JSON, the constants as arrays)."""
        graph = {"format": FORMAT, "version": VERSION, "source": self.source,
                 "shifted": sorted(self.shifted),
                 "inputs": [vars(t) for t in self.inputs],
                 "outputs": [vars(t) for t in self.outputs],
                 "nodes": [{"op": n.op, "name": n.name, "inputs": n.inputs,
                            "outputs": n.outputs, "attrs": n.attrs} for n in self.nodes]}
        arrays = {f"const/{name}": value for name, value in self.constants.items()}
        arrays["graph"] = np.frombuffer(json.dumps(graph).encode(), np.uint8)
        with open(path, "wb") as f:
            np.savez_compressed(f, **arrays)

    def __repr__(self):
        device = sum(node.op == "QGemm" for node in self.nodes)
        return (f"<CompiledModel {self.source or ''}: {len(self.nodes)} nodes, {device} on the "
                f"accelerator; inputs {[(t.name, t.dtype, t.shape) for t in self.inputs]}>")


_NUMPY_TYPE = {"float32": np.float32, "float64": np.float64, "int8": np.int8, "uint8": np.uint8,
               "int32": np.int32, "int64": np.int64, "bool": np.bool_}


def by_name(infos, values, argument):
    """``values`` (one array for a model of one input, or a dict by name) as a dict by the
    names of ``infos``, checked: no name missing, none unknown."""
    names = [t.name for t in infos]
    if isinstance(values, dict):
        unknown = set(values) - set(names)
        if unknown:
            raise ModelError(f"{argument}: unknown input name(s) {sorted(unknown)}; the model's "
                             f"inputs are {names}")
        missing = [name for name in names if name not in values]
        if missing:
            raise ModelError(f"{argument}: missing {missing}")
        return values
    if len(names) != 1:
        raise ModelError(f"{argument}: the model has {len(names)} inputs ({names}); pass a dict "
                         f"by name")
    return {names[0]: values}


def _input_array(info, value):
    """A model input as the graph holds it (uint8 as int8 less 128), checked against the
    model's type and fixed dimensions."""
    value = check_input(info, value)
    return hold_uint8(value) if value.dtype == np.uint8 else value


def check_input(info, value):
    """``value`` for the model input ``info`` (a :class:`TensorInfo`) as
    :meth:`CompiledModel.run` takes it (integers and other floats cast to a float input's
    type), or ModelError naming the input and what was expected: its type, its fixed
    dimensions, no empty dimension, finite floats."""
    name = f"inputs[{info.name!r}]"
    if not isinstance(value, np.ndarray):
        raise ModelError(f"{name}: expected a numpy.ndarray, got {type(value).__name__}")
    expected = np.dtype(_NUMPY_TYPE[info.dtype])
    if value.dtype != expected:
        if expected.kind == "f" and value.dtype.kind in "fiu":
            value = value.astype(expected)
        else:
            raise ModelError(f"{name}: expected dtype {expected}, got {value.dtype}")
    if value.ndim != len(info.shape) or any(
            d is not None and d != s for d, s in zip(info.shape, value.shape)):
        raise ModelError(f"{name}: expected shape {tuple(info.shape)} (None: any), got "
                         f"{value.shape}")
    if value.size == 0:
        raise ModelError(f"{name}: expected no empty dimension, got shape {value.shape}")
    if expected.kind == "f" and not np.all(np.isfinite(value)):
        raise ModelError(f"{name}: expected finite values")
    return value


def _output_array(info, value):
    if info.dtype == "uint8":
        return release_uint8(value)
    return np.asarray(value).astype(_NUMPY_TYPE.get(info.dtype, value.dtype), copy=False)


def load(path):
    """A :class:`CompiledModel` from a file :meth:`CompiledModel.save` wrote, checked whole
    before it is returned: the graph's structure, every node's inputs produced before it,
    every device node's attributes and constants (its record in :mod:`sparsa.host.schema`),
    quantization scales and zero points; of the constants only those the graph names are
    read, and only when they fit in the memory available. Anything else raises
    :class:`ModelError` naming the file, the node and what is wrong."""
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not an .npz archive")
        with data:
            graph = json.loads(bytes(data["graph"]).decode())
            if not isinstance(graph, dict):
                raise ValueError("its graph is not a JSON object")
            if graph.get("format") != FORMAT:
                raise ModelError(f"path: {path!s} is not a sparsa compiled model")
            if graph.get("version") != VERSION:
                raise ModelError(f"path: {path!s} has format version {graph.get('version')}; "
                                 f"this sparsa reads version {VERSION}")
            nodes = [_node(i, entry) for i, entry in enumerate(_list(graph, "nodes"))]
            inputs = [_tensor_info("inputs", entry) for entry in _list(graph, "inputs")]
            outputs = [_tensor_info("outputs", entry) for entry in _list(graph, "outputs")]
            shifted = _list(graph, "shifted") if "shifted" in graph else []
            if not all(isinstance(name, str) for name in shifted):
                raise ModelError("the graph's 'shifted': expected tensor names")
            constants = _constants(data, nodes)
    except ModelError as error:
        if str(path) in str(error):
            raise
        raise ModelError(f"path: {path!s}: {error}") from None
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, UnicodeError) as error:
        raise ModelError(f"path: {path!s} is not a model sparsa saved ({error})") from error
    try:
        return CompiledModel(nodes, constants, inputs, outputs, str(graph.get("source", "")),
                             shifted)
    except ModelError as error:
        raise ModelError(f"path: {path!s}: {error}") from None


def _list(graph, key):
    value = graph.get(key)
    if not isinstance(value, list):
        raise ModelError(f"the graph's {key!r}: expected a list, got {type(value).__name__}")
    return value


def _node(index, entry):
    """A graph entry as a :class:`Node`: op, name, inputs and outputs (names) and attrs."""
    fields = {"op": str, "name": str, "inputs": list, "outputs": list, "attrs": dict}
    if not isinstance(entry, dict) or set(entry) != set(fields) or not all(
            isinstance(entry[key], kind) for key, kind in fields.items()):
        raise ModelError(f"node {index}: expected op, name, inputs, outputs and attrs, got "
                         f"{str(entry)[:120]}")
    if not all(isinstance(name, str) for name in entry["inputs"] + entry["outputs"]):
        raise ModelError(f"node {index} ({entry['name']!r}): tensor names must be strings")
    return Node(**entry)


def _tensor_info(where, entry):
    if not (isinstance(entry, dict) and set(entry) == {"name", "dtype", "shape"}
            and isinstance(entry["name"], str) and entry["dtype"] in _NUMPY_TYPE
            and isinstance(entry["shape"], list)
            and all(d is None or is_int(d, 0) for d in entry["shape"])):
        raise ModelError(f"the graph's {where}: expected name, dtype (one of "
                         f"{sorted(_NUMPY_TYPE)}) and shape, got {str(entry)[:120]}")
    return TensorInfo(**entry)


def _constants(data, nodes):
    """The constants the graph names (node inputs, QGemm attributes), read once their sizes,
    from the archive's directory, are known to fit in the memory available."""
    named = set()
    for node in nodes:
        named.update(node.inputs)
        for key in RECORDS[node.op].CONSTANTS if node.op in RECORDS else ():
            if isinstance(node.attrs.get(key), str):
                named.add(node.attrs[key])
    keys = [key for key in data.files if key.startswith("const/") and key[6:] in named]
    size = sum(data.zip.getinfo(f"{key}.npy").file_size for key in keys)
    available = available_memory()
    if available is not None and size > available // 2:
        raise ModelError(f"its constants take {size / 2**30:.1f} GiB, more than half the "
                         f"{available / 2**30:.1f} GiB of memory available")
    return {key[len("const/"):]: data[key] for key in keys}


def available_memory():
    """Bytes of memory available to allocate (Linux's MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def loads(data):
    """:func:`load` from bytes."""
    return load(io.BytesIO(data))
