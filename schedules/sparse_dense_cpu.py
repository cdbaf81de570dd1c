"""x86 schedule for the sparse dense (linear) operator: parallel over output-row tiles, the row's
nonzeros as the inner serial loop with a register accumulator."""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.target import Target

from ._common import extents, has_block, largest_divisor, op_of, sample_divisor

OP = "sparse_dense"


@dataclass
class Config:
    tile_rows: int = 16   # output features per parallel task
    unroll_j: int = 4     # nonzeros per unrolled step (independent loads in flight)

    @staticmethod
    def for_target(target: Target) -> "Config":
        return Config()


def apply(func: tirx.PrimFunc, target: Target, config: Config | None = None) -> s_tir.Schedule | None:
    if op_of(func) != OP or target.kind.name != "llvm":
        return None
    cfg = config or Config.for_target(target)
    sch = s_tir.Schedule(func)
    _schedule(sch, cfg.tile_rows, cfg.unroll_j, clamp=True)
    return sch


def space(sch: s_tir.Schedule) -> None:
    """MetaSchedule design space (unsparse-tvm tune): tile_rows and unroll_j drawn from the exact
    divisors of their loops."""
    _schedule(sch, None, None, clamp=False)


def _rows(sch, name, tile_rows, unroll_j, clamp):
    block = sch.get_sblock(name)
    acc = sch.cache_write(block, 0, "local")
    n, o, j = sch.get_loops(block)
    ext = extents(sch, [n, o, j])
    if tile_rows is None:  # space(): sampled per stage
        tile_rows = sample_divisor(sch, ext[1], 64)
    if unroll_j is None:
        unroll_j = sample_divisor(sch, ext[2], 8)
    if clamp:
        tile_rows = largest_divisor(ext[1], tile_rows)
        unroll_j = largest_divisor(ext[2], unroll_j)
    oo, oi = sch.split(o, [None, tile_rows])
    jo, ji = sch.split(j, [None, unroll_j])
    sch.reorder(n, oo, oi, jo, ji)
    par = sch.fuse(n, oo)
    sch.parallel(par)
    sch.reverse_compute_at(acc, oi)
    sch.unroll(ji)
    sch.decompose_reduction(block, jo)


def _schedule(sch, tile_rows, unroll_j, clamp: bool) -> None:
    _rows(sch, "conv", tile_rows, unroll_j, clamp)
    if has_block(sch, "conv_ovf"):
        _rows(sch, "conv_ovf", tile_rows, unroll_j, clamp)
    n, o = sch.get_loops(sch.get_sblock("epilogue"))
    sch.parallel(sch.fuse(n, o))
