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

- ``a[i]`` (i < rows): the k-step's group of four A values of row i (see the group format in
  :mod:`sparsa.protocol`), with their zero flags ``a_zero[i]``; ``b[j]`` (j < cols): the B
  operand of column j, with its zero flag ``b_zero[j]`` and ``b_lane[j]``, the lane of the
  group whose A value it multiplies. (A plain k-step k: its A values at lane ``k % 4``, and
  every column's lane that.)
- ``valid``, ``first``, ``last``: as in :mod:`.pe`; ``first`` on the tile's first k-step,
  ``last`` on its final one (both on the same cycle when K = 1).
- ``out_valid``, ``out_row``, ``c[j]``: one finished result row per cycle, row 0 first.

Rows are built in groups (:func:`row_groups`): single rows, or with ``dsp_packing`` pairs of
rows whose DSP columns are :class:`.PackedPair` elements (two PEs of a column sharing one
multiplier; a LUT-multiplier column has two plain PEs there). The rows of a group enter
together and B crosses one register per row, so the pairs take B in either format.

Latency: row ``i`` of a tile appears on ``c`` ``cols + i + pe.LATENCY`` cycles after the
cycle that carried the tile's ``last`` k-step (the second row of a group is read a cycle after
the first), so the last row leaves :func:`latency` cycles after it.

Issue rule: consecutive ``last`` k-steps must be at least ``max(rows, cols)`` cycles apart (pad a
shorter tile with cycles where ``valid`` is low). Then result rows of two tiles never leave on the
same cycle, and a PE's result register is read before the next tile overwrites it.
"""

from amaranth import Module, Mux, Signal
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import bits_for

from sparsa.protocol import check_dimensions

from .pe import (ACCUMULATOR, B_OPERAND, LANES, LATENCY, OPERAND, PackedPair,
                 ProcessingElement)
from .pipeline import delay, or_all

ROW_GROUP = 4  # rows gathered per register in the first stage of the result read-out
GATHER_STAGES = 2


def row_groups(rows, dsp_packing=False):
    """The array's rows as built, north to south: lists of the row numbers that enter
    together, in pairs with ``dsp_packing`` (an odd one out stays single)."""
    step = 2 if dsp_packing else 1
    return [list(range(i, min(i + step, rows))) for i in range(0, rows, step)]


def latency(rows, cols):
    """Cycles from a tile's ``last`` k-step entering the array to its final result row."""
    return rows + cols + LATENCY - 2 + GATHER_STAGES


def check_lut_columns(lut_columns, cols):
    if not isinstance(lut_columns, int) or isinstance(lut_columns, bool) \
            or not 0 <= lut_columns <= cols:
        raise ValueError(f"lut_columns must be an int between 0 and cols ({cols}), "
                         f"not {lut_columns!r}")


class SystolicArray(wiring.Component):
    """``lut_columns``: the last that many columns use LUT multipliers (see :mod:`.pe`);
    ``dsp_packing``: rows go in pairs, two INT8 MACs per multiplier in the other columns."""

    def __init__(self, rows, cols, lut_columns=0, dsp_packing=False):
        check_dimensions(rows, cols)
        check_lut_columns(lut_columns, cols)
        self.rows = rows
        self.cols = cols
        self.lut_columns = lut_columns
        self.dsp_packing = bool(dsp_packing)
        self.groups = row_groups(rows, dsp_packing)
        super().__init__({
            "a": In(data.ArrayLayout(OPERAND, LANES)).array(rows),
            "b": In(OPERAND).array(cols),
            # Each operand's zero flag, in the operand's cycle (see :mod:`.pe`: never high for
            # an operand that is not zero; low only forgoes the gating).
            "a_zero": In(LANES).array(rows),
            "b_zero": In(1).array(cols),
            "b_lane": In(range(LANES)).array(cols),
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

        def skew(signal, depth, name, reset_less=False):
            """``signal`` delayed by ``depth`` registers (all but ``valid``: ``reset_less``,
            being read only with ``valid``)."""
            return delay(m, signal, depth, f"{name}_skew", reset_less=reset_less)

        # cells[g][j]: row group g's elements in column j, as a list of (element, index) per
        # row of the group (index: the row's port of a pair, None for a plain PE); norths and
        # souths[g][j]: the B operand the group takes and the one it passes south.
        cells, norths, souths = [], [], []
        for g, members in enumerate(self.groups):
            cells.append([]), norths.append([]), souths.append([])
            for j in range(cols):
                multiplier = "lut" if j >= cols - self.lut_columns else "dsp"
                if len(members) == 2 and multiplier == "dsp":
                    pair = m.submodules[f"pe_{members[0]}_{j}"] = PackedPair()
                    cells[g].append([(pair, 0), (pair, 1)])
                    norths[g].append([pair.north])
                    souths[g].append(pair.south)
                    continue
                # Plain PEs, one per row of the group, all taking the group's B operand in
                # the same cycle; a pair of them passes it south two cycles later, as a
                # packed pair does.
                pes = [ProcessingElement(multiplier) for _ in members]
                for i, pe in zip(members, pes):
                    m.submodules[f"pe_{i}_{j}"] = pe
                cells[g].append([(pe, None) for pe in pes])
                norths[g].append([pe.north for pe in pes])
                souths[g].append(skew(pes[0].south, len(pes) - 1, f"b{members[0]}_{j}",
                                      reset_less=True))

        def port(element, index, name):
            value = getattr(element, name)
            return value if index is None else value[index]

        # A row group enters as many cycles late as there are rows north of it, column j
        # enters j cycles late, and B crosses one register per row, so the operands of one
        # k-step meet at row group g, column j exactly (rows north of g) + j cycles after they
        # entered. Each element passes the k-step east and its B operand south.
        for g, members in enumerate(self.groups):
            for row, i in enumerate(members):
                west = port(*cells[g][0][row], "west")
                m.d.comb += [
                    west.a.eq(skew(self.a[i], members[0], f"a{i}", reset_less=True)),
                    west.a_zero.eq(skew(self.a_zero[i], members[0], f"a_zero{i}",
                                        reset_less=True)),
                    west.valid.eq(skew(self.valid, members[0], f"valid{i}")),
                    west.first.eq(skew(self.first, members[0], f"first{i}", reset_less=True)),
                    west.last.eq(skew(self.last, members[0], f"last{i}", reset_less=True)),
                ]
                for j in range(1, cols):
                    m.d.comb += port(*cells[g][j][row], "west").eq(
                        port(*cells[g][j - 1][row], "east"))
        for j in range(cols):
            top = Signal(B_OPERAND, name=f"b_top{j}")
            m.d.comb += [top.b.eq(skew(self.b[j], j, f"b{j}", reset_less=True)),
                         top.zero.eq(skew(self.b_zero[j], j, f"b_zero{j}", reset_less=True)),
                         top.lane.eq(skew(self.b_lane[j], j, f"b_lane{j}", reset_less=True))]
            for g in range(len(self.groups)):
                m.d.comb += [north.eq(top if g == 0 else souths[g - 1][j])
                             for north in norths[g][j]]

        # A row is finished when its last k-step has left the east edge and the east PE has
        # added it (LATENCY - 1 cycles later); the second row of a group is read a cycle
        # after the first. By the issue rule at most one row finishes per cycle, so the
        # selection below never has to arbitrate.
        row_done, results = [], []
        for g, members in enumerate(self.groups):
            for row, i in enumerate(members):
                east = port(*cells[g][cols - 1][row], "east")
                row_done.append(skew(east.valid & east.last, LATENCY - 1 + row, f"done{i}"))
                results.append([port(*cells[g][j][row], "result") for j in range(cols)])
        # The finished row is gathered in two registered stages, because the rows' result
        # registers lie across the whole array: an AND-OR of up to four rows per group, then of
        # the groups. A row's result register holds still for a whole tile after its row_done
        # (the issue rule), and row_done is one-hot, so an OR suffices.
        gather = [list(range(i, min(i + ROW_GROUP, rows))) for i in range(0, rows, ROW_GROUP)]
        gathered = []
        for number, members in enumerate(gather):
            part = [Signal(ACCUMULATOR, name=f"gather{number}_c{j}", reset_less=True)
                    for j in range(cols)]
            for j in range(cols):
                terms = [Mux(row_done[i], results[i][j], 0) for i in members]
                m.d.sync += part[j].eq(or_all(terms))
            gathered.append(part)
        valid1, row1 = Signal(), Signal.like(self.out_row)
        m.d.sync += [
            valid1.eq(or_all(row_done)),
            row1.eq(or_all([Mux(row_done[i], i, 0) for i in range(rows)])),
            self.out_valid.eq(valid1), self.out_row.eq(row1),
        ]
        for j in range(cols):
            m.d.comb += self.c[j].eq(delay(m, or_all([part[j] for part in gathered]), 1,
                                           f"c{j}_", reset_less=True))
        return m
