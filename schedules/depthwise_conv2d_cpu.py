"""x86 schedule for depthwise and grouped conv2d as TVM legalises them (TOPI's `group_conv2d_nchw` block,
NCHW), with whatever FuseOps fused after it (BN's bias add, ReLU6/SiLU/hardswish/sigmoid, residual add)
as one kernel: the elementwise chain is inlined into the accumulator's write-back.

Per (batch, channel), in parallel: a depthwise channel's padded plane is built next to its use (it stays
in cache), then each output row is a few vector accumulators over the row's width, `kh x kw` unrolled
broadcast-weight FMAs each. relay_passes/tag_grouped_conv.py marks the functions this rule takes.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.target import Target

from ._common import ScheduleRule, cpu_vector_lanes, extents, finish_register_tile, has_block, sample_choice

OP = "depthwise_conv2d"
CONV_BLOCKS = ("group_conv2d_nchw", "DepthwiseConv2d")  # TOPI's names (relax legalize, topi.nn)


@dataclass
class Config:
    vec: int = 0         # lanes of the innermost width split; 0 = the target's vector register
                         # (cpu_vector_lanes), narrowed to the largest divisor of the output width
    unroll: int = 8      # vectors of one output row accumulated in registers per weight tap


def conv_block(sch: s_tir.Schedule) -> str | None:
    return next((b for b in CONV_BLOCKS if has_block(sch, b)), None)


def _width(sch: s_tir.Schedule) -> int:
    return extents(sch, sch.get_loops(sch.get_sblock(conv_block(sch))))[3]


def schedule(sch: s_tir.Schedule, func: tirx.PrimFunc, target: Target, cfg: Config) -> None:
    """The schedule at the knobs cfg, fitted to the output width (no ragged splits)."""
    width = _width(sch)
    vec = _lanes(width, cfg.vec or cpu_vector_lanes(target)[0])
    _schedule(sch, vec, _divisor_at_most(width // vec, cfg.unroll))


def space(sch: s_tir.Schedule) -> list[s_tir.Schedule]:
    """MetaSchedule design spaces: one per vector width (16, 8 lanes, narrowed to a divisor of the output
    width); in each, the register tile (vectors per row) drawn from the divisors of the row's vectors."""
    width = _width(sch)
    spaces = []
    for vec in sorted({_lanes(width, v) for v in (16, 8)}, reverse=True):
        s = sch.copy()
        _schedule(s, vec, sample_choice(s, [d for d in range(1, 9) if (width // vec) % d == 0]))
        spaces.append(s)
    return spaces


def _lanes(width: int, lanes: int) -> int:
    """The vector width: the largest power of two dividing the row, up to `lanes` (a 14-lane vector is
    8 + 4 + 2 lane instructions; 56 = 7 x 8 lanes is 7 whole ones); a row with none of 4 or more (odd maps,
    14 or 7 wide) is one vector op as a whole. TagGroupedConv leaves rows too wide for that to the fallback."""
    vec = _pow2_divisor(width, lanes)
    return vec if vec >= 4 else width


def fits(width: int) -> bool:
    """Whether the rule can vectorise a row this wide (see _lanes)."""
    return _pow2_divisor(width, 16) >= 4 or width <= 64


def _pow2_divisor(n: int, cap: int) -> int:
    v = 1
    while v * 2 <= cap and n % (v * 2) == 0:
        v *= 2
    return v


def _divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def _spatial(sch: s_tir.Schedule, block) -> bool:
    return all(iv.iter_type == 0 for iv in sch.get(block).iter_vars)


def _schedule(sch: s_tir.Schedule, vec: int, unroll) -> None:
    conv = sch.get_sblock(conv_block(sch))
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    pads = [p for p in sch.get_producers(conv) if _spatial(sch, p)]
    # the elementwise rest (bias reshape/add, activation pieces) inlined down to the last block
    tail = []
    for block in blocks:
        if sch.get(block).same_as(sch.get(conv)) or any(sch.get(block).same_as(sch.get(p)) for p in pads):
            continue
        consumers = sch.get_consumers(block)
        if consumers and all(_spatial(sch, c) for c in consumers):
            try:
                sch.compute_inline(block)
                continue
            except Exception:  # an output block, or one that cannot be inlined: it stays after the conv
                pass
        tail.append(block)
    acc = sch.cache_write(conv, 0, "local")
    for block in reversed(tail):  # into the write-back: one pass over the output, from registers
        try:
            sch.reverse_compute_inline(block)
        except Exception:
            pass
    n, f, y, x, rc, ry, rx = sch.get_loops(conv)
    depthwise = extents(sch, [rc])[0] == 1
    xo, xu, xi = sch.split(x, [None, unroll, vec])
    # a row's `unroll` vectors accumulate in registers; each weight tap is one broadcast + `unroll` FMAs
    sch.reorder(n, f, y, xo, rc, ry, rx, xu, xi)
    nf = sch.fuse(n, f)
    sch.parallel(nf)
    finish_register_tile(sch, conv, acc, xo, xi, [ry, rx, xu], rc)
    for pad in pads:
        # inlining the pad instead puts its bounds test on every tap (measured 2-4x slower)
        if depthwise:  # one channel's plane, built where it is read (it stays in cache)
            sch.compute_at(pad, nf)
            sch.vectorize(sch.get_loops(pad)[-1])
        else:  # a group's input channels serve several outputs: pad them once, in parallel
            loops = sch.get_loops(pad)
            sch.parallel(sch.fuse(*loops[:2]))


RULE = ScheduleRule((OP,), "llvm", Config, schedule, space)
