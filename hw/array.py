"""A rows x cols output-stationary systolic array of INT8 MAC processing elements.

Dataflow choice: **output-stationary**. Every PE keeps one INT32 output C[i, j] in place while
the k-steps of a tile stream through it: A enters from the left (row i carries A[i, k]), B from
the top (column j carries B[k, j]). We chose it over weight-stationary because

- any K works without reloading: a tile is as long as its K, accumulators never leave the array
  mid-sum, so only finished INT32 results cross the array edge;
- a k-step whose operand vector is all zero can simply not be issued (no cycle spent), which is
  what sparse-skip at the schedule needs; in a weight-stationary array skipping a k means
  skipping a whole preloaded weight row, which couples skipping to the preload schedule;
- the next tile starts as soon as the last k-step of the current one has entered, because each
  PE latches its finished sum into a result register and keeps accumulating (drain overlaps
  compute).

Interface (one k-step per cycle, unskewed: the array adds the skewing registers itself):

- ``a[i]`` (i < rows), ``b[j]`` (j < cols): the operand vectors of one k-step.
- ``valid``, ``first``, ``last``: as in :mod:`.pe`; ``first`` on the tile's first k-step,
  ``last`` on its final one (both on the same cycle when K = 1).
- ``out_valid``, ``out_row``, ``c[j]``: one finished result row per cycle, row 0 first.

Latency: row ``i`` of a tile appears on ``c`` ``cols + i + pe.LATENCY`` cycles after the cycle
that carried the tile's ``last`` k-step, so the last row leaves :func:`latency` cycles after it.

Issue rule: consecutive ``last`` k-steps must be at least ``max(rows, cols)`` cycles apart (pad a
shorter tile with cycles where ``valid`` is low). Then result rows of two tiles never leave on the
same cycle, and a PE's result register is read before the next tile overwrites it.
"""

from amaranth import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import bits_for

from .pe import ACCUMULATOR, LATENCY, OPERAND, ProcessingElement
from .pipeline import delay

MAX_DIMENSION = 32


def latency(rows, cols):
    """Cycles from a tile's ``last`` k-step entering the array to its final result row."""
    return rows + cols + LATENCY - 1


def check_dimensions(rows, cols):
    """Raise a clear error unless ``rows`` and ``cols`` are ints from 1 to MAX_DIMENSION."""
    for name, value in (("rows", rows), ("cols", cols)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, not {type(value).__name__}")
        if not 1 <= value <= MAX_DIMENSION:
            raise ValueError(f"{name} must be between 1 and {MAX_DIMENSION}, not {value}")


class SystolicArray(wiring.Component):
    """``lut_columns``: the last that many columns use LUT multipliers (see :mod:`.pe`)."""

    def __init__(self, rows, cols, lut_columns=0):
        check_dimensions(rows, cols)
        self.rows = rows
        self.cols = cols
        self.lut_columns = lut_columns
        super().__init__({
            "a": In(OPERAND).array(rows),
            "b": In(OPERAND).array(cols),
            "valid": In(1),
            "first": In(1),
            "last": In(1),
            "out_valid": Out(1),
            "out_row": Out(max(1, bits_for(rows - 1))),
            "c": Out(ACCUMULATOR).array(cols),
        })

    @property
    def min_tile_cycles(self):
        """The fewest cycles between two ``last`` k-steps (the issue rule above)."""
        return max(self.rows, self.cols)

    @property
    def latency(self):
        """Cycles from a tile's ``last`` k-step to its final result row on ``c``."""
        return latency(self.rows, self.cols)

    def elaborate(self, platform):
        m = Module()
        rows, cols = self.rows, self.cols

        pes = [[ProcessingElement("lut" if j >= cols - self.lut_columns else "dsp")
                for j in range(cols)] for _ in range(rows)]
        for i in range(rows):
            for j in range(cols):
                m.submodules[f"pe_{i}_{j}"] = pes[i][j]

        def skew(signal, depth, name):
            """``signal`` delayed by ``depth`` registers."""
            return delay(m, signal, depth, f"{name}_skew")

        # Row i enters i cycles late and column j enters j cycles late, so the operands of one
        # k-step meet at PE (i, j) exactly i + j cycles after they entered the array.
        for i in range(rows):
            west = pes[i][0]
            m.d.comb += [
                west.a_in.eq(skew(self.a[i], i, f"a{i}")),
                west.valid_in.eq(skew(self.valid, i, f"valid{i}")),
                west.first_in.eq(skew(self.first, i, f"first{i}")),
                west.last_in.eq(skew(self.last, i, f"last{i}")),
            ]
            for j in range(1, cols):
                left, pe = pes[i][j - 1], pes[i][j]
                m.d.comb += [
                    pe.a_in.eq(left.a_out),
                    pe.valid_in.eq(left.valid_out),
                    pe.first_in.eq(left.first_out),
                    pe.last_in.eq(left.last_out),
                ]
        for j in range(cols):
            m.d.comb += pes[0][j].b_in.eq(skew(self.b[j], j, f"b{j}"))
            for i in range(1, rows):
                m.d.comb += pes[i][j].b_in.eq(pes[i - 1][j].b_out)

        # A row is finished when its last k-step has left the east edge and the east PE has added
        # it (LATENCY - 1 cycles later). By the issue rule at most one row finishes per cycle, so
        # the selection below never has to arbitrate.
        row_done = []
        for i in range(rows):
            done = pes[i][cols - 1].valid_out & pes[i][cols - 1].last_out
            row_done.append(skew(done, LATENCY - 1, f"done{i}"))
        m.d.sync += self.out_valid.eq(0)
        for i in range(rows):
            with m.If(row_done[i]):
                m.d.sync += [
                    self.out_valid.eq(1),
                    self.out_row.eq(i),
                    *(self.c[j].eq(pes[i][j].result) for j in range(cols)),
                ]
        return m
