"""sparsa gateware (Amaranth HDL 0.5): PE -> systolic array -> accelerator top level."""

from .pe import ProcessingElement
from .array import SystolicArray

__all__ = ["ProcessingElement", "SystolicArray"]
