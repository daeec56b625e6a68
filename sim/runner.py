"""Build generated Verilog once per configuration and run cocotb testbenches against it.

A :class:`Design` names a top module and how to generate its Verilog. :func:`run` builds it for a
simulator (once per process and design, and incrementally on disk) and runs one cocotb test of a
testbench module, handing the testbench its settings as JSON in ``SPARSA_TB``. :func:`check` runs a
test and, when it fails, runs it again with waveform tracing and raises with the waveform's path.

Builds live in one cache whatever the current folder: ``$SPARSA_BUILD_DIR`` if set, else
``$XDG_CACHE_HOME/sparsa`` (``~/.cache/sparsa``), a folder per design, simulator and hash of the
design's Verilog, so a changed design builds anew and an unchanged one is reused from any
folder; a build replaces the older builds of its configuration. A build that takes long says
so while it runs (logger ``sparsa``, INFO: the commands show it).
"""

import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import toolchain

log = logging.getLogger("sparsa")
QUIET_SECONDS = 3  # a build says nothing before this (an up-to-date one takes less)
PROGRESS_SECONDS = 30  # how often a running build says how long it has taken

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
    """The build cache: ``$SPARSA_BUILD_DIR``, else ``$XDG_CACHE_HOME/sparsa`` (default
    ``~/.cache/sparsa``)."""
    folder = os.environ.get("SPARSA_BUILD_DIR")
    if not folder:
        folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sparsa"
    return Path(folder).resolve()


_built = {}

# The waveform a run with ``waves`` writes in its test folder, per simulator.
WAVEFORMS = {"verilator": "dump.vcd", "icarus": "dump.fst"}
ICARUS_WAVES_TOP = "sparsa_waves"
ICARUS_WAVES = """\
module {name};
  reg [8*1024-1:0] path;
  initial begin
    if ($value$plusargs("{name}=%s", path)) begin
      $dumpfile(path);
      $dumpvars(0, {top});
    end
  end
endmodule
"""


def _installation(simulator):
    """Where cocotb and the simulator come from, and their versions."""
    import cocotb

    tool = shutil.which({"icarus": "iverilog"}.get(simulator, simulator)) or simulator
    return f"\ncocotb {cocotb.__version__} {Path(cocotb.__file__).parent}\n{simulator} {tool}"


def _folder(configuration, text, simulator):
    """A build's folder, by the Verilog and the installation that builds it: a build's
    makefiles and dependency files name cocotb's and the simulator's files, so another
    installation (a moved or new virtual environment) builds its own."""
    digest = hashlib.sha256((text + _installation(simulator)).encode()).hexdigest()[:16]
    return build_root() / f"{configuration}-{digest}"


def _configuration(design, simulator, waves):
    """The cache folder's name for a configuration, less the Verilog's hash."""
    return f"{design.key}-{simulator}{'-waves' if waves else ''}"


def build(design, simulator, waves=False):
    """Build ``design`` for ``simulator``; returns (runner, build folder). Cached per process,
    and on disk in :func:`build_root` by the Verilog's hash and the installation."""
    key = (design.key, simulator, waves)
    if key in _built:
        return _built[key]
    reason = toolchain.missing(simulator)
    if reason:
        raise RuntimeError(reason)
    text = design.generate()
    configuration = _configuration(design, simulator, waves)
    folder = _folder(configuration, text, simulator)
    folder.mkdir(parents=True, exist_ok=True)
    # One build at a time per folder: test processes running side by side (pytest -n) share
    # the builds, and the second waits for the first's rather than writing over it.
    with open(_lock_path(folder, "build"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("sparsa sim: waiting for another process's build in %s", folder)
            fcntl.flock(lock, fcntl.LOCK_EX)
        with _Progress(f"{configuration} in {folder}"):
            runner = _build_locked(design, simulator, waves, folder, text)
    # Held (shared) while this process lives, so no other process removes the build it uses.
    in_use = open(_lock_path(folder, "use"), "w")
    fcntl.flock(in_use, fcntl.LOCK_SH)
    _in_use.append(in_use)
    _drop_older(folder, configuration)
    _built[key] = runner, folder
    return runner, folder


_in_use = []


def _lock_path(folder, kind):
    return folder.parent / f"{folder.name}.{kind}.lock"


class _Progress:
    """While a build runs: once it has taken ``QUIET_SECONDS`` (an up-to-date build takes
    less), a line saying what it builds, then one every :data:`PROGRESS_SECONDS` with the time
    taken so far, and one at the end (INFO on logger ``sparsa``)."""

    def __init__(self, what):
        self.what = what
        self._done = threading.Event()
        self._said = False

    def __enter__(self):
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._report, daemon=True,
                                        name="sparsa-build-progress")
        self._thread.start()

    def _report(self):
        if self._done.wait(QUIET_SECONDS):
            return
        self._said = True
        log.info("sparsa sim: building %s (a first build takes minutes)", self.what)
        while not self._done.wait(PROGRESS_SECONDS):
            log.info("sparsa sim: still building (%s so far)", _elapsed(self.started))

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        if self._said:
            log.info("sparsa sim: built in %s", _elapsed(self.started))


def _elapsed(started):
    seconds = int(time.monotonic() - started)
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


def _drop_older(folder, configuration):
    """Remove the cache's other builds of ``configuration`` (older versions of the design)
    that no process is building or using now (their lock is free)."""
    for other in folder.parent.glob(f"{configuration}-*"):
        digest = other.name[len(configuration) + 1:]
        if other == folder or not other.is_dir() or "-" in digest:  # another configuration
            continue
        paths = [_lock_path(other, kind) for kind in ("build", "use")]
        with open(paths[0], "w") as building, open(paths[1], "w") as using:
            try:
                for lock in (building, using):
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            shutil.rmtree(other, ignore_errors=True)
            for path in paths:
                path.unlink(missing_ok=True)


def _build_locked(design, simulator, waves, folder, text):
    from cocotb_tools.runner import get_runner

    source = folder / f"{design.top}.v"
    # Rewrite only on change, so the simulators' own up-to-date checks skip unchanged builds.
    if not source.exists() or source.read_text() != text:
        source.write_text(text)
    sources = [source]
    # The simulators' own checks look at the sources only; a change of flags forces a rebuild.
    args = list(toolchain.BUILD_ARGS[simulator])
    cocotb_waves = waves
    if waves and simulator == "icarus":
        # cocotb's dump module for Icarus declares a SystemVerilog string, which this build's
        # -g2005 cannot read: a Verilog-2005 one instead, its file named at run time.
        dump = folder / f"{ICARUS_WAVES_TOP}.v"
        dump.write_text(ICARUS_WAVES.format(name=ICARUS_WAVES_TOP, top=design.top))
        sources.append(dump)
        args += ["-s", ICARUS_WAVES_TOP]
        cocotb_waves = False
    stamp = folder / "build-args.json"
    flags_changed = not stamp.exists() or json.loads(stamp.read_text()) != args
    runner = get_runner(simulator)
    runner.log.setLevel(logging.WARNING)  # the commands it runs; their output goes to the logs
    build_log = folder / "build.log"
    try:
        runner.build(
            sources=sources,
            hdl_toplevel=design.top,
            build_dir=folder,
            build_args=args,
            always=flags_changed,
            timescale=("1ns", "1ps"),
            waves=cocotb_waves,
            log_file=build_log,
        )
    except subprocess.CalledProcessError as error:
        tail = "\n".join(build_log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"building {design.key} for {simulator} failed ({build_log}):\n"
                           f"{tail}") from error
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
    sim_log = test_dir / "sim.log"
    waveform = test_dir / WAVEFORMS[simulator] if waves else None
    if waveform is not None:
        waveform.unlink(missing_ok=True)
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
            plusargs=[f"+{ICARUS_WAVES_TOP}={waveform}"] if waves and simulator == "icarus"
            else [],
            timescale=("1ns", "1ps"),
            log_file=sim_log,
        )
    except SystemExit:
        # Under pytest the runner exits on a failing test; the results file says what failed.
        pass
    if not results_xml.exists():
        return RunResult(False, 0, 0, results_xml, sim_log, waveform)
    tests, failed = get_results(results_xml)
    return RunResult(tests > 0 and failed == 0, tests, failed, results_xml, sim_log, waveform)


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
