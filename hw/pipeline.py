"""Register chains, the one building block of the pipelines in :mod:`.array` (operand skew)
and :mod:`.postproc` (stages), an OR over a list of values (one-hot selections), a small
unsigned product built from adders, and the position flags of a walk through the job."""

from amaranth import Const, Mux, Signal, Value


# The attribute of a register that must stay where its readers are, not be merged with the
# registers elsewhere that hold the same value: the k-step flags of the PEs, which every PE on
# an anti-diagonal of the array holds alike. Synthesis would otherwise keep one register for
# all of them and route its fan-out across the die; ``sparsa synth`` marks these registers
# ``keep`` before synthesis (Vivado's equivalent: keep_equivalent_registers, DONT_TOUCH).
LOCAL = {"sparsa_local": 1}


def delay(m, value, depth, name, shape=None, reset_less=False, attrs=None):
    """``value`` through ``depth`` registers of ``m``'s sync domain (``value`` itself when
    ``depth`` is 0), each register named ``name`` plus its stage number and of ``shape``
    (default: the shape of ``value``), with ``attrs`` (say :data:`LOCAL`). Data that needs no
    reset (a value whose register is read only under a valid flag that is reset) takes
    ``reset_less``: fewer loads on the reset net, which then reaches only the control
    registers."""
    shape = Value.cast(value).shape() if shape is None else shape
    for stage in range(depth):
        register = Signal(shape, name=f"{name}{stage}", reset_less=reset_less,
                          attrs=attrs or {})
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


def walk_flag(m, start, first_is_last, value, step, limit, name):
    """A register holding ``value + step >= limit`` while ``value`` walks 0, step, 2 step, ...
    (a position in the job against one of its dimensions). Returns it with the statements that
    keep it true to ``value`` where ``value`` steps on and where it returns to 0. Both outcomes
    are compared from registers beforehand, so the flag costs the control logic one
    multiplexer, not an adder and a compare. At ``start`` it is set from ``first_is_last``
    (``step >= limit``, which :class:`.JobControl` compares from the job's registers in the
    cycles before), so ``start`` loads a register, not a 32-bit compare."""
    flag = Signal(name=name)
    with m.If(start):
        m.d.sync += flag.eq(first_is_last)
    return flag, flag.eq(value + 2 * step >= limit), flag.eq(step >= limit)


def walk_flag_behind(m, start, first_is_last, value, step, limit, name):
    """The flag of :func:`walk_flag` (``value + step >= limit``) with registers that take no
    enable, for a walk whose steps come straight from a stream's handshake. Two registers
    compare ``value`` in every cycle, one and two steps on, so they are a cycle behind it; the
    flag chooses between them by what ``value`` did in that cycle (a step: the two-step
    compare), or is ``first_is_last`` (latched at ``start``) in the cycle after ``start`` or a
    return to 0. Each of its inputs is a register whose input is registers too: the handshake
    reaches only the two event registers. Returns the flag and the events, which the caller
    sets (combinationally) where ``value`` steps on (``stepped``) and returns to 0
    (``restarted``, which wins over ``stepped``)."""
    stepped, restarted = Signal(name=f"{name}_stepped"), Signal(name=f"{name}_restarted")
    here, ahead = Signal(name=f"{name}_here"), Signal(name=f"{name}_ahead")
    first = Signal(name=f"{name}_first")
    moved, at_zero = Signal(name=f"{name}_moved"), Signal(name=f"{name}_at_zero")
    m.d.sync += [here.eq(value + step >= limit), ahead.eq(value + 2 * step >= limit),
                 moved.eq(stepped), at_zero.eq(start | restarted)]
    with m.If(start):
        m.d.sync += first.eq(first_is_last)
    flag = Signal(name=name)
    m.d.comb += flag.eq(Mux(at_zero, first, Mux(moved, ahead, here)))
    return flag, stepped, restarted
