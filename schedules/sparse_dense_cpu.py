"""x86 schedule for the sparse dense (linear) operator: parallel over output-row tiles; inside a tile,
`rows_inner` rows interleaved in the nonzero loop, each with its own register accumulator, so that
their FMA chains overlap (one row alone waits on each add's latency)."""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.target import Target

from unsparse_tvm.ops import names

from ._common import ScheduleRule, extents, has_block, largest_divisor, row_tile, sample_divisor

OP = names.SPARSE_DENSE


@dataclass
class Config:
    tile_rows: int = 16   # output features per parallel task
    rows_inner: int = 4   # rows interleaved per nonzero step: 4 independent FMA chains (8 measured 1.4x slower)



def schedule(sch: s_tir.Schedule, func: tirx.PrimFunc, target: Target, cfg: Config) -> None:
    """The schedule at the knobs cfg (defaults fitted to the shapes where a knob is 0 or too large)."""
    for stage in _stages(sch):
        _rows(sch, stage, *row_tile(_row_count(sch, stage), cfg.tile_rows, cfg.rows_inner))
    _schedule_epilogue(sch)


def space(sch: s_tir.Schedule) -> list[s_tir.Schedule]:
    """MetaSchedule design spaces (unsparse-tvm tune): one per rows_inner (a structural choice), with the
    number of interleaved groups per task drawn from the exact divisors (no ragged tiles). hyb's
    overflow stage, with its own row count, gets one group per task."""
    rows = _row_count(sch, "conv")
    spaces = []
    for inner in [d for d in (1, 2, 4, 8, 16) if rows % d == 0]:
        s = sch.copy()
        _rows(s, "conv", sample_divisor(s, rows // inner, max(1, 64 // inner)), inner)
        for stage in _stages(s)[1:]:
            _rows(s, stage, 1, largest_divisor(_row_count(s, stage), inner))
        _schedule_epilogue(s)
        spaces.append(s)
    return spaces


def _stages(sch: s_tir.Schedule) -> list[str]:
    return ["conv", "conv_ovf"] if has_block(sch, "conv_ovf") else ["conv"]


def _row_count(sch: s_tir.Schedule, stage: str) -> int:
    return extents(sch, sch.get_loops(sch.get_sblock(stage)))[1]


def _rows(sch, name, groups, rows_inner) -> None:
    """A task holds `groups` x `rows_inner` rows; the rows_inner rows advance together through their
    nonzeros (loop j outside them), each accumulating in a register."""
    block = sch.get_sblock(name)
    acc = sch.cache_write(block, 0, "local")
    n, o, j = sch.get_loops(block)
    oo, og, oi = sch.split(o, [None, groups, rows_inner])
    sch.reorder(n, oo, og, j, oi)
    sch.parallel(sch.fuse(n, oo))
    sch.reverse_compute_at(acc, og)
    sch.unroll(oi)
    sch.decompose_reduction(block, j)


def _schedule_epilogue(sch) -> None:
    n, o = sch.get_loops(sch.get_sblock("epilogue"))
    sch.parallel(sch.fuse(n, o))


RULE = ScheduleRule((OP,), "llvm", Config, schedule, space)
