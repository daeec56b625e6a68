"""Verilog generation for sparsa's components."""

from amaranth.back import verilog

from .array import SystolicArray

ARRAY_TOP = "sparsa_array"


def array_verilog(rows, cols, name=ARRAY_TOP):
    """Verilog text of a rows x cols :class:`SystolicArray` as module ``name``.

    Source-location attributes are left out so the text depends only on the parameters.
    """
    array = SystolicArray(rows, cols)
    return verilog.convert(array, name=name, emit_src=False)
