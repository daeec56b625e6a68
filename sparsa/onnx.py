"""Compile an ONNX model for the accelerator: ``compile(model) -> CompiledModel``.

Needs the ``onnx`` package (``pip install 'sparsa[onnx]'``) at compile time only: the result
(:class:`sparsa.host.graph.CompiledModel`) runs, saves and loads with NumPy alone, so a PYNQ
board runs what a workstation compiled.

Accepted models:

- QDQ models (QuantizeLinear/DequantizeLinear around Conv, MatMul and Gemm) and QOperator models
  (QLinearConv, QLinearMatMul, MatMulInteger, ConvInteger, and onnxruntime's com.microsoft
  QLinearAdd, QLinearMul, QLinearAveragePool, QLinearGlobalAveragePool, QLinearConcat), as
  ``onnxruntime.quantization`` writes them: int8 weights per tensor or per channel, int8 or
  uint8 activations with any zero point;
- float models with ``calibration`` data, quantized here: activations symmetric int8 (zero point
  0, so a ReLU's zeros stay zeros for sparse-skip), weights symmetric int8 per output channel,
  BatchNormalization folded into the Conv before it (a host op elsewhere).

Each Conv, MatMul (with a constant weight) and Gemm becomes a ``QGemm`` node: accelerator jobs
with the int32 bias, the requantization to the following QuantizeLinear and a Relu or Clip
between them done by the device. The rest runs on the host (:data:`sparsa.host.graph.HOST_OPS`).
Anything else is refused here, naming the node.
"""

from pathlib import Path

import numpy as np

from sparsa.host.graph import (HOST_OPS, CompiledModel, ModelError, Node, TensorInfo, by_name,
                               hold_uint8, run_host_op)
from sparsa.host.graph import im2col, load, loads  # noqa: F401  (re-exported)
from sparsa.host.quant import (activation_scale, quantize_weights, rounding_multiplier,
                               weight_scales)

__all__ = ["compile", "load", "loads", "ModelError", "SUPPORTED_OPS", "node_agreement",
           "onnxruntime_tensors", "prune_weights"]

GEMM_OPS = ("Conv", "MatMul", "Gemm")
QOPERATOR_OPS = ("QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger")
_QLINEAR_GEMM = "QLinearGemm"  # com.microsoft QGemm, renamed apart from the graph's QGemm
MICROSOFT_OPS = ("QGemm", "QLinearAdd", "QLinearMul", "QLinearAveragePool",
                 "QLinearGlobalAveragePool", "QLinearConcat", "QLinearSoftmax")
SUPPORTED_OPS = tuple(sorted((set(GEMM_OPS + QOPERATOR_OPS + MICROSOFT_OPS) | set(HOST_OPS)
                              | {"Constant"}) - {"QGemm"}))
"""The ONNX op types :func:`compile` accepts (:data:`CONVERTERS` has each one's converter)."""

_ACTIVATIONS = ("Relu", "Clip")


# The ai.onnx opsets read, the ones tested (tests/test_onnx.py): onnxruntime's quantizer makes
# models from 11 on; opset 21's QuantizeLinear and DequantizeLinear add block quantization,
# which the runtime does not have.
OPSETS = (11, 20)


def check(model):
    """Which of ``model``'s nodes sparsa compiles, without compiling it: ``{"nodes": count,
    "ops": {op: count}, "refused": [one line per refused node: op, node, why, the fix where
    there is one]}`` (the nodes that read a refused node's outputs are not checked)."""
    model, _ = _read_model(model, "check")
    ops = {}
    for node in model.graph.node:
        domain = "" if node.domain in ("", "ai.onnx") else f"{node.domain}."
        ops[domain + node.op_type] = ops.get(domain + node.op_type, 0) + 1
    try:
        _import(model, None)
        refused = []
    except ModelError as error:
        lines = str(error).split("\n  ")
        refused = [line for line in lines[1:] if not line.startswith("(sparsa compiles")] \
            if len(lines) > 1 else lines
    return {"nodes": len(model.graph.node), "ops": ops, "refused": refused}


def compile(model, *, calibration=None, outputs=None):  # noqa: A001  (sparsa.onnx.compile)
    """A :class:`~sparsa.host.graph.CompiledModel` for ``model`` (a path or an
    ``onnx.ModelProto``).

    ``calibration``: float inputs (an array, or a dict by input name; a batch of samples) for
    a float model, which is then quantized here; not needed for a quantized model.
    ``outputs``: tensor names to end the graph at (default: the model's outputs)."""
    model, source = _read_model(model, "compile")
    graph = _import(model, outputs)
    graph.source = source or model.graph.name
    _fold_constants(graph, keep_ops=("DequantizeLinear",))
    if calibration is not None:
        _fold_batch_norm(graph)
        _fuse_matmul_bias(graph)
        _calibrate_and_quantize(graph, calibration)
    _lower(graph)
    _prune(graph)
    _fold_constants(graph)
    _prune(graph)
    _skip_requantization(graph)
    return CompiledModel(graph.nodes, graph.used_constants(), graph.inputs, graph.outputs,
                         graph.source, shifted=sorted(graph.shifted))


# ---- import: ONNX nodes to graph nodes --------------------------------------------------------

class _Graph:
    """The model while it is compiled: nodes (graph :class:`Node`), constants and what is known
    of each tensor (its ONNX element type, whether it is held as uint8 less 128)."""

    def __init__(self):
        self.nodes = []
        self.constants = {}
        self.types = {}  # tensor name -> numpy dtype name as ONNX types it
        self.shifted = set()  # uint8 tensors held as int8 (value - 128)
        self.inputs = []
        self.outputs = []
        self.source = ""
        self._names = set()

    def fresh(self, base):
        name = base
        index = 0
        while name in self._names or name in self.constants:
            index += 1
            name = f"{base}_{index}"
        self._names.add(name)
        return name

    def constant(self, base, value):
        name = self.fresh(base)
        self.constants[name] = np.asarray(value)
        return name

    def producers(self):
        return {out: node for node in self.nodes for out in node.outputs if out}

    def consumers(self):
        users = {}
        for node in self.nodes:
            for name in node.inputs:
                if name:
                    users.setdefault(name, []).append(node)
        for t in self.outputs:
            users.setdefault(t.name, []).append(None)
        return users

    def used_constants(self):
        used = {name for node in self.nodes for name in node.inputs}
        for node in self.nodes:
            for key in ("weight", "bias", "colsum", "multiplier", "scale", "float_bias"):
                if key in node.attrs:
                    used.add(node.attrs[key])
        return {name: value for name, value in self.constants.items() if name in used}


def _read_model(model, caller):
    """``(ModelProto, file name or "")`` of ``model``, a path or an ``onnx.ModelProto``; clear
    errors for a missing onnx package (naming ``sparsa.onnx.<caller>``) and for anything else."""
    try:
        import onnx
    except ImportError as error:
        raise ModuleNotFoundError(f"sparsa.onnx.{caller} needs the onnx package: "
                                  "pip install 'sparsa[onnx]'", name="onnx") from error
    if isinstance(model, (str, Path)):
        source = Path(model).name
        try:
            return onnx.load(str(model)), source
        except Exception as error:  # onnx raises DecodeError, OSError, ...
            raise ModelError(f"model: cannot read {source} as ONNX ({error})") from error
    if not isinstance(model, onnx.ModelProto):
        raise ModelError(f"model: expected a path or an onnx.ModelProto, got "
                         f"{type(model).__name__}")
    return model, ""


def _dtype_name(onnx_type):
    from onnx import helper

    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(onnx_type)).name
    except Exception:
        return f"onnx type {onnx_type}"


def _shape(value_info):
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else None for d in dims]


def _attributes(node):
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


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


def _shift_constant(graph, name, value):
    if value.dtype == np.uint8:
        graph.shifted.add(name)
        return hold_uint8(value)
    return value


def _refusals(refused, passed_over=0):
    """One message for every refused node, each on its own line (one alone is the whole
    message), the list of supported ops once at the end."""
    if len(refused) == 1:
        return refused[0]
    after = (f" ({passed_over} node{'s' if passed_over > 1 else ''} reading their outputs "
             f"not checked)" if passed_over else "")
    supported = f"; sparsa compiles {', '.join(SUPPORTED_OPS)}"
    lines = [line.replace(supported, "") for line in refused]
    if lines != refused:
        lines.append(f"(sparsa compiles {', '.join(SUPPORTED_OPS)})")
    return (f"{len(refused)} node{'s' if len(refused) > 1 else ''} refused{after}:\n  "
            + "\n  ".join(lines))


def _unsupported(node, name, why=None):
    domain = f" (domain {node.domain})" if node.domain not in ("", "ai.onnx") else ""
    return ModelError(f"{node.op_type} node {name!r}{domain}: "
                      + (why or f"op not supported; sparsa compiles {', '.join(SUPPORTED_OPS)}"))


def _add(graph, op, name, inputs, outputs, attrs=None, dtype=None):
    graph.nodes.append(Node(op, name, list(inputs), list(outputs), attrs or {}))
    graph._names.update(o for o in outputs if o)
    for out in outputs:
        if out and dtype is not None:
            graph.types[out] = dtype


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
    converter(graph, node, name, _attributes(node), inputs, list(node.output))


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
    strides = list(attrs.get("strides", [1, 1]))
    dilations = list(attrs.get("dilations", [1, 1]))
    for what, values, count, low in (("strides", strides, 2, 1), ("dilations", dilations, 2, 1),
                                     ("pads", pads, 4, 0), ("kernel_shape", kernel, 2, 0)):
        if len(values) != count or any(int(v) < low for v in values):
            raise ModelError(f"{node.op_type} node {name!r}: {what} {values}: expected {count} "
                             f"integers of at least {low}")
    return {"kernel_shape": kernel, "strides": strides,
            "pads": [pads[0], pads[1], pads[2], pads[3]], "dilations": dilations}


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


# ---- graph passes -----------------------------------------------------------------------------

CONVERTERS = {
    **{("", op): _convert_host for op in HOST_OPS if op not in (
        "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")},
    **{("", op): _convert_gemm for op in GEMM_OPS + QOPERATOR_OPS},
    ("", "Constant"): _convert_constant,
    ("", "QuantizeLinear"): _convert_quantize,
    ("", "DequantizeLinear"): _convert_dequantize,
    ("", "DynamicQuantizeLinear"): _convert_dynamic_quantize,
    **{("com.microsoft", op): _import_microsoft for op in MICROSOFT_OPS},
}
"""Each (domain, op type) the compiler reads, to its converter: ``f(graph, node, name, attrs,
inputs, outputs)`` adds the op's nodes to ``graph`` or raises :class:`ModelError` saying why
not (what the model's opset changes, e.g. Softmax's axes, the converter reads from
``graph.opset``)."""


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


# ---- lowering Conv / MatMul / Gemm to QGemm ---------------------------------------------------

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
    attrs = {"a_zero": int(np.asarray(a.zero_point).reshape(-1)[0]),
             "b_zero": int(np.asarray(b.zero_point).reshape(-1)[0]),
             "multiplier": int(multiplier), "shift": int(shift),
             "out_zero": int(out_zero.reshape(-1)[0]), "source_op": "MatMul"}
    output = follow.outputs[0]
    return Node("QMatMul", node.name, [a.tensor, b.tensor], [output], attrs), [follow]


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
    attrs = {"groups": groups, "k": k, "n": n, "source_op": op, "x_zero": x_zero}
    if conv:
        attrs["conv"] = {key: a[key] for key in ("strides", "pads", "dilations")}
        attrs["conv"]["kernel_shape"] = kernel
    base = node.name.replace("/", "_")
    attrs["weight"] = graph.constant(f"{base}/weight", matrix)
    colsum = matrix.astype(np.int64).sum(axis=1).reshape(-1)
    attrs["colsum"] = graph.constant(f"{base}/colsum", colsum)
    attrs["bias"] = graph.constant(f"{base}/bias", bias)
    # The bias the device adds: the input zero point folded in (at run time for a zero point
    # that is a tensor). It must still fit int32.
    folded = bias.astype(np.int64) - (0 if x_zero_tensor else x_zero * colsum)
    if folded.min() < -2**31 or folded.max() > 2**31 - 1:
        raise ModelError(f"the int32 bias with the input zero point {x_zero} folded in "
                         f"exceeds int32 ({folded.min()}..{folded.max()})")
    if mode == "device":
        out_scale = float(np.asarray(out_q[0]).reshape(-1)[0])
        out_zero = int(np.asarray(out_q[1]).reshape(-1)[0])
        real = acc_scale / out_scale
        attrs["out_zero"] = out_zero
        if np.all(real < 1) and np.all(real > 2.0**-32):
            # How far inputs of int8 magnitude move each column's output, and how large the
            # output gets with the bias.
            spread = real * 128.0 * np.abs(matrix.astype(np.float64)).sum(axis=1).reshape(-1)
            multiplier, shift = rounding_multiplier(
                real, magnitude=spread + real * np.abs(folded), spread=spread, center=folded)
            if np.all(multiplier == multiplier[0]):
                multiplier = multiplier[:1]
            attrs["multiplier"] = graph.constant(f"{base}/multiplier", multiplier)
            attrs["shift"] = int(shift)
        else:  # the device only scales down: requantize on the host
            mode = "host"
            attrs["scale"] = graph.constant(f"{base}/scale", real)
        if relu:
            attrs["relu"] = True
        if clip is not None:
            attrs["clip"] = clip
    elif mode == "float":
        attrs["scale"] = graph.constant(f"{base}/scale", acc_scale.astype(np.float32))
    attrs["mode"] = mode
    inputs = [x.tensor] + ([x_zero_tensor] if x_zero_tensor else [])
    dtype = {"device": "int8", "host": "int8", "float": "float32", "int32": "int32"}[mode]
    if mode in ("device", "host"):
        dtype = graph.types.get(output, "int8")
    qgemm = Node("QGemm", node.name, inputs, [output], attrs)
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


def _const(graph, name):
    if not name:
        return np.int64(0)
    if name not in graph.constants:
        raise ModelError(f"{name!r} must be a constant")
    return np.asarray(graph.constants[name])


def _single_consumer(consumers, name):
    users = consumers.get(name, [])
    return users[0] if len(users) == 1 and users[0] is not None else None


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


# ---- float models: sparsa's own quantizer -----------------------------------------------------

def _fold_batch_norm(graph):
    """BatchNormalization after a float Conv with constant weights folded into that Conv."""
    producers = graph.producers()
    consumers = graph.consumers()
    kept = []
    for node in graph.nodes:
        if node.op != "BatchNormalization":
            kept.append(node)
            continue
        conv = producers.get(node.inputs[0])
        if (conv is None or conv.op != "Conv" or len(consumers.get(conv.outputs[0], [])) != 1
                or conv.inputs[1] not in graph.constants
                or not all(i in graph.constants for i in node.inputs[1:5])):
            kept.append(node)  # not after a Conv of its own: a host op
            continue
        gamma, beta, mean, var = (np.asarray(graph.constants[i], np.float64)
                                  for i in node.inputs[1:5])
        factor = gamma / np.sqrt(var + node.attrs["epsilon"])
        w = np.asarray(graph.constants[conv.inputs[1]], np.float64)
        b = (np.asarray(graph.constants[conv.inputs[2]], np.float64)
             if len(conv.inputs) > 2 and conv.inputs[2] else np.zeros(w.shape[0]))
        base = conv.name.replace("/", "_")
        conv.inputs = [conv.inputs[0],
                       graph.constant(f"{base}/folded_weight",
                                      (w * factor[:, None, None, None]).astype(np.float32)),
                       graph.constant(f"{base}/folded_bias",
                                      ((b - mean) * factor + beta).astype(np.float32))]
        conv.outputs = list(node.outputs)
    graph.nodes = kept


def _fuse_matmul_bias(graph):
    """A float MatMul by constant weights followed by the Add of a constant vector (how
    exporters write a linear layer on [B, T, K] inputs) made one MatMul with a bias."""
    consumers = graph.consumers()
    removed = set()
    for node in graph.nodes:
        if node.op != "MatMul" or node.inputs[1] not in graph.constants:
            continue
        add = _single_consumer(consumers, node.outputs[0])
        if add is None or add.op != "Add":
            continue
        other = add.inputs[1] if add.inputs[0] == node.outputs[0] else add.inputs[0]
        n = graph.constants[node.inputs[1]].shape[-1]
        if other not in graph.constants or np.size(graph.constants[other]) != n or (
                np.ndim(graph.constants[other]) > 1 and graph.constants[other].shape[-1] != n):
            continue
        node.inputs = node.inputs[:2] + [other]
        node.outputs = list(add.outputs)
        removed.add(id(add))
    graph.nodes = [n for n in graph.nodes if id(n) not in removed]


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
        if (gemm is not None and gemm.op == "QGemm" and gemm.attrs["mode"] == "device"
                and gemm.attrs["out_zero"] == 0 and not gemm.attrs.get("clip")
                and _single_consumer(consumers, gemm.outputs[0]) is node):
            gemm.attrs["relu"] = True
            gemm.outputs = list(node.outputs)
            removed.add(id(node))
    graph.nodes = [n for n in graph.nodes if id(n) not in removed]


def _float_gemm(graph, node, x):
    """A float Conv / MatMul / Gemm with constant weights (calibration only)."""
    w = np.asarray(graph.constants[node.inputs[1]], np.float64)
    b = (np.asarray(graph.constants[node.inputs[2]], np.float64)
         if len(node.inputs) > 2 and node.inputs[2] else 0.0)
    if node.op == "Conv":
        groups = node.attrs["group"]
        per_group, n_group = x.shape[1] // groups, w.shape[0] // groups
        outs = []
        for g in range(groups):
            cols, (batch, oh, ow) = im2col(
                np.asarray(x[:, g * per_group:(g + 1) * per_group], np.float64),
                list(w.shape[2:]), node.attrs["strides"], node.attrs["pads"],
                node.attrs["dilations"], 0.0)
            outs.append(cols @ w[g * n_group:(g + 1) * n_group].reshape(n_group, -1).T)
        y = np.concatenate(outs, axis=1) + b
        return y.reshape(batch, oh, ow, -1).transpose(0, 3, 1, 2)
    if node.op == "Gemm":
        w = w.T if node.attrs["transB"] else w
        return node.attrs["alpha"] * (x @ w) + node.attrs["beta"] * b
    return x @ w


def _float_run(graph, feeds):
    """Every tensor of the float graph for ``feeds`` (compile-time NumPy evaluation)."""
    env = dict(graph.constants)
    env.update(feeds)
    for node in graph.nodes:
        if node.op in GEMM_OPS:
            results = (_float_gemm(graph, node, env[node.inputs[0]]).astype(np.float32),)
        elif node.op in HOST_OPS:
            results = run_host_op(node, env)
        else:
            raise ModelError(f"{node.describe()}: a float model compiled with calibration= may "
                             f"hold only float ops; this one is quantized")
        for out, value in zip(node.outputs, results):
            if out:
                env[out] = value
    return env


def _calibration_feeds(graph, calibration):
    calibration = by_name(graph.inputs, calibration, "calibration")
    feeds = {}
    for t in graph.inputs:
        value = np.asarray(calibration[t.name])
        if t.dtype.startswith("float"):
            if value.dtype.kind not in "fiu" or not np.all(np.isfinite(value)):
                raise ModelError(f"calibration[{t.name!r}]: expected finite numbers")
            value = value.astype(t.dtype)
        if value.ndim != len(t.shape) or any(d is not None and d != s
                                             for d, s in zip(t.shape, value.shape)):
            raise ModelError(f"calibration[{t.name!r}]: expected shape {tuple(t.shape)} (None: "
                             f"any), got {value.shape}")
        if value.ndim and value.shape[0] == 0:
            raise ModelError(f"calibration[{t.name!r}]: expected at least one sample, got "
                             f"shape {value.shape}")
        feeds[t.name] = value
    return feeds


def _calibrate_and_quantize(graph, calibration):
    """A float graph made a QDQ graph: each Conv/MatMul/Gemm with constant weights gets its
    input quantized (symmetric, zero point 0, scale from the calibration data's range), its
    weights per output channel, its bias in int32, and its output (after a sole following
    Relu/Clip) quantized unless it is a model output."""
    quantized = sorted({node.op for node in graph.nodes if node.op in QOPERATOR_OPS
                        or node.op in ("QuantizeLinear", "DequantizeLinear", _QLINEAR_GEMM)})
    if quantized:
        raise ModelError(f"calibration: the model is quantized already (it has {quantized}); "
                         f"compile it without calibration=")
    gemms = [node for node in graph.nodes if node.op in GEMM_OPS]
    if not gemms:
        raise ModelError("calibration: the model has no Conv, MatMul or Gemm to quantize")
    for node in gemms:
        if node.inputs[1] not in graph.constants:
            raise ModelError(f"{node.describe()}: the weights are not a constant")
    env = _float_run(graph, _calibration_feeds(graph, calibration))
    consumers = graph.consumers()
    outputs = {t.name for t in graph.outputs}
    scales = {}  # activation tensor -> scale
    quantized = {}  # float tensor -> its dequantized copy
    new_nodes = []

    producers = graph.producers()

    def qdq(tensor):
        if tensor in quantized:
            return quantized[tensor]
        if tensor in quantized.values():
            return tensor
        scale = scales.setdefault(tensor, activation_scale(env[tensor]))
        base = tensor.replace("/", "_")
        s = graph.constant(f"{base}/scale", np.float32(scale))
        z = graph.constant(f"{base}/zero_point", np.int8(0))
        q, dq = graph.fresh(f"{base}/quantized"), graph.fresh(f"{base}/dequantized")
        new_nodes.append((producers.get(tensor), [Node("QuantizeLinear", f"{base}/quantize",
                                            [tensor, s, z], [q], {"axis": 1}),
                                       Node("DequantizeLinear", f"{base}/dequantize",
                                            [q, s, z], [dq], {"axis": 1})]))
        graph.types[q], graph.types[dq] = "int8", "float32"
        quantized[tensor] = dq
        return dq

    for node in gemms:
        x_name = node.inputs[0]
        x_dq = qdq(x_name)
        x_scale = scales[x_name if x_name in scales else next(
            t for t, d in quantized.items() if d == x_name)]
        w = np.asarray(graph.constants[node.inputs[1]], np.float64)
        out_axis = 0 if node.op == "Conv" or (node.op == "Gemm" and node.attrs["transB"]) else 1
        bias = (np.asarray(graph.constants[node.inputs[2]], np.float64).reshape(-1)
                if len(node.inputs) > 2 and node.inputs[2] else np.zeros(w.shape[out_axis]))
        if node.op == "Gemm":
            bias = np.broadcast_to(bias * node.attrs["beta"], (w.shape[out_axis],))
        alpha = node.attrs.get("alpha", 1.0) if node.op == "Gemm" else 1.0
        w_scale = weight_scales(w, out_axis, bias, x_scale * alpha)
        w_q = quantize_weights(w, w_scale, out_axis)
        base = node.name.replace("/", "_")
        wq, ws = (graph.constant(f"{base}/weight_quantized", w_q),
                  graph.constant(f"{base}/weight_scale", w_scale.astype(np.float32)))
        wz = graph.constant(f"{base}/weight_zero_point", np.zeros(w_scale.size, np.int8))
        w_dq = graph.fresh(f"{base}/weight_dequantized")
        acc_scale = x_scale * np.asarray(w_scale.astype(np.float32), np.float64) * alpha
        b_q = np.rint(bias / acc_scale).astype(np.int32)
        bq, bs = (graph.constant(f"{base}/bias_quantized", b_q),
                  graph.constant(f"{base}/bias_scale", (acc_scale / alpha).astype(np.float64)))
        bz = graph.constant(f"{base}/bias_zero_point", np.zeros(b_q.size, np.int32))
        b_dq = graph.fresh(f"{base}/bias_dequantized")
        for t in (wq, ws, wz, bq, bs, bz):
            graph.types[t] = graph.constants[t].dtype.name
        graph.types[w_dq] = graph.types[b_dq] = "float32"
        new_nodes.append((None, [Node("DequantizeLinear", f"{base}/weight_dequantize",
                                      [wq, ws, wz], [w_dq], {"axis": out_axis}),
                                 Node("DequantizeLinear", f"{base}/bias_dequantize",
                                      [bq, bs, bz], [b_dq], {"axis": 0})]))
        node.inputs = [x_dq, w_dq, b_dq]
        if node.op == "Gemm":
            node.attrs = dict(node.attrs, beta=1.0)
        # The output: quantized after a sole Relu/Clip, unless the model hands it out float.
        out = node.outputs[0]
        users = consumers.get(out, [])
        if len(users) == 1 and users[0] is not None and users[0].op in _ACTIVATIONS:
            out = users[0].outputs[0]
            users = consumers.get(out, [])
        if out in outputs or not users:
            continue
        out_scale = max(activation_scale(env[out]), float(np.max(acc_scale)) * (1 + 2**-20))
        scales[out] = out_scale
        dq = qdq(out)
        for user in users:
            if user is not None:
                user.inputs = [dq if i == out else i for i in user.inputs]
    _insert(graph, new_nodes)


def _insert(graph, new_nodes):
    """``new_nodes`` ((after, nodes) pairs) placed after ``after`` (None: first)."""
    first = [n for after, nodes in new_nodes if after is None for n in nodes]
    following = {}
    for after, nodes in new_nodes:
        if after is not None:
            following.setdefault(id(after), []).extend(nodes)
    result = list(first)
    for node in graph.nodes:
        result.append(node)
        result.extend(following.get(id(node), []))
    graph.nodes = result


# ---- comparing with onnxruntime ---------------------------------------------------------------

def prune_weights(model, pattern):
    """A copy of float ``model`` (a path or an ``onnx.ModelProto``) with the constant weights
    of its Conv, MatMul and Gemm nodes pruned by magnitude along K, the accelerator's
    reduction axis (:func:`sparsa.prune`: ``"2:4"``, ``"1:4"``, ... or a fraction): a MatMul's
    rows, a Gemm's rows (its columns with ``transB``), a Conv's input channels x kernel in
    im2col's order. Returns ``(pruned model, {node name: zero fraction of its weight})``. No
    fine-tuning: the accuracy this costs is what pruning alone costs."""
    model, _ = _read_model(model, "prune_weights")
    import onnx
    from onnx import numpy_helper

    from sparsa.host.sparsity import prune

    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    model = pruned
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    users = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    zeros = {}
    for node in model.graph.node:
        if node.op_type not in GEMM_OPS or len(node.input) < 2:
            continue
        name = node.input[1]
        if name not in initializers:
            continue
        if len(users[name]) > 1:
            raise ModelError(f"{node.op_type} node {node.name!r}: its weight {name!r} is "
                             f"shared with other nodes; prune it once, by hand")
        weight = numpy_helper.to_array(initializers[name])
        if weight.dtype.kind != "f":
            raise ModelError(f"{node.op_type} node {node.name!r}: expected a float weight, got "
                             f"{weight.dtype} (prune before quantizing)")
        attrs = {attr.name: onnx.helper.get_attribute_value(attr) for attr in node.attribute}
        if node.op_type == "Conv":
            kn = weight.reshape(weight.shape[0], -1).T
            pruned = prune(kn, pattern).T.reshape(weight.shape)
        elif node.op_type == "Gemm" and attrs.get("transB", 0):
            pruned = prune(weight.T, pattern).T
        elif weight.ndim == 2:
            pruned = prune(weight, pattern)
        else:
            raise ModelError(f"{node.op_type} node {node.name!r}: expected a 2-d weight, got "
                             f"shape {weight.shape}")
        initializers[name].CopyFrom(numpy_helper.from_array(pruned.astype(weight.dtype), name))
        zeros[node.name or name] = float(np.mean(pruned == 0))
    return model, zeros


def onnxruntime_tensors(model, feeds, names=None, optimize=True):
    """onnxruntime's outputs of ``model`` (a path or ModelProto) for ``feeds``, or, with
    ``names``, those tensors (made outputs) as a dict. ``optimize=False`` runs the graph as
    written (no fusions). Needs onnxruntime."""
    import onnx
    import onnxruntime

    model, _ = _read_model(model, "onnxruntime_tensors")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    if names is not None:
        have = {o.name for o in copy.graph.output}
        copy.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in have)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(copy.SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
    outputs = session.run(names, feeds)
    return dict(zip(names, outputs)) if names is not None else outputs


def node_agreement(model, compiled, feeds, accelerator):
    """Each accelerated node of ``compiled`` against onnxruntime running ``model``, the ONNX
    model it was compiled from: fed onnxruntime's own input tensor, ``{node name: (fraction
    of output elements equal, largest difference)}``. Needs onnxruntime."""
    result = {}
    for node in compiled.nodes:
        if node.op not in ("QGemm", "QMatMul"):
            continue
        tensors = onnxruntime_tensors(model, feeds, [i for i in node.inputs if i]
                                      + node.outputs)
        ours = compiled.run_node(accelerator, node.name, tensors)[0]
        theirs = tensors[node.outputs[0]]
        if ours.shape != theirs.shape or ours.dtype != theirs.dtype:
            raise ModelError(f"{node.describe()}: output {ours.dtype}{ours.shape}, onnxruntime "
                             f"gives {theirs.dtype}{theirs.shape}")
        difference = np.abs(ours.astype(np.float64) - theirs.astype(np.float64))
        result[node.name] = (float(np.mean(difference == 0)), float(difference.max()))
    return result
