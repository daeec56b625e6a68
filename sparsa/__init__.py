"""sparsa: a verified INT8 systolic-array GEMM accelerator with sparse-skip.

Subpackages: :mod:`sparsa.hw` (Amaranth gateware), :mod:`sparsa.sim` (cocotb verification),
:mod:`sparsa.host` (host runtime).
"""

__version__ = "0.1.0"
