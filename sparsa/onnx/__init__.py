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

import numpy as np

from sparsa.host.graph import CompiledModel, ModelError, im2col, load, loads  # noqa: F401
from sparsa.host.graph import run_host_op

from .compare import node_agreement, onnxruntime_tensors  # noqa: F401
from .importer import CONVERTERS, _fold_constants, _import, _prune  # noqa: F401
from .ir import (GEMM_OPS, MICROSOFT_OPS, OPSETS, QOPERATOR_OPS, SUPPORTED_OPS,  # noqa: F401
                 _read_model)
from .lowering import _lower, _skip_requantization
from .quantizer import (_calibrate_and_quantize, _fold_batch_norm,  # noqa: F401
                        _fuse_matmul_bias, prune_weights)

__all__ = ["compile", "check", "load", "loads", "ModelError", "SUPPORTED_OPS", "CONVERTERS",
           "node_agreement", "onnxruntime_tensors", "prune_weights"]


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
    compiled = CompiledModel(graph.nodes, graph.used_constants(), graph.inputs, graph.outputs,
                             graph.source, shifted=sorted(graph.shifted))
    if _fold_shapes(graph, compiled):
        compiled = CompiledModel(graph.nodes, graph.used_constants(), graph.inputs,
                                 graph.outputs, graph.source, shifted=sorted(graph.shifted))
    return compiled


def _fold_shapes(graph, compiled):
    """With every input's shape fixed (its batch too), each Shape node of a tensor whose
    shape the rules tell becomes a constant, and what is computed from it alone (PyTorch's
    flatten: Gather, Unsqueeze, Concat) is folded, leaving a Reshape to a constant target.
    True if a node went."""
    batches = {t.shape[0] if t.shape else None for t in graph.inputs}
    if len(batches) != 1 or not all(t.shape and None not in t.shape for t in graph.inputs):
        return False
    shapes = compiled._shapes(batches.pop())
    outputs = {t.name for t in graph.outputs}
    kept = []
    for node in graph.nodes:
        if node.op == "Shape" and node.inputs[0] in shapes and node.outputs[0] not in outputs:
            zeros = np.broadcast_to(np.int8(0), shapes[node.inputs[0]])
            (graph.constants[node.outputs[0]],) = run_host_op(node, {node.inputs[0]: zeros})
        else:
            kept.append(node)
    if len(kept) == len(graph.nodes):
        return False
    graph.nodes = kept
    _fold_constants(graph)
    _prune(graph)
    return True
