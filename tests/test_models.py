"""The benchmark networks of sparsa/models.py: valid ONNX, quantized by onnxruntime, compiled
by sparsa and run on the reference backend, every accelerated node's int8 output equal to
onnxruntime's on at least 99.9% of elements (fed onnxruntime's own inputs)."""

import numpy as np
import pytest

from sparsa import models

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("build,per_channel", [(models.mobilenet_v2, True),
                                               (models.resnet18, False)],
                         ids=["mobilenet_v2", "resnet18"])
def test_benchmark_networks_run_as_onnxruntime_does(build, per_channel, tmp_path):
    import sparsa
    from sparsa import onnx as sparsa_onnx
    from sparsa.demo import quantize_with_onnxruntime

    rng = np.random.default_rng(0)
    model = build(rng)
    onnx.checker.check_model(model)
    calibration = rng.standard_normal((8, *models.INPUT)).astype(np.float32)
    quantized = quantize_with_onnxruntime(model, calibration, tmp_path, per_channel)
    compiled = sparsa_onnx.compile(quantized)
    grouped = [node for node in compiled.nodes if node.op == "QGemm"
               and node.attrs["groups"] > 1]
    assert len(grouped) == (7 if build is models.mobilenet_v2 else 0)
    x = rng.standard_normal((2, *models.INPUT)).astype(np.float32)
    with sparsa.open("reference") as acc:
        agreement = sparsa_onnx.node_agreement(quantized, compiled, {"x": x}, acc)
        compiled.run(acc, x)
    assert agreement and all(equal >= 0.999 and largest <= 1
                             for equal, largest in agreement.values()), agreement
    # The depthwise layers' channels side by side, 28 to a call (K = 9 each, MAX_K 256).
    calls = {node.name: stats["calls"] for node, stats in zip(compiled.nodes, compiled.last_run)}
    assert [calls[node.name] for node in grouped] == [-(-node.attrs["groups"] // 28)
                                                      for node in grouped]


def test_residual_adds_run_fused_with_the_unfused_results(tmp_path):
    """The ResNet-style network's residual adds (DequantizeLinear of both int8 branches, Add,
    QuantizeLinear, Relu) run as one table lookup each: the outputs equal those of every node
    run on its own (a run that keeps the intermediate tensors runs unfused), on inputs wide
    enough to saturate, and on a batch that the table's shapes do not fix."""
    import sparsa
    from sparsa import onnx as sparsa_onnx
    from sparsa.demo import quantize_with_onnxruntime

    rng = np.random.default_rng(3)
    calibration = rng.standard_normal((4, *models.INPUT)).astype(np.float32)
    compiled = sparsa_onnx.compile(quantize_with_onnxruntime(models.resnet18(rng), calibration,
                                                              tmp_path, False))
    fused = compiled._fused()
    adds = [i for i, step in fused.items() if step is not sparsa.host.graph._FUSED_AWAY]
    assert len(adds) == 8 and all(compiled.nodes[i].op == "Add" for i in adds)
    # Each: its two dequantizations, its quantization and Relu fused away.
    assert len(fused) == 8 * 5
    names = [out for node in compiled.nodes for out in node.outputs]
    with sparsa.open("reference") as acc:
        for scale, batch in ((1.0, 2), (6.0, 3)):
            x = (scale * rng.standard_normal((batch, *models.INPUT))).astype(np.float32)
            fast = compiled.run(acc, x)
            slow, tensors = compiled.run(acc, x, keep=names)
            assert all(np.array_equal(a, b) for a, b in zip(fast, slow))
            # The adds' outputs saturate somewhere and take many values: the table is used.
            relu = compiled.nodes[adds[-1] + 2].outputs[0]
            assert len(np.unique(tensors[relu])) > 50
