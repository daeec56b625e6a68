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
