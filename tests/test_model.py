"""The INT8 model runner (sparsa.host.model) on the reference backend: im2col against a direct
convolution, the quantized network against an independent integer pipeline built from the
golden model, accuracy on digits, and argument errors. The same networks on the simulated RTL
are in test_host_sim.py."""

import numpy as np
import pytest

import sparsa
from sparsa.host import jobs, model
from sparsa.sim import golden


def direct_conv(x, w, stride, padding):
    """Convolution as a sum over kernel offsets (no im2col), in the input's dtype promoted to
    int64 or float64; x: NCHW, w: OIHW."""
    kind = np.int64 if x.dtype.kind in "iu" else np.float64
    x = np.pad(x.astype(kind), ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    _, _, kh, kw = w.shape
    oh = (x.shape[2] - kh) // stride + 1
    ow = (x.shape[3] - kw) // stride + 1
    out = np.zeros((x.shape[0], w.shape[0], oh, ow), kind)
    for i in range(kh):
        for j in range(kw):
            window = x[:, :, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
            out += np.einsum("nchw,oc->nohw", window, w[:, :, i, j].astype(kind))
    return out


def small_cnn(rng):
    """Conv(3->6, 3x3, pad 1) ReLU, Conv(6->8, 3x3, stride 2, pad 1) ReLU, Flatten, Linear."""
    return [
        model.Conv2d(rng.normal(0, 0.3, (6, 3, 3, 3)), rng.normal(0, 0.1, 6), padding=1,
                     relu=True),
        model.Conv2d(rng.normal(0, 0.2, (8, 6, 3, 3)), rng.normal(0, 0.1, 8), stride=2,
                     padding=1, relu=True),
        model.Flatten(),
        model.Linear(rng.normal(0, 0.1, (5, 8 * 4 * 4)), rng.normal(0, 0.1, 5)),
    ]


def integer_pipeline(qmodel, x_q):
    """The int8 network computed without the runner: direct integer convolutions and plain
    matrix products, then the golden model's bias, requantization and ReLU per layer."""
    x = x_q
    for q in qmodel.layers:
        if isinstance(q, model.Flatten):
            x = x.reshape(x.shape[0], -1)
            continue
        layer = q.layer
        if isinstance(layer, model.Conv2d):
            w = q.weight.T.reshape(layer.weight.shape)  # back to OIHW
            acc = direct_conv(x, w, layer.stride, layer.padding)  # (batch, O, OH, OW), int64
            batch, channels, oh, ow = acc.shape
            y = golden.postprocess(acc.transpose(0, 2, 3, 1).reshape(-1, channels), q.bias,
                                   q.requant, layer.relu)
            x = y.reshape(batch, oh, ow, channels).transpose(0, 3, 1, 2)
        else:
            x = golden.gemm(x, q.weight, q.bias, q.requant, layer.relu)
    return x


def test_im2col_matches_direct_convolution():
    rng = np.random.default_rng(1)
    for stride, padding, size in [(1, 0, 7), (1, 1, 6), (2, 1, 9), (3, 2, 8)]:
        layer = model.Conv2d(rng.normal(size=(4, 3, 3, 2)), rng.normal(size=4), stride, padding)
        x = rng.normal(size=(2, 3, size, size + 1))
        want = direct_conv(x, layer.weight, stride, padding) + layer.bias[None, :, None, None]
        assert np.allclose(layer.forward(x), want), (stride, padding)


def test_quantized_cnn_matches_integer_pipeline():
    rng = np.random.default_rng(2)
    layers = small_cnn(rng)
    calibration = rng.normal(0, 1, (16, 3, 8, 8))
    qmodel = model.quantize_model(layers, calibration)
    x = rng.normal(0, 1, (5, 3, 8, 8))
    x_q = qmodel.quantize_input(x)
    want = integer_pipeline(qmodel, x_q)
    for config in ({}, {"device_model": True, "rows": 4, "cols": 4, "stream_width": 32,
                        "max_k": 64, "max_n": 48}):
        with sparsa.open("reference", **config) as acc:
            got = qmodel.run_int(acc, x_q)
        assert got.dtype == np.int32 and np.array_equal(got, want), config
    # Requantization between layers is per channel with one shift: on the device.
    for q in qmodel.gemm_layers[:-1]:
        mult, shift, zero = q.requant
        assert mult.shape == (q.weight.shape[1],) and isinstance(shift, int) and zero == 0
        assert jobs.plan(sparsa.open("reference").info.geometry, 10, q.weight.shape[0],
                         q.weight.shape[1], True, q.requant, True).on_device
    # The int8 network approximates the float one.
    float_out = model.forward_float(layers, x)
    int8_out = qmodel.dequantize_output(want)
    assert np.abs(int8_out - float_out).max() < 0.1 * np.abs(float_out).max()


def test_counters_add_up_over_layers():
    rng = np.random.default_rng(3)
    layers = small_cnn(rng)
    qmodel = model.quantize_model(layers, rng.normal(0, 1, (8, 3, 8, 8)))
    x_q = qmodel.quantize_input(rng.normal(0, 1, (3, 3, 8, 8)))
    with sparsa.open("reference") as acc:
        qmodel.reset_counters()
        qmodel.run_int(acc, x_q)
        first = [dict(c) for c in qmodel.counters]
        qmodel.run_int(acc, x_q)  # counters accumulate until reset
    total = qmodel.total_counters()
    # GEMM shapes: (3*8*8) x 27 x 6, (3*4*4) x 54 x 8, 3 x 128 x 5.
    products = [192 * 27 * 6, 48 * 54 * 8, 3 * 128 * 5]
    assert [c["products"] for c in first] == products
    assert total["products"] == 2 * sum(products)
    assert total["cycles"] == 2 * sum(c["cycles"] for c in first) > 0
    # The hidden layers' inputs are ReLU outputs: many zero activations, all skipped products.
    assert first[1]["zero_activation_products"] > 0
    assert all(c["macs_skipped"] >= c["zero_activation_products"] for c in first)


def test_digits_mlp_int8_accuracy_within_two_points():
    pytest.importorskip("sklearn")
    from sparsa import demo

    layers, (x_train, _), (x_test, y_test) = demo.digits_mlp()
    float_accuracy = np.mean(model.forward_float(layers, x_test).argmax(1) == y_test)
    qmodel = model.quantize_model(layers, x_train)
    with sparsa.open("reference") as acc:
        logits = qmodel.run(acc, x_test)
    int8_accuracy = np.mean(logits.argmax(1) == y_test)
    assert float_accuracy > 0.9
    assert int8_accuracy >= float_accuracy - 0.02, (float_accuracy, int8_accuracy)


@pytest.mark.parametrize("call,error,words", [
    (lambda: model.Linear(np.ones(3)), ValueError, ["weight", "2-d", "(3,)"]),
    (lambda: model.Linear(np.ones((2, 3)), np.ones(3)), ValueError, ["bias", "(2,)", "(3,)"]),
    (lambda: model.Conv2d(np.ones((2, 3, 3))), ValueError, ["weight", "4-d"]),
    (lambda: model.Conv2d(np.ones((2, 3, 3, 3)), stride=0), ValueError, ["stride", ">= 1"]),
    (lambda: model.quantize_model([], np.ones((2, 3))), ValueError, ["layers", "at least one"]),
    (lambda: model.quantize_model(["relu"], np.ones((2, 3))), TypeError, ["layers[0]", "str"]),
    (lambda: model.quantize_model([model.Linear(np.ones((2, 3)))], np.ones((2, 4))),
     ValueError, ["calibration", "(batch, 3)", "(2, 4)"]),
    (lambda: model.quantize_model([model.Conv2d(np.ones((2, 3, 3, 3)))], np.ones((2, 1, 5, 5))),
     ValueError, ["calibration", "3 input channels"]),
    (lambda: model.quantize_model([model.Linear(np.ones((2, 3)))], [[1.0, 2.0, 3.0]]),
     TypeError, ["calibration", "numpy.ndarray", "list"]),
    (lambda: model.quantize_model([model.Linear(np.ones((2, 3)))], np.full((2, 3), np.nan)),
     ValueError, ["calibration", "finite", "nan"]),
])
def test_errors_name_the_argument(call, error, words):
    with pytest.raises(error) as caught:
        call()
    for word in words:
        assert word in str(caught.value), (str(caught.value), word)


def test_run_checks_its_input():
    qmodel = model.quantize_model([model.Linear(np.ones((2, 3)))], np.ones((4, 3)))
    acc = sparsa.open("reference")
    with pytest.raises(ValueError, match=r"x: expected shape \(batch, 3\)"):
        qmodel.run(acc, np.ones((4, 5)))
    with pytest.raises(TypeError, match="x: expected dtype int8"):
        qmodel.run_int(acc, np.ones((4, 3), np.int16))
