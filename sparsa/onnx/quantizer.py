"""Float models quantized here, from calibration data; weights pruned for the benchmarks."""

import numpy as np

from sparsa.host.graph import HOST_OPS, ModelError, Node, by_name, im2col, run_host_op
from sparsa.host.quant import activation_scale, quantize_weights, weight_scales

from .ir import GEMM_OPS, QOPERATOR_OPS, _ACTIVATIONS, _QLINEAR_GEMM, _read_model, _single_consumer


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
