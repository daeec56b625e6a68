"""The reference backend's CPU kernels through onnxruntime, when it is installed (bit-exact).

The runtime needs NumPy only (:mod:`sparsa.host.arith` is the device's arithmetic in NumPy and
float32 BLAS). Where onnxruntime is importable (``pip install sparsa[cpu]``), the reference
backend hands two things to its MLAS kernels instead, as whole operations rather than device
jobs, with results identical to the NumPy path:

- **INT8 GEMMs** (:func:`matmul`): onnxruntime's ``MatMulInteger`` with A shifted to uint8
  (``a + 128``) and a zero point of 128, which MLAS corrects for inside its kernel. B is int8
  when this CPU's kernel is exact for it: MLAS's AVX2 u8s8 kernel adds pairs of products in
  saturating int16 (``vpmaddubsw``), its VNNI and ARM kernels do not, so a probe of the
  saturating extremes at first use decides; otherwise B is shifted to uint8 too (the u8u8
  kernels widen before they add). Its int32 sums wrap as the device's accumulators do.
- **Convolution layers** (:class:`ConvKernel`): the layer's ``Conv`` in float32 with the
  weights baked into a session (MLAS's direct, depthwise and NCHWc convolutions take the
  layout and the groups as they are, no im2col in NumPy), padded with the input's zero point
  as the device's A is; input channels split into chunks whose sums float32 holds exactly
  (at most 1024 products of two int8: ``1024 * 2**14 == 2**24``), each chunk's sums cast to
  int32 and added, then the device's bias. Exact whatever order MLAS adds in.

``SPARSA_CPU_KERNELS=numpy`` in the environment turns both off (the NumPy path alone).
"""

import os
import threading

import numpy as np

FLOAT32_EXACT_K = 1024  # products of two int8 per float32 sum that stay exact (as in arith)
INT32_LIMIT = 2**31

_lock = threading.Lock()
_state = {}


def _onnxruntime():
    """The onnxruntime module, or None (not installed, or turned off)."""
    if os.environ.get("SPARSA_CPU_KERNELS", "").lower() == "numpy":
        return None
    if "ort" not in _state:
        try:
            import onnxruntime
            from onnx import TensorProto, helper, numpy_helper  # noqa: F401 (models are built)
        except ImportError:
            onnxruntime = None
        _state["ort"] = onnxruntime
    return _state["ort"]


def available():
    """Whether the kernels of this module run (onnxruntime and onnx importable)."""
    return _onnxruntime() is not None


def _session(model):
    ort = _onnxruntime()
    options = ort.SessionOptions()
    # Its worker threads otherwise spin after each run, taking the cores from the NumPy
    # passes between two layers.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _model(nodes, inputs, outputs, initializers=()):
    from onnx import helper

    graph = helper.make_graph(nodes, "sparsa_cpu", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


# ---- GEMM -------------------------------------------------------------------------------------

def _matmul_integer(b_signed):
    from onnx import TensorProto, helper

    b_type = TensorProto.INT8 if b_signed else TensorProto.UINT8
    inputs = [helper.make_tensor_value_info("A", TensorProto.UINT8, ["M", "K"]),
              helper.make_tensor_value_info("B", b_type, ["K", "N"]),
              helper.make_tensor_value_info("a_zero", TensorProto.UINT8, [])]
    names = ["A", "B", "a_zero"]
    if not b_signed:
        inputs.append(helper.make_tensor_value_info("b_zero", TensorProto.UINT8, []))
        names.append("b_zero")
    model = _model([helper.make_node("MatMulInteger", names, ["C"])], inputs,
                   [helper.make_tensor_value_info("C", TensorProto.INT32, ["M", "N"])])
    session = _session(model)
    shift = np.array(128, np.uint8)

    def run(a, b):
        feeds = {"A": _as_uint8(a), "B": b if b_signed else _as_uint8(b), "a_zero": shift}
        if not b_signed:
            feeds["b_zero"] = shift
        return session.run(None, feeds)[0]
    return run


def _as_uint8(x):
    """int8 ``x`` plus 128, as uint8 (the same bits with the sign bit flipped)."""
    return np.bitwise_xor(x.view(np.uint8), np.uint8(0x80))


def _exact(run):
    """Whether ``run`` gives exact sums where a saturating kernel would not: every pair of
    products at the extremes of int8, in shapes of the GEMV and the GEMM kernels."""
    for m, k, n in ((1, 64, 1), (7, 96, 5), (64, 512, 64)):
        for a_value, b_value in ((127, 127), (127, -128), (-128, -128), (-128, 127)):
            a = np.full((m, k), a_value, np.int8)
            b = np.full((k, n), b_value, np.int8)
            if not np.array_equal(run(a, b), np.full((m, n), k * a_value * b_value, np.int64)):
                return False
    return True


def _gemm_kernel():
    if "gemm" not in _state:
        with _lock:
            if "gemm" not in _state:  # (another thread may have made it meanwhile)
                kernel = None
                for b_signed in (True, False):
                    candidate = _matmul_integer(b_signed)
                    if _exact(candidate):
                        kernel = candidate
                        break
                _state["gemm"] = kernel
    return _state["gemm"]


def matmul(a, b, out=None):
    """``a @ b`` of int8 matrices as int32 with wrap-around through onnxruntime, into ``out``
    when given; None when this module's kernels are not available (or not exact here)."""
    if not available():
        return None
    kernel = _gemm_kernel()
    if kernel is None:
        return None
    product = kernel(np.ascontiguousarray(a), np.ascontiguousarray(b))
    if out is None:
        return product
    np.copyto(out, product)
    return out


# ---- convolution layers ---------------------------------------------------------------------

class ConvKernel:
    """One convolution layer's int32 accumulators (the device's: the products of the
    zero-point-padded int8 input and the weights, summed, plus the int32 bias) for any batch,
    in NCHW. ``weights``: (groups, K, N per group) int8 with K in (C, KH, KW) order (the
    compiled model's ``weight``)."""

    def __init__(self, weights, kernel_shape, strides, pads, dilations):
        from onnx import TensorProto, helper, numpy_helper

        groups, k, n_group = weights.shape
        kh, kw = kernel_shape
        channels = k // (kh * kw)
        w = weights.transpose(0, 2, 1).reshape(groups * n_group, channels, kh, kw)
        per_chunk = FLOAT32_EXACT_K // (kh * kw)
        if per_chunk == 0 or (groups > 1 and channels > per_chunk):
            raise ValueError("no exact float32 chunking for this kernel")
        chunks = [(c, min(channels, c + per_chunk)) for c in range(0, channels, per_chunk)]
        self.chunks = len(chunks)
        top, left, bottom, right = pads
        tensor = helper.make_tensor_value_info
        inputs = [tensor("x", TensorProto.INT8, ["B", groups * channels, "H", "W"]),
                  tensor("pad", TensorProto.INT8, []),
                  tensor("bias", TensorProto.INT32, [1, groups * n_group, 1, 1])]
        nodes, initializers = [], []
        x = "x"
        if any(pads):
            initializers.append(numpy_helper.from_array(
                np.array([0, 0, top, left, 0, 0, bottom, right], np.int64), "pads"))
            nodes.append(helper.make_node("Pad", ["x", "pads", "pad"], ["x_padded"]))
            x = "x_padded"
        nodes.append(helper.make_node("Cast", [x], ["x_float"], to=TensorProto.FLOAT))
        parts = ["x_float"]
        if len(chunks) > 1:
            initializers.append(numpy_helper.from_array(
                np.array([stop - start for start, stop in chunks], np.int64), "split"))
            parts = [f"x_{i}" for i in range(len(chunks))]
            nodes.append(helper.make_node("Split", ["x_float", "split"], parts, axis=1))
        sums = []
        for i, ((start, stop), part) in enumerate(zip(chunks, parts)):
            initializers.append(numpy_helper.from_array(
                np.ascontiguousarray(w[:, start:stop], np.float32), f"w_{i}"))
            nodes.append(helper.make_node(
                "Conv", [part, f"w_{i}"], [f"f_{i}"], group=groups,
                kernel_shape=[kh, kw], strides=list(strides), dilations=list(dilations)))
            nodes.append(helper.make_node("Cast", [f"f_{i}"], [f"s_{i}"], to=TensorProto.INT32))
            sums.append(f"s_{i}")
        total = sums[0]
        for i, name in enumerate(sums[1:], 1):
            nodes.append(helper.make_node("Add", [total, name], [f"t_{i}"]))
            total = f"t_{i}"
        nodes.append(helper.make_node("Add", [total, "bias"], ["y"]))
        model = _model(nodes, inputs, [tensor("y", TensorProto.INT32, None)], initializers)
        self._session = _session(model)
        self.n = groups * n_group

    def usable(self, bias):
        """Whether the int32 sums of this call cannot wrap (each chunk's are at most 2**24 in
        magnitude): the device's wrap-around is then never needed."""
        bound = self.chunks * 2**24 + int(np.abs(bias.astype(np.int64)).max(initial=0))
        return bound < INT32_LIMIT

    def __call__(self, x, pad_value, bias):
        return self._session.run(None, {
            "x": np.ascontiguousarray(x), "pad": np.array(pad_value, np.int8),
            "bias": bias.reshape(1, self.n, 1, 1)})[0]


def conv_kernel(weights, conv):
    """A :class:`ConvKernel` for a compiled model's QGemm convolution, or None where the
    kernels are not available or the layer has no exact float32 form (the caller then takes
    the NumPy path)."""
    if not available():
        return None
    try:
        return ConvKernel(weights, conv["kernel_shape"], conv["strides"], conv["pads"],
                          conv["dilations"])
    except ValueError:
        return None
