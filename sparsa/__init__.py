"""sparsa: a verified INT8 systolic-array GEMM accelerator with sparse-skip.

``sparsa.open(backend)`` returns an accelerator (:mod:`sparsa.host`); ``sparsa.quantize`` and
friends turn floats into its int8 operands. Subpackages: :mod:`sparsa.hw` (Amaranth gateware),
:mod:`sparsa.sim` (cocotb verification), :mod:`sparsa.host` (host runtime).
"""

__version__ = "0.1.0"

from sparsa.host import (Accelerator, DeviceError, Info, choose_qparams,  # noqa: E402
                         dequantize, open, quantize, quantize_multiplier, requant_params)

__all__ = ["Accelerator", "DeviceError", "Info", "open", "choose_qparams", "dequantize",
           "quantize", "quantize_multiplier", "requant_params"]
