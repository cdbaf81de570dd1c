"""CUDA schedule for the sparse dense (linear) operator: one warp per output row, lanes striding over
the row's nonzeros, a warp-level (cross-thread) reduction; rows_per_block warps per thread block."""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.target import Target

from unsparse_tvm.ops import names

from ._common import ScheduleRule, bind_elementwise_cuda, extents, has_block, largest_divisor

OP = names.SPARSE_DENSE
OPS = (OP, names.SPARSE_DENSE_GROUPED)  # grouped rows (vellV): a warp per group, each lane summing V rows


@dataclass
class Config:
    lanes: int = 32          # threads over one row's nonzeros (a warp)
    rows_per_block: int = 4  # rows (warps) per block



def schedule(sch: s_tir.Schedule, func: tirx.PrimFunc, target: Target, cfg: Config) -> None:
    """The schedule at the knobs cfg (defaults fitted to the shapes where a knob is 0 or too large)."""
    _schedule(sch, cfg.lanes, cfg.rows_per_block, clamp=True)


def space(sch: s_tir.Schedule) -> None:
    lanes = sch.sample_categorical([8, 16, 32], [0.2, 0.3, 0.5])
    rows = sch.get_loops(sch.get_sblock("conv"))[1]
    per_block = sch.sample_perfect_tile(rows, n=2, max_innermost_factor=8)[1]
    _schedule(sch, lanes, per_block, clamp=False)


def _rows(sch, name, lanes, rows_per_block, clamp):
    block = sch.get_sblock(name)
    loops = sch.get_loops(block)
    n, o, j = loops[0], loops[1], loops[-1]  # o: rows, or groups of V rows
    v = loops[2:-1]                          # grouped: the V rows, one reduction each, in every lane
    if clamp:
        rows_per_block = largest_divisor(extents(sch, [o])[0], rows_per_block)
    oo, oi = sch.split(o, [None, rows_per_block])
    jo, ji = sch.split(j, [None, lanes])
    sch.reorder(n, oo, oi, *v, ji, jo)
    sch.bind(sch.fuse(n, oo), "blockIdx.x")
    sch.bind(oi, "threadIdx.y")
    sch.bind(ji, "threadIdx.x")   # reduction over threads: lowered to a warp shuffle all-reduce


def _schedule(sch, lanes, rows_per_block, clamp: bool) -> None:
    _rows(sch, "conv", lanes, rows_per_block, clamp)
    if has_block(sch, "conv_ovf"):
        _rows(sch, "conv_ovf", lanes, rows_per_block, clamp)
    bind_elementwise_cuda(sch, "epilogue")


RULE = ScheduleRule(OPS, "cuda", Config, schedule, space)
