"""The command line's answers to a user's mistakes: an exit status of 1 or 2 and one line on
stderr naming the argument and what is wrong, never a traceback; --version; help with
defaults and an example."""

import numpy as np
import pytest

from sparsa import cli


def mistakes(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a model")
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((1, 3), np.float32))
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"not onnx")
    return [
        (["compile", str(onnx_file), "-o", "/proc/sparsa/model.npz"],
         "--output /proc/sparsa/model.npz: cannot be written"),
        (["compile", str(onnx_file), "-o", str(folder)], f"--output {folder}: is a folder"),
        (["compile", str(tmp_path / "absent.onnx"), "-o", str(tmp_path / "m.npz")],
         "cannot read absent.onnx as ONNX"),
        (["infer", str(junk), "--input", str(x), "--output", str(folder)],
         f"--output {folder}: is a folder"),
        (["infer", str(junk), "--input", str(x), "--backend", "reference"],
         "is not a model sparsa saved"),
        (["infer", str(junk), "--input", str(tmp_path / "absent.npy")], "--input"),
        (["run", "--backend", "pynq", "-m", "4", "-k", "4", "-n", "4"],
         "--backend pynq: backend 'pynq' needs the pynq package"),
        (["run", "--backend", "reference", "-m", "100000", "-k", "100000", "-n", "100000"],
         "-m 100000 -k 100000 -n 100000: needs about"),
        (["verilog", "--max-k", "6", "-o", str(tmp_path / "v.v")],
         "the build: max_k must be a multiple of 4"),
        (["selftest", "--backend", "reference", "--json", str(folder)],
         f"--json {folder}: is a folder"),
        (["bench", "models", "--out", "/proc/sparsa/bench"], "--out /proc/sparsa/bench: cannot"),
    ]


def test_each_mistake_is_one_line_and_a_status(tmp_path, capsys):
    pytest.importorskip("onnx")
    for argv, fragment in mistakes(tmp_path):
        status = cli.main(argv)
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert status in (1, 2), (argv, status, err)
        assert len(lines) == 1 and fragment in lines[0], (argv, err)
        assert "Traceback" not in err
    assert not (tmp_path / "v.v").exists()  # nothing written for a refused command


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("sparsa ")
    for command in cli.EXAMPLES:
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        out = capsys.readouterr().out
        assert f"example:\n  {cli.EXAMPLES[command]}" in out and "``" not in out, command
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    assert "(default: 64)" in capsys.readouterr().out
