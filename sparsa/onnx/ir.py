"""The model while it is compiled (:class:`_Graph`) and what every stage of the compiler shares."""

from pathlib import Path

import numpy as np

from sparsa.host.graph import HOST_OPS, ModelError, Node, hold_uint8
from sparsa.host.schema import RECORDS


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
            for key in RECORDS[node.op].CONSTANTS if node.op in RECORDS else ():
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


def _const(graph, name):
    if not name:
        return np.int64(0)
    if name not in graph.constants:
        raise ModelError(f"{name!r} must be a constant")
    return np.asarray(graph.constants[name])


def _single_consumer(consumers, name):
    users = consumers.get(name, [])
    return users[0] if len(users) == 1 and users[0] is not None else None
