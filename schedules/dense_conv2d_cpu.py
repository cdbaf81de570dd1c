"""x86 schedule for the dense direct conv2d (sparse_ops.dense_conv2d): a register tile of
tile_k output channels x unroll*vec outputs, each input vector load feeding tile_k FMAs."""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.target import Target

from unsparse_tvm.ops import names

from ._common import (ScheduleRule, cpu_vector_lanes, extents, finish_register_tile, flat_epilogue, largest_divisor,
                      pow2_divisor, sample_divisor, schedule_epilogue_cpu, schedule_pad_cpu)

OP = names.DENSE_CONV2D


@dataclass
class Config:
    tile_k: int = 0    # output channels sharing each input load (register tile rows); 0 = half the target's
                       # vector registers as accumulators: 8 x 2 zmm on AVX-512, 4 x 2 ymm on AVX2 (8 x 2 ymm
                       # spill: 1.4x slower there; 4 x 2 zmm leave half of AVX-512's registers idle: 1.15x)
    vec: int = 0       # lanes of the output axis; 0 = one vector register of the target (16 AVX-512, 8 AVX2)
    unroll: int = 2    # vectors per channel



def schedule(sch: s_tir.Schedule, func: tirx.PrimFunc, target: Target, cfg: Config) -> None:
    """The schedule at the knobs cfg (defaults fitted to the shapes where a knob is 0 or too large)."""
    lanes, registers = cpu_vector_lanes(target)
    _schedule(sch, func, cfg.tile_k, cfg.vec or lanes, cfg.unroll, clamp=True, accumulators=registers // 2)


def space(sch: s_tir.Schedule) -> list[s_tir.Schedule]:
    """MetaSchedule design spaces (unsparse-tvm tune): one per vector width dividing the output axis;
    tile_k and unroll drawn from the exact divisors of their loops (no ragged register tiles)."""
    func = sch.mod["main"]
    ext = extents(sch, sch.get_loops(sch.get_sblock("conv")))
    inner = ext[2]
    spaces = []
    for vec in [v for v in (16, 8) if inner % v == 0]:  # q_extent is a multiple of 8
        s = sch.copy()
        # tile_k >= 2: with a unit row tile the init block's loop nest changes shape, which a trace cannot follow
        _schedule(s, func, sample_divisor(s, ext[1], 8, low=2), vec, sample_divisor(s, inner // vec, 4), clamp=False)
        spaces.append(s)
    return spaces


def _schedule(sch, func, tile_k, vec, unroll, clamp: bool, accumulators: int = 0) -> None:
    cx, rows, cols = (int(v) for v in func.attrs["unsparse.pad_shape"])
    schedule_pad_cpu(sch, cx, rows, cols)
    flat = flat_epilogue(sch, "conv", cols)
    block = sch.get_sblock("conv")
    acc = sch.cache_write(block, 0, "local")
    loops = sch.get_loops(block)
    ext = extents(sch, loops)
    if clamp:  # tile_k 0: as many rows as `accumulators` leaves once the output axis has its vectors
        narrow = vec // pow2_divisor(ext[2], vec)  # 2 where 16 lanes do not divide q (4x4, 2x2 maps)
        vec //= narrow
        unroll = largest_divisor(ext[2] // vec, unroll * narrow)  # same register tile in narrower vectors
        # on a 2x2 map (one vector of q) the rows take the whole tile: 770 -> 500 us for 512x512 on AVX2
        tile_k = largest_divisor(ext[1], tile_k or accumulators // unroll)
    n, k, q, rc, rr, rs = loops
    ko, ki = sch.split(k, [None, tile_k])
    qo, qu, qv = sch.split(q, [None, unroll, vec])
    sch.reorder(n, ko, qo, rc, rr, rs, ki, qu, qv)
    par = sch.fuse(n, ko)
    sch.parallel(par)
    finish_register_tile(sch, block, acc, qo, qv, [qu, ki], rc)
    schedule_epilogue_cpu(sch, flat)  # flat: bias/residual/ReLU in the accumulators' write-back


RULE = ScheduleRule((OP,), "llvm", Config, schedule, space)
