"""sparsa: a verified INT8 systolic-array GEMM accelerator with sparse-skip.

``sparsa.open(backend)`` returns an accelerator (:mod:`sparsa.host`); ``sparsa.quantize`` and
friends turn floats into its int8 operands. Subpackages: :mod:`sparsa.hw` (Amaranth gateware),
:mod:`sparsa.sim` (cocotb verification), :mod:`sparsa.host` (host runtime), :mod:`sparsa.onnx`
(ONNX models compiled for the accelerator).
"""

from importlib import metadata as _metadata
from importlib import util as _util

try:  # pyproject.toml is the one place the version is written
    __version__ = _metadata.version("sparsa")
except _metadata.PackageNotFoundError:  # a checkout on sys.path, not installed
    __version__ = "0+unknown"

__all__ = ["Accelerator", "DeviceError", "Info", "open", "choose_qparams", "dequantize",
           "prune", "quantize", "quantize_multiplier", "requant_params"]


def __getattr__(name):
    """The runtime's names, imported on first use: ``import sparsa.protocol`` (what the
    gateware imports) loads no part of the runtime."""
    if name in __all__:
        from sparsa import host

        return getattr(host, name)
    raise AttributeError(f"module 'sparsa' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


if _util.find_spec("pynq") is not None:
    # On a board: the runtime now, so that importing sparsa before ``Overlay(...)`` registers
    # its driver for the IP with PYNQ (sparsa.host.backends.SparsaIP).
    from sparsa import host as _host  # noqa: E402,F401
