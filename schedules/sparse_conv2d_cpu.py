"""x86 schedule for the sparse direct conv2d (te_ops.sparse_conv2d).

Per output channel k and nonzero j, one broadcast weight times `unroll` contiguous input vectors,
accumulated in registers over the row's nonzeros; parallel over (batch, output-channel tiles).
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.target import Target

from ._common import extents, has_block, largest_divisor, op_of, schedule_epilogue_cpu, schedule_pad_cpu

OP = "sparse_conv2d"


@dataclass
class Config:
    tile_k: int = 8    # output channels per parallel task (enough tasks for every core, L2-sized input band)
    vec: int = 16      # lanes of the innermost output axis: one AVX-512 register, two AVX2 registers
    unroll: int = 4    # vectors accumulated in registers per loaded (weight, offset): 4 zmm, few spills

    @staticmethod
    def for_target(target: Target) -> "Config":
        return Config()


def apply(func: tirx.PrimFunc, target: Target, config: Config | None = None) -> s_tir.Schedule | None:
    if op_of(func) != OP or target.kind.name != "llvm":
        return None
    cfg = config or Config.for_target(target)
    sch = s_tir.Schedule(func)
    _schedule(sch, func, cfg.tile_k, cfg.vec, cfg.unroll, clamp=True)
    return sch


def space(sch: s_tir.Schedule) -> None:
    """MetaSchedule design space: the same schedule with its knobs sampled."""
    func = sch.mod["main"]
    k, q = _conv_extents(sch, "conv")
    tile_k = sch.sample_perfect_tile(sch.get_loops(sch.get_sblock("conv"))[1], n=2, max_innermost_factor=32)[1]
    vec = sch.sample_categorical([4, 8, 16], [0.2, 0.3, 0.5])
    unroll = sch.sample_categorical([1, 2, 4, 8], [0.2, 0.3, 0.3, 0.2])
    _schedule(sch, func, tile_k, vec, unroll, clamp=False)


def _conv_extents(sch: s_tir.Schedule, name: str) -> tuple[int, int]:
    loops = sch.get_loops(sch.get_sblock(name))
    ext = extents(sch, loops)
    return ext[1], ext[2]


def _schedule_rows(sch, name, tile_k, vec, unroll, clamp, flat):
    """Schedule one reduction stage ("conv" or "conv_ovf"); returns its parallel loop."""
    block = sch.get_sblock(name)
    acc = sch.cache_write(block, 0, "local")
    loops = sch.get_loops(block)
    ext = extents(sch, loops)
    if clamp:
        tile_k = largest_divisor(ext[1], tile_k)
    n, k = loops[0], loops[1]
    ko, ki = sch.split(k, [None, tile_k])
    if flat:  # [n, k, q, j]; q_extent is a multiple of 16
        q, j = loops[2], loops[3]
        if clamp:
            vec = largest_divisor(ext[2], vec)
            unroll = largest_divisor(ext[2] // vec, unroll)
        qo, qu, qv = sch.split(q, [None, unroll, vec])
        sch.reorder(n, ko, qo, ki, j, qu, qv)
        outer = qo
    else:     # [n, k, y, x, j]
        y, x, j = loops[2], loops[3], loops[4]
        if clamp:
            vec = largest_divisor(ext[3], vec)
            unroll = largest_divisor(ext[3] // vec, unroll)
        xo, xu, xv = sch.split(x, [None, unroll, vec])
        sch.reorder(n, ko, y, xo, ki, j, xu, xv)
        outer = xo
        qu, qv = xu, xv
    par = sch.fuse(n, ko)
    sch.parallel(par)
    sch.reverse_compute_at(acc, ki)
    sch.vectorize(qv)
    sch.unroll(qu)
    init = sch.decompose_reduction(block, j)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(acc)[-1])
    return par


def _schedule(sch: s_tir.Schedule, func: tirx.PrimFunc, tile_k, vec, unroll, clamp: bool) -> None:
    cx, hp, wp = (int(v) for v in func.attrs["unsparse.pad_shape"])
    flat = bool(int(func.attrs["unsparse.flat"]))
    hyb = has_block(sch, "conv_ovf")  # ask before decompose_reduction renames it "conv_ovf_update"
    schedule_pad_cpu(sch, cx, hp, wp)
    par = _schedule_rows(sch, "conv", tile_k, vec, unroll, clamp, flat)
    if hyb:
        _schedule_rows(sch, "conv_ovf", tile_k, vec, unroll, clamp, flat)
    schedule_epilogue_cpu(sch, par, fuse_into_tile=not flat and not hyb)
