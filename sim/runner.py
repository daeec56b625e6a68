"""Build generated Verilog once per configuration and run cocotb testbenches against it.

A :class:`Design` names a top module and how to generate its Verilog. :func:`run` builds it for a
simulator (once per process and design, and incrementally on disk) and runs one cocotb test of a
testbench module, handing the testbench its settings as JSON in ``SPARSA_TB``. :func:`check` runs a
test and, when it fails, runs it again with waveform tracing and raises with the waveform's path.

Builds live under ``$SPARSA_BUILD_DIR`` (default ``build/sim`` in the current folder).
"""

import fcntl
import json
import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import toolchain

# Simulation models of the vendor primitives a DSP style instantiates (see sparsa.hw.dsp and
# sparsa.hw.bram), appended to the generated Verilog of such a build.
PRIMITIVE_MODELS = {"ecp5": (Path(__file__).with_name("mult18x18d.v"),
                            Path(__file__).with_name("dp16kd.v"))}


def primitive_models(dsp):
    """The model files a build of DSP style ``dsp`` needs (none for ``"generic"``)."""
    return PRIMITIVE_MODELS.get(dsp, ())


def with_primitive_models(verilog_text, dsp):
    """``verilog_text`` with the models of the primitives its DSP style instantiates."""
    return verilog_text + "".join("\n" + model.read_text() for model in primitive_models(dsp))


@dataclass(frozen=True)
class Design:
    """A top module ``top`` whose Verilog ``generate()`` returns; ``key`` names the configuration."""

    key: str
    top: str
    generate: Callable[[], str]


@dataclass(frozen=True)
class RunResult:
    passed: bool
    tests: int
    failed: int
    results_xml: Path
    log: Path
    waveform: Path | None

    def log_tail(self, lines=40):
        text = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return "\n".join(text[-lines:])


def accelerator_design(cfg):
    """The accelerator built with ``cfg`` (``sparsa.hw.Accelerator``'s arguments) as a
    :class:`Design`, keyed by its settings."""
    from sparsa.hw.verilog import ACCELERATOR_TOP, accelerator_verilog

    key = "accel_{rows}x{cols}_w{stream_width}_k{max_k}_n{max_n}".format(**cfg)
    if not cfg.get("sparse_skip", True):
        key += "_dense"
    if cfg.get("lut_columns"):
        key += "_lut{lut_columns}".format(**cfg)
    if cfg.get("dsp_packing"):
        key += "_packed"
    dsp = cfg.get("dsp", "generic")
    if dsp != "generic":
        key += f"_{dsp}"

    def generate():  # with the simulation models of the vendor primitives it instantiates
        return with_primitive_models(accelerator_verilog(**cfg), dsp)
    return Design(key, ACCELERATOR_TOP, generate)


def build_root():
    return Path(os.environ.get("SPARSA_BUILD_DIR", Path.cwd() / "build" / "sim")).resolve()


_built = {}


def _build_dir(design, simulator, waves):
    return build_root() / f"{design.key}-{simulator}{'-waves' if waves else ''}"


def build(design, simulator, waves=False):
    """Build ``design`` for ``simulator``; returns (runner, build folder). Cached per process."""
    key = (design.key, simulator, waves)
    if key in _built:
        return _built[key]
    reason = toolchain.missing(simulator)
    if reason:
        raise RuntimeError(reason)
    folder = _build_dir(design, simulator, waves)
    folder.mkdir(parents=True, exist_ok=True)
    # One build at a time per folder: test processes running side by side (pytest -n) share
    # the builds, and the second waits for the first's rather than writing over it.
    with open(folder.parent / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        runner = _build_locked(design, simulator, waves, folder)
    _built[key] = runner, folder
    return runner, folder


def _build_locked(design, simulator, waves, folder):
    from cocotb_tools.runner import get_runner

    source = folder / f"{design.top}.v"
    text = design.generate()
    # Rewrite only on change, so the simulators' own up-to-date checks skip unchanged builds.
    if not source.exists() or source.read_text() != text:
        source.write_text(text)
    # The simulators' own checks look at the sources only; a change of flags forces a rebuild.
    args = list(toolchain.BUILD_ARGS[simulator])
    stamp = folder / "build-args.json"
    flags_changed = not stamp.exists() or json.loads(stamp.read_text()) != args
    runner = get_runner(simulator)
    runner.log.setLevel(logging.WARNING)  # the commands it runs; their output goes to the logs
    log = folder / "build.log"
    try:
        runner.build(
            sources=[source],
            hdl_toplevel=design.top,
            build_dir=folder,
            build_args=args,
            always=flags_changed,
            timescale=("1ns", "1ps"),
            waves=waves,
            log_file=log,
        )
    except subprocess.CalledProcessError as error:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"building {design.key} for {simulator} failed ({log}):\n{tail}") from error
    stamp.write_text(json.dumps(args))
    return runner


def run(design, simulator, test_module, testcase, settings=None, waves=False):
    """Run one cocotb test; returns a :class:`RunResult` (never raises on a failing test)."""
    from cocotb_tools.check_results import get_results

    runner, folder = build(design, simulator, waves)
    # A folder per test process too (pytest -n runs tests of one build side by side).
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    test_dir = folder / "runs" / (f"{testcase}-{worker}" if worker else testcase)
    test_dir.mkdir(parents=True, exist_ok=True)
    results_xml = test_dir / "results.xml"
    results_xml.unlink(missing_ok=True)
    log = test_dir / "sim.log"
    try:
        runner.test(
            test_module=test_module,
            hdl_toplevel=design.top,
            testcase=testcase,
            build_dir=folder,
            test_dir=test_dir,
            results_xml=str(results_xml),
            extra_env={"SPARSA_TB": json.dumps(settings or {})},
            waves=waves,
            timescale=("1ns", "1ps"),
            log_file=log,
        )
    except SystemExit:
        # Under pytest the runner exits on a failing test; the results file says what failed.
        pass
    if not results_xml.exists():
        return RunResult(False, 0, 0, results_xml, log, None)
    tests, failed = get_results(results_xml)
    waveform = None
    if waves:
        waveform = test_dir / "dump.vcd" if simulator == "verilator" else folder / f"{design.top}.fst"
    return RunResult(tests > 0 and failed == 0, tests, failed, results_xml, log, waveform)


def check(design, simulator, test_module, testcase, settings=None):
    """Run a test; on failure rerun it with tracing and raise ``AssertionError`` naming the trace."""
    result = run(design, simulator, test_module, testcase, settings)
    if result.passed:
        return result
    traced = run(design, simulator, test_module, testcase, settings, waves=True)
    raise AssertionError(
        f"{test_module}.{testcase} failed on {simulator}; log: {result.log}; "
        f"waveform of the rerun: {traced.waveform}\n{result.log_tail()}"
    )
