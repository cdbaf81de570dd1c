"""CUDA schedule for the dense direct conv2d (sparse_ops.dense_conv2d), in place of dlight's fallback (one
thread per output, no reuse): threadIdx.x over consecutive flat output positions (coalesced input loads),
each thread keeps `tile_k` output channels in registers, so every input value it loads feeds tile_k
FMAs; one block per (batch, channel tile, range of positions)."""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.target import Target

from unsparse_tvm.ops import names

from ._common import ScheduleRule, bind_elementwise_cuda, extents, largest_divisor, sample_choice

OP = names.DENSE_CONV2D


@dataclass
class Config:
    threads_q: int = 128  # threads over output positions (four warps)
    tile_k: int = 8       # output channels per thread, in registers


def schedule(sch: s_tir.Schedule, func: tirx.PrimFunc, target: Target, cfg: Config) -> None:
    """The schedule at the knobs cfg (defaults fitted to the shapes where a knob is 0 or too large)."""
    k = extents(sch, sch.get_loops(sch.get_sblock("conv")))[1]
    _schedule(sch, cfg.threads_q, largest_divisor(k, cfg.tile_k))


def space(sch: s_tir.Schedule) -> None:
    k = extents(sch, sch.get_loops(sch.get_sblock("conv")))[1]
    _schedule(sch, sch.sample_categorical([32, 64, 128, 256], [0.25] * 4),
              sample_choice(sch, [d for d in (1, 2, 4, 8, 16) if k % d == 0]))


def _schedule(sch: s_tir.Schedule, threads_q, tile_k) -> None:
    bind_elementwise_cuda(sch, "pad_flat")
    block = sch.get_sblock("conv")
    acc = sch.cache_write(block, 0, "local")
    n, k, q, rc, rr, rs = sch.get_loops(block)
    ko, kt = sch.split(k, [None, tile_k])
    qo, qi = sch.split(q, [None, threads_q])
    sch.reorder(n, ko, qo, qi, rc, rr, rs, kt)
    sch.bind(sch.fuse(n, ko), "blockIdx.y")
    sch.bind(qo, "blockIdx.x")
    sch.bind(qi, "threadIdx.x")
    sch.reverse_compute_at(acc, qi)
    sch.unroll(kt)
    sch.decompose_reduction(block, rc)
    bind_elementwise_cuda(sch, "epilogue")


RULE = ScheduleRule((OP,), "cuda", Config, schedule, space)
