"""Float ONNX models built with onnx.helper for the compiler's tests, quantized by onnxruntime.

Between them the models hold every op :func:`sparsa.onnx.compile` accepts: :func:`cnn` (Conv with
padding, groups and 1x1, Relu, Clip, MaxPool, a residual Add, Pad, AveragePool,
GlobalAveragePool, Concat, Flatten, Gemm, Softmax), :func:`ffn` (MatMul on [B, T, K], bias Add,
Sum, Transpose, Reshape, Unsqueeze, Squeeze, Dropout, Identity, Gemm, Sub, Mul, ArgMax, Cast),
:func:`bn_cnn` (Conv, BatchNormalization, strides, MatMul + Add).
"""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sparsa.demo import Calibration


def _constant(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def _model(nodes, inputs, outputs, initializers, name):
    graph = helper.make_graph(nodes, name, inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _weights(rng):
    return lambda *shape: (rng.standard_normal(shape) * 0.3).astype(np.float32)


def _input(shape, batch="N"):
    return [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, *shape])]


def cnn(rng):
    """x (N, 1, 8, 8) -> class probabilities (N, 10)."""
    f = _weights(rng)
    constants = [_constant("w1", f(8, 1, 3, 3)), _constant("b1", f(8)),
                 _constant("w2", f(8, 4, 3, 3)), _constant("b2", f(8)),
                 _constant("w3", f(8, 8, 1, 1)), _constant("w4", f(10, 16)),
                 _constant("b4", f(10)), _constant("low", np.float32(0)),
                 _constant("high", np.float32(4)),
                 _constant("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))]
    node = helper.make_node
    nodes = [
        node("Conv", ["x", "w1", "b1"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
        node("Relu", ["c1"], ["r1"], "relu1"),
        node("MaxPool", ["r1"], ["p1"], "pool1", kernel_shape=[2, 2], strides=[2, 2]),
        node("Conv", ["p1", "w2", "b2"], ["c2"], "conv2", pads=[1, 1, 1, 1], group=2),
        node("Clip", ["c2", "low", "high"], ["r2"], "clip2"),
        node("Conv", ["r2", "w3"], ["c3"], "conv3"),
        node("Add", ["c3", "p1"], ["s3"], "residual"),
        node("Pad", ["s3", "pads"], ["padded"], "pad"),
        node("AveragePool", ["padded"], ["ap"], "avgpool", kernel_shape=[2, 2], strides=[2, 2]),
        node("GlobalAveragePool", ["ap"], ["g"], "gap"),
        node("MaxPool", ["s3"], ["mp"], "global_max", kernel_shape=[4, 4]),
        node("Concat", ["g", "mp"], ["cat"], "concat", axis=1),
        node("Flatten", ["cat"], ["flat"], "flatten"),
        node("Gemm", ["flat", "w4", "b4"], ["logits"], "fc", transB=1),
        node("Softmax", ["logits"], ["prob"], "softmax"),
    ]
    return _model(nodes, _input([1, 8, 8]),
                  [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 10])],
                  constants, "cnn")


def ffn(rng):
    """x (N, 4, 16) -> logits (N, 10) and the class as a float (N,)."""
    f = _weights(rng)
    constants = [_constant("w1", f(16, 32)), _constant("b1", f(32)), _constant("w2", f(32, 16)),
                 _constant("b2", f(16)), _constant("w3", f(64, 10)), _constant("b3", f(10)),
                 _constant("shape", np.array([0, -1], np.int64)),
                 _constant("axes", np.array([1], np.int64)), _constant("offset", f(10)),
                 _constant("gain", np.abs(f(10)) + 0.5)]
    node = helper.make_node
    nodes = [
        node("MatMul", ["x", "w1"], ["h1"], "ffn1"),
        node("Add", ["h1", "b1"], ["h1b"], "ffn1_bias"),
        node("Relu", ["h1b"], ["h1r"], "ffn1_relu"),
        node("MatMul", ["h1r", "w2"], ["h2"], "ffn2"),
        node("Add", ["h2", "b2"], ["h2b"], "ffn2_bias"),
        node("Sum", ["h2b", "x"], ["res"], "residual"),
        node("Transpose", ["res"], ["tr"], "transpose", perm=[0, 2, 1]),
        node("Reshape", ["tr", "shape"], ["flat"], "reshape"),
        node("Unsqueeze", ["flat", "axes"], ["u"], "unsqueeze"),
        node("Squeeze", ["u", "axes"], ["sq"], "squeeze"),
        node("Dropout", ["sq"], ["dr"], "dropout"),
        node("Identity", ["dr"], ["id"], "identity"),
        node("Gemm", ["id", "w3", "b3"], ["g"], "head"),
        node("Sub", ["g", "offset"], ["gs"], "sub"),
        node("Mul", ["gs", "gain"], ["logits"], "mul"),
        node("ArgMax", ["logits"], ["label"], "argmax", axis=1, keepdims=0),
        node("Cast", ["label"], ["label_float"], "cast", to=TensorProto.FLOAT),
    ]
    return _model(nodes, _input([4, 16]),
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10]),
                   helper.make_tensor_value_info("label_float", TensorProto.FLOAT, ["N"])],
                  constants, "ffn")


def bn_cnn(rng):
    """x (N, 1, 8, 8) -> logits (N, 10), with a BatchNormalization after the Conv."""
    f = _weights(rng)
    constants = [_constant("w1", f(6, 1, 3, 3)), _constant("gamma", np.abs(f(6)) + 0.5),
                 _constant("beta", f(6)), _constant("mean", f(6)),
                 _constant("var", np.abs(f(6)) + 0.2), _constant("w2", f(6, 10)),
                 _constant("b2", f(10))]
    node = helper.make_node
    nodes = [
        node("Conv", ["x", "w1"], ["c1"], "conv1", pads=[1, 1, 1, 1], strides=[2, 2]),
        node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["bn"], "bn1"),
        node("Relu", ["bn"], ["r1"], "relu1"),
        node("GlobalAveragePool", ["r1"], ["g"], "gap"),
        node("Flatten", ["g"], ["flat"], "flatten"),
        node("MatMul", ["flat", "w2"], ["m"], "fc"),
        node("Add", ["m", "b2"], ["logits"], "fc_bias"),
    ]
    return _model(nodes, _input([1, 8, 8]),
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
                  constants, "bn_cnn")


def inverted_residual(rng, channels=40):
    """A MobileNetV2 block: x (N, 3, 8, 8) -> 1x1 expansion to ``channels``, Relu, a 3x3
    depthwise convolution (``group=channels``), Relu, 1x1 projection to 8 -> (N, 8, 8, 8)."""
    f = _weights(rng)
    constants = [_constant("w1", f(channels, 3, 1, 1)), _constant("b1", f(channels)),
                 _constant("wd", f(channels, 1, 3, 3)), _constant("bd", f(channels)),
                 _constant("w2", f(8, channels, 1, 1)), _constant("b2", f(8))]
    node = helper.make_node
    nodes = [
        node("Conv", ["x", "w1", "b1"], ["e"], "expand"),
        node("Relu", ["e"], ["er"], "expand_relu"),
        node("Conv", ["er", "wd", "bd"], ["d"], "depthwise", pads=[1, 1, 1, 1],
             group=channels),
        node("Relu", ["d"], ["dr"], "depthwise_relu"),
        node("Conv", ["dr", "w2", "b2"], ["y"], "project"),
    ]
    return _model(nodes, _input([3, 8, 8]),
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8, 8])],
                  constants, "inverted_residual")


def quantize_static(model, data, directory, quant_format="QDQ", activations="QInt8",
                    per_channel=False):
    """``model`` quantized by onnxruntime's ``quantize_static``, calibrated on ``data``. uint8
    activations use ``reduce_range`` (7-bit weights), as onnxruntime advises on x86: its U8S8
    kernels there saturate int16 pair sums otherwise."""
    from onnxruntime import quantization

    source = directory / f"{model.graph.name}.onnx"
    target = directory / f"{model.graph.name}_{quant_format}_{activations}_{per_channel}.onnx"
    onnx.save(model, source)
    quantization.quantize_static(
        str(source), str(target), Calibration(model.graph.input[0].name, data, batch=16),
        quant_format=getattr(quantization.QuantFormat, quant_format),
        activation_type=getattr(quantization.QuantType, activations),
        weight_type=quantization.QuantType.QInt8, per_channel=per_channel,
        reduce_range=activations == "QUInt8")
    return onnx.load(target)


def quantize_dynamic(model, directory, op_types):
    """``model`` quantized by onnxruntime's ``quantize_dynamic`` (uint8 activations, so with
    ``reduce_range`` as in :func:`quantize_static`)."""
    from onnxruntime import quantization

    source = directory / f"{model.graph.name}.onnx"
    target = directory / f"{model.graph.name}_dynamic.onnx"
    onnx.save(model, source)
    quantization.quantize_dynamic(str(source), str(target), op_types_to_quantize=op_types,
                                  weight_type=quantization.QuantType.QInt8, reduce_range=True)
    return onnx.load(target)


def exporter_idioms(rng, opset=17, batch="N"):
    """What exporters write: x (N, 3, 8, 8) -> Conv, Relu, BatchNormalization not after a Conv
    (onnxruntime's quantizer without quant_pre_process leaves it between Q/DQ pairs), Conv,
    Relu, ReduceMean over H and W (tf2onnx's global pooling; its axes an input from opset 18),
    PyTorch's flatten (Shape -> Gather -> Unsqueeze -> Concat -> Reshape), Gemm -> (N, 10);
    ``batch`` fixes N."""
    f = _weights(rng)
    constants = [_constant("w1", f(8, 3, 3, 3)), _constant("b1", f(8)),
                 _constant("gamma", (1 + 0.1 * rng.standard_normal(8)).astype(np.float32)),
                 _constant("beta", f(8)), _constant("mean", f(8)),
                 _constant("var", (1 + rng.random(8)).astype(np.float32)),
                 _constant("w2", f(16, 8, 3, 3)), _constant("b2", f(16)),
                 _constant("w3", f(10, 16)), _constant("b3", f(10)),
                 _constant("zero", np.array(0, np.int64)),
                 _constant("minus_one", np.array([-1], np.int64)),
                 _constant("axis0", np.array([0], np.int64))]
    node = helper.make_node
    if opset >= 18:
        constants.append(_constant("hw", np.array([2, 3], np.int64)))
        reduce = node("ReduceMean", ["r2", "hw"], ["pooled"], "pool", keepdims=1)
    else:
        reduce = node("ReduceMean", ["r2"], ["pooled"], "pool", axes=[2, 3], keepdims=1)
    nodes = [
        node("Conv", ["x", "w1", "b1"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
        node("Relu", ["c1"], ["r1"], "relu1"),
        node("BatchNormalization", ["r1", "gamma", "beta", "mean", "var"], ["bn"], "bn"),
        node("Conv", ["bn", "w2", "b2"], ["c2"], "conv2", pads=[1, 1, 1, 1]),
        node("Relu", ["c2"], ["r2"], "relu2"),
        reduce,
        node("Shape", ["pooled"], ["shape"], "shape"),
        node("Gather", ["shape", "zero"], ["batch"], "batch", axis=0),
        node("Unsqueeze", ["batch", "axis0"], ["batch1"], "batch1"),
        node("Concat", ["batch1", "minus_one"], ["target"], "target", axis=0),
        node("Reshape", ["pooled", "target"], ["flat"], "flatten"),
        node("Gemm", ["flat", "w3", "b3"], ["logits"], "fc", transB=1),
    ]
    graph = helper.make_graph(nodes, f"exporter_idioms_{opset}", _input([3, 8, 8], batch),
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                             [batch, 10])], constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _encoder_layer(prefix, x, rng, d, heads, t, ff, nodes, constants):
    """A transformer encoder layer (post-norm, as BERT's): multi-head self-attention (Q, K, V
    projections, Q x K^T / sqrt(d_head), Softmax, x V), a residual Add, LayerNormalization, a
    feed-forward block with Erf-form GELU, a residual Add, LayerNormalization. Appends to
    ``nodes`` and ``constants``; returns the output's name."""
    dh = d // heads
    f = _weights(rng)

    def c(name, value):
        value = np.asarray(value)
        constants.append(_constant(f"{prefix}{name}", value.astype(np.float32)
                                   if value.dtype == np.float64 else value))
        return f"{prefix}{name}"
    node = helper.make_node

    def add(op, inputs, name, **attrs):
        nodes.append(node(op, inputs, [f"{prefix}{name}"], f"{prefix}{name}", **attrs))
        return f"{prefix}{name}"
    heads_shape = c("heads_shape", np.array([0, t, heads, dh], np.int64))
    merged_shape = c("merged_shape", np.array([0, t, d], np.int64))
    split = {}
    for part, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        projected = add("MatMul", [x, c(f"w{part}", f(d, d) / np.sqrt(d))], f"{part}_proj")
        biased = add("Add", [projected, c(f"b{part}", f(d))], f"{part}_bias")
        shaped = add("Reshape", [biased, heads_shape], f"{part}_heads")
        split[part] = add("Transpose", [shaped], f"{part}_t", perm=perm)
    scores = add("MatMul", [split["q"], split["k"]], "scores")
    scaled = add("Div", [scores, c("sqrt_dh", np.array(np.sqrt(dh), np.float32))], "scaled")
    probabilities = add("Softmax", [scaled], "softmax", axis=-1)
    context = add("MatMul", [probabilities, split["v"]], "context")
    merged = add("Reshape", [add("Transpose", [context], "context_t", perm=[0, 2, 1, 3]),
                             merged_shape], "merged")
    attended = add("Add", [add("MatMul", [merged, c("wo", f(d, d) / np.sqrt(d))], "o_proj"),
                           c("bo", f(d))], "o_bias")
    norm1 = add("LayerNormalization", [add("Add", [attended, x], "residual1"),
                                       c("gamma1", np.ones(d, np.float32)),
                                       c("beta1", np.zeros(d, np.float32))], "norm1", axis=-1)
    hidden = add("Add", [add("MatMul", [norm1, c("w1", f(d, ff) / np.sqrt(d))], "ff1"),
                         c("b1", f(ff))], "ff1_bias")
    erf = add("Erf", [add("Div", [hidden, c("sqrt2", np.array(np.sqrt(2), np.float32))],
                          "gelu_div")], "gelu_erf")
    gelu = add("Mul", [add("Mul", [hidden, add("Add", [erf, c("one", np.array(1, np.float32))],
                                               "gelu_one")], "gelu_mul"),
                       c("half", np.array(0.5, np.float32))], "gelu")
    out = add("Add", [add("MatMul", [gelu, c("w2", f(ff, d) / np.sqrt(ff))], "ff2"),
                      c("b2", f(d))], "ff2_bias")
    return add("LayerNormalization", [add("Add", [out, norm1], "residual2"),
                                      c("gamma2", np.ones(d, np.float32)),
                                      c("beta2", np.zeros(d, np.float32))], "norm2", axis=-1)


def bert_encoder(rng, layers=2, d=128, heads=4, t=32, ff=256):
    """A BERT-style encoder: x (N, t, d) embeddings -> ``layers`` encoder layers -> (N, t, d)."""
    nodes, constants, x = [], [], "x"
    for layer in range(layers):
        x = _encoder_layer(f"l{layer}_", x, rng, d, heads, t, ff, nodes, constants)
    nodes.append(helper.make_node("Identity", [x], ["y"], "output"))
    graph = helper.make_graph(
        nodes, "bert_encoder", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                              ["N", t, d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", t, d])], constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def vit_encoder(rng, layers=2, d=64, heads=4, image=32, patch=8, ff=128, classes=10):
    """A ViT-style classifier: x (N, 3, image, image) -> patch embedding as a Conv with
    stride = kernel -> tokens (Reshape, Transpose), a class token (Expand to the batch from
    Shape/Gather/Unsqueeze/Concat, Concat) and position embeddings (Add) -> ``layers`` encoder
    layers -> the class token (Gather) -> Gemm -> (N, classes)."""
    f = _weights(rng)
    t = (image // patch) ** 2 + 1
    constants = [_constant("patch_w", f(d, 3, patch, patch) / np.float32(patch)),
                 _constant("patch_b", f(d)),
                 _constant("tokens_shape", np.array([0, d, t - 1], np.int64)),
                 _constant("cls", f(1, 1, d)), _constant("positions", f(1, t, d)),
                 _constant("first", np.array(0, np.int64)),
                 _constant("axis0", np.array([0], np.int64)),
                 _constant("one_and_d", np.array([1, d], np.int64)),
                 _constant("head_w", f(classes, d) / np.float32(np.sqrt(d))),
                 _constant("head_b", f(classes))]
    node = helper.make_node
    nodes = [node("Conv", ["x", "patch_w", "patch_b"], ["patches"], "patch_embed",
                  kernel_shape=[patch, patch], strides=[patch, patch]),
             node("Reshape", ["patches", "tokens_shape"], ["tokens_t"], "flatten_patches"),
             node("Transpose", ["tokens_t"], ["tokens"], "tokens", perm=[0, 2, 1]),
             node("Shape", ["tokens"], ["token_shape"], "token_shape"),
             node("Gather", ["token_shape", "first"], ["batch"], "batch", axis=0),
             node("Unsqueeze", ["batch", "axis0"], ["batch1"], "batch1"),
             node("Concat", ["batch1", "one_and_d"], ["cls_shape"], "cls_shape", axis=0),
             node("Expand", ["cls", "cls_shape"], ["cls_tokens"], "cls_tokens"),
             node("Concat", ["cls_tokens", "tokens"], ["sequence"], "with_cls", axis=1),
             node("Add", ["sequence", "positions"], ["embedded"], "positions")]
    x = "embedded"
    for layer in range(layers):
        x = _encoder_layer(f"l{layer}_", x, rng, d, heads, t, ff, nodes, constants)
    nodes += [node("Gather", [x, "first"], ["cls_out"], "class_token", axis=1),
              node("Gemm", ["cls_out", "head_w", "head_b"], ["logits"], "head", transB=1)]
    graph = helper.make_graph(
        nodes, "vit_encoder", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                             ["N", 3, image, image])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def more_host_ops(rng, opset=20):
    """x (N, 16) -> MatMul -> Gelu (exact), HardSigmoid, HardSwish, Gelu (tanh), Where on a
    constant mask, Split in two, Slice of each, Concat -> MatMul -> (N, 8)."""
    f = _weights(rng)
    constants = [_constant("w1", f(16, 32)), _constant("w2", f(16, 8)),
                 _constant("mask", rng.random(32) < 0.5), _constant("other", f(32)),
                 _constant("halves", np.array([16, 16], np.int64)),
                 _constant("starts", np.array([0], np.int64)),
                 _constant("ends", np.array([8], np.int64)),
                 _constant("axis1", np.array([1], np.int64))]
    node = helper.make_node
    nodes = [node("MatMul", ["x", "w1"], ["h"], "up"),
             node("Gelu", ["h"], ["g"], "gelu"),
             node("HardSigmoid", ["g"], ["hs"], "hard_sigmoid", alpha=0.3, beta=0.4),
             node("HardSwish", ["hs"], ["hw"], "hard_swish"),
             node("Gelu", ["hw"], ["gt"], "gelu_tanh", approximate="tanh"),
             node("Where", ["mask", "gt", "other"], ["wh"], "where"),
             node("Split", ["wh", "halves"], ["left", "right"], "split", axis=1),
             node("Slice", ["left", "starts", "ends", "axis1"], ["left8"], "slice_left"),
             node("Slice", ["right", "starts", "ends", "axis1"], ["right8"], "slice_right"),
             node("Concat", ["left8", "right8"], ["joined"], "join", axis=1),
             node("MatMul", ["joined", "w2"], ["y"], "down")]
    graph = helper.make_graph(nodes, "more_host_ops", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["N", 16])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, ["N", 8])], constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model
