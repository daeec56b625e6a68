"""The main demo: two digit classifiers exported to ONNX, quantized by onnxruntime, compiled by
sparsa, run on the simulated accelerator and the reference backend.

The data are the 8x8 digit images bundled with scikit-learn (no download). The models:

- an MLP (64 -> 64 -> 32 -> 10, ReLU) fitted by scikit-learn and exported by skl2onnx;
- a CNN: Conv 3x3 (8 filters: the leading principal components of the training images' 3x3
  patches) - ReLU - MaxPool 2x2 - Conv 4x4 (64 channels) - ReLU - GlobalAveragePool - Gemm,
  whose second convolution and Gemm are an MLP fitted on the pooled feature maps.

Each is pre-processed and quantized by onnxruntime (``quant_pre_process``, ``quantize_static``:
QDQ, symmetric int8 activations, 7-bit int8 weights, calibrated on training images), compiled with
:func:`sparsa.onnx.compile` and run on the test split; the figures compare with the float model,
with onnxruntime running the same quantized model and with sparsa's own quantizer (the float
model compiled with calibration data).
"""

import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from sparsa.host import model


def digits(seed=0):
    """``(x_train, y_train), (x_test, y_test)``: the digits, pixels scaled to 0..1."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data / 16.0, data.target, test_size=0.25, random_state=seed, stratify=data.target)
    return (x_train, y_train), (x_test, y_test)


def _fit_mlp(x, y, hidden, seed):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    classifier = MLPClassifier(hidden_layer_sizes=tuple(hidden), max_iter=400,
                               random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        classifier.fit(x, y)
    return classifier


def digits_mlp(hidden=(64, 32), seed=0):
    """``(layers, (x_train, y_train), (x_test, y_test))``: the float MLP fitted on digits as
    :class:`~sparsa.host.model.Linear` layers (for :mod:`sparsa.host.model`)."""
    train, test = digits(seed)
    classifier = _fit_mlp(*train, hidden, seed)
    last = len(classifier.coefs_) - 1
    layers = [model.Linear(w.T, b, relu=index < last)
              for index, (w, b) in enumerate(zip(classifier.coefs_, classifier.intercepts_))]
    return layers, train, test


def mlp_onnx(x_train, y_train, hidden=(64, 32), seed=0):
    """The MLP as skl2onnx exports it (outputs "label" and "probabilities")."""
    from skl2onnx import to_onnx

    classifier = _fit_mlp(x_train, y_train, hidden, seed)
    return to_onnx(classifier, x_train[:1].astype(np.float32),
                   options={id(classifier): {"zipmap": False}},
                   target_opset={"": 17, "ai.onnx.ml": 3})


def _pca_filters(images, count):
    """The ``count`` leading principal components of the images' 3x3 patches."""
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1)))
    patches = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(1, 2))
    patches = patches.reshape(-1, 9)
    patches = patches - patches.mean(axis=1, keepdims=True)
    _, _, components = np.linalg.svd(patches[::7], full_matrices=False)
    return components[:count].reshape(count, 1, 3, 3)


def cnn_onnx(x_train, y_train, seed=0, filters=8, channels=64):
    """The CNN as an ONNX model (input "x": N x 1 x 8 x 8, output "logits")."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    images = x_train.reshape(-1, 8, 8)
    w1 = _pca_filters(images, filters).astype(np.float32)
    b1 = np.zeros(filters, np.float32)
    # The pooled feature maps the first layers give, computed here to fit the rest on.
    from sparsa.host.graph import im2col

    columns, _ = im2col(images[:, None], (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 0.0)
    features = np.maximum(columns @ w1.reshape(filters, 9).T, 0)
    features = features.reshape(len(images), 4, 2, 4, 2, filters).max(axis=(2, 4))
    features = features.transpose(0, 3, 1, 2).reshape(len(images), -1)  # (N, C*4*4)
    head = _fit_mlp(features, y_train, (channels,), seed)
    w2 = head.coefs_[0].T.reshape(channels, filters, 4, 4).astype(np.float32)
    b2 = head.intercepts_[0].astype(np.float32)
    w3 = head.coefs_[1].T.astype(np.float32)  # (10, channels)
    b3 = head.intercepts_[1].astype(np.float32)
    constants = [numpy_helper.from_array(value, name) for name, value in
                 (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2), ("w3", w3), ("b3", b3))]
    node = helper.make_node
    nodes = [node("Conv", ["x", "w1", "b1"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
             node("Relu", ["c1"], ["r1"], "relu1"),
             node("MaxPool", ["r1"], ["p1"], "pool1", kernel_shape=[2, 2], strides=[2, 2]),
             node("Conv", ["p1", "w2", "b2"], ["c2"], "conv2"),
             node("Relu", ["c2"], ["r2"], "relu2"),
             node("GlobalAveragePool", ["r2"], ["g"], "pool2"),
             node("Flatten", ["g"], ["f"], "flatten"),
             node("Gemm", ["f", "w3", "b3"], ["logits"], "fc", transB=1)]
    graph = helper.make_graph(
        nodes, "digits_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], constants)
    result = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result.ir_version = 9
    onnx.checker.check_model(result)
    return result


class Calibration:
    """onnxruntime's CalibrationDataReader: ``data`` under the input ``name``, in batches."""

    def __init__(self, name, data, batch=64):
        self._batches = iter([{name: data[i:i + batch]} for i in range(0, len(data), batch)])

    def get_next(self):
        return next(self._batches, None)


def quantize_with_onnxruntime(float_model, calibration, directory, per_channel,
                              reduce_range=True):
    """onnxruntime's recommended flow: ``quant_pre_process`` (shape inference, MatMul + Add to
    Gemm), then ``quantize_static`` (QDQ, symmetric int8 activations, int8 weights per tensor
    or per channel, 7-bit with ``reduce_range``).

    ``reduce_range`` is what onnxruntime advises for its x86 CPU kernels, whose int16 pair sums
    saturate with full-range weights (then onnxruntime's optimized run disagrees with its own
    unoptimized one). The device needs no such margin; it is on by default so that onnxruntime
    is a fair reference."""
    import logging

    import onnx
    from onnxruntime import quantization
    from onnxruntime.quantization.shape_inference import quant_pre_process

    directory = Path(directory)
    name = float_model.graph.name or "model"
    source, prepared, target = (directory / f"{name}{suffix}.onnx"
                                for suffix in ("", "_prepared", "_int8"))
    onnx.save(float_model, source)
    logging.getLogger().setLevel(logging.ERROR)  # quantize_static's advice is followed here
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    quantization.quantize_static(
        str(prepared), str(target), Calibration(float_model.graph.input[0].name, calibration),
        quant_format=quantization.QuantFormat.QDQ, activation_type=quantization.QuantType.QInt8,
        weight_type=quantization.QuantType.QInt8, per_channel=per_channel,
        reduce_range=reduce_range,
        # Zero point 0 for activations: a ReLU's zeros stay zeros, which sparse-skip skips.
        extra_options={"ActivationSymmetric": True})
    return onnx.load(target)


def _pruned_2_4(float_model, name, train, test, labels, outputs, directory, per_channel,
                reduce_range, reference, compiled):
    """The model with its GEMM weights pruned 2:4 along K (:func:`sparsa.onnx.prune_weights`),
    quantized by onnxruntime as the dense one is, compiled into ``compiled[name + " 2:4"]``:
    its float and int8 accuracy, the int8 weights' zero fraction and the reference's
    outputs."""
    from sparsa import onnx as sparsa_onnx

    pruned, _ = sparsa_onnx.prune_weights(float_model, "2:4")
    pruned.graph.name = f"{float_model.graph.name or 'model'}_2of4"
    quantized = quantize_with_onnxruntime(pruned, train[:512], directory, per_channel,
                                          reduce_range)
    model = compiled[f"{name} 2:4"] = sparsa_onnx.compile(quantized, outputs=outputs)
    float_out = sparsa_onnx.onnxruntime_tensors(pruned, {pruned.graph.input[0].name: test})
    float_out = float_out[-1] if outputs else float_out[0]
    ours = model.run(reference, test)[0]
    weights = [model.constants[node.attrs["weight"]] for node in model.nodes
               if node.op == "QGemm"]
    return {"weight_zeros": sum(int(np.sum(w == 0)) for w in weights)
            / sum(w.size for w in weights),
            "float_accuracy": float(np.mean(float_out.argmax(1) == labels)),
            "int8_accuracy": float(np.mean(ours.argmax(1) == labels)), "reference": ours}


def _on_device(model, device, images, reference):
    """``model`` run on ``device``: how many images' outputs equal ``reference``'s (the
    reference backend's, for at least these images), and the run's counters."""
    ours = model.run(device, images)[0]
    identical = int(np.sum(np.all(ours == reference[:len(images)], axis=1)))
    return identical, model.run_counters()


def run(config, simulator="verilator", clock_mhz=100.0, seed=0, sim_images=None,
        reduce_range=True, printer=print):
    """Run the demo, printing as it goes; returns a dict of the figures (and 0/1 in
    "status")."""
    import sparsa
    from sparsa import onnx as sparsa_onnx

    (x_train, y_train), (x_test, y_test) = digits(seed)
    x_train = x_train.astype(np.float32)
    x_test = x_test.astype(np.float32)
    sim_count = len(x_test) if sim_images is None else min(sim_images, len(x_test))
    printer(f"sparsa demo: two digit classifiers (scikit-learn's 8x8 digits: {len(x_train)} "
            f"training, {len(x_test)} test images) exported to ONNX, quantized by onnxruntime, "
            f"compiled by sparsa, run on the reference backend and the simulated RTL")
    started = time.perf_counter()
    # Weights per tensor for the MLP: onnxruntime's per-channel quantization of a Gemm without
    # transB (how the pre-processing writes skl2onnx's MatMul + Add) writes bias scales that
    # onnxruntime itself then refuses to run.
    models = {"MLP": (mlp_onnx(x_train, y_train, seed=seed), x_train, x_test, ["probabilities"],
                      "skl2onnx MLPClassifier 64-64-32-10, weights per tensor", False),
              "CNN": (cnn_onnx(x_train, y_train, seed), x_train.reshape(-1, 1, 8, 8),
                      x_test.reshape(-1, 1, 8, 8), None,
                      "conv3x3(8)-relu-maxpool-conv4x4(64)-relu-globalpool-gemm, weights per "
                      "channel", True)}
    printer(f"  float models fitted and exported in {time.perf_counter() - started:.1f} s")
    figures = {"images": len(x_test), "sim_images": sim_count, "models": {}}
    compiled = {}
    with tempfile.TemporaryDirectory() as directory, sparsa.open("reference", **config) as ref:
        for name, (float_model, train, test, outputs, description, per_channel) in \
                models.items():
            started = time.perf_counter()
            quantized = quantize_with_onnxruntime(float_model, train[:512], directory,
                                                  per_channel, reduce_range)
            compiled[name] = sparsa_onnx.compile(quantized, outputs=outputs)
            seconds = time.perf_counter() - started
            float_out = sparsa_onnx.onnxruntime_tensors(float_model, {
                float_model.graph.input[0].name: test})
            float_out = float_out[-1] if outputs else float_out[0]  # skl2onnx: label first
            feeds = {quantized.graph.input[0].name: test}
            ort_out, ort_unfused = (
                sparsa_onnx.onnxruntime_tensors(quantized, feeds, outputs, optimize=optimize)
                for optimize in (True, False))
            if outputs:
                ort_out, ort_unfused = ort_out[outputs[0]], ort_unfused[outputs[0]]
            else:
                ort_out, ort_unfused = ort_out[0], ort_unfused[0]
            ours = compiled[name].run(ref, test)[0]
            agreement = sparsa_onnx.node_agreement(
                quantized, compiled[name], {quantized.graph.input[0].name: test}, ref)
            row = {"float_accuracy": float(np.mean(float_out.argmax(1) == y_test)),
                   "onnxruntime_accuracy": float(np.mean(ort_out.argmax(1) == y_test)),
                   "int8_accuracy": float(np.mean(ours.argmax(1) == y_test)),
                   "top1_agreement": float(np.mean(ours.argmax(1) == ort_out.argmax(1))),
                   "top1_agreement_unfused": float(np.mean(ours.argmax(1)
                                                           == ort_unfused.argmax(1))),
                   "max_difference_unfused": float(np.abs(ours - ort_unfused).max()),
                   "node_agreement": min(equal for equal, _ in agreement.values()),
                   "node_max_difference": max(diff for _, diff in agreement.values()),
                   "accelerated_nodes": len(agreement),
                   "compile_s": seconds, "reference": ours}
            own = sparsa_onnx.compile(float_model, calibration=train[:512], outputs=outputs)
            row["own_quantizer_accuracy"] = float(np.mean(own.run(ref, test)[0].argmax(1)
                                                          == y_test))
            row["pruned"] = _pruned_2_4(float_model, name, train, test, y_test, outputs,
                                        directory, per_channel, reduce_range, ref, compiled)
            figures["models"][name] = row
            printer(f"  {name} ({description}): quantized by onnxruntime and compiled in "
                    f"{seconds:.1f} s, {len(agreement)} of {len(compiled[name].nodes)} nodes on "
                    f"the accelerator")
            printer(f"    accuracy: float {100 * row['float_accuracy']:.2f}%, onnxruntime int8 "
                    f"{100 * row['onnxruntime_accuracy']:.2f}%, sparsa int8 "
                    f"{100 * row['int8_accuracy']:.2f}% (sparsa's own quantizer, from the "
                    f"float model and calibration images: "
                    f"{100 * row['own_quantizer_accuracy']:.2f}%)")
            printer(f"    against onnxruntime on the same int8 model: top-1 agrees on "
                    f"{100 * row['top1_agreement']:.2f}% of images (its graph as written, "
                    f"without its fusions: {100 * row['top1_agreement_unfused']:.2f}%, outputs "
                    f"within {row['max_difference_unfused']:g}); each accelerated node's int8 "
                    f"output, fed onnxruntime's input, equal on "
                    f">= {100 * row['node_agreement']:.3f}% of elements (largest difference "
                    f"{row['node_max_difference']:g})")
            pruned = row["pruned"]
            printer(f"    its weights pruned 2:4 by magnitude before quantizing (no fine-tuning; "
                    f"{100 * pruned['weight_zeros']:.1f}% of the int8 weights zero): accuracy "
                    f"float {100 * pruned['float_accuracy']:.2f}%, sparsa int8 "
                    f"{100 * pruned['int8_accuracy']:.2f}%")
        started = time.perf_counter()
        with sparsa.open("sim", simulator=simulator, **config) as device:
            printer(f"  {device!r}: built and started in {time.perf_counter() - started:.1f} s")
            status = 0
            for name, (_, _, test, _, _, _) in models.items():
                row = figures["models"][name]
                started = time.perf_counter()
                identical, counters = _on_device(compiled[name], device, test[:sim_count],
                                                 row.pop("reference"))
                seconds = time.perf_counter() - started
                cycles = counters["cycles"]
                per_image = cycles / (clock_mhz * 1e6) / sim_count
                row.update(identical=identical, cycles=cycles, macs=counters["macs"],
                           macs_skipped=counters["macs_skipped"],
                           products=counters["products"], us_per_image=1e6 * per_image,
                           sim_s=seconds)
                pruned = row["pruned"]
                pruned_identical, pruned_counters = _on_device(
                    compiled[f"{name} 2:4"], device, test[:sim_count], pruned.pop("reference"))
                pruned.update(identical=pruned_identical, cycles=pruned_counters["cycles"])
                if identical != sim_count or pruned_identical != sim_count:
                    status = 1
                printer(f"    {name} on the simulated RTL: outputs identical to the reference "
                        f"for {identical} of {sim_count} images"
                        f"{' (bit-exact)' if identical == sim_count else ' -- MISMATCH'} in "
                        f"{seconds:.1f} s; {cycles} cycles, {counters['macs_skipped']} of "
                        f"{counters['products']} products skipped as zero; projected "
                        f"{1e6 * per_image:.2f} us per image at {clock_mhz:g} MHz (array time)")
                printer(f"      with 2:4 weights: identical for {pruned_identical} of "
                        f"{sim_count} images; {pruned['cycles']} cycles, the dense model's "
                        f"{cycles} / {cycles / pruned['cycles']:.2f}")
            printer("  the CNN's per-layer report on the simulated RTL "
                    f"({sim_count} images):")
            for line in compiled["CNN"].summary(batch=sim_count).splitlines():
                printer("    " + line)
    figures["status"] = status
    return figures
