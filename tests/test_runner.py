"""The simulation launcher (sim/runner.py): one build cache whatever the current folder, keyed
by the design's Verilog, progress while a build runs, and waveforms on both simulators."""

import logging
import time

import pytest

from sparsa.hw.verilog import MEMORY_TOP, memory_verilog
from sparsa.sim import runner


def memory_design(key="memory_64x512_generic", extra=""):
    return runner.Design(key, MEMORY_TOP, lambda: memory_verilog(64, 512) + extra)


def test_build_cache_is_one_folder_whatever_the_current_one(tmp_path, monkeypatch):
    monkeypatch.delenv("SPARSA_BUILD_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert runner.build_root() == tmp_path / "home" / ".cache" / "sparsa"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert runner.build_root() == tmp_path / "xdg" / "sparsa"
    monkeypatch.setenv("SPARSA_BUILD_DIR", str(tmp_path / "mine"))
    assert runner.build_root() == tmp_path / "mine"


def test_builds_keyed_by_the_verilog_and_older_ones_replaced(tmp_path, monkeypatch, icarus,
                                                             caplog):
    """The same design from another folder reuses its build; a changed design builds in a
    folder of its own, which replaces the older build of that configuration; a build says
    when it starts and how long it took."""
    monkeypatch.setenv("SPARSA_BUILD_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(runner, "_built", {})
    monkeypatch.setattr(runner, "QUIET_SECONDS", 0)
    with caplog.at_level(logging.INFO, logger="sparsa"):
        _, first = runner.build(memory_design(), icarus)
    assert first.parent == tmp_path / "cache" and (first / "sim.vvp").exists()
    assert "sparsa sim: building memory_64x512_generic-icarus in" in caplog.text
    assert "sparsa sim: built in" in caplog.text
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runner, "_built", {})
    assert runner.build(memory_design(), icarus)[1] == first
    monkeypatch.setattr(runner, "_built", {})
    _, second = runner.build(memory_design(extra="// changed\n"), icarus)
    assert second != first and second.name.startswith("memory_64x512_generic-icarus-")
    # (This process still holds the first build: it is kept until no process uses it.)
    assert first.exists()
    for handle in runner._in_use:
        handle.close()
    monkeypatch.setattr(runner, "_in_use", [])
    monkeypatch.setattr(runner, "_built", {})
    runner.build(memory_design(extra="// changed\n"), icarus)
    assert not first.exists() and second.exists()


def test_a_long_build_reports_its_progress(monkeypatch, caplog):
    """A build that takes long says what it builds, how long it has taken every so often and
    when it is done; one that is up to date (quick) says nothing."""
    monkeypatch.setattr(runner, "QUIET_SECONDS", 0.05)
    monkeypatch.setattr(runner, "PROGRESS_SECONDS", 0.05)
    with caplog.at_level(logging.INFO, logger="sparsa"):
        with runner._Progress("something"):
            time.sleep(0.3)
    assert "sparsa sim: building something" in caplog.text
    assert "sparsa sim: still building (0 s so far)" in caplog.text
    assert "sparsa sim: built in 0 s" in caplog.text
    caplog.clear()
    monkeypatch.setattr(runner, "QUIET_SECONDS", 5)
    with caplog.at_level(logging.INFO, logger="sparsa"):
        with runner._Progress("quick"):
            pass
    assert caplog.text == ""


@pytest.mark.parametrize("simulator", ["verilator", "icarus"])
def test_waves_run_writes_a_trace(tmp_path, monkeypatch, simulator, request):
    """A run with waves (what ``runner.check`` does after a failure) leaves a trace file on
    either simulator."""
    request.getfixturevalue(simulator)  # skips, saying why, where it is missing
    result = runner.run(memory_design(), simulator, "sparsa.sim.memory_tb",
                        "test_random_access", {"width": 64, "depth": 512, "cycles": 200,
                                               "seed": 1}, waves=True)
    assert result.passed, result.log_tail()
    assert result.waveform.exists() and result.waveform.stat().st_size > 0
    assert result.waveform.suffix == {"verilator": ".vcd", "icarus": ".fst"}[simulator]


def test_build_folders_are_per_installation(monkeypatch, tmp_path):
    """A build's folder follows its Verilog and the cocotb and simulator installation that
    builds it (their makefiles name each other's files): a moved or new virtual environment
    gets its own build rather than one whose makefiles point into a folder that is gone."""
    from sparsa.sim import runner

    monkeypatch.setenv("SPARSA_BUILD_DIR", str(tmp_path))
    here = runner._folder("accel_8x8-verilator", "module top; endmodule", "verilator")
    assert here == runner._folder("accel_8x8-verilator", "module top; endmodule", "verilator")
    assert here != runner._folder("accel_8x8-verilator", "module top2; endmodule", "verilator")
    assert here.parent == tmp_path and here.name.startswith("accel_8x8-verilator-")
    import cocotb

    monkeypatch.setattr(cocotb, "__file__", "/elsewhere/.venv/lib/cocotb/__init__.py")
    assert runner._folder("accel_8x8-verilator", "module top; endmodule", "verilator") != here
