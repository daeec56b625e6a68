"""The host runtime: one driver for the PYNQ board, the simulated RTL and a NumPy reference.

``sparsa.open(backend)`` gives an accelerator whose ``matmul`` takes int8 NumPy arrays of any
shape. The driver's core (:mod:`.jobs`) plans jobs and packs/unpacks stream bytes without I/O;
transports move the bytes: :mod:`.board` (PYNQ MMIO + AXI DMA), :mod:`.simulation` (the same
transport over the RTL in cocotb) and :mod:`.reference` (a NumPy model of the device); they sit
below the driver (:mod:`.driver`) and import nothing of it. :mod:`.backends` puts them
together: ``open``, and the driver PYNQ binds to the IP.
"""

from . import backends  # noqa: F401  (with PYNQ installed: registers SparsaIP, the IP's driver)
from .backends import open
from .driver import Accelerator, Info, PreparedWeights
from .errors import DeviceError, TransferError
from .quant import choose_qparams, dequantize, quantize, quantize_multiplier, requant_params
from .sparsity import prune

__all__ = ["Accelerator", "DeviceError", "Info", "PreparedWeights", "TransferError", "open",
           "choose_qparams", "dequantize", "quantize", "quantize_multiplier", "requant_params",
           "prune"]
