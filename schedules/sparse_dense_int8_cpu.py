"""x86 schedule for the int8 sparse linear layer (int8_ops.sparse_dense_int8).

There is no spatial axis to put in vector lanes at batch 1, so this is the scalar form of
sparse_dense_cpu's: parallel over output-row tiles, `rows_inner` rows interleaved per stored quad (their
integer multiply-add chains overlap), the quad's 4 products unrolled. Linear layers are a small share of
a CNN's time; what int8 buys here is the layer's input and weights in a quarter of the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.target import Target

from unsparse_tvm.ops import names

from ._common import ScheduleRule, extents, inner_spaces, row_tile, tile_rows

OP = names.SPARSE_DENSE_INT8


@dataclass
class Config:
    tile_rows: int = 16   # output features per parallel task
    rows_inner: int = 4   # rows interleaved per stored quad


def schedule(sch: s_tir.Schedule, func: tirx.PrimFunc, target: Target, cfg: Config) -> None:
    rows = extents(sch, sch.get_loops(sch.get_sblock("conv")))[1]
    _schedule(sch, *row_tile(rows, cfg.tile_rows, cfg.rows_inner))


def space(sch: s_tir.Schedule) -> list[s_tir.Schedule]:
    return inner_spaces(sch, extents(sch, sch.get_loops(sch.get_sblock("conv")))[1], 64, _schedule)


def _schedule(sch: s_tir.Schedule, groups, rows_inner) -> None:
    n, i, v = sch.get_loops(sch.get_sblock("pad_q"))
    sch.parallel(sch.fuse(n, i))
    sch.unroll(v)
    block = sch.get_sblock("conv")
    acc, og, oi, j, v = tile_rows(sch, block, groups, rows_inner, reduction=2, lanes=3)  # loops (n, o, j, v)
    sch.reverse_compute_at(acc, og)
    sch.decompose_reduction(block, j)
    sch.unroll(oi)
    sch.unroll(v)
    n, o = sch.get_loops(sch.get_sblock("epilogue"))
    sch.parallel(sch.fuse(n, o))


RULE = ScheduleRule((OP,), "llvm", Config, schedule, space)
