"""CNNs of the shapes users run, built with ``onnx.helper`` (random weights, no download), for
``sparsa bench models``: a MobileNetV2-style network (inverted residual blocks: 1x1 expansion,
3x3 depthwise convolution, 1x1 projection, residual adds) and a ResNet-18-style one (basic
blocks of two 3x3 convolutions with residual adds), both on 64x64 RGB inputs. Needs onnx."""

import numpy as np

INPUT = (3, 64, 64)


class _Graph:
    """A float ONNX graph under construction: convolutions (with bias), Relu, Add, pooling."""

    def __init__(self, rng):
        self.rng, self.nodes, self.initializers, self.count = rng, [], [], 0

    def _name(self, kind):
        self.count += 1
        return f"{kind}{self.count}"

    def _constant(self, array):
        from onnx import numpy_helper

        name = self._name("w")
        self.initializers.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def node(self, op, inputs, **attributes):
        from onnx import helper

        out = self._name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], out, **attributes))
        return out

    def conv(self, x, c_in, c_out, kernel=1, stride=1, groups=1, relu=True):
        fan_in = c_in // groups * kernel * kernel
        w = self.rng.standard_normal((c_out, c_in // groups, kernel, kernel)) * np.sqrt(2 / fan_in)
        b = self.rng.standard_normal(c_out) * 0.05
        pad = kernel // 2
        y = self.node("Conv", [x, self._constant(w), self._constant(b)],
                      kernel_shape=[kernel, kernel], strides=[stride, stride],
                      pads=[pad] * 4, group=groups)
        return self.node("Relu", [y]) if relu else y

    def model(self, x, name, classes, c_in):
        from onnx import TensorProto, helper

        pooled = self.node("GlobalAveragePool", [x])
        flat = self.node("Flatten", [pooled])
        w = self.rng.standard_normal((c_in, classes)) * np.sqrt(1 / c_in)
        logits = self.node("Gemm", [flat, self._constant(w.T), self._constant(np.zeros(classes))],
                           transB=1)
        graph = helper.make_graph(
            self.nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                             ["N", *INPUT])],
            [helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["N", classes])],
            self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 9
        return model


def mobilenet_v2(rng, classes=10):
    """A MobileNetV2-style network: stem 3x3/2 (16), then inverted residual blocks (expansion
    6, 3x3 depthwise, residual where the shape allows) of 16, 24 (/2), 24, 32 (/2), 32, 64 (/2),
    64 channels, a 1x1 to 128, global pooling, a classifier."""
    g = _Graph(rng)
    x = g.conv("x", 3, 16, 3, 2)
    channels = 16
    for c_out, stride in ((16, 1), (24, 2), (24, 1), (32, 2), (32, 1), (64, 2), (64, 1)):
        hidden = channels * 6
        y = g.conv(x, channels, hidden, 1)
        y = g.conv(y, hidden, hidden, 3, stride, groups=hidden)
        y = g.conv(y, hidden, c_out, 1, relu=False)
        x = g.node("Add", [x, y]) if stride == 1 and c_out == channels else y
        channels = c_out
    x = g.conv(x, channels, 128, 1)
    return g.model(x, "mobilenet_v2_style", classes, 128)


def resnet18(rng, classes=10):
    """A ResNet-18-style network: stem 3x3 (32), then basic blocks (two 3x3 convolutions and a
    residual add; a 1x1/2 shortcut where the shape changes) of 32, 32, 64 (/2), 64, 128 (/2),
    128, 256 (/2), 256 channels, global pooling, a classifier."""
    g = _Graph(rng)
    x = g.conv("x", 3, 32, 3, 1)
    channels = 32
    for c_out, stride in ((32, 1), (32, 1), (64, 2), (64, 1), (128, 2), (128, 1), (256, 2),
                          (256, 1)):
        y = g.conv(x, channels, c_out, 3, stride)
        y = g.conv(y, c_out, c_out, 3, 1, relu=False)
        shortcut = x if stride == 1 and c_out == channels else g.conv(x, channels, c_out, 1,
                                                                       stride, relu=False)
        x = g.node("Relu", [g.node("Add", [shortcut, y])])
        channels = c_out
    return g.model(x, "resnet18_style", classes, channels)
