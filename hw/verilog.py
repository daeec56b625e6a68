"""Verilog generation for sparsa's components."""

from amaranth.back import verilog

from .accelerator import Accelerator
from .array import SystolicArray
from .bram import BlockMemory
from .dsp import DspTarget

ARRAY_TOP = "sparsa_array"


def array_verilog(rows, cols, name=ARRAY_TOP, lut_columns=0, dsp_packing=False,
                  dsp="generic"):
    """Verilog text of a rows x cols :class:`SystolicArray` as module ``name``.

    Source-location attributes are left out so the text depends only on the parameters.
    """
    array = SystolicArray(rows, cols, lut_columns, dsp_packing)
    return verilog.convert(array, name=name, emit_src=False, platform=DspTarget(dsp))


ACCELERATOR_TOP = "sparsa_accel"


def accelerator_verilog(sparse_skip=True, name=ACCELERATOR_TOP, lut_columns=0,
                        dsp_packing=False, dsp="generic", **geometry):
    """Verilog text of the AXI top level :class:`Accelerator` as module ``name``; ``geometry``:
    any of its ``rows``, ``cols``, ``stream_width``, ``max_k``, ``max_n`` (default
    :data:`~sparsa.protocol.DEFAULT_BUILD`'s); ``dsp``: ``"generic"`` (portable) or ``"ecp5"``
    (MULT18X18D instances, see :mod:`.dsp`)."""
    top = Accelerator(**geometry, sparse_skip=sparse_skip, lut_columns=lut_columns,
                      dsp_packing=dsp_packing)
    return verilog.convert(top, name=name, emit_src=False, platform=DspTarget(dsp))


MEMORY_TOP = "sparsa_memory"


def memory_verilog(width, depth, name=MEMORY_TOP, dsp="generic"):
    """Verilog text of a :class:`.BlockMemory` on its own (for its test bench); ``dsp="ecp5"``
    instantiates DP16KD blocks (see :mod:`.bram`)."""
    return verilog.convert(BlockMemory(width, depth), name=name, emit_src=False,
                           platform=DspTarget(dsp))
