"""sparsa: a verified INT8 systolic-array GEMM accelerator with sparse-skip.

``sparsa.open(backend)`` returns an accelerator (:mod:`sparsa.host`); ``sparsa.quantize`` and
friends turn floats into its int8 operands. Subpackages: :mod:`sparsa.hw` (Amaranth gateware),
:mod:`sparsa.sim` (cocotb verification), :mod:`sparsa.host` (host runtime), :mod:`sparsa.onnx`
(ONNX models compiled for the accelerator).
"""

from importlib import metadata as _metadata

try:  # pyproject.toml is the one place the version is written
    __version__ = _metadata.version("sparsa")
except _metadata.PackageNotFoundError:  # a checkout on sys.path, not installed
    __version__ = "0+unknown"

from sparsa.host import (Accelerator, DeviceError, Info, choose_qparams,  # noqa: E402
                         dequantize, open, prune, quantize, quantize_multiplier, requant_params)

__all__ = ["Accelerator", "DeviceError", "Info", "open", "choose_qparams", "dequantize",
           "prune", "quantize", "quantize_multiplier", "requant_params"]
