"""x86 schedule for the grouped sparse dense (linear) operator (sparse_ops.sparse_dense with fmt "vellV").

Per stored offset: one input value (broadcast) times the group's V contiguous weights (one vector load)
into a V-lane accumulator: 3 loads for V FMAs, where ungrouped rows pay 3 loads per FMA. `inner` groups
advance together through their offsets, so their FMA chains overlap."""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.target import Target

from unsparse_tvm.ops import names

from ._common import ScheduleRule, extents, finish_register_tile, inner_spaces, row_tile, tile_rows

OP = names.SPARSE_DENSE_GROUPED


@dataclass
class Config:
    tile_groups: int = 0  # groups per parallel task; 0 = ~32 rows' worth
    inner: int = 4        # groups interleaved per offset step: independent FMA chains (as sparse_dense's 4)


def schedule(sch: s_tir.Schedule, func: tirx.PrimFunc, target: Target, cfg: Config) -> None:
    """The schedule at the knobs cfg (defaults fitted to the shapes where a knob is 0 or too large)."""
    _, groups, v, _ = extents(sch, sch.get_loops(sch.get_sblock("conv")))
    _schedule(sch, *row_tile(groups, cfg.tile_groups or max(1, 32 // v), cfg.inner))


def space(sch: s_tir.Schedule) -> list[s_tir.Schedule]:
    """One design space per `inner` (a structural choice); the task size drawn from exact divisors."""
    return inner_spaces(sch, extents(sch, sch.get_loops(sch.get_sblock("conv")))[1], 32, _schedule)


def _schedule(sch: s_tir.Schedule, per_task: int, inner: int) -> None:
    block = sch.get_sblock("conv")
    acc, gg, gi, j, v = tile_rows(sch, block, per_task, inner, reduction=3, lanes=2)  # loops (n, g, v, j)
    finish_register_tile(sch, block, acc, gg, v, [gi], j)
    n, o = sch.get_loops(sch.get_sblock("epilogue"))
    sch.parallel(sch.fuse(n, o))


RULE = ScheduleRule((OP,), "llvm", Config, schedule, space)
