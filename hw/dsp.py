"""Registered multipliers: operands in registers, the product in a register, two cycles from
operands to product.

- ``"generic"``: registers around a ``*``. Synthesis maps the product to a DSP block, and where
  the tool packs registers into DSP blocks (Vivado, Yosys ``synth_xilinx`` for the DSP48E1's
  A/B and M/P registers), the registers go with it.
- ``"ecp5"``: a Lattice ECP5 ``MULT18X18D`` instance with its own input registers (A, B) and
  output register (P), all on ``CLK0``. Yosys ``synth_ecp5`` maps a ``*`` to a MULT18X18D but
  leaves the registers in the logic, and nextpnr's placer sometimes puts a DSP block tens of
  columns from them: a long route and the multiplier in one cycle. Inside the block, neither
  path leaves it. The generated Verilog then needs the primitive: synthesis for an ECP5 has
  it, and simulation adds the model ``sim/mult18x18d.v`` (:data:`sparsa.sim.runner.PRIMITIVE_MODELS`;
  the behaviour of the ports and parameters used here only).
"""

from amaranth import ClockSignal, Const, Instance, Signal, signed

from sparsa.protocol import DSP_STYLES  # noqa: F401  (sparsa.hw.dsp.DSP_STYLES)


class DspTarget:
    """The platform object :func:`amaranth.back.verilog.convert` hands to every
    ``elaborate``, carrying the DSP style (see :func:`dsp_style`), which also says how the
    operand memories are built (:mod:`.bram`)."""

    def __init__(self, dsp="generic"):
        self.dsp = check_dsp(dsp)


def dsp_style(platform):
    """The DSP style a design is elaborated for: the platform's ``dsp`` attribute, else
    ``"generic"`` (no platform, as in simulation, or one that does not say)."""
    return getattr(platform, "dsp", "generic")


def check_dsp(dsp):
    if dsp not in DSP_STYLES:
        raise ValueError(f"dsp: expected one of {', '.join(DSP_STYLES)}, got {dsp!r}")
    return dsp


def mult18x18d(m, a, b, enable, name):
    """``a * b`` (signed, ``len(a) + len(b)`` bits, operands of up to 18 bits) from an ECP5
    MULT18X18D two cycles after ``a`` and ``b``: its input registers load them when
    ``enable`` is high (and hold otherwise), its output register takes their product every
    cycle. (The generic style writes the same registers around a ``*`` in :mod:`.pe` and
    :mod:`.postproc`.)"""
    width = len(a) + len(b)
    if len(a) > 18 or len(b) > 18:
        raise ValueError(f"{name}: a MULT18X18D takes operands of up to 18 bits, "
                         f"got {len(a)} and {len(b)}")
    # Both operands sign-extended (or zero-extended, if unsigned) to 18 bits, multiplied as
    # signed: the 36-bit product is exact.
    a18, b18 = Signal(signed(18), name=f"{name}_a18"), Signal(signed(18), name=f"{name}_b18")
    p36 = Signal(signed(36), name=f"{name}_p36")
    m.d.comb += [a18.eq(a), b18.eq(b)]
    m.submodules[f"{name}_mult"] = Instance(
        "MULT18X18D",
        p_REG_INPUTA_CLK="CLK0", p_REG_INPUTA_CE="CE0", p_REG_INPUTA_RST="RST0",
        p_REG_INPUTB_CLK="CLK0", p_REG_INPUTB_CE="CE0", p_REG_INPUTB_RST="RST0",
        p_REG_PIPELINE_CLK="NONE",
        p_REG_OUTPUT_CLK="CLK0", p_REG_OUTPUT_CE="CE1", p_REG_OUTPUT_RST="RST0",
        p_GSR="DISABLED", p_RESETMODE="SYNC",
        **{f"i_A{k}": a18[k] for k in range(18)},
        **{f"i_B{k}": b18[k] for k in range(18)},
        **{f"i_C{k}": Const(0, 1) for k in range(18)},
        i_SIGNEDA=Const(1, 1), i_SIGNEDB=Const(1, 1), i_SOURCEA=Const(0, 1),
        i_SOURCEB=Const(0, 1), i_CLK0=ClockSignal(), i_CE0=enable, i_CE1=Const(1, 1),
        i_RST0=Const(0, 1),
        **{f"o_P{k}": p36[k] for k in range(36)},
    )
    return p36[:width].as_signed()
