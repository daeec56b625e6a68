"""Malformed compiled-model files: each refused by ``load`` with a ModelError naming the file,
the node or part and what is wrong; never a raw library error, never a model that runs and
gives other outputs."""

import io
import json
import zipfile

import numpy as np
import pytest

from sparsa.host import graph

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A compiled CNN (device-mode QGemms, a grouped convolution, pooling, Q/DQ) as the bytes
    of its .npz and its parts."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import onnx_models

    from sparsa import onnx as sparsa_onnx

    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("files")
    model = onnx_models.quantize_static(onnx_models.cnn(rng),
                                        rng.standard_normal((16, 1, 8, 8)).astype(np.float32),
                                        folder)
    compiled = sparsa_onnx.compile(model)
    compiled.save(folder / "model.npz")
    return (folder / "model.npz").read_bytes()


def parts(data):
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    return json.loads(bytes(arrays.pop("graph")).decode()), arrays


def rebuild(graph_, arrays):
    buffer = io.BytesIO()
    np.savez(buffer, graph=np.frombuffer(json.dumps(graph_).encode(), np.uint8), **arrays)
    return buffer.getvalue()


def qgemm(graph_, index=0):
    return [node for node in graph_["nodes"] if node["op"] == "QGemm"][index]


def constant_of(graph_, arrays, attribute, index=0):
    return "const/" + qgemm(graph_, index)["attrs"][attribute]


def edit_attr(attribute, value, index=0):
    def edit(graph_, arrays):
        qgemm(graph_, index)["attrs"][attribute] = value
    return edit


def edit_constant(attribute, function, index=0):
    def edit(graph_, arrays):
        key = constant_of(graph_, arrays, attribute, index)
        arrays[key] = function(arrays[key])
    return edit


def edit_quantize(function):
    def edit(graph_, arrays):
        node = next(n for n in graph_["nodes"] if n["op"] == "QuantizeLinear")
        key = "const/" + node["inputs"][function[0]]
        arrays[key] = function[1](arrays[key])
    return edit


def drop_node_key(key):
    def edit(graph_, arrays):
        del graph_["nodes"][1][key]
    return edit


CASES = [
    ("groups 0", edit_attr("groups", 0), "attribute 'groups'"),
    ("groups not an int", edit_attr("groups", "2"), "attribute 'groups'"),
    ("k 0", edit_attr("k", 0), "attribute 'k'"),
    ("n not a multiple of groups", edit_attr("n", 7, 1), "attribute 'n'"),
    ("unknown mode", edit_attr("mode", "turbo"), "attribute 'mode'"),
    ("shift 40", edit_attr("shift", 40), "attribute 'shift'"),
    ("out_zero 300", edit_attr("out_zero", 300), "attribute 'out_zero'"),
    ("x_zero -129", edit_attr("x_zero", -129), "attribute 'x_zero'"),
    ("relu a string", edit_attr("relu", "yes"), "attribute 'relu'"),
    ("clip of three", edit_attr("clip", [0, 1, 2]), "attribute 'clip'"),
    ("conv stride 0", lambda g, a: qgemm(g)["attrs"]["conv"].update(strides=[0, 1]),
     "attribute 'conv'"),
    ("conv negative pad", lambda g, a: qgemm(g)["attrs"]["conv"].update(pads=[-1, 0, 0, 0]),
     "attribute 'conv'"),
    ("an unknown attribute", edit_attr("turbo", True), "attribute 'turbo'"),
    ("no weight attribute", lambda g, a: qgemm(g)["attrs"].pop("weight"),
     "attribute 'weight': expected constant: int8 (groups, k, n / groups), got absent"),
    ("a scale in the device mode", edit_attr("scale", "x"), "'x' in the device mode"),
    ("QMatMul multiplier 0", lambda g, a: g["nodes"].__setitem__(1, {
        **g["nodes"][1], "op": "QMatMul", "attrs": {"a_zero": 0, "b_zero": 0, "out_zero": 0,
                                                    "multiplier": 0, "shift": 3}}),
     "attribute 'multiplier': expected an int in 1..2147483647, got 0"),
    ("missing weight constant", edit_attr("weight", "nowhere"), "not one of the model's"),
    ("weight of another shape", edit_constant("weight", lambda w: w[:, :-1]),
     "attribute 'weight'"),
    ("float weights", edit_constant("weight", lambda w: w.astype(np.float32)),
     "attribute 'weight'"),
    ("float multiplier", edit_constant("multiplier", lambda m: m.astype(np.float64)),
     "attribute 'multiplier'"),
    ("multiplier past int32", edit_constant("multiplier", lambda m: m.astype(np.int64) + 2**32),
     "attribute 'multiplier'"),
    ("bias of another length", edit_constant("bias", lambda b: b[:-1]), "attribute 'bias'"),
    ("negative scale", edit_quantize((1, lambda s: -s)), "scale"),
    ("NaN scale", edit_quantize((1, lambda s: np.full_like(s, np.nan))), "scale"),
    ("zero point 300", edit_quantize((2, lambda z: np.full(z.shape, 300, np.int64))),
     "zero point"),
    ("a node without attrs", drop_node_key("attrs"), "node 1: expected op"),
    ("an input from nowhere", lambda g, a: g["nodes"][2]["inputs"].__setitem__(0, "ghost"),
     "produced by no earlier node"),
    ("an op the runtime lacks", lambda g, a: g["nodes"][2].update(op="Einsum"),
     "not an op this runtime has"),
    ("pooling stride 0", lambda g, a: next(n for n in g["nodes"] if n["op"] == "MaxPool")[
        "attrs"].update(strides=[0, 2]), "attribute 'strides'"),
    ("nodes not a list", lambda g, a: g.update(nodes={}), "'nodes': expected a list"),
    ("an input without a dtype", lambda g, a: g["inputs"][0].pop("dtype"),
     "the graph's inputs"),
    ("an output of no node", lambda g, a: g["outputs"][0].update(name="ghost"),
     "produced by no node"),
    ("another format", lambda g, a: g.update(format="other"), "not a sparsa compiled model"),
    ("another version", lambda g, a: g.update(version=99), "format version 99"),
]


@pytest.mark.parametrize("label,edit,fragment", CASES, ids=[case[0] for case in CASES])
def test_malformed_model_refused(saved, tmp_path, label, edit, fragment):
    graph_, arrays = parts(saved)
    edit(graph_, arrays)
    path = tmp_path / "model.npz"
    path.write_bytes(rebuild(graph_, arrays))
    with pytest.raises(graph.ModelError) as error:
        graph.load(path)
    assert fragment in str(error.value) and str(path) in str(error.value), str(error.value)


@pytest.mark.parametrize("label,content", [
    ("empty", b""), ("not a zip", b"PK\x03\x04 but not really"), ("junk", b"\x00" * 100),
    ("an .npy", None), ("JSON that is not an object", "list"), ("JSON that is not JSON", "bad"),
    ("no graph", "nograph"),
])
def test_files_that_are_not_models_refused(saved, tmp_path, label, content):
    path = tmp_path / "model.npz"
    if content is None:
        np.save(path.with_suffix(".npy"), np.zeros(3))
        path = path.with_suffix(".npy")
    elif content == "list":
        path.write_bytes(_archive({"graph": b"[1, 2]"}))
    elif content == "bad":
        path.write_bytes(_archive({"graph": b"{not json"}))
    elif content == "nograph":
        path.write_bytes(_archive({"const/x": b"1"}))
    else:
        path.write_bytes(content)
    with pytest.raises(graph.ModelError, match="model.np"):
        graph.load(path)


def _archive(entries):
    buffer = io.BytesIO()
    arrays = {key: np.frombuffer(value, np.uint8) for key, value in entries.items()}
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def test_truncated_files_refused(saved, tmp_path):
    path = tmp_path / "model.npz"
    for size in (10, len(saved) // 2, len(saved) - 20):
        path.write_bytes(saved[:size])
        with pytest.raises(graph.ModelError, match="model.npz"):
            graph.load(path)


def test_unused_constants_are_not_read_and_the_model_still_loads(saved, tmp_path):
    """Only the constants the graph names are read: a large array nobody uses costs nothing
    (a zip entry claiming gigabytes would otherwise be allocated)."""
    graph_, arrays = parts(saved)
    path = tmp_path / "model.npz"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for key, value in {**arrays, "graph": np.frombuffer(json.dumps(graph_).encode(),
                                                            np.uint8)}.items():
            with archive.open(f"{key}.npy", "w") as entry:
                np.lib.format.write_array(entry, value)
        with archive.open("const/unused.npy", "w") as entry:  # 1 GiB of zeros, compressed
            np.lib.format.write_array_header_1_0(
                entry, {"descr": "|u1", "fortran_order": False, "shape": (2**30,)})
            block = bytes(2**20)
            for _ in range(2**10):
                entry.write(block)
    path.write_bytes(buffer.getvalue())
    assert path.stat().st_size < 5 * 2**20
    model = graph.load(path)
    assert "unused" not in model.constants
    x = np.random.default_rng(1).standard_normal((2, 1, 8, 8)).astype(np.float32)
    import sparsa

    with sparsa.open("reference") as acc:
        assert np.array_equal(model.run(acc, x)[0], graph.load(io.BytesIO(saved)).run(acc, x)[0])


def test_device_nodes_are_their_records(saved, tmp_path):
    """A loaded model's device nodes carry their typed records (what the runtime reads),
    whose JSON form is what the file holds."""
    from sparsa.host import schema

    path = tmp_path / "model.npz"
    path.write_bytes(saved)
    model = graph.load(path)
    device = [node for node in model.nodes if node.op in schema.RECORDS]
    assert device and all(isinstance(node.spec, schema.QGemm) for node in device)
    graph_, _ = parts(saved)
    written = {node["name"]: node["attrs"] for node in graph_["nodes"]}
    for node in device:
        assert node.spec.attrs() == written[node.name]
        assert set(written[node.name]) <= set(schema.QGemm.docs())
