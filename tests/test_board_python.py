"""The host runtime on the PYNQ v3.0 image's software: Python 3.10 with NumPy 1.21.5 and no
Amaranth, onnx or simulator.

A virtual environment of that kind is made under build/ (once; later runs reuse it), sparsa is
installed into it from this checkout, and the host tests that need no simulator run there:
the reference backend, the byte-level device model, the PYNQ transport over its stand-ins and
the model runner. Skipped, saying why, only where no Python 3.10 interpreter exists.
"""

import fcntl
import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / "build" / "board-py310"
BOARD_NUMPY = "1.21.5"  # Ubuntu jammy's, which the PYNQ v3.0 image's Python uses
HOST_TESTS = ["tests/test_board.py", "tests/test_host.py", "tests/test_model.py"]
PIP = ["-m", "pip", "--disable-pip-version-check", "--no-input"]


def python310():
    """A Python 3.10 interpreter: pyenv's, the system's or one on PATH."""
    root = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
    candidates = sorted(glob.glob(f"{root}/versions/3.10*/bin/python3.10"), reverse=True)
    candidates += ["/usr/bin/python3.10", "/usr/local/bin/python3.10", shutil.which("python3.10")]
    for candidate in filter(None, candidates):
        try:
            done = subprocess.run([candidate, "-c", "import sys, venv; print(sys.version_info[:2])"],
                                  capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0 and done.stdout.strip() == "(3, 10)":
            return candidate
    return None


def run(command, **options):
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PIP_NO_INPUT": "1"}, **options)
    assert done.returncode == 0, (f"{' '.join(map(str, command))} exited {done.returncode}:\n"
                                  f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done


@pytest.fixture(scope="module")
def board_python():
    """The venv's interpreter, with NumPy 1.21.5, pytest and sparsa (editable, no extras)."""
    interpreter = python310()
    if interpreter is None:
        pytest.skip("no Python 3.10 interpreter on this machine (the PYNQ image's version)")
    python = VENV / "bin" / "python"
    stamp = VENV / ".sparsa-installed"
    wanted = (ROOT / "pyproject.toml").read_text() + BOARD_NUMPY
    VENV.parent.mkdir(parents=True, exist_ok=True)
    # One test process makes the venv; others (pytest -n) wait for it and reuse it.
    with open(VENV.parent / "board-py310.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (stamp.exists() and stamp.read_text() == wanted and python.exists()):
            shutil.rmtree(VENV, ignore_errors=True)
            run([interpreter, "-m", "venv", str(VENV)])
            run([python, *PIP, "install", "-q", f"numpy=={BOARD_NUMPY}", "pytest>=8"])
            run([python, *PIP, "install", "-q", "--no-deps", "-e", "."])
            stamp.write_text(wanted)
    return python


def test_installing_sparsa_changes_no_board_package(board_python):
    """pip's dry run of installing this checkout where NumPy 1.21.5 is installed: sparsa is
    the only package it would install (the image's NumPy stays; pynq is on the image)."""
    done = run([board_python, *PIP, "install", "--dry-run", "--quiet", "--report", "-", "."])
    report = json.loads(done.stdout)
    installs = sorted(item["metadata"]["name"] for item in report["install"])
    assert installs == ["sparsa"]
    versions = run([board_python, "-c", "import numpy, importlib.util as u; "
                    "print(numpy.__version__, u.find_spec('amaranth') is None)"]).stdout.split()
    assert versions == [BOARD_NUMPY, "True"]


def test_host_tests_pass_on_board_python(board_python):
    """The host tests that need no simulator, under Python 3.10 + NumPy 1.21.5, no Amaranth."""
    pytest_script = board_python.parent / "pytest"
    # The board has no pytest-xdist: the project's addopts (-n auto) are left out.
    done = subprocess.run([pytest_script, "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra",
                           *HOST_TESTS],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    print(f"board Python ({sys.platform}, NumPy {BOARD_NUMPY}): {summary}")
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert " passed" in summary and " failed" not in summary


def test_compiled_models_run_on_board_python(board_python, tmp_path):
    """Models compiled here (onnx and onnxruntime present) are saved, then loaded and run under
    Python 3.10 + NumPy 1.21.5 with neither: the outputs equal this machine's, bit for bit,
    on the reference and on the byte-level device model, and through sparsa serve's core."""
    pytest.importorskip("onnxruntime")
    import numpy as np

    import onnx_models  # tests/onnx_models.py
    import sparsa
    from sparsa import onnx as sparsa_onnx

    rng = np.random.default_rng(0)
    cases = {
        "cnn": (onnx_models.quantize_static(
            onnx_models.cnn(rng), rng.standard_normal((32, 1, 8, 8)).astype(np.float32),
            tmp_path, "QDQ", "QUInt8", True), (3, 1, 8, 8)),
        "ffn": (onnx_models.quantize_dynamic(onnx_models.ffn(rng), tmp_path, ["MatMul", "Gemm"]),
                (3, 4, 16)),
    }
    expected = {}
    for name, (model, shape) in cases.items():
        compiled = sparsa_onnx.compile(model)
        compiled.save(tmp_path / f"{name}.npz")
        x = rng.standard_normal(shape).astype(np.float32)
        np.save(tmp_path / f"{name}_x.npy", x)
        with sparsa.open("reference", rows=4, cols=4) as acc:
            expected[name] = compiled.run(acc, x)
    script = f"""
import numpy as np, sparsa
from sparsa.onnx import load
for name in {sorted(cases)!r}:
    model = load({str(tmp_path)!r} + f"/{{name}}.npz")
    x = np.load({str(tmp_path)!r} + f"/{{name}}_x.npy")
    for device_model in (False, True):
        with sparsa.open("reference", rows=4, cols=4, device_model=device_model) as acc:
            outputs = model.run(acc, x)
        np.savez({str(tmp_path)!r} + f"/{{name}}_{{device_model}}.npz", *outputs)
# sparsa serve's core (batching, instances) needs no more than NumPy.
from sparsa import serve
x = np.load({str(tmp_path)!r} + "/cnn_x.npy")
server = serve.Server([serve.ServedModel("cnn", {str(tmp_path)!r} + "/cnn.npz")],
                      [serve.Instance(lambda: sparsa.open("reference", rows=4, cols=4))])
requests = [server.models["cnn"].submit({{"x": x[i:i + 1]}}) for i in range(len(x))]
np.save({str(tmp_path)!r} + "/served.npy",
        np.concatenate([r.future.result(timeout=60)[0] for r in requests]))
server.close()
"""
    run([board_python, "-c", script], timeout=300)
    for name, want in expected.items():
        for device_model in (False, True):
            with np.load(tmp_path / f"{name}_{device_model}.npz") as got:
                assert len(got.files) == len(want)
                for index, value in enumerate(want):
                    assert np.array_equal(got[f"arr_{index}"], value), (name, device_model)
    assert np.array_equal(np.load(tmp_path / "served.npy"), expected["cnn"][0])
