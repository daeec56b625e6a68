"""The notebooks under notebooks/ run start to end on the reference backend (their parameters
cell set as a user without a board would set it), as a PYNQ user runs them on a board."""

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import onnx_models
import pytest

import sparsa.onnx

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def code_cells(path):
    notebook = json.loads(path.read_text())
    assert notebook["nbformat"] == 4
    return [(cell.get("metadata", {}).get("tags", []), "".join(cell["source"]))
            for cell in notebook["cells"] if cell["cell_type"] == "code"]


def run_notebook(path, parameters):
    """Run the code cells in one namespace, the cell tagged ``parameters`` followed by
    ``parameters``; returns the namespace and what the cells printed."""
    namespace, printed = {"__name__": "__main__"}, io.StringIO()
    with contextlib.redirect_stdout(printed):
        for tags, source in code_cells(path):
            exec(compile(source, f"{path.name}", "exec"), namespace)
            if "parameters" in tags:
                namespace.update(parameters)
    return namespace, printed.getvalue()


def test_pynq_notebook_runs_on_the_reference_backend(tmp_path):
    """notebooks/sparsa_on_pynq.ipynb: the self-test passes, the product is exact, and a
    compiled model runs with its per-node report."""
    model = onnx_models.cnn(np.random.default_rng(1))
    data = np.random.default_rng(2).standard_normal((32, 1, 8, 8)).astype(np.float32)
    quantized = onnx_models.quantize_static(model, data, tmp_path)
    sparsa.onnx.compile(quantized).save(tmp_path / "model.npz")
    path = NOTEBOOKS / "sparsa_on_pynq.ipynb"
    assert [tags for tags, _ in code_cells(path)][0] == ["parameters"]
    namespace, printed = run_notebook(path, {"BACKEND": "reference",
                                             "MODEL": str(tmp_path / "model.npz")})
    assert namespace["report"]["passed"] and len(namespace["report"]["jobs"]) == 15
    assert [output.shape for output in namespace["outputs"]] == [(4, 10)]
    assert "jobs exact: PASS" in printed and "total:" in printed
    assert namespace["acc"].closed


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_notebooks_are_saved_without_outputs(path):
    """Notebooks are kept as sources: no outputs or execution counts from someone's run."""
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
