"""onnxruntime beside a compiled model: its tensors, and a node-by-node agreement."""

import numpy as np

from sparsa.host.graph import ModelError

from .ir import _read_model


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
