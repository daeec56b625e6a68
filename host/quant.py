"""Float <-> int8 quantization, and the integer requantization parameters the device takes.

A quantized tensor is ``q = clip(round(x / scale) + zero_point, -128, 127)`` (round half to even,
as NumPy and most frameworks round), per tensor (scalar ``scale``/``zero_point``) or per channel
(one per index of ``axis``). Symmetric quantization has ``zero_point == 0`` and uses -127..127.

For ``C = A @ B`` with ``A = sa * (qa - za)`` and ``B = sb * qb`` (weights symmetric), the int32
accumulators ``qa @ qb`` (corrected for ``za`` by the bias) are requantized to the output scale
``so`` with the real multiplier ``sa * sb / so``; :func:`quantize_multiplier` turns it into the
device's ``(QUANT_MULT, QUANT_SHIFT)`` pair.
"""

import math

import numpy as np

from . import arith
from .validate import check_float_array, check_int8_array


def _per_axis(value, x, axis, name):
    """``value`` (scalar, or one per index of ``axis`` of ``x``) shaped to broadcast against x."""
    value = np.asarray(value)
    if axis is None:
        if value.ndim != 0:
            raise ValueError(f"{name}: expected a scalar for per-tensor quantization (axis=None), "
                             f"got shape {value.shape}")
        return value
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis: expected an axis of a {x.ndim}-d array, got {axis}")
    axis %= x.ndim
    if value.shape != (x.shape[axis],):
        raise ValueError(f"{name}: expected shape ({x.shape[axis]},) for axis={axis}, "
                         f"got {value.shape}")
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    return value.reshape(shape)


def _check_scale(scale):
    scale = np.asarray(scale, np.float64)
    if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        raise ValueError(f"scale: expected finite values > 0, got {scale}")
    return scale


def _check_zero_point(zero_point):
    zero_point = np.asarray(zero_point)
    if zero_point.dtype.kind not in "iu":
        raise TypeError(f"zero_point: expected integers, got dtype {zero_point.dtype}")
    if np.any(zero_point < -128) or np.any(zero_point > 127):
        raise ValueError(f"zero_point: expected values in -128..127, got {zero_point}")
    return zero_point.astype(np.int64)


def choose_qparams(x, symmetric=True, axis=None):
    """``(scale, zero_point)`` covering the range of float ``x`` (per tensor, or per channel
    along ``axis``); symmetric maps ``max|x|`` to 127 with zero point 0, asymmetric maps
    ``[min(x, 0), max(x, 0)]`` onto -128..127."""
    x = check_float_array(x, "x")
    reduce = None if axis is None else tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    if symmetric:
        bound = np.max(np.abs(x), axis=reduce)
        scale = np.where(bound > 0, bound / 127.0, 1.0)
        return scale, np.zeros_like(scale, np.int64)
    low = np.minimum(np.min(x, axis=reduce), 0.0)
    high = np.maximum(np.max(x, axis=reduce), 0.0)
    scale = np.where(high > low, (high - low) / 255.0, 1.0)
    zero_point = np.clip(np.round(-128 - low / scale), -128, 127).astype(np.int64)
    return scale, zero_point


def quantize(x, scale, zero_point=0, axis=None, symmetric=None):
    """Float ``x`` to int8. ``symmetric`` (default: ``zero_point`` is 0) clamps to -127..127."""
    x = check_float_array(x, "x")
    scale = _per_axis(_check_scale(scale), x, axis, "scale")
    zero_point = _per_axis(_check_zero_point(zero_point), x, axis, "zero_point")
    if symmetric is None:
        symmetric = not np.any(zero_point)
    low = -127 if symmetric else -128
    return np.clip(np.round(x / scale) + zero_point, low, 127).astype(np.int8)


def dequantize(q, scale, zero_point=0, axis=None):
    """int8 ``q`` back to float32: ``scale * (q - zero_point)``."""
    q = check_int8_array(q, "q")
    scale = _per_axis(_check_scale(scale), q, axis, "scale")
    zero_point = _per_axis(_check_zero_point(zero_point), q, axis, "zero_point")
    return (scale * (q.astype(np.int64) - zero_point)).astype(np.float32)


def quantize_multiplier(real_multiplier, shared_shift=False):
    """``(multiplier, shift)`` with ``real_multiplier ~= multiplier * 2**-31 * 2**-shift``,
    ``multiplier`` in [2**30, 2**31) and ``shift`` in 0..31, as the device's QUANT_MULT and
    QUANT_SHIFT take them. ``real_multiplier`` must be in (0, 1) (the device only shifts right).

    An array gives an array of multipliers and, with ``shared_shift``, one shift for all (that
    of the largest value; the others get smaller multipliers, which the device applies per
    column: ``OPTIONS.CHANNEL_QUANT``), else an array of shifts (requantized on the host). A
    shared shift costs no accuracy that matters: a multiplier's rounding error is at most
    ``2**-(32 + shift)`` of the accumulator, below a thousandth of an output step for any
    accumulator that does not saturate. (The device's two roundings are another matter: with
    the shift this normalization gives, a result can differ from one rounding by one step; see
    :func:`rounding_multiplier`.)"""
    values = np.asarray(real_multiplier, np.float64)
    if not np.all(np.isfinite(values)) or np.any(values <= 0) or np.any(values >= 1):
        raise ValueError(f"real_multiplier: expected values in (0, 1), got {real_multiplier}")
    multipliers, shifts = [], []
    for value in values.reshape(-1):
        fraction, exponent = math.frexp(float(value))  # value = fraction * 2**exponent
        multiplier = round(fraction * 2**31)
        if multiplier == 2**31:  # rounding carried into the next power of two
            multiplier //= 2
            exponent += 1
        shift = -exponent
        if shift > 31:
            raise ValueError(f"real_multiplier: {value} is below the smallest the device "
                             f"can apply (2**-32)")
        multipliers.append(multiplier)
        shifts.append(shift)
    if values.ndim == 0:
        return multipliers[0], shifts[0]
    if shared_shift:
        shift = min(shifts)
        # Exact in float64: a power-of-two scaling, then one rounding, as for the largest value.
        scaled = np.round(np.ldexp(values, 31 + shift)).astype(np.int64)
        return scaled, shift
    return (np.array(multipliers, np.int64).reshape(values.shape),
            np.array(shifts, np.int64).reshape(values.shape))


def rounding_multiplier(real_multiplier, magnitude=128.0, spread=None, center=None):
    """``(multiplier, shift)`` for real multipliers in (0, 1) (a scalar or one per column, with
    one shift) chosen so the device's result most often equals ``round(acc * real)``.

    The device rounds twice: the high multiply to ``2**-shift`` of an output step, then the
    shift. A value whose fraction lies within ``2**-(shift + 1)`` below one half rounds up
    where one rounding would not, so a shift of 7 (what :func:`quantize_multiplier`'s
    normalized multiplier gives for a multiplier of about 0.005) differs from a single
    rounding on about 0.4% of outputs. Shift 0 rounds once, at the cost of a multiplier with
    fewer significant bits: an error of up to ``magnitude / 2 / multiplier`` of an output step
    for outputs up to ``magnitude`` (scalar or per column: the largest ``|acc * real|`` the
    column reaches, at most the int8 range). This takes the shift with the fewest expected
    differences: ``2**-(shift + 1)`` plus that error averaged over the columns (each column's
    share of outputs near a rounding tie). A column whose inputs move it by less than half a
    step (``spread``, per column; default ``magnitude``) gives one value, the rounding of its
    accumulator ``center`` (per column, e.g. its bias): it counts as all different when the
    device's result for ``center`` is not ``round(center * real)``, else not at all."""
    values = np.asarray(real_multiplier, np.float64)
    if not np.all(np.isfinite(values)) or np.any(values <= 0) or np.any(values >= 1):
        raise ValueError(f"real_multiplier: expected values in (0, 1), got {real_multiplier}")
    magnitude = np.minimum(np.broadcast_to(np.asarray(magnitude, np.float64), values.shape),
                           128.0).reshape(-1)
    spread = magnitude if spread is None else np.broadcast_to(
        np.asarray(spread, np.float64), values.shape).reshape(-1)
    live = spread >= 0.5
    center = (np.zeros(values.size) if center is None else np.broadcast_to(
        np.asarray(center, np.float64), values.shape).reshape(-1))
    exact = np.clip(np.rint(center * values.reshape(-1)), -2**20, 2**20)
    largest_shift = min(31, int(math.floor(-math.log2(float(values.max())))))
    best = None
    for shift in range(largest_shift + 1):
        multipliers = np.round(np.ldexp(values, 31 + shift))
        if multipliers.max() >= 2**31:
            break
        error = np.minimum(1.0, magnitude / 2 / np.maximum(multipliers.reshape(-1), 1.0))
        device = arith.scale(np.clip(center, -2**31, 2**31 - 1), multipliers.reshape(-1), shift)
        error = np.where(live, error, (device != exact).astype(np.float64))
        rate = (2.0 ** -(shift + 1) if shift else 0.0) + float(np.mean(error))
        if best is None or rate < best[0]:
            best = (rate, multipliers.astype(np.int64), shift)
    _, multipliers, shift = best
    return (int(multipliers) if values.ndim == 0 else multipliers), shift


def requant_params(input_scale, weight_scale, output_scale, output_zero_point=0,
                   shared_shift=True):
    """The ``requant=(multiplier, shift, zero_point)`` argument of ``matmul`` for int8 inputs of
    scale ``input_scale`` times weights of ``weight_scale`` (scalar, or one per output column)
    to outputs of ``output_scale``/``output_zero_point``. Per-column weight scales give one
    multiplier per column and, with ``shared_shift`` (the default), one shift, so the device
    requantizes; the pair is :func:`rounding_multiplier`'s (the device then rounds once, as a
    float requantization would). ``shared_shift=False`` gives :func:`quantize_multiplier`'s
    per-column shifts (applied on the host)."""
    real = (np.asarray(input_scale, np.float64) * np.asarray(weight_scale, np.float64)
            / float(_check_scale(output_scale)))
    if shared_shift:
        multiplier, shift = rounding_multiplier(real)
    else:
        multiplier, shift = quantize_multiplier(real, shared_shift=False)
    zero_point = int(_check_zero_point(output_zero_point))
    return multiplier, shift, zero_point


# ---- post-training quantization: the rules sparsa's quantizers share ------------------------
# (sparsa.onnx.compile(calibration=...) and sparsa.host.model.quantize_model)

def activation_scale(values):
    """The scale of a symmetric int8 activation (zero point 0): the largest magnitude among
    ``values`` over 127 (1 when every value is zero or there are none)."""
    bound = float(np.max(np.abs(values))) if np.size(values) else 0.0
    return bound / 127.0 if bound > 0 else 1.0


def weight_scales(w, axis, bias, input_scale):
    """Symmetric int8 scales per output channel (``axis`` of ``w``; zero point 0): each
    channel's largest magnitude over 127, raised where the channel's float ``bias`` would not
    fit int32 at the accumulator's scale ``input_scale * scale`` (its weights then round to
    fewer levels, or to zero); 1 for a channel of zeros."""
    w = np.asarray(w, np.float64)
    reduce = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
    scales = np.maximum(np.max(np.abs(w), axis=reduce) / 127.0,
                        np.abs(np.asarray(bias, np.float64)) / (input_scale * 2**30))
    return np.where(scales > 0, scales, 1.0)


def quantize_weights(w, scales, axis):
    """``w`` in int8 at per-channel ``scales`` along ``axis``: rounded half to even, -127..127."""
    w = np.asarray(w, np.float64)
    shape = [1] * w.ndim
    shape[axis % w.ndim] = -1
    return np.clip(np.rint(w / np.asarray(scales).reshape(shape)), -127, 127).astype(np.int8)
