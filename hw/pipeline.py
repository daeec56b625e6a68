"""Register chains, the one building block of the pipelines in :mod:`.array` (operand skew)
and :mod:`.postproc` (stages), and an OR over a list of values (one-hot selections)."""

from amaranth import Signal, Value


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
