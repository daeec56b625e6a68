"""Conv, MatMul and Gemm lowered to the runtime's QGemm (and QMatMul) nodes."""

import dataclasses

import numpy as np

from sparsa.host.graph import ModelError, Node
from sparsa.host.quant import rounding_multiplier
from sparsa.host.schema import QGemm, QMatMul

from .ir import GEMM_OPS, QOPERATOR_OPS, _ACTIVATIONS, _QLINEAR_GEMM, _const, _single_consumer


class _Operand:
    """A quantized tensor feeding a GEMM: the int8-domain tensor, its scale and zero point."""

    def __init__(self, tensor, scale, zero_point):
        self.tensor, self.scale, self.zero_point = tensor, scale, zero_point


def _dequantized(graph, producers, name, node):
    """The quantized operand behind float tensor ``name`` if a DequantizeLinear made it."""
    dq = producers.get(name)
    if dq is None or dq.op != "DequantizeLinear":
        return None
    scale = np.asarray(graph.constants[dq.inputs[1]], np.float64)
    zero_point = np.asarray(graph.constants[dq.inputs[2]], np.int64)
    axis = dq.attrs.get("axis", 1)
    return _Operand(dq.inputs[0], scale, zero_point), axis


def device_node(name, inputs, outputs, spec):
    """A device node of the record ``spec`` (:mod:`sparsa.host.schema`), its attributes the
    record's JSON form."""
    return Node(type(spec).__name__, name, inputs, outputs, spec.attrs(), spec)


def _lower(graph):
    producers = graph.producers()
    consumers = graph.consumers()
    removed = set()
    lowered = []
    for node in graph.nodes:
        if id(node) in removed:
            continue
        if node.op in GEMM_OPS or node.op in QOPERATOR_OPS or node.op == _QLINEAR_GEMM:
            try:
                if _of_two_activations(graph, node, producers):
                    qgemm, absorbed = _lower_activation_matmul(graph, node, producers,
                                                               consumers)
                else:
                    qgemm, absorbed = _lower_gemm(graph, node, producers, consumers)
            except ModelError as error:
                if node.name in str(error):
                    raise
                raise ModelError(f"{node.describe()}: {error}") from error
            removed.update(id(n) for n in absorbed)
            lowered.append(qgemm)
            continue
        lowered.append(node)
    graph.nodes = [n for n in lowered if id(n) not in removed]


def _of_two_activations(graph, node, producers):
    """Whether ``node`` is a MatMul whose second operand is not constant weights (attention's
    Q x K^T and P x V)."""
    if node.op != "MatMul":
        return False
    found = _dequantized(graph, producers, node.inputs[1], node)
    tensor = found[0].tensor if found is not None else node.inputs[1]
    return tensor not in graph.constants


def _lower_activation_matmul(graph, node, producers, consumers):
    """A MatMul of two quantized activations, each from a DequantizeLinear (per tensor), into
    a QuantizeLinear (per tensor): a ``QMatMul`` node, the int8 product of each pair of
    matrices (broadcast over the leading axes) on the device, the zero points' terms and
    gemmlowp's requantization on the host."""
    operands = [_dequantized(graph, producers, name, node) for name in node.inputs[:2]]
    if any(found is None for found in operands):
        raise ModelError("a MatMul of two activations needs both from a DequantizeLinear "
                         "(quantize the model, e.g. onnxruntime's quantize_static)")
    (a, _), (b, _) = operands
    follow = _single_consumer(consumers, node.outputs[0])
    if follow is None or follow.op != "QuantizeLinear" or not all(
            name in graph.constants for name in follow.inputs[1:3]):
        raise ModelError("a MatMul of two activations needs a QuantizeLinear after it")
    out_scale = np.asarray(graph.constants[follow.inputs[1]], np.float64)
    out_zero = np.asarray(graph.constants[follow.inputs[2]], np.int64)
    if any(np.size(v) != 1 for v in (a.scale, a.zero_point, b.scale, b.zero_point, out_scale,
                                     out_zero)):
        raise ModelError("a MatMul of two activations is quantized per tensor only")
    real = float(np.asarray(a.scale).reshape(-1)[0] * np.asarray(b.scale).reshape(-1)[0]
                 / out_scale.reshape(-1)[0])
    if not 0 < real < 1:
        raise ModelError(f"the scales give a multiplier of {real}: expected below 1")
    # The shift whose two roundings most often give one rounding of the exact product (what
    # a float computation of the QDQ graph gives), for outputs across the int8 range.
    multiplier, shift = rounding_multiplier(real)
    spec = QMatMul(a_zero=int(np.asarray(a.zero_point).reshape(-1)[0]),
                   b_zero=int(np.asarray(b.zero_point).reshape(-1)[0]),
                   multiplier=int(multiplier), shift=int(shift),
                   out_zero=int(out_zero.reshape(-1)[0]))
    return device_node(node.name, [a.tensor, b.tensor], [follow.outputs[0]], spec), [follow]


def _weight_operand(graph, node, producers, name, operand=None):
    """The constant int8 weights of a GEMM, as (values, scale, zero point, axis)."""
    if operand is None:
        found = _dequantized(graph, producers, name, node)
        if found is None:
            if name in graph.constants and graph.types.get(name, "").startswith("float"):
                raise ModelError("the weights are float: quantize the model (e.g. onnxruntime's "
                                 "quantize_static) or compile the float model with "
                                 "calibration=")
            raise ModelError(f"the weights {name!r} are not a constant (sparsa runs GEMMs of "
                             f"activations by constant weights)")
        operand, axis = found
    else:
        axis = operand.axis
    if operand.tensor not in graph.constants:
        raise ModelError(f"the weights {operand.tensor!r} are not a constant (sparsa runs GEMMs "
                         f"of activations by constant weights)")
    w = graph.constants[operand.tensor]
    if w.dtype != np.int8:
        raise ModelError(f"weights of type {graph.types.get(operand.tensor)}: expected int8 "
                         f"or uint8")
    return w, operand.scale, operand.zero_point, axis


def _per_channel(values, n, what, axis_ok):
    values = np.asarray(values).reshape(-1)
    if values.size == 1:
        return np.repeat(values, n)
    if values.size != n or not axis_ok:
        raise ModelError(f"{what}: expected one value or one per output channel ({n}), got "
                         f"{values.size} along another axis")
    return values


def _lower_gemm(graph, node, producers, consumers):
    op = node.op
    a = node.attrs
    absorbed = []
    out_q = None  # (scale, zero point) of a fused QuantizeLinear
    mode = None
    x_zero_tensor = ""
    if op in GEMM_OPS:
        found = _dequantized(graph, producers, node.inputs[0], node)
        if found is None:
            raise ModelError("the input is not from a DequantizeLinear: quantize the model "
                             "(e.g. onnxruntime's quantize_static) or compile the float model "
                             "with calibration=")
        x, x_axis = found
        if x.scale.size != 1 or x.zero_point.size != 1:
            raise ModelError("the input is quantized per channel: sparsa needs one scale and "
                             "zero point per activation tensor")
        w, w_scale, w_zero, w_axis = _weight_operand(graph, node, producers, node.inputs[1])
        bias_name = node.inputs[2] if len(node.inputs) > 2 else ""
    elif op in ("QLinearConv", "QLinearMatMul", _QLINEAR_GEMM):
        ins = node.inputs
        x = _Operand(ins[0], _const(graph, ins[1]), _const(graph, ins[2]))
        w_operand = _Operand(ins[3], _const(graph, ins[4]), _const(graph, ins[5]))
        w_operand.axis = 0 if op == "QLinearConv" or a.get("transB") else 1
        w, w_scale, w_zero, w_axis = _weight_operand(graph, node, producers, ins[3], w_operand)
        if op == _QLINEAR_GEMM:  # C is int32 at the accumulator's scale; Y optional
            bias_name = ins[6]
            out_q = (_const(graph, ins[7]), _const(graph, ins[8])) if ins[7] else None
            mode = "device" if ins[7] else "float"
        else:
            out_q = (_const(graph, ins[6]), _const(graph, ins[7]))
            bias_name = ins[8] if len(ins) > 8 else ""
            mode = "device"
    else:  # MatMulInteger / ConvInteger: int32 sums
        ins = node.inputs + [""] * (4 - len(node.inputs))
        zp = ins[2]
        x = _Operand(ins[0], np.float64(1.0), np.int64(0))
        if zp:
            if zp in graph.constants:
                x.zero_point = np.asarray(graph.constants[zp], np.int64)
            else:
                x_zero_tensor = zp
        if graph.types.get(ins[0]) == "uint8" and not zp:
            x.zero_point = np.int64(-128)
        w_operand = _Operand(ins[1], np.float64(1.0),
                             _const(graph, ins[3]) if ins[3] else np.int64(
                                 -128 if graph.types.get(ins[1]) == "uint8" else 0))
        w_operand.axis = 0 if op == "ConvInteger" else 1
        w, w_scale, w_zero, w_axis = _weight_operand(graph, node, producers, ins[1], w_operand)
        bias_name = ""
        mode = "int32"
    conv = op in ("Conv", "QLinearConv", "ConvInteger")
    # The weights as (groups, K, N per group) in im2col's order, and which axis is output.
    if conv:
        if w.ndim != 4:
            raise ModelError(f"weights of shape {w.shape}: only 2-d convolutions are supported")
        groups = a["group"]
        n = w.shape[0]
        if n % groups:
            raise ModelError(f"{n} output channels do not divide into {groups} groups")
        out_axis = 0
        matrix = w.reshape(groups, n // groups, -1).transpose(0, 2, 1)
        kernel = list(w.shape[2:])
        if a["kernel_shape"] not in ([0, 0], kernel):
            raise ModelError(f"kernel_shape {a['kernel_shape']} does not match the weights "
                             f"{list(w.shape)}")
    else:
        if w.ndim != 2:
            raise ModelError(f"weights of shape {w.shape}: expected a matrix")
        groups = 1
        trans = bool(a.get("transB", 0))
        matrix = (w.T if trans else w)[None]
        n = matrix.shape[2]
        out_axis = 0 if trans else 1
    w_scale = _per_channel(w_scale, n, "weight scale", w_axis % w.ndim == out_axis)
    w_zero = _per_channel(w_zero, n, "weight zero point", w_axis % w.ndim == out_axis)
    if np.any(w_zero):
        shifted = matrix.astype(np.int64) - w_zero.reshape(groups, 1, n // groups)
        if shifted.min() < -128 or shifted.max() > 127:
            raise ModelError("weights less their zero point exceed int8 (the device multiplies "
                             "int8 by int8); quantize the weights symmetrically")
        matrix = shifted
    matrix = np.ascontiguousarray(matrix.astype(np.int8))
    k = matrix.shape[1]
    alpha = float(a.get("alpha", 1.0))
    beta = float(a.get("beta", 1.0))
    if alpha <= 0:
        raise ModelError(f"alpha={alpha}: only a positive alpha is supported")
    x_scale = float(np.asarray(x.scale).reshape(-1)[0])
    acc_scale = x_scale * w_scale.astype(np.float64) * alpha  # real value of one int32 step
    bias, real_bias = _bias_values(graph, producers, bias_name, n, acc_scale, beta,
                                   raw=op in ("QLinearConv", _QLINEAR_GEMM))
    x_zero = int(np.asarray(x.zero_point).reshape(-1)[0])
    # The device's bias is the model's less the input zero point times the weights' column
    # sums. A channel whose weights are so small that this exceeds int32 at the accumulator's
    # scale gets a coarser weight scale, just enough for it to fit (as the layer quantizer of
    # sparsa.host.model does): its weights round to fewer levels. (onnxruntime saturates such
    # a bias to int32 instead.)
    steps = (bias.astype(np.float64) if bias is not None else real_bias / acc_scale)
    if not x_zero_tensor:
        steps = steps - x_zero * matrix.astype(np.float64).sum(axis=1).reshape(-1)
    factor = np.maximum(1.0, np.abs(steps) / 2**30)
    if np.any(factor > 1):
        if bias is not None:
            real_bias = bias * acc_scale
        matrix = np.rint(matrix / factor.reshape(groups, 1, -1)).astype(np.int8)
        acc_scale = acc_scale * factor
        bias = None
    if bias is None:
        bias = np.rint(real_bias / acc_scale).astype(np.int32)
    # Where the output goes: a QuantizeLinear (maybe after a Relu or Clip) makes it int8 on
    # the device; otherwise the int32 sums are scaled to float on the host.
    relu, clip = False, None
    output = node.outputs[0]
    if mode is None:
        follow = _single_consumer(consumers, output)
        activation = None
        if follow is not None and follow.op in _ACTIVATIONS:
            activation = follow
            follow = _single_consumer(consumers, follow.outputs[0])
        if follow is not None and follow.op == "QuantizeLinear":
            q_scale = np.asarray(graph.constants[follow.inputs[1]], np.float64)
            q_zero = np.asarray(graph.constants[follow.inputs[2]], np.int64)
            if q_scale.size == 1 and q_zero.size == 1:
                out_q = (q_scale, q_zero)
                output = follow.outputs[0]
                absorbed.append(follow)
                if activation is not None:
                    absorbed.append(activation)
                    relu, clip = _fused_activation(graph, activation, out_q)
        mode = "device" if out_q is not None else "float"
    if mode == "device":
        matrix, bias, acc_scale = _sharpen_multipliers(
            matrix, bias, acc_scale, float(np.asarray(out_q[0]).reshape(-1)[0]), k, groups)
    window = None
    if conv:
        window = {key: a[key] for key in ("strides", "pads", "dilations")}
        window["kernel_shape"] = kernel
    base = node.name.replace("/", "_")
    colsum = matrix.astype(np.int64).sum(axis=1).reshape(-1)
    # The bias the device adds: the input zero point folded in (at run time for a zero point
    # that is a tensor). It must still fit int32.
    folded = bias.astype(np.int64) - (0 if x_zero_tensor else x_zero * colsum)
    if folded.min() < -2**31 or folded.max() > 2**31 - 1:
        raise ModelError(f"the int32 bias with the input zero point {x_zero} folded in "
                         f"exceeds int32 ({folded.min()}..{folded.max()})")
    fields = {}  # the mode's own
    if mode == "device":
        out_scale = float(np.asarray(out_q[0]).reshape(-1)[0])
        real = acc_scale / out_scale
        fields.update(out_zero=int(np.asarray(out_q[1]).reshape(-1)[0]), relu=relu,
                      clip=tuple(clip) if clip is not None else None)
        if np.all(real < 1) and np.all(real > 2.0**-32):
            # How far inputs of int8 magnitude move each column's output, and how large the
            # output gets with the bias.
            spread = real * 128.0 * np.abs(matrix.astype(np.float64)).sum(axis=1).reshape(-1)
            multiplier, shift = rounding_multiplier(
                real, magnitude=spread + real * np.abs(folded), spread=spread, center=folded)
            if np.all(multiplier == multiplier[0]):
                multiplier = multiplier[:1]
            fields.update(multiplier=graph.constant(f"{base}/multiplier", multiplier),
                          shift=int(shift))
        else:  # the device only scales down: requantize on the host
            mode = "host"
            fields.update(scale=graph.constant(f"{base}/scale", real))
    elif mode == "float":
        fields.update(scale=graph.constant(f"{base}/scale", acc_scale.astype(np.float32)))
    spec = QGemm(groups=groups, k=k, n=n, mode=mode, source_op=op, x_zero=x_zero, conv=window,
                 weight=graph.constant(f"{base}/weight", matrix),
                 colsum=graph.constant(f"{base}/colsum", colsum),
                 bias=graph.constant(f"{base}/bias", bias), **fields)
    inputs = [x.tensor] + ([x_zero_tensor] if x_zero_tensor else [])
    dtype = {"device": "int8", "host": "int8", "float": "float32", "int32": "int32"}[mode]
    if mode in ("device", "host"):
        dtype = graph.types.get(output, "int8")
    qgemm = device_node(node.name, inputs, [output], spec)
    graph.types[output] = dtype
    return qgemm, absorbed


def _sharpen_multipliers(matrix, bias, acc_scale, out_scale, k, groups):
    """Columns whose real multiplier is so small that the device's 31-bit multiplier keeps
    fewer than 23 significant bits (channels of tiny weights, nearly constant outputs) get
    their weights and bias divided by a power of two ``f`` and their multiplier made ``f``
    times larger, as far as the weights' rounding moves the output by at most 1/128 of a
    step (``64 * K * real * f``): the multiplier's precision is then what the other columns
    have, at one shift for all."""
    real = acc_scale / out_scale
    if not np.all(real < 1):
        return matrix, bias, acc_scale
    limit = np.minimum(2.0**-7 / (64.0 * k * real), 2.0**30 / (real * 2**31))
    factor = np.where(real * 2**31 < 2**23, 2.0 ** np.floor(np.log2(np.maximum(limit, 1.0))),
                      1.0)
    if not np.any(factor > 1):
        return matrix, bias, acc_scale
    matrix = np.rint(matrix / factor.reshape(groups, 1, -1)).astype(np.int8)
    bias = np.rint(bias / factor).astype(np.int32)
    return matrix, bias, acc_scale * factor


def _fused_activation(graph, node, out_q):
    """A Relu or Clip between a GEMM and its QuantizeLinear, in quantized terms: the device's
    ReLU (clamp at the zero point) and/or a clip to the quantized bounds (quantization is
    monotonic, so ``Q(clip(y, lo, hi)) == clip(Q(y), Q(lo), Q(hi))``)."""
    if node.op == "Relu":
        return True, None
    scale = float(np.asarray(out_q[0]).reshape(-1)[0])
    zero = int(np.asarray(out_q[1]).reshape(-1)[0])
    bounds = []
    for i, key in ((1, "min"), (2, "max")):
        if len(node.inputs) > i and node.inputs[i]:
            if node.inputs[i] not in graph.constants:
                raise ModelError(f"{node.describe()}: the bounds must be constants")
            bounds.append(float(np.asarray(graph.constants[node.inputs[i]]).reshape(-1)[0]))
        else:
            bounds.append(node.attrs.get(key))
    low, high = (None if b is None else int(np.clip(np.rint(b / scale) + zero, -128, 127))
                 for b in bounds)
    relu = bounds[0] == 0.0
    return relu, [-128 if low is None else low, 127 if high is None else high]


def _bias_values(graph, producers, name, n, acc_scale, beta, raw=False):
    """``(int32 bias, None)`` at the accumulator's scale from a QOperator's int32 bias (``raw``)
    or an int32 DequantizeLinear of the accumulator's scale; else ``(None, real bias)``
    (another scale, or a float constant) for the caller to round."""
    if not name:
        return np.zeros(n, np.int32), None
    found = _dequantized(graph, producers, name, None)
    if raw:
        values = _const(graph, name).astype(np.int64).reshape(-1)
        if values.size not in (1, n):
            raise ModelError(f"bias {name!r}: expected one value per output channel ({n})")
        real, ints = None, np.broadcast_to(values, (n,))
    elif found is not None and found[0].tensor in graph.constants:
        operand, _ = found
        values = np.asarray(graph.constants[operand.tensor]).astype(np.int64)
        values = np.broadcast_to(values.reshape(-1), (n,)) if values.size in (1, n) else None
        if values is None:
            raise ModelError(f"bias {name!r}: expected one value per output channel ({n})")
        scale = np.broadcast_to(np.asarray(operand.scale, np.float64).reshape(-1), (n,))
        zero = np.broadcast_to(np.asarray(operand.zero_point, np.int64).reshape(-1), (n,))
        if beta == 1.0 and not np.any(zero) and np.allclose(scale, acc_scale, rtol=1e-6, atol=0):
            real = None
            ints = values
        else:
            real = (values - zero) * scale * beta
    elif name in graph.constants:
        real = np.asarray(graph.constants[name], np.float64) * beta
        if real.size not in (1, n):
            raise ModelError(f"bias {name!r}: expected one value per output channel ({n}), got "
                             f"shape {real.shape}")
        real = np.broadcast_to(real.reshape(-1), (n,))
    else:
        raise ModelError(f"bias {name!r} is not a constant")
    if real is not None:
        return None, real
    return np.asarray(ints, np.int64).astype(np.int32), None


# Host ops that move or pick int8 values without changing them: between a DequantizeLinear and
# a QuantizeLinear of the same scale and zero point they run on the int8 tensor directly
# (exactly: Q(DQ(q)) == q).
_VALUE_PRESERVING = ("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze",
                     "Identity", "Dropout", "Relu")


def _skip_requantization(graph):
    producers = graph.producers()
    consumers = graph.consumers()
    removed = set()
    for node in graph.nodes:
        if node.op not in _VALUE_PRESERVING:
            continue
        dq = producers.get(node.inputs[0])
        q = _single_consumer(consumers, node.outputs[0])
        if (dq is None or q is None or dq.op != "DequantizeLinear" or q.op != "QuantizeLinear"
                or len(consumers.get(dq.outputs[0], [])) != 1):
            continue
        params = [np.asarray(graph.constants.get(n, np.nan))
                  for n in dq.inputs[1:3] + q.inputs[1:3]]
        if any(p.size != 1 for p in params) or not (
                float(params[0]) == float(params[2]) and int(params[1]) == int(params[3])):
            continue
        if node.op == "Relu" and int(params[1]) != 0:  # max(q, 0) is Relu only at zero point 0
            continue
        node.inputs = [dq.inputs[0]] + node.inputs[1:]
        node.outputs = list(q.outputs)
        removed.update((id(dq), id(q)))
    graph.nodes = [n for n in graph.nodes if id(n) not in removed]
    # A Relu on a QGemm's int8 output at zero point 0 is the device's ReLU.
    producers = graph.producers()
    consumers = graph.consumers()
    removed = set()
    for node in graph.nodes:
        gemm = producers.get(node.inputs[0]) if node.op == "Relu" else None
        if (gemm is not None and gemm.op == "QGemm" and gemm.spec.mode == "device"
                and gemm.spec.out_zero == 0 and not gemm.spec.clip
                and _single_consumer(consumers, gemm.outputs[0]) is node):
            gemm.spec = dataclasses.replace(gemm.spec, relu=True)
            gemm.attrs = gemm.spec.attrs()
            gemm.outputs = list(node.outputs)
            removed.add(id(node))
    graph.nodes = [n for n in graph.nodes if id(n) not in removed]
