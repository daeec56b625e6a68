"""sparsa gateware (Amaranth HDL 0.5): PE -> systolic array -> accelerator top level."""

from .accelerator import Accelerator
from .array import SystolicArray
from .pe import ProcessingElement

__all__ = ["Accelerator", "ProcessingElement", "SystolicArray"]
