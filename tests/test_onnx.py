"""ONNX models compiled for the accelerator, against onnxruntime running the same model.

The models are built here (tests/onnx_models.py) and quantized by onnxruntime's own quantizer;
onnxruntime is the independent model. Per accelerated node, fed onnxruntime's input tensor, the
int8 output must equal onnxruntime's on at least 99.9% of elements and differ by at most 1
elsewhere; end to end, top-1 must agree with onnxruntime on at least 99.5% of inputs.
"""

import subprocess
import sys
import time

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx_models  # noqa: E402  (tests/onnx_models.py)

import sparsa  # noqa: E402
from sparsa import onnx as sparsa_onnx  # noqa: E402
from sparsa.cli import main  # noqa: E402
from sparsa.host import graph  # noqa: E402

SHAPES = {"cnn": (1, 8, 8), "ffn": (4, 16), "bn_cnn": (1, 8, 8)}
STATIC = [(fmt, activations, per_channel) for fmt in ("QDQ", "QOperator")
          for activations, per_channel in (("QInt8", False), ("QInt8", True), ("QUInt8", True))]


def data(name, count, seed):
    return np.random.default_rng(seed).standard_normal((count,) + SHAPES[name]).astype(
        np.float32)


@pytest.fixture(scope="module")
def float_models():
    return {name: getattr(onnx_models, name)(np.random.default_rng(1))
            for name in ("cnn", "ffn", "bn_cnn")}


@pytest.fixture(scope="module")
def quantized(float_models, tmp_path_factory):
    """Every (model, format, activations, per-channel) quantized once."""
    directory = tmp_path_factory.mktemp("models")
    return {(name, *config): onnx_models.quantize_static(float_models[name], data(name, 64, 2),
                                                           directory, *config)
            for name in ("cnn", "ffn") for config in STATIC}


@pytest.fixture(scope="module")
def reference():
    with sparsa.open("reference") as acc:
        yield acc


@pytest.mark.parametrize("name", ["cnn", "ffn"])
@pytest.mark.parametrize("config", STATIC, ids=["-".join(map(str, c)) for c in STATIC])
def test_static_quantized_model_agrees_with_onnxruntime(quantized, reference, name, config):
    model = quantized[(name, *config)]
    compiled = sparsa_onnx.compile(model)
    accelerated = [node for node in compiled.nodes if node.op == "QGemm"]
    assert len(accelerated) == {"cnn": 4, "ffn": 3}[name]
    assert all(node.attrs["mode"] == "device" for node in accelerated)
    x = data(name, 400, 3)
    for node_name, (equal, largest) in sparsa_onnx.node_agreement(
            model, compiled, {"x": x[:100]}, reference).items():
        assert equal >= 0.999 and largest <= 1, (node_name, equal, largest)
    ours = compiled.run(reference, x)
    theirs = sparsa_onnx.onnxruntime_tensors(model, {"x": x}, optimize=False)
    assert [o.dtype for o in ours] == [t.dtype for t in theirs]
    assert np.mean(ours[0].argmax(1) == theirs[0].argmax(1)) >= 0.995
    if name == "ffn":  # the ArgMax -> Cast output
        assert np.mean(ours[1] == theirs[1]) >= 0.995


def test_dynamic_quantized_models_agree_with_onnxruntime(float_models, reference, tmp_path):
    """onnxruntime's quantize_dynamic: DynamicQuantizeLinear, MatMulInteger / ConvInteger (int32
    sums, the activation zero point known only at run time), Cast, Mul."""
    for name, op_types in (("ffn", ["MatMul", "Gemm"]), ("cnn", ["Conv", "MatMul", "Gemm"])):
        model = onnx_models.quantize_dynamic(float_models[name], tmp_path, op_types)
        compiled = sparsa_onnx.compile(model)
        ops = {node.attrs["source_op"] for node in compiled.nodes if node.op == "QGemm"}
        assert ops == ({"MatMulInteger"} if name == "ffn" else {"ConvInteger", "MatMulInteger"})
        x = data(name, 300, 4)
        for node_name, (equal, largest) in sparsa_onnx.node_agreement(
                model, compiled, {"x": x[:50]}, reference).items():
            assert equal == 1.0, (name, node_name, largest)  # int32 sums: exact
        ours = compiled.run(reference, x)
        theirs = sparsa_onnx.onnxruntime_tensors(model, {"x": x})
        assert np.mean(ours[0].argmax(1) == theirs[0].argmax(1)) >= 0.995


def test_float_model_with_calibration(float_models, reference):
    """sparsa's own quantizer: symmetric activations (zero point 0), weights per channel,
    BatchNormalization folded, MatMul + Add as one GEMM with a bias, ReLU on the device."""
    for name in ("bn_cnn", "ffn", "cnn"):
        model = float_models[name]
        compiled = sparsa_onnx.compile(model, calibration=data(name, 200, 5))
        accelerated = [node for node in compiled.nodes if node.op == "QGemm"]
        assert all(node.attrs["x_zero"] == 0 for node in accelerated)
        assert "BatchNormalization" not in {node.op for node in compiled.nodes}
        if name == "ffn":
            assert not any(node.op == "Add" for node in compiled.nodes)
            assert accelerated[0].attrs.get("relu")
        x = data(name, 500, 6)
        ours = compiled.run(reference, x)[0]
        theirs = sparsa_onnx.onnxruntime_tensors(model, {"x": x})[0]
        scale = np.abs(theirs).max()
        assert np.abs(ours - theirs).max() <= 0.1 * scale, name
        assert np.mean(ours.argmax(1) == theirs.argmax(1)) >= 0.9, name


def test_prune_weights_along_the_accelerators_k(float_models, reference):
    """sparsa.onnx.prune_weights: 2:4 along K as the accelerator sees it (each compiled GEMM's
    int8 K x N matrix, groups of 4 consecutive k per column), the model still runs and stays
    close to the float original; bad input is refused naming the node."""
    for name in ("cnn", "ffn"):
        pruned, zeros = sparsa_onnx.prune_weights(float_models[name], "2:4")
        assert zeros and all(0.4 <= fraction <= 0.5 for fraction in zeros.values()), zeros
        compiled = sparsa_onnx.compile(pruned, calibration=data(name, 200, 5))
        for node in compiled.nodes:
            if node.op != "QGemm":
                continue
            for w in compiled.constants[node.attrs["weight"]]:  # per convolution group
                k, n = w.shape
                groups = np.pad(w != 0, ((0, -k % 4), (0, 0))).reshape(-1, 4, n)
                assert groups.sum(axis=1).max() <= 2, node.name
        x = data(name, 300, 6)
        ours = compiled.run(reference, x)[0]
        theirs = sparsa_onnx.onnxruntime_tensors(pruned, {"x": x})[0]
        assert np.abs(ours - theirs).max() <= 0.1 * np.abs(theirs).max(), name
    original = float_models["cnn"]  # pruned above into a copy: the original is untouched
    assert all(float(np.mean(onnx.numpy_helper.to_array(t) == 0)) < 0.1
               for t in original.graph.initializer if t.name.startswith("w"))
    with pytest.raises(ValueError, match="pattern"):
        sparsa_onnx.prune_weights(original, "5:4")
    with pytest.raises(sparsa_onnx.ModelError, match="model: expected a path"):
        sparsa_onnx.prune_weights(np.zeros(3), "2:4")


def test_backends_give_identical_outputs(quantized, reference):
    """The fast reference and the byte-level device model (the whole driver) agree bit for
    bit on every tensor, with the same work counters."""
    compiled = sparsa_onnx.compile(quantized[("cnn", "QOperator", "QUInt8", True)])
    x = data("cnn", 6, 7)
    names = [out for node in compiled.nodes for out in node.outputs]
    results = []
    for acc in (sparsa.open("reference", rows=4, cols=4),
                sparsa.open("reference", rows=4, cols=4, device_model=True)):
        with acc:
            outputs, tensors = compiled.run(acc, x, keep=names)
            results.append((outputs, tensors, compiled.run_counters()))
    (out_a, tensors_a, counters_a), (out_b, tensors_b, counters_b) = results
    assert all(np.array_equal(a, b) for a, b in zip(out_a, out_b))
    assert all(tensors_a[n].dtype == tensors_b[n].dtype and np.array_equal(tensors_a[n],
                                                                             tensors_b[n])
               for n in names)
    for key in ("macs", "macs_skipped", "products", "jobs"):
        assert counters_a[key] == counters_b[key], key


def inverted_residual(rng, tmp_path):
    """The MobileNetV2 block of onnx_models quantized by onnxruntime (QDQ, int8, weights per
    channel), and compiled."""
    model = onnx_models.quantize_static(
        onnx_models.inverted_residual(rng), rng.standard_normal((32, 3, 8, 8)).astype(np.float32),
        tmp_path, "QDQ", "QInt8", True)
    return model, sparsa_onnx.compile(model)


def test_depthwise_convolution_in_few_jobs(tmp_path):
    """A depthwise convolution of 40 channels runs as two device jobs, not one per channel:
    its groups side by side in a block-diagonal B, as many as K <= MAX_K allows (28 of K = 9).
    The integers are those of one job per group (a build whose MAX_K takes one group), on the
    reference and the device model alike, and agree with onnxruntime's."""
    rng = np.random.default_rng(8)
    model, compiled = inverted_residual(rng, tmp_path)
    x = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)
    names = [out for node in compiled.nodes for out in node.outputs]
    runs = {}
    for label, options in (("batched", {}), ("device model", {"device_model": True}),
                           ("one group per job", {"max_k": 12})):
        with sparsa.open("reference", **options) as acc:
            outputs, tensors = compiled.run(acc, x, keep=names)
            stats = dict(zip((node.name for node in compiled.nodes), compiled.last_run))
            runs[label] = (outputs, tensors, stats)
    (out, tensors, stats) = runs["batched"]
    depthwise = [node.name for node in compiled.nodes
                 if node.op == "QGemm" and node.attrs["groups"] == 40][0]
    assert stats[depthwise]["calls"] == stats[depthwise]["jobs"] == 2
    assert runs["one group per job"][2][depthwise]["calls"] == 40
    for label in ("device model", "one group per job"):
        other_out, other_tensors, other_stats = runs[label]
        assert all(np.array_equal(a, b) for a, b in zip(out, other_out)), label
        assert all(np.array_equal(tensors[n], other_tensors[n]) for n in names), label
    assert {key: runs["device model"][2][depthwise][key] for key in ("macs", "jobs")} == \
        {key: stats[depthwise][key] for key in ("macs", "jobs")}
    with sparsa.open("reference") as acc:
        agreement = sparsa_onnx.node_agreement(model, compiled, {"x": x}, acc)
    assert agreement[depthwise][0] >= 0.999 and agreement[depthwise][1] <= 1


def test_reference_runs_convolutions_whole_with_the_device_calls_counters(tmp_path,
                                                                        monkeypatch):
    """On the reference, a convolution is one onnxruntime call (sparsa.host.cpu) instead of the
    device's im2col and calls: every tensor and every counter (cycles included) is the same
    as the NumPy path's, which runs the device's calls."""
    rng = np.random.default_rng(9)
    model, compiled = inverted_residual(rng, tmp_path)
    x = rng.standard_normal((5, 3, 8, 8)).astype(np.float32)
    names = [out for node in compiled.nodes for out in node.outputs]
    runs = []
    for kernels in ("onnxruntime", "numpy"):
        monkeypatch.setenv("SPARSA_CPU_KERNELS", kernels)
        with sparsa.open("reference") as acc:
            outputs, tensors = compiled.run(acc, x, keep=names)
        runs.append((outputs, tensors, [dict(s) for s in compiled.last_run]))
    kernels = compiled.__dict__.get("_cpu_kernels", {})  # built by the first run
    assert len(kernels) == 3 and all(kernels.values())
    (out, tensors, stats), (out_np, tensors_np, stats_np) = runs
    assert all(np.array_equal(a, b) for a, b in zip(out, out_np))
    assert all(np.array_equal(tensors[n], tensors_np[n]) for n in names)
    convolutions = [i for i, node in enumerate(compiled.nodes) if node.op == "QGemm"]
    assert len(convolutions) == 3
    for i in convolutions:
        for key in ("cycles", "macs", "macs_skipped", "jobs", "calls", "products"):
            assert stats[i][key] == stats_np[i][key] > 0 or key == "macs_skipped", key


@pytest.mark.parametrize("device_model", [False, True])
def test_compiled_model_shared_by_threads(quantized, device_model):
    """One compiled model on one accelerator, run by two threads at once with different
    inputs: each gets the outputs of its own inputs run alone, every time."""
    import threading

    compiled = sparsa_onnx.compile(quantized[("cnn", "QDQ", "QInt8", True)])
    inputs = [data("cnn", 3, seed) for seed in range(4)]
    with sparsa.open("reference", device_model=device_model, rows=4, cols=4) as acc:
        alone = [compiled.run(acc, x)[0] for x in inputs]
        wrong, barrier = [], threading.Barrier(2)

        def worker(index):
            try:
                barrier.wait()
                for repeat in range(5):
                    which = (index + 2 * repeat) % len(inputs)
                    if not np.array_equal(compiled.run(acc, inputs[which])[0], alone[which]):
                        wrong.append((index, repeat))
            except BaseException as error:  # reported, not lost in the thread
                wrong.append(repr(error))

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not any(thread.is_alive() for thread in threads) and wrong == []


def test_save_and_load_need_only_numpy(quantized, tmp_path):
    """A saved model loads and runs in a process where onnx, onnxruntime, Amaranth and cocotb
    cannot be imported, with the outputs of the model before saving."""
    compiled = sparsa_onnx.compile(quantized[("ffn", "QDQ", "QInt8", True)])
    path = tmp_path / "ffn.npz"
    compiled.save(path)
    x = data("ffn", 20, 8)
    np.save(tmp_path / "x.npy", x)
    with sparsa.open("reference") as acc:
        want = compiled.run(acc, x)
    script = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("onnx", "onnxruntime", "amaranth", "cocotb", "sklearn"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import numpy as np, sparsa
from sparsa.onnx import load
model = load({str(path)!r})
with sparsa.open("reference") as acc:
    outputs = model.run(acc, np.load({str(tmp_path / 'x.npy')!r}))
np.savez({str(tmp_path / 'out.npz')!r}, *outputs)
print(sorted(m for m in sys.modules if m.split(".")[0] in ("onnx", "amaranth", "cocotb")))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    with np.load(tmp_path / "out.npz") as got:
        assert all(np.array_equal(got[f"arr_{i}"], w) for i, w in enumerate(want))
    assert repr(graph.load(path)) == repr(compiled)


def test_outputs_cut_and_uint8_tensors(quantized, reference):
    """``outputs=`` ends the graph at a named tensor; a uint8 tensor comes back as uint8,
    equal to onnxruntime's."""
    model = quantized[("cnn", "QOperator", "QUInt8", True)]
    first = next(node for node in model.graph.node if node.op_type == "QLinearConv")
    compiled = sparsa_onnx.compile(model, outputs=[first.output[0]])
    assert [node.op for node in compiled.nodes] == ["QuantizeLinear", "QGemm"]
    x = data("cnn", 50, 9)
    ours = compiled.run(reference, x)[0]
    theirs = sparsa_onnx.onnxruntime_tensors(model, {"x": x}, [first.output[0]])[first.output[0]]
    assert ours.dtype == np.uint8 and np.mean(ours == theirs) >= 0.999
    assert np.abs(ours.astype(int) - theirs).max() <= 1
    with pytest.raises(graph.ModelError, match="no tensor 'nowhere'"):
        sparsa_onnx.compile(model, outputs=["nowhere"])


def test_summary_before_and_after_a_run(quantized, reference):
    compiled = sparsa_onnx.compile(quantized[("cnn", "QDQ", "QInt8", False)])
    before = compiled.summary(batch=2)
    assert compiled.last_run is None  # nothing was run
    conv1 = next(line for line in before.splitlines() if line.startswith("conv1 "))
    # 2 images x 8x8 pixels x 9 inputs x 8 channels, on the device
    assert "device" in conv1 and str(2 * 64 * 9 * 8) in conv1 and "(2, 8, 8, 8)" in conv1
    assert "device g=2" in next(line for line in before.splitlines()
                                if line.startswith("conv2 "))
    # The projection (per image, every activation nonzero): each product whose weight k-step
    # vector is not all zero is issued; these weights have no such zero vector but conv2's
    # two groups' (its block-diagonal B's zeros).
    projected = compiled.projection()
    for node in compiled.nodes:
        if node.op == "QGemm" and node.attrs["groups"] == 1:
            shape = compiled._shapes(1)[node.outputs[0]]
            assert projected[node.name]["macs"] == int(np.prod(shape)) * node.attrs["k"], \
                node.name
            assert projected[node.name]["jobs"] == 1 and projected[node.name]["cycles"] > 0
    per_image = sum(p["cycles"] for p in projected.values())
    assert f"per image 4 device jobs, {per_image} cycles projected" in before
    fixed = sparsa_onnx.compile(quantized[("cnn", "QDQ", "QInt8", False)])
    fixed.inputs[0].shape = [1, 1, 8, 8]  # a model exported with a batch of one
    with pytest.raises(sparsa_onnx.ModelError, match=r"batch: the model's input 'x' has a "
                                                     r"fixed batch of 1 .*summary\(batch=1\)"):
        fixed.summary(batch=2)
    assert "(1, 8, 8, 8)" in fixed.summary(batch=1)
    model_line = [line for line in before.splitlines() if line.startswith("model: ")][0]
    assert model_line.startswith("model: 4 of ") and "(1 grouped)" in model_line
    assert "MACs for a batch of 2" in model_line
    compiled.run(reference, data("cnn", 2, 10))
    after = compiled.summary(batch=2)
    assert "cycles" in after.splitlines()[0] and "total:" in after
    counters = compiled.run_counters()
    # One device job per node, conv2's two groups side by side in one (block-diagonal B).
    assert counters["macs"] >= counters["products"] > 0 and counters["jobs"] == 4
    conv2 = [stats for node, stats in zip(compiled.nodes, compiled.last_run)
             if node.name == "conv2"][0]
    assert conv2["calls"] == conv2["jobs"] == 1
    assert "jobs" in after.splitlines()[0]


def _qlinear_conv(bias, x_zero=100, scales=(0.1, 0.01, 0.5), y_zero=3):
    """A QLinearConv (1x1, weights all 127) over a uint8 model input, built by hand."""
    from onnx import TensorProto, helper, numpy_helper

    x_scale, w_scale, y_scale = (np.float32(s) for s in scales)
    constants = [numpy_helper.from_array(np.asarray(v), n) for n, v in (
        ("xs", x_scale), ("xz", np.uint8(x_zero)), ("w", np.full((2, 1, 1, 1), 127, np.int8)),
        ("ws", w_scale), ("wz", np.int8(0)), ("ys", y_scale), ("yz", np.uint8(y_zero)),
        ("b", np.asarray(bias, np.int32)))]
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"],
                            ["y"], "qconv")
    g = helper.make_graph([node], "qconv", [helper.make_tensor_value_info(
        "x", TensorProto.UINT8, ["N", 1, 2, 2])], [helper.make_tensor_value_info(
            "y", TensorProto.UINT8, ["N", 2, 2, 2])], constants)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def test_bias_beyond_int32_gets_a_coarser_weight_scale(reference):
    """A bias that exceeds int32 once the input zero point (255) is folded in: the channel's
    weight scale is raised until it fits, as the layer quantizer of sparsa.host.model does;
    the outputs stay within one step of the exact real values (NumPy, float64)."""
    bias = [-2**31 + 10, 5]
    scales = (1e-4, 1e-4, 1.0)
    compiled = sparsa_onnx.compile(_qlinear_conv(bias, x_zero=255, scales=scales, y_zero=100))
    node = compiled.node("qconv")
    folded = (compiled.constants[node.attrs["bias"]].astype(np.int64)
              - node.attrs["x_zero"] * compiled.constants[node.attrs["colsum"]])
    assert folded.min() >= -2**31 and node.attrs["mode"] == "device"
    x = np.random.default_rng(15).integers(0, 256, (4, 1, 2, 2), dtype=np.uint8)
    ours = compiled.run(reference, x)[0]
    real = np.float32(1e-4) * np.float64(np.float32(1e-4))
    exact = ((x.astype(np.float64) - 255) * 127 * real
             + np.array(bias, np.float64)[None, :, None, None] * real)
    exact = np.clip(np.rint(exact) + 100, 0, 255)
    assert ours.dtype == np.uint8 and np.abs(ours - exact).max() <= 1


def test_uint8_model_input_and_output(reference):
    model = _qlinear_conv([5, -7])
    compiled = sparsa_onnx.compile(model)
    x = np.random.default_rng(11).integers(0, 256, (3, 1, 2, 2), dtype=np.uint8)
    ours = compiled.run(reference, x)[0]
    theirs = sparsa_onnx.onnxruntime_tensors(model, {"x": x})[0]
    assert ours.dtype == np.uint8 and np.array_equal(ours, theirs)


def test_errors_name_the_node_or_argument(float_models, quantized, reference, tmp_path):
    from onnx import TensorProto, helper

    # An op sparsa does not run: refused at compile time, naming op, node and what is supported.
    model = float_models["bn_cnn"]
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    bad.graph.node[2].op_type = "Softplus"
    with pytest.raises(graph.ModelError, match=r"Softplus node 'relu1'.*supported.*Conv"):
        sparsa_onnx.compile(bad, calibration=data("bn_cnn", 10, 0))
    # A float model without calibration data.
    with pytest.raises(graph.ModelError, match=r"Conv node 'conv1'.*calibration="):
        sparsa_onnx.compile(model)
    # Calibration data for a model that is quantized already.
    with pytest.raises(graph.ModelError, match=r"calibration: the model is quantized already"):
        sparsa_onnx.compile(quantized[("cnn", "QDQ", "QInt8", False)],
                            calibration=data("cnn", 4, 0))
    # A MatMul of two activations.
    node = helper.make_node("MatMul", ["a", "b"], ["c"], "outer")
    two = helper.make_model(helper.make_graph(
        [node], "two", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 2])
                        for n in "ab"], [helper.make_tensor_value_info("c", TensorProto.FLOAT,
                                                                       [2, 2])]),
        opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(graph.ModelError, match=r"MatMul node 'outer'.*not a constant"):
        sparsa_onnx.compile(two, calibration={"a": np.ones((2, 2)), "b": np.ones((2, 2))})
    # Not an ONNX file; not a compiled model.
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(graph.ModelError, match="junk.onnx"):
        sparsa_onnx.compile(tmp_path / "junk.onnx")
    with pytest.raises(graph.ModelError, match="junk.onnx"):
        sparsa_onnx.load(tmp_path / "junk.onnx")
    # Bad inputs at run time: named, with what was expected.
    compiled = sparsa_onnx.compile(quantized[("cnn", "QDQ", "QInt8", False)])
    with pytest.raises(graph.ModelError, match=r"inputs\['x'\]: expected shape"):
        compiled.run(reference, np.zeros((2, 1, 9, 8), np.float32))
    with pytest.raises(graph.ModelError, match=r"inputs\['x'\]: expected dtype float32"):
        compiled.run(reference, np.zeros((2, 1, 8, 8), np.complex64))
    with pytest.raises(graph.ModelError, match=r"inputs: missing \['x'\]"):
        compiled.run(reference, {})
    with pytest.raises(graph.ModelError, match=r"unknown input name"):
        compiled.run(reference, {"x": np.zeros((1, 1, 8, 8)), "y": np.zeros(1)})
    with pytest.raises(graph.ModelError, match=r"finite"):
        compiled.run(reference, np.full((1, 1, 8, 8), np.nan, np.float32))
    with pytest.raises(graph.ModelError, match=r"keep: no tensor 'nowhere'"):
        compiled.run(reference, np.zeros((1, 1, 8, 8), np.float32), keep=["nowhere"])
    with pytest.raises(graph.ModelError, match=r"Conv node 'conv2'.*expected 8 input channels"):
        compiled.run_node(reference, "conv2", {compiled.node("conv2").inputs[0]:
                                               np.zeros((1, 3, 4, 4), np.int8)})


def test_prepared_weights_match_plain_weights():
    rng = np.random.default_rng(12)
    b = rng.integers(-128, 128, (70, 30), dtype=np.int8)
    for options in ({}, {"device_model": True, "rows": 4, "cols": 4}):
        with sparsa.open("reference", **options) as acc:
            prepared = acc.prepare(b)
            for m in (1, 9, 40):
                a = rng.integers(-128, 128, (m, 70), dtype=np.int8)
                assert np.array_equal(acc.matmul(a, prepared, relu=True),
                                      acc.matmul(a, b, relu=True))
    copy = b.copy()
    with sparsa.open("reference") as acc:
        prepared = acc.prepare(copy)
        copy[:] = 0  # prepare keeps its own copy
        a = rng.integers(-128, 128, (3, 70), dtype=np.int8)
        assert np.array_equal(acc.matmul(a, prepared), acc.matmul(a, b))
        with pytest.raises(TypeError, match="B: expected dtype int8, got int16"):
            acc.prepare(np.zeros((3, 4), np.int16))


def test_command_line_compile_and_infer(quantized, tmp_path, capsys):
    source = tmp_path / "cnn.onnx"
    onnx.save(quantized[("cnn", "QDQ", "QInt8", True)], source)
    np.save(tmp_path / "x.npy", data("cnn", 5, 13))
    assert main(["compile", str(source), "-o", str(tmp_path / "cnn.npz")]) == 0
    assert "conv1" in capsys.readouterr().out
    assert main(["infer", str(tmp_path / "cnn.npz"), "--input", str(tmp_path / "x.npy"),
                 "--backend", "reference", "--output", str(tmp_path / "y.npy")]) == 0
    report = capsys.readouterr().out
    assert "total:" in report and "device cycles" in report
    with sparsa.open("reference") as acc:
        want = sparsa_onnx.compile(source).run(acc, data("cnn", 5, 13))[0]
    assert np.array_equal(np.load(tmp_path / "y.npy"), want)
    # A float model compiled from the command line with calibration data.
    onnx.save(onnx_models.bn_cnn(np.random.default_rng(1)), tmp_path / "bn.onnx")
    np.save(tmp_path / "calibration.npy", data("bn_cnn", 50, 14))
    assert main(["compile", str(tmp_path / "bn.onnx"), "-o", str(tmp_path / "bn.npz"),
                 "--calibration", str(tmp_path / "calibration.npy")]) == 0
    # Errors: the message, exit status 1, no traceback.
    assert main(["compile", str(tmp_path / "bn.onnx"), "-o", str(tmp_path / "x.npz")]) == 1
    assert "calibration=" in capsys.readouterr().err
    assert main(["infer", str(tmp_path / "cnn.npz"), "--input",
                 str(tmp_path / "calibration.npy"), "--backend", "reference"]) == 0
    np.save(tmp_path / "bad.npy", np.zeros((2, 3)))
    assert main(["infer", str(tmp_path / "cnn.npz"), "--input", str(tmp_path / "bad.npy"),
                 "--backend", "reference"]) == 1
    assert "expected shape" in capsys.readouterr().err


def test_host_ops_on_uint8_tensors(reference):
    """Pad (default and given value), MaxPool, Transpose and Cast on a uint8 model input
    (held as int8 less 128 inside): the same uint8 values as onnxruntime."""
    from onnx import TensorProto, helper, numpy_helper

    constants = [numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"),
                 numpy_helper.from_array(np.uint8(7), "seven")]
    node = helper.make_node
    nodes = [node("Pad", ["x", "pads"], ["padded"], "pad_zero"),
             node("Pad", ["x", "pads", "seven"], ["padded7"], "pad_seven"),
             node("MaxPool", ["padded"], ["pooled"], "pool", kernel_shape=[2, 2]),
             node("Transpose", ["padded7"], ["moved"], "move", perm=[0, 1, 3, 2]),
             node("Cast", ["pooled"], ["wide"], "widen", to=TensorProto.INT32)]
    g = helper.make_graph(nodes, "u8", [helper.make_tensor_value_info(
        "x", TensorProto.UINT8, ["N", 1, 3, 3])], [helper.make_tensor_value_info(
            name, TensorProto.UINT8 if name != "wide" else TensorProto.INT32, None)
            for name in ("padded", "moved", "wide")], constants)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    x = np.random.default_rng(16).integers(0, 256, (2, 1, 3, 3), dtype=np.uint8)
    ours = sparsa_onnx.compile(model).run(reference, x)
    theirs = sparsa_onnx.onnxruntime_tensors(model, {"x": x})
    for got, want in zip(ours, theirs):
        assert got.dtype == want.dtype and np.array_equal(got, want)


def test_shapes_without_running_are_the_run_shapes(quantized, reference, tmp_path):
    """summary()'s shapes come from each op's shape rule, not a run: on every test model
    (QDQ and QOperator, int8 and uint8, the FFN's ArgMax -> Cast, pooling, Flatten, Concat),
    each tensor's shape is the one a run gives it."""
    rng = np.random.default_rng(4)
    models = [quantized[key] for key in quantized] + [inverted_residual(rng, tmp_path)[0]]
    for model in models:
        compiled = sparsa_onnx.compile(model)
        names = [out for node in compiled.nodes for out in node.outputs if out]
        for batch in (1, 3):
            x = rng.standard_normal((batch, *compiled.inputs[0].shape[1:])).astype(np.float32)
            _, tensors = compiled.run(reference, x, keep=names)
            shapes = compiled._shapes(batch)
            assert {n: shapes.get(n) for n in names} == {n: tensors[n].shape for n in names}


def test_micro_batches_overlap_host_and_device(quantized, float_models, tmp_path):
    """On a device, a batch runs as two micro-batches by default, one's host work beside the
    other's device jobs: the device's transfers come from two threads, one at a time; the
    outputs and the summed counters are those of the batch run whole; the report gives the
    run's host and device totals and the device's busy fraction. A model that mixes a
    batch's samples (dynamic quantization: one scale per batch) runs whole, and refuses
    micro-batches asked for."""
    import threading

    from sparsa.host import driver, reference

    compiled = sparsa_onnx.compile(quantized[("cnn", "QDQ", "QInt8", True)])
    assert compiled.separable()
    x = data("cnn", 6, 11)
    with sparsa.open("reference") as acc:
        expected = compiled.run(acc, x)[0]
    transfers = []

    class Threads(reference.ReferenceDevice):
        def transfer(self, *args, **kwargs):
            started = time.perf_counter()
            size = super().transfer(*args, **kwargs)
            time.sleep(0.01)
            transfers.append((started, time.perf_counter(), threading.get_ident()))
            return size
    acc = driver.DeviceAccelerator(Threads(), "reference-device")
    whole = compiled.run(acc, x, micro_batches=1)[0]
    counters = compiled.run_counters()
    assert np.array_equal(whole, expected) and len({t[2] for t in transfers}) == 1
    transfers.clear()
    parts = compiled.run(acc, x)[0]
    assert np.array_equal(parts, expected)
    assert len({t[2] for t in transfers}) == 2  # each micro-batch's jobs from its thread
    ordered = sorted(transfers)
    assert all(a[1] <= b[0] for a, b in zip(ordered, ordered[1:]))  # one job at a time
    split = compiled.run_counters()
    assert split["jobs"] == 2 * counters["jobs"] and split["busy_s"] >= 0.01 * split["jobs"]
    assert split["macs"] + split["macs_skipped"] == counters["macs"] + counters["macs_skipped"]
    assert 0 < split["busy_fraction"] <= 1 and split["host_s"] > 0
    assert "device busy" in compiled.summary(6, acc).splitlines()[-1]
    for bad in (0, -1, True, 1.5):
        with pytest.raises(sparsa_onnx.ModelError, match="micro_batches: expected"):
            compiled.run(acc, x, micro_batches=bad)
    dynamic = sparsa_onnx.compile(onnx_models.quantize_dynamic(float_models["ffn"], tmp_path,
                                                               ["MatMul", "Gemm"]))
    assert not dynamic.separable()
    with pytest.raises(sparsa_onnx.ModelError, match="mixes the samples"):
        dynamic.run(acc, data("ffn", 4, 1), micro_batches=2)
    transfers.clear()
    dynamic.run(acc, data("ffn", 4, 1))
    assert len({t[2] for t in transfers}) == 1
    acc.close()


def test_external_data_outside_the_models_folder_is_refused(tmp_path):
    """A model whose external data points outside its folder is refused (onnx 1.16 on, which
    the extras require), not read into the compiled weights."""
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    weights.ClearField("raw_data")
    weights.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../outside.bin"), ("offset", "0"), ("length", "64")):
        entry = weights.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "outside",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              [weights])
    np.full((4, 4), 7, np.float32).tofile(tmp_path / "outside.bin")
    (tmp_path / "model").mkdir()
    path = tmp_path / "model" / "model.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    with pytest.raises(sparsa_onnx.ModelError, match="points outside the directory"):
        sparsa_onnx.compile(path, calibration=np.ones((2, 4), np.float32))


@pytest.mark.parametrize("attribute, value, message", [
    ("strides", [0, 1], r"strides \[0, 1\]: expected 2 integers of at least 1"),
    ("dilations", [1, 0], r"dilations \[1, 0\]: expected 2 integers of at least 1"),
    ("pads", [1, -1, 1, 1], r"pads \[1, -1, 1, 1\]: expected 4 integers of at least 0"),
    ("group", 0, r"group 0: expected at least 1"),
])
def test_convolution_attributes_checked_at_compile_time(float_models, attribute, value,
                                                        message):
    """A Conv whose strides, dilations, pads or group no convolution has is refused when it
    is compiled, naming the node (not at run time inside NumPy)."""
    from onnx import helper

    bad = onnx.ModelProto()
    bad.CopyFrom(float_models["cnn"])
    conv = next(node for node in bad.graph.node if node.op_type == "Conv")
    kept = [a for a in conv.attribute if a.name != attribute]
    del conv.attribute[:]
    conv.attribute.extend(kept + [helper.make_attribute(attribute, value)])
    with pytest.raises(graph.ModelError, match=rf"Conv node '{conv.name}'.*{message}"):
        sparsa_onnx.compile(bad, calibration=data("cnn", 4, 0))


def test_calibration_needs_a_sample(float_models):
    with pytest.raises(graph.ModelError, match=r"calibration\['x'\]: expected at least one "
                                               r"sample, got shape \(0, 1, 8, 8\)"):
        sparsa_onnx.compile(float_models["cnn"], calibration=data("cnn", 0, 0))


@pytest.mark.parametrize("opset", [10, 21])
def test_opsets_outside_the_tested_range_refused(float_models, opset):
    model = onnx.ModelProto()
    model.CopyFrom(float_models["cnn"])
    model.opset_import[0].version = opset
    with pytest.raises(graph.ModelError, match=rf"ai.onnx opset is {opset}; sparsa reads "
                                               r"opsets 11 to 20.*convert_version"):
        sparsa_onnx.compile(model, calibration=data("cnn", 4, 0))


@pytest.mark.parametrize("opset", [11, 13, 20])
def test_tested_opsets_agree_with_onnxruntime(float_models, tmp_path, opset):
    """The CNN at the range's ends (and 13), quantized by onnxruntime there: every accelerated
    node agrees with onnxruntime's."""
    model = onnx.ModelProto()
    model.CopyFrom(float_models["cnn"])
    model.opset_import[0].version = opset
    model.graph.name = f"cnn_opset{opset}"
    quantized_model = onnx_models.quantize_static(model, data("cnn", 32, 2), tmp_path)
    assert quantized_model.opset_import[0].version >= opset
    compiled = sparsa_onnx.compile(quantized_model)
    with sparsa.open("reference") as acc:
        agreement = sparsa_onnx.node_agreement(quantized_model, compiled,
                                               {"x": data("cnn", 20, 3)}, acc)
    assert agreement and all(equal >= 0.999 and largest <= 1
                             for equal, largest in agreement.values()), agreement


def test_softmax_before_opset_13_normalizes_every_axis_from_its_own(tmp_path):
    """Softmax before opset 13 takes the input as a matrix (the axes before ``axis`` by those
    from it on) and normalizes each row: over axes 1, 2 and 3 together here, as onnxruntime
    does, not over axis 1 alone."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(6)
    w = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], "project"),
             helper.make_node("Softmax", ["h"], ["y"], "softmax", axis=1)]
    graph_ = helper.make_graph(
        nodes, "legacy_softmax", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                ["N", 2, 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 3, 4])], [w])
    model = helper.make_model(graph_, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 6
    x = rng.standard_normal((5, 2, 3, 4)).astype(np.float32)
    compiled = sparsa_onnx.compile(model, calibration=x)
    with sparsa.open("reference") as acc:
        ours = compiled.run(acc, x)[0]
    theirs = sparsa_onnx.onnxruntime_tensors(model, {"x": x})[0]
    assert np.allclose(ours.reshape(5, -1).sum(axis=1), 1, atol=1e-5)
    assert np.abs(ours - theirs).max() < 0.01  # the int8 projection's rounding only


def test_every_refused_node_reported_together(tmp_path, capsys):
    """Compile looks at every node before it stops and reports each refused one (op, node,
    why, the fix where there is one); the nodes reading a refused node's outputs are passed
    over, not reported again. ``check`` and ``sparsa compile --check`` list them without
    compiling."""
    from onnx import TensorProto, helper, numpy_helper

    from sparsa import cli

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    k = numpy_helper.from_array(np.ones((1, 1, 3, 3), np.float32), "k")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], "project"),
             helper.make_node("Selu", ["h"], ["e"], "selu"),
             helper.make_node("Add", ["e", "h"], ["a"], "after_selu"),
             helper.make_node("Softplus", ["h"], ["s"], "gate"),
             helper.make_node("Add", ["a", "s"], ["y"], "join"),
             helper.make_node("Conv", ["image", "k"], ["c"], "same", auto_pad="SAME_UPPER")]
    graph_ = helper.make_graph(
        nodes, "three_refused",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
         helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4]),
         helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 1, 4, 4])], [w, k])
    model = helper.make_model(graph_, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    with pytest.raises(graph.ModelError) as error:
        sparsa_onnx.compile(model)
    lines = str(error.value).splitlines()
    assert lines[0] == "3 nodes refused (2 nodes reading their outputs not checked):"
    assert sorted(line.strip().split(":")[0] for line in lines[1:4]) == [
        "Conv node 'same'", "Selu node 'selu'", "Softplus node 'gate'"]
    assert any("export with auto_pad NOTSET" in line for line in lines[1:4])
    assert lines[4].strip().startswith("(sparsa compiles Add")
    report = sparsa_onnx.check(model)
    assert report["nodes"] == 6 and report["ops"]["Add"] == 2 and len(report["refused"]) == 3
    path = tmp_path / "three.onnx"
    path.write_bytes(model.SerializeToString())
    assert cli.main(["compile", "--check", str(path)]) == 1
    out = capsys.readouterr().out
    assert out.count("  refused: ") == 3 and "3 refused" in out
    assert sparsa_onnx.check(onnx_models.cnn(np.random.default_rng(0)))["refused"] == []
    assert cli.main(["compile", str(path)]) == 2  # neither an output nor --check
    assert "-o/--output" in capsys.readouterr().err


@pytest.mark.parametrize("opset", [17, 18])
def test_exporter_idioms_agree_with_onnxruntime(tmp_path, opset):
    """A BatchNormalization between Q/DQ pairs (onnxruntime's quantizer without
    quant_pre_process), ReduceMean over H and W (its axes an input from opset 18) and PyTorch's
    flatten (Shape, Gather, Unsqueeze, Concat, Reshape) run on the host; every accelerated
    node agrees with onnxruntime's, and the logits' classes."""
    rng = np.random.default_rng(12)
    model = onnx_models.exporter_idioms(rng, opset)
    calibration = rng.standard_normal((32, 3, 8, 8)).astype(np.float32)
    quantized_model = onnx_models.quantize_static(model, calibration, tmp_path)
    ops = {node.op_type for node in quantized_model.graph.node}
    assert {"BatchNormalization", "ReduceMean", "Shape", "Gather"} <= ops
    compiled = sparsa_onnx.compile(quantized_model)
    host = {node.op for node in compiled.nodes if node.op != "QGemm"}
    assert {"BatchNormalization", "ReduceMean", "Shape", "Gather", "Reshape"} <= host
    assert compiled.separable()  # (the flatten works out each micro-batch's own shape)
    x = rng.standard_normal((64, 3, 8, 8)).astype(np.float32)
    with sparsa.open("reference") as acc:
        agreement = sparsa_onnx.node_agreement(quantized_model, compiled, {"x": x[:16]}, acc)
        ours = compiled.run(acc, x)[0]
    assert len(agreement) == 3 and all(equal >= 0.999 and largest <= 1
                                       for equal, largest in agreement.values()), agreement
    theirs = sparsa_onnx.onnxruntime_tensors(quantized_model, {"x": x}, optimize=False)[0]
    assert ours.shape == theirs.shape == (64, 10)
    assert np.mean(ours.argmax(1) == theirs.argmax(1)) >= 0.95
    assert np.abs(ours - theirs).max() < 0.2 * np.abs(theirs).max()
    # On a device, in two micro-batches, each working out its own flatten: the same outputs.
    with sparsa.open("reference", device_model=True) as device:
        assert np.array_equal(compiled.run(device, x[:6])[0], ours[:6])
        assert compiled.run_counters()["jobs"] == 2 * 3  # two parts, three GEMMs each
    # The same float model through sparsa's own quantizer: the BatchNormalization after a
    # Relu stays a host op.
    own = sparsa_onnx.compile(model, calibration=calibration)
    assert "BatchNormalization" in {node.op for node in own.nodes}


def test_shape_subgraphs_fold_for_fixed_input_shapes(tmp_path):
    """With the input's shape fixed (its batch too), PyTorch's flatten (Shape, Gather,
    Unsqueeze, Concat) is folded at compile time to a Reshape to a constant target; the
    outputs are onnxruntime's."""
    rng = np.random.default_rng(13)
    model = onnx_models.exporter_idioms(rng, 17, batch=4)
    x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    quantized_model = onnx_models.quantize_static(model, x, tmp_path)
    compiled = sparsa_onnx.compile(quantized_model)
    ops = [node.op for node in compiled.nodes]
    assert not {"Shape", "Gather", "Unsqueeze", "Concat"} & set(ops) and "Reshape" in ops
    reshape = next(node for node in compiled.nodes if node.op == "Reshape")
    assert compiled.constants[reshape.inputs[1]].tolist() == [4, -1]
    with sparsa.open("reference") as acc:
        ours = compiled.run(acc, x)[0]
        dynamic = sparsa_onnx.compile(onnx_models.quantize_static(
            onnx_models.exporter_idioms(np.random.default_rng(13), 17), x, tmp_path))
        assert np.array_equal(dynamic.run(acc, x)[0], ours)
    theirs = sparsa_onnx.onnxruntime_tensors(quantized_model, {"x": x}, optimize=False)[0]
    assert np.array_equal(ours.argmax(1), theirs.argmax(1))
    assert np.abs(ours - theirs).max() < 0.2 * np.abs(theirs).max()


@pytest.mark.parametrize("build, shape", [(onnx_models.bert_encoder, (32, 128)),
                                          (onnx_models.vit_encoder, (3, 32, 32))],
                         ids=["bert", "vit"])
def test_transformer_encoders_agree_with_onnxruntime(tmp_path, build, shape):
    """A BERT-style encoder (2 layers, d 128, 4 heads, sequence 32) and a ViT-style one (patch
    embedding as a Conv of stride = kernel, a class token, 2 layers), quantized by onnxruntime:
    the MatMuls of two activations (Q x K^T, P x V) on the device with their zero points'
    terms and requantization on the host, LayerNormalization, Erf-form GELU, Div, Softmax,
    Expand, Gather on the host. Every accelerated node equals onnxruntime's (graph
    optimizations off) on >= 99.9% of elements and within 1; end to end, within 2% of the
    output's range (and the ViT's classes the same)."""
    rng = np.random.default_rng(0)
    model = build(rng)
    calibration = rng.standard_normal((16, *shape)).astype(np.float32)
    quantized_model = onnx_models.quantize_static(model, calibration, tmp_path)
    compiled = sparsa_onnx.compile(quantized_model)
    assert sum(node.op == "QMatMul" for node in compiled.nodes) == 4  # two per layer
    x = rng.standard_normal((8, *shape)).astype(np.float32)
    with sparsa.open("reference") as acc:
        agreement = sparsa_onnx.node_agreement(quantized_model, compiled, {"x": x}, acc)
        ours = compiled.run(acc, x)[0]
    assert len(agreement) >= 16 and all(equal >= 0.999 and largest <= 1
                                        for equal, largest in agreement.values()), agreement
    theirs = sparsa_onnx.onnxruntime_tensors(quantized_model, {"x": x}, optimize=False)[0]
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= 0.02 * np.abs(theirs).max()
    if build is onnx_models.vit_encoder:
        assert np.array_equal(ours.argmax(1), theirs.argmax(1))
    # The same integers through the whole driver on the device model (micro-batches too).
    with sparsa.open("reference", device_model=True) as device:
        assert np.array_equal(compiled.run(device, x[:4])[0], ours[:4])


def test_more_host_ops_agree_with_onnxruntime(tmp_path):
    """Gelu (exact and tanh, opset 20), HardSigmoid, HardSwish, Where on a constant mask,
    Split, Slice: quantized by onnxruntime, both accelerated nodes equal onnxruntime's and the
    output within its quantization steps."""
    rng = np.random.default_rng(13)
    model = onnx_models.more_host_ops(rng)
    calibration = rng.standard_normal((64, 16)).astype(np.float32)
    quantized_model = onnx_models.quantize_static(model, calibration, tmp_path)
    compiled = sparsa_onnx.compile(quantized_model)
    host = {node.op for node in compiled.nodes}
    assert {"Gelu", "HardSigmoid", "HardSwish", "Where", "Split", "Slice"} <= host
    x = rng.standard_normal((200, 16)).astype(np.float32)
    with sparsa.open("reference") as acc:
        agreement = sparsa_onnx.node_agreement(quantized_model, compiled, {"x": x}, acc)
        ours = compiled.run(acc, x)[0]
    assert len(agreement) == 2 and all(equal >= 0.999 and largest <= 1
                                       for equal, largest in agreement.values()), agreement
    theirs = sparsa_onnx.onnxruntime_tensors(quantized_model, {"x": x}, optimize=False)[0]
    assert np.abs(ours - theirs).max() <= 0.02 * np.abs(theirs).max()
    assert compiled._shapes(3)[compiled.outputs[0].name] == (3, 8)


def test_every_supported_op_has_a_converter_and_runs():
    """One registry from (domain, op) to its converter: every op the docs list has one, every
    host op a converter reaches is one the runtime runs and has a shape rule for."""
    ops = {op for _, op in sparsa_onnx.CONVERTERS}
    assert ops - {"QGemm"} == set(sparsa_onnx.SUPPORTED_OPS)
    from sparsa.onnx.importer import _convert_host

    host = {op for (domain, op), converter in sparsa_onnx.CONVERTERS.items()
            if converter.convert is _convert_host}
    assert host <= set(graph.HOST_OPS) and host <= set(graph.SHAPES)


def test_each_converters_opsets_are_the_ops():
    """Each ai.onnx converter's first opset is where onnx's operator schemas define the op (or
    the first opset read), checked against onnx.defs; an op used below it is refused."""
    from onnx import TensorProto, defs, helper

    low, high = sparsa_onnx.OPSETS
    for (domain, op), converter in sparsa_onnx.CONVERTERS.items():
        if domain:
            assert converter.opsets is None
            continue
        first, last = converter.opsets
        assert last == high, op
        defined = min(v for v in range(1, high + 1) if _defined(defs, op, v))
        assert first == max(low, defined), (op, first, defined)
    model = helper.make_model(helper.make_graph(
        [helper.make_node("HardSwish", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])]),
        opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(graph.ModelError, match="HardSwish is an op of ai.onnx opsets 14 to "):
        sparsa_onnx.compile(model)


def _defined(defs, op, version):
    try:
        defs.get_schema(op, version, "")
        return True
    except Exception:  # onnx's SchemaError: no such op at that opset
        return False


def test_integer_division_truncates_as_onnxruntime_does():
    """Div of integer tensors (shape arithmetic, say) is integer division truncating toward
    zero, onnxruntime's result, not a float quotient."""
    from onnx import TensorProto, helper

    a = np.array([-7, 7, -8, 9, 0], np.int64)
    b = np.array([2, -2, 3, 3, 5], np.int64)
    node = graph.Node("Div", "divide", ["a", "b"], ["c"])
    (ours,) = graph.run_host_op(node, {"a": a, "b": b})
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Div", ["a", "b"], ["c"])], "div",
        [helper.make_tensor_value_info(n, TensorProto.INT64, [5]) for n in "ab"],
        [helper.make_tensor_value_info("c", TensorProto.INT64, [5])]),
        opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    theirs = sparsa_onnx.onnxruntime_tensors(model, {"a": a, "b": b})[0]
    assert ours.dtype == np.int64 and np.array_equal(ours, theirs)
    assert ours.tolist() == [-3, -3, -2, 3, 0]
    (half,) = graph.run_host_op(node, {"a": np.float32([1, -3]), "b": np.float32([2, 2])})
    assert half.dtype == np.float32 and half.tolist() == [0.5, -1.5]
