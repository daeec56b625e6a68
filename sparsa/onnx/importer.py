"""Reading an ONNX graph: each (domain, op) through its converter (:data:`CONVERTERS`)."""

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from sparsa.host.graph import HOST_OPS, ModelError, TensorInfo, run_host_op
from sparsa.host.schema import WINDOW, bad_window

from .ir import (GEMM_OPS, MICROSOFT_OPS, OPSETS, QOPERATOR_OPS, _Graph, _QLINEAR_GEMM, _add,
                 _attributes, _dtype_name, _refusals, _shape, _shift_constant, _unsupported)


def _import(model, outputs):
    from onnx import numpy_helper

    g = model.graph
    graph = _Graph()
    opset = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    graph.opset = opset.get("ai.onnx", 1)
    low, high = OPSETS
    if not low <= graph.opset <= high:
        raise ModelError(f"model: its ai.onnx opset is {graph.opset}; sparsa reads opsets {low} "
                         f"to {high} (the tested ones): convert it with "
                         f"onnx.version_converter.convert_version(model, 17)")
    import onnx

    if not 3 <= model.ir_version <= onnx.IR_VERSION:
        raise ModelError(f"model: its IR version is {model.ir_version}; this onnx "
                         f"({onnx.__version__}) reads IR versions 3 to {onnx.IR_VERSION}")
    for init in g.initializer:
        value = numpy_helper.to_array(init)
        graph.types[init.name] = value.dtype.name
        graph.constants[init.name] = _shift_constant(graph, init.name, value)
        graph._names.add(init.name)
    for vi in g.input:
        if vi.name in graph.constants:
            continue
        dtype = _dtype_name(vi.type.tensor_type.elem_type)
        if dtype not in ("float32", "float64", "int8", "uint8", "int32", "int64", "bool"):
            raise ModelError(f"model input {vi.name!r}: element type {dtype} is not supported")
        graph.types[vi.name] = dtype
        if dtype == "uint8":
            graph.shifted.add(vi.name)
        graph.inputs.append(TensorInfo(vi.name, dtype, _shape(vi)))
        graph._names.add(vi.name)
    names = list(outputs) if outputs is not None else [vi.name for vi in g.output]
    produced = {out for node in g.node for out in node.output} | set(graph.types)
    for out in names:
        if out not in produced:
            raise ModelError(f"outputs: no tensor {out!r} in the model")
    # Only the nodes the outputs need are compiled (a cut leaves out, e.g., a classifier's
    # label branch).
    # (By position: protobuf's Python objects for nodes are made on access, so their ids are
    # not the nodes'.)
    nodes = list(g.node)
    needed, used = set(names), set()
    for position in reversed(range(len(nodes))):
        if any(out in needed for out in nodes[position].output):
            used.add(position)
            needed.update(nodes[position].input)
    # Every node is looked at before compile stops: a refused node's outputs are marked, the
    # nodes that read them are passed over, and the refusals are reported together.
    refused, passed_over, marked = [], 0, set()
    for index, node in _topological([nodes[i] for i in sorted(used)], set(graph.types)):
        if any(name in marked for name in node.input):
            passed_over += 1
            marked.update(node.output)
            continue
        name = graph.fresh(node.name or f"{node.op_type}_{index}")
        try:
            _import_node(graph, node, name)
        except ModelError as error:
            refused.append(str(error) if name in str(error)
                           else f"{node.op_type} node {name!r}: {error}")
            marked.update(out for out in node.output if out)
    if refused:
        raise ModelError(_refusals(refused, passed_over))
    infos = {vi.name: vi for vi in list(g.output) + list(g.value_info)}
    if not names:
        raise ModelError("outputs: the model names no outputs")
    for out in names:
        shape = _shape(infos[out]) if out in infos else []
        graph.outputs.append(TensorInfo(out, graph.types[out], shape))
    return graph


def _topological(nodes, available):
    """``(index, node)`` in an order where each node comes after the producers of its inputs
    (ONNX asks for this order, but not every tool writes it); the file's order otherwise."""
    available = set(available) | {""}
    pending = list(enumerate(nodes))
    ordered = []
    while pending:
        ready = [(i, n) for i, n in pending if all(x in available for x in n.input)]
        if not ready:
            i, node = pending[0]
            missing = [x for x in node.input if x not in available]
            raise ModelError(f"{node.op_type} node {node.name or i!r}: input {missing[0]!r} is "
                             f"produced by no node (or by a cycle)")
        for i, n in ready:
            available.update(n.output)
        ordered.extend(ready)
        taken = {id(n) for _, n in ready}
        pending = [(i, n) for i, n in pending if id(n) not in taken]
    return ordered


def _zero_point(graph, node, name, zp_name, data_type=None):
    """A QuantizeLinear/DequantizeLinear zero point as an int8-domain constant name."""
    if zp_name:
        if zp_name not in graph.constants:
            raise ModelError(f"the zero point {zp_name!r} is not a constant")
        dtype = graph.types[zp_name]
        if dtype not in ("int8", "uint8", "int32"):
            raise _unsupported(node, name, f"zero point type {dtype}: sparsa runs int8 and "
                                           f"uint8 quantization")
        return zp_name, dtype
    dtype = data_type or "uint8"
    return graph.constant(f"{name}_zero_point",
                          np.int8(-128) if dtype == "uint8" else np.int8(0)), dtype


def _import_node(graph, node, name):
    """``node`` into ``graph`` through its op's converter (:data:`CONVERTERS`), or refused."""
    inputs = list(node.input)
    for i in inputs:
        if i and i not in graph.types:
            raise ModelError(f"input {i!r} is produced by no earlier node")
    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    converter = CONVERTERS.get((domain, node.op_type))
    if converter is None:
        raise _unsupported(node, name)
    if converter.opsets is not None:
        low, high = converter.opsets
        if not low <= graph.opset <= high:
            raise _unsupported(node, name, f"{node.op_type} is an op of ai.onnx opsets {low} "
                                           f"to {high}; the model's opset is {graph.opset}")
    converter.convert(graph, node, name, _attributes(node), inputs, list(node.output))


def _convert_constant(graph, node, name, attrs, inputs, outputs):
    from onnx import numpy_helper

    if "value" not in attrs:
        raise _unsupported(node, name, "only the tensor form (value=) of Constant is supported")
    value = numpy_helper.to_array(attrs["value"])
    graph.types[outputs[0]] = value.dtype.name
    graph.constants[outputs[0]] = _shift_constant(graph, outputs[0], value)
    graph._names.add(outputs[0])


def _convert_quantize(graph, node, name, attrs, inputs, outputs):
    if "output_dtype" in attrs and attrs["output_dtype"] not in (2, 3):
        raise _unsupported(node, name, "only int8 and uint8 outputs are supported")
    zp, dtype = _zero_point(graph, node, name, inputs[2] if len(inputs) > 2 else "")
    if dtype not in ("int8", "uint8"):
        raise _unsupported(node, name, f"output type {dtype}: sparsa quantizes to int8 and "
                                       f"uint8")
    _check_scale(graph, node, name, inputs[1])
    _add(graph, node.op_type, name, [inputs[0], inputs[1], zp], outputs,
         {"axis": attrs.get("axis", 1)}, dtype)
    if dtype == "uint8":
        graph.shifted.add(outputs[0])


def _convert_dequantize(graph, node, name, attrs, inputs, outputs):
    first = graph.types.get(inputs[0])
    if first not in ("int8", "uint8", "int32"):
        raise _unsupported(node, name, f"input type {first}: sparsa runs int8, uint8 and int32 "
                                       f"quantized tensors")
    zp, _ = _zero_point(graph, node, name, inputs[2] if len(inputs) > 2 else "", first)
    _check_scale(graph, node, name, inputs[1])
    _add(graph, node.op_type, name, [inputs[0], inputs[1], zp], outputs,
         {"axis": attrs.get("axis", 1)}, graph.types[inputs[1]])


def _convert_dynamic_quantize(graph, node, name, attrs, inputs, outputs):
    _add(graph, node.op_type, name, inputs, outputs, {}, None)
    graph.types.update({outputs[0]: "uint8", outputs[1]: "float32", outputs[2]: "uint8"})
    graph.shifted.update({outputs[0], outputs[2]})


def _convert_gemm(graph, node, name, attrs, inputs, outputs):
    """Conv, MatMul, Gemm and the QOperator GEMMs: kept as they are until lowering."""
    op = node.op_type
    first = graph.types.get(inputs[0])
    dtype = {"MatMulInteger": "int32", "ConvInteger": "int32"}.get(
        op, graph.types.get(inputs[7]) if op.startswith("QLinear") else first)
    _add(graph, op, name, inputs, outputs, _gemm_attrs(node, name, op, attrs), dtype)
    if op.startswith("QLinear") and graph.types[outputs[0]] == "uint8":
        graph.shifted.add(outputs[0])


# Host ops that run on float tensors only.
_FLOAT_OPS = ("Softmax", "AveragePool", "GlobalAveragePool", "ReduceMean", "BatchNormalization",
              "Erf", "Sqrt", "Pow", "Sigmoid", "Tanh", "LayerNormalization", "Gelu",
              "HardSigmoid", "HardSwish")


def _convert_host(graph, node, name, attrs, inputs, outputs):
    """An op the runtime runs on the host (:data:`sparsa.host.graph.HOST_OPS`), its
    attributes as the runtime reads them."""
    op = node.op_type
    first = graph.types.get(inputs[0]) if inputs else None
    host_attrs = _host_attrs(graph, node, name, op, attrs, inputs)
    if op in ("Add", "Sub", "Mul", "Sum", "Div", "Pow") and any(
            graph.types.get(i) in ("int8", "uint8") for i in inputs):
        raise _unsupported(node, name, "integer arithmetic on 8-bit tensors; quantized models "
                                       "add through DequantizeLinear/QuantizeLinear or QLinearAdd")
    if op == "Pad" and len(inputs) > 2 and inputs[2] and inputs[2] not in graph.constants:
        raise _unsupported(node, name, "the pad value must be a constant")
    if op == "Pad" and inputs[0] in graph.shifted:  # uint8 held as int8 less 128
        if "value" in host_attrs or "pads" in host_attrs:  # opset < 11: attributes
            host_attrs["value"] = int(host_attrs.get("value", 0)) - 128
        elif len(inputs) < 3 or not inputs[2]:  # the default pad value, 0, is -128 here
            inputs = (inputs + [""])[:2] + [graph.constant(f"{name}_value", np.int8(-128))]
    dtype = {"Cast": host_attrs.get("to"), "ArgMax": "int64", "Shape": "int64"}.get(op, first)
    _add(graph, op, name, inputs, outputs, host_attrs, dtype)
    if op in _FLOAT_OPS and first not in ("float32", "float64"):
        raise _unsupported(node, name, f"input type {first}: {op} runs on float tensors")
    if dtype == "uint8" or (op not in ("Cast", "ArgMax", "Shape") and inputs
                            and inputs[0] in graph.shifted):
        graph.shifted.update(o for o in outputs[:1] if o)


def _check_scale(graph, node, name, scale):
    if scale not in graph.constants:
        raise _unsupported(node, name, f"the scale {scale!r} is not a constant")


def _pool_attrs(node, name, attrs):
    kernel = list(attrs.get("kernel_shape", []))
    if len(kernel) != 2:
        raise _unsupported(node, name, f"kernel_shape {kernel}: only 2-d pooling and "
                                       f"convolution are supported")
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID", "NOTSET", "VALID"):
        auto_pad = attrs["auto_pad"]
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        raise _unsupported(node, name, f"auto_pad {auto_pad}: give explicit pads (export with "
                                       f"auto_pad NOTSET)")
    if attrs.get("ceil_mode", 0):
        raise _unsupported(node, name, "ceil_mode=1 is not supported")
    result = {"kernel_shape": kernel, "strides": list(attrs.get("strides", [1, 1])),
              "pads": pads, "dilations": list(attrs.get("dilations", [1, 1]))}
    # (A convolution's kernel_shape of [0, 0]: not given, the weights' shape.)
    key = bad_window(result, [key for key in WINDOW if key != "kernel_shape" or any(kernel)])
    if key is not None:
        count, low = WINDOW[key]
        raise ModelError(f"{node.op_type} node {name!r}: {key} {result[key]}: expected {count} "
                         f"integers of at least {low}")
    return result


def _gemm_attrs(node, name, op, attrs):
    if op in ("Conv", "QLinearConv", "ConvInteger"):
        result = _pool_attrs(node, name, {"kernel_shape": attrs.get("kernel_shape", [0, 0]),
                                          **attrs})
        result["group"] = attrs.get("group", 1)
        if result["group"] < 1:
            raise ModelError(f"{op} node {name!r}: group {result['group']}: expected at least 1")
        return result
    if op == "Gemm":
        if attrs.get("transA", 0):
            raise _unsupported(node, name, "transA=1 is not supported (transpose the input "
                                           "with a Transpose node)")
        return {"transB": attrs.get("transB", 0), "alpha": attrs.get("alpha", 1.0),
                "beta": attrs.get("beta", 1.0)}
    return {}


def _host_attrs(graph, node, name, op, attrs, inputs):
    if op in ("MaxPool", "AveragePool"):
        result = _pool_attrs(node, name, attrs)
        if op == "AveragePool":
            result["count_include_pad"] = attrs.get("count_include_pad", 0)
        if op == "MaxPool" and len(node.output) > 1 and node.output[1]:
            raise _unsupported(node, name, "the Indices output is not supported")
        return result
    if op == "Cast":
        to = _dtype_name(attrs["to"])
        if to not in ("float32", "float64", "int8", "uint8", "int32", "int64", "bool"):
            raise _unsupported(node, name, f"cast to {to} is not supported")
        return {"to": to, "from_shifted": inputs[0] in graph.shifted, "to_shifted": to == "uint8"}
    if op == "Softmax":
        if graph.opset >= 13:
            return {"axis": attrs.get("axis", -1)}
        # Before opset 13: the input as a matrix of its axes before ``axis`` by those from it
        # on, normalized over the latter together.
        return {"axis": attrs.get("axis", 1), "through_last": 1}
    if op == "Pad":
        mode = attrs.get("mode", b"constant")
        if mode not in (b"constant", "constant"):
            raise _unsupported(node, name, f"pad mode {mode!r}: only constant is supported")
        return {k: v for k, v in attrs.items() if k in ("pads", "value")}
    if op == "Concat":
        return {"axis": attrs["axis"]}
    if op == "ReduceMean":
        if len(inputs) > 1 and inputs[1] and inputs[1] not in graph.constants:
            raise _unsupported(node, name, "the axes must be a constant")
        return {k: v for k, v in attrs.items() if k in ("axes", "keepdims",
                                                        "noop_with_empty_axes")}
    if op == "LayerNormalization":
        if len(node.output) > 1 and any(node.output[1:]):
            raise _unsupported(node, name, "only the normalized output is supported")
        return {"axis": attrs.get("axis", -1), "epsilon": attrs.get("epsilon", 1e-5)}
    if op == "Shape":
        return {k: v for k, v in attrs.items() if k in ("start", "end")}
    if op in ("HardSigmoid", "Gelu"):
        value = attrs.get("approximate")
        result = {k: v for k, v in attrs.items() if k in ("alpha", "beta")}
        if value is not None:
            result["approximate"] = value.decode() if isinstance(value, bytes) else value
        return result
    if op == "Split":
        return {k: (list(v) if k == "split" else v) for k, v in attrs.items()
                if k in ("axis", "split", "num_outputs")}
    if op == "Slice":
        if len(inputs) < 3 or not all(i in graph.constants for i in inputs[1:] if i):
            raise _unsupported(node, name, "starts, ends, axes and steps must be constants "
                                           "(given as inputs: opset 10 on)")
        return {}
    if op == "Gather":
        if inputs[1] not in graph.constants:
            raise _unsupported(node, name, "the indices must be a constant")
        return {"axis": attrs.get("axis", 0)}
    if op == "BatchNormalization":
        if len(node.output) > 1 and any(node.output[1:]):
            raise _unsupported(node, name, "only inference (one output) is supported")
        return {"epsilon": attrs.get("epsilon", 1e-5)}
    if op in ("Clip",):
        return {k: v for k, v in attrs.items() if k in ("min", "max")}
    return {k: v for k, v in attrs.items()
            if k in ("axis", "axes", "perm", "keepdims", "select_last_index", "allowzero")}


def _import_microsoft(graph, node, name, attrs, inputs, outputs):
    """onnxruntime's quantized element-wise ops as DequantizeLinear, the float op,
    QuantizeLinear: the real values they define, computed in float."""
    def dequantized(i, x, scale, zp):
        zp_name, _ = _zero_point(graph, node, name, zp, graph.types[x])
        out = graph.fresh(f"{name}_x{i}")
        _add(graph, "DequantizeLinear", f"{name}/dequantize{i}", [x, scale, zp_name], [out],
             {"axis": 1}, "float32")
        return out

    op = node.op_type
    if op == "QGemm":
        if attrs.get("transA", 0):
            raise _unsupported(node, name, "transA=1 is not supported")
        ins = inputs + [""] * (9 - len(inputs))
        dtype = graph.types.get(ins[8]) if ins[7] else "float32"
        _add(graph, _QLINEAR_GEMM, name, ins, outputs,
             {"transB": attrs.get("transB", 0), "alpha": attrs.get("alpha", 1.0), "beta": 1.0},
             dtype)
        if dtype == "uint8":
            graph.shifted.add(outputs[0])
        return
    if op == "QLinearConcat":
        y_scale, y_zp, rest = inputs[0], inputs[1], inputs[2:]
        triples = [rest[i:i + 3] for i in range(0, len(rest), 3)]
        floats = [dequantized(i, *t) for i, t in enumerate(triples)]
        result = graph.fresh(f"{name}_float")
        _add(graph, "Concat", f"{name}/concat", floats, [result], {"axis": attrs["axis"]},
             "float32")
    elif op in ("QLinearAdd", "QLinearMul"):
        a = dequantized(0, inputs[0], inputs[1], inputs[2])
        b = dequantized(1, inputs[3], inputs[4], inputs[5])
        y_scale, y_zp = inputs[6], inputs[7] if len(inputs) > 7 else ""
        result = graph.fresh(f"{name}_float")
        _add(graph, op[len("QLinear"):], f"{name}/{op[7:].lower()}", [a, b], [result], {},
             "float32")
    elif op == "QLinearSoftmax":
        x = dequantized(0, inputs[0], inputs[1], inputs[2])
        y_scale, y_zp = inputs[3], inputs[4] if len(inputs) > 4 else ""
        result = graph.fresh(f"{name}_float")
        _add(graph, "Softmax", f"{name}/softmax", [x], [result],
             {"axis": attrs.get("axis", -1)} if attrs.get("opset", 13) >= 13
             else {"axis": attrs.get("axis", 1), "through_last": 1}, "float32")
    else:
        if attrs.get("channels_last", 0):
            raise _unsupported(node, name, "channels_last=1 is not supported")
        x = dequantized(0, inputs[0], inputs[1], inputs[2])
        y_scale, y_zp = inputs[3], inputs[4] if len(inputs) > 4 else ""
        result = graph.fresh(f"{name}_float")
        float_op = op[len("QLinear"):]
        _add(graph, float_op, f"{name}/{float_op}", [x], [result],
             _pool_attrs(node, name, attrs) | {"count_include_pad":
                                                attrs.get("count_include_pad", 0)}
             if float_op == "AveragePool" else {}, "float32")
    zp_name, dtype = _zero_point(graph, node, name, y_zp, graph.types[inputs[0]]
                                 if op != "QLinearConcat" else graph.types[inputs[3]])
    _add(graph, "QuantizeLinear", f"{name}/quantize", [result, y_scale, zp_name], outputs,
         {"axis": 1}, dtype)
    if dtype == "uint8":
        graph.shifted.add(outputs[0])


@dataclass(frozen=True)
class Converter:
    """How the compiler reads one (domain, op): ``convert(graph, node, name, attrs, inputs,
    outputs)`` adds the op's nodes to ``graph`` or raises :class:`ModelError` saying why not;
    ``opsets``, the ai.onnx opsets (first, last) of the op as the converter reads it (None
    for another domain's op). What an opset changes within them (Softmax's axes, attributes
    that became inputs) the converter reads from ``graph.opset``."""

    convert: Callable
    opsets: Optional[tuple] = OPSETS


_FIRST_OPSET = {"LayerNormalization": 17, "Gelu": 20, "HardSwish": 14}
"""The supported ops defined after the first opset read (onnx's operator schemas)."""


def _ai_onnx(op, convert):
    return ("", op), Converter(convert, (_FIRST_OPSET.get(op, OPSETS[0]), OPSETS[1]))


CONVERTERS = dict([
    *(_ai_onnx(op, _convert_host) for op in HOST_OPS if op not in (
        "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")),
    *(_ai_onnx(op, _convert_gemm) for op in GEMM_OPS + QOPERATOR_OPS),
    _ai_onnx("Constant", _convert_constant),
    _ai_onnx("QuantizeLinear", _convert_quantize),
    _ai_onnx("DequantizeLinear", _convert_dequantize),
    _ai_onnx("DynamicQuantizeLinear", _convert_dynamic_quantize),
    *((("com.microsoft", op), Converter(_import_microsoft, None)) for op in MICROSOFT_OPS),
])
"""Each (domain, op type) the compiler reads, to its :class:`Converter`."""


def _fold_constants(graph, keep_ops=()):
    """Host nodes whose inputs are all constants, evaluated now."""
    kept = []
    for node in graph.nodes:
        if (node.op in HOST_OPS and node.op not in keep_ops
                and all(not i or i in graph.constants for i in node.inputs)
                and not any(o in {t.name for t in graph.outputs} for o in node.outputs)):
            for out, value in zip(node.outputs, run_host_op(node, graph.constants)):
                if out:
                    graph.constants[out] = np.asarray(value)
            continue
        kept.append(node)
    graph.nodes = kept


def _prune(graph):
    """Nodes that no output depends on, dropped."""
    needed = {t.name for t in graph.outputs}
    kept = []
    for node in reversed(graph.nodes):
        if any(o in needed for o in node.outputs):
            kept.append(node)
            needed.update(i for i in node.inputs if i)
    graph.nodes = kept[::-1]
    graph.inputs = [t for t in graph.inputs if t.name in needed]
