"""Register chains, the one building block of the pipelines in :mod:`.array` (operand skew)
and :mod:`.postproc` (stages), an OR over a list of values (one-hot selections), and a small
unsigned product built from adders."""

from amaranth import Const, Mux, Signal, Value


def delay(m, value, depth, name, shape=None, reset_less=False):
    """``value`` through ``depth`` registers of ``m``'s sync domain (``value`` itself when
    ``depth`` is 0), each register named ``name`` plus its stage number and of ``shape``
    (default: the shape of ``value``). Data that needs no reset (a value whose register is
    read only under a valid flag that is reset) takes ``reset_less``: fewer loads on the reset
    net, which then reaches only the control registers."""
    shape = Value.cast(value).shape() if shape is None else shape
    for stage in range(depth):
        register = Signal(shape, name=f"{name}{stage}", reset_less=reset_less)
        m.d.sync += register.eq(value)
        value = register
    return value


def or_all(values):
    """``values[0] | values[1] | ...`` (at least one value)."""
    result = values[0]
    for value in values[1:]:
        result = result | value
    return result


def lut_product(a, b):
    """``a * b`` for small unsigned values, as a sum of shifted copies of ``a`` (one per bit
    of ``b``, the narrower), which synthesis builds from adders in the logic. A ``*`` would
    take a DSP block, and on an ECP5 those sit in rows apart from the logic: a long route on
    each side of the multiplier, for a count that a few adders give."""
    terms = [Mux(b[i], a, 0) << i for i in range(len(b))] or [Const(0, 1)]
    while len(terms) > 1:  # summed as a balanced tree: log2(len(b)) adders deep
        terms = [terms[k] + terms[k + 1] if k + 1 < len(terms) else terms[k]
                 for k in range(0, len(terms), 2)]
    return terms[0]
