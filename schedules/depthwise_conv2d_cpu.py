"""x86 schedule for depthwise and grouped conv2d as TVM legalises them (TOPI's `group_conv2d_nchw` block,
NCHW), with whatever FuseOps fused after it (BN's bias add, ReLU6/SiLU/hardswish/sigmoid, residual add)
as one kernel: the elementwise chain is inlined into the accumulator's write-back.

Per (batch, channel), in parallel: a depthwise channel's padded plane is built next to its use (it stays
in cache; for stride 2 as two column-phase planes, so that strided rows are contiguous), then a tile of
output rows x vectors across a row accumulates in registers, `kh x kw` unrolled broadcast-weight FMAs
per vector. relay_passes/tag_grouped_conv.py marks the functions this rule takes.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.target import Target

from unsparse_tvm.ops import names

from ._common import (ScheduleRule, cpu_vector_lanes, extents, finish_register_tile, has_block, largest_divisor,
                      pow2_divisor, sample_choice)

OP = names.DEPTHWISE_CONV2D
CONV_BLOCKS = ("group_conv2d_nchw", "DepthwiseConv2d")  # TOPI's names (relax legalize, topi.nn)


@dataclass
class Config:
    vec: int = 0         # lanes of the innermost width split; 0 = the target's vector register
                         # (cpu_vector_lanes), narrowed to the largest divisor of the output width
    unroll: int = 8      # vectors of one output row accumulated in registers per weight tap
    rows: int = 0        # output rows accumulated together; 0 = enough for ACCUMULATORS vectors (a 4-wide
                         # row is one vector: alone, its 25 taps of a 5x5 are one FMA latency chain)


ACCUMULATORS = 8  # independent FMA chains that hide the FMA latency (2 pipes x 4 cycles)


def conv_block(sch: s_tir.Schedule) -> str | None:
    return next((b for b in CONV_BLOCKS if has_block(sch, b)), None)


def _width(sch: s_tir.Schedule) -> int:
    return extents(sch, sch.get_loops(sch.get_sblock(conv_block(sch))))[3]


def _height(sch: s_tir.Schedule) -> int:
    return extents(sch, sch.get_loops(sch.get_sblock(conv_block(sch))))[2]


def schedule(sch: s_tir.Schedule, func: tirx.PrimFunc, target: Target, cfg: Config) -> None:
    """The schedule at the knobs cfg, fitted to the output width (no ragged splits)."""
    width, height = _width(sch), _height(sch)
    vec = _lanes(width, cfg.vec or cpu_vector_lanes(target)[0])
    unroll = largest_divisor(width // vec, cfg.unroll)
    rows = cfg.rows or -(-ACCUMULATORS // unroll)
    _schedule(sch, vec, unroll, largest_divisor(height, rows))


def space(sch: s_tir.Schedule) -> list[s_tir.Schedule]:
    """MetaSchedule design spaces: one per vector width (16, 8 lanes, narrowed to a divisor of the output
    width); in each, the register tile (vectors per row x rows) drawn from the divisors of the row's
    vectors and of the output's height."""
    width, height = _width(sch), _height(sch)
    spaces = []
    for vec in sorted({_lanes(width, v) for v in (16, 8)}, reverse=True):
        s = sch.copy()
        _schedule(s, vec, sample_choice(s, [d for d in range(1, 9) if (width // vec) % d == 0]),
                  sample_choice(s, [d for d in range(1, 9) if height % d == 0]))
        spaces.append(s)
    return spaces


def _lanes(width: int, lanes: int) -> int:
    """The vector width: the largest power of two dividing the row, up to `lanes` (a 14-lane vector is
    8 + 4 + 2 lane instructions; 56 = 7 x 8 lanes is 7 whole ones); a row with none of 4 or more (odd maps,
    14 or 7 wide) is one vector op as a whole. TagGroupedConv leaves rows too wide for that to the fallback."""
    vec = pow2_divisor(width, lanes)
    return vec if vec >= 4 else width


def fits(width: int) -> bool:
    """Whether the rule can vectorise a row this wide (see _lanes)."""
    return pow2_divisor(width, 16) >= 4 or width <= 64


def stride_of(sch: s_tir.Schedule) -> tuple[int, int]:
    """(the conv's horizontal stride, its padded input's width): the widest step that still fits the
    padded row (TOPI's block does not record it)."""
    conv = sch.get_sblock(conv_block(sch))
    _, _, _, width, _, _, kw = extents(sch, sch.get_loops(conv))
    padded = int(sch.get(conv).reads[0].source.shape[3])
    return ((padded - kw) // (width - 1) if width > 1 else 1), padded


# Stride-2 layers, TVM's fallback -> this rule's phase split, one thread, AVX2 Zen 3 (benchmarks/dw_layers.py
# --stride 2, 12 mobilenet_v2 / efficientnet_b0 shapes at 224 and 128, two runs): 1.2-4.2x faster, e.g.
# 3x3s with 96 channels on 112x112 545 -> 307 us, 144 on 32x32 145 -> 61; 5x5 672 on 16x16 455 -> 140;
# one layer within noise (192 on 28x28: 0.89x in one run, 1.25x in the other). (While the copy was vectorised by TVM, a lane-by-lane gather, the split lost to the fallback
# on most 3x3s, 0.6-0.95x, and was taken only from 4 taps per padded element.)


# ... but on 16-lane code (AVX-512, Zen 4) the 3x3s on maps of 16 or less ran about 2x slower than the
# fallback (240 channels on 16x16: 103 vs 47 us; 576 on 14x14: 199 vs 97), where the AVX2 code of the same
# layers beat it (40 vs 48, 64 vs 78; dw_layers.py --stride 2, UNSPARSE_MCPU=haswell); the 5x5s on 16x16
# still gained 2.6x. Those 3x3s go to the fallback on 16-lane targets.
SMALL_PADDED_ROW = 18


def supports(sch: s_tir.Schedule) -> bool:
    """Whether the rule takes this conv: stride 1, or stride 2 where its padded input can be stored as two
    column-phase planes (even width, a padding block to re-lay out), except 3x3s on small maps in
    16-lane code (above)."""
    stride, padded = stride_of(sch)
    if not fits(_width(sch)):
        return False
    if stride == 1:
        return True
    conv = sch.get_sblock(conv_block(sch))
    pads = _pads(sch, conv)  # the layout to transform
    if stride != 2 or padded % 2 or not pads:
        return False
    target = Target.current(allow_none=True)
    small_3x3 = extents(sch, sch.get_loops(conv))[6] == 3 and padded <= SMALL_PADDED_ROW
    return not (small_3x3 and target is not None and cpu_vector_lanes(target)[0] >= 16)


def _spatial(sch: s_tir.Schedule, block) -> bool:
    return all(iv.iter_type == 0 for iv in sch.get(block).iter_vars)


def _pads(sch: s_tir.Schedule, conv) -> list:
    """The conv's spatial producers: its padded input (TOPI's pad_temp)."""
    return [p for p in sch.get_producers(conv) if _spatial(sch, p)]


def _schedule(sch: s_tir.Schedule, vec: int, unroll, rows) -> None:
    conv = sch.get_sblock(conv_block(sch))
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    pads = _pads(sch, conv)
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
    stride, _ = stride_of(sch)
    n, f, y, x, rc, ry, rx = sch.get_loops(conv)
    depthwise = extents(sch, [rc])[0] == 1
    if stride > 1:
        # a strided row read from NCHW is a gather; the padded input's columns stored as `stride` phase
        # planes ([.., h, w % s, w // s]) make tap rx of output x column x + rx // s of plane rx % s
        for pad in pads:
            sch.transform_layout(pad, ("write", 0), lambda b, c, h, w: (b, c, h, tirx.floormod(w, stride),
                                                                        tirx.floordiv(w, stride)))
    xo, xu, xi = sch.split(x, [None, unroll, vec])
    yo, yi = sch.split(y, [None, rows])
    # `rows` x `unroll` vectors accumulate in registers; each weight tap is one broadcast + that many FMAs
    sch.reorder(n, f, yo, xo, rc, ry, rx, yi, xu, xi)
    nf = sch.fuse(n, f)
    sch.parallel(nf)
    finish_register_tile(sch, conv, acc, xo, xi, [ry, rx, yi, xu], rc)
    for pad in pads:
        # inlining the pad instead puts its bounds test on every tap (measured 2-4x slower)
        if depthwise:  # one channel's plane, built where it is read (it stays in cache)
            sch.compute_at(pad, nf)
            col = sch.get_loops(pad)[-1]
            if stride > 1:
                # the phases innermost and unrolled, the columns left to LLVM, which reads a padded row with
                # contiguous vector loads and deinterleaves them with shuffles (TVM's vectorize would gather
                # each strided read lane by lane: 2-5x slower)
                sch.unroll(sch.split(col, [None, stride])[1])
            else:
                sch.vectorize(col)
        else:  # a group's input channels serve several outputs: pad them once, in parallel
            loops = sch.get_loops(pad)
            sch.parallel(sch.fuse(*loops[:2]))


RULE = ScheduleRule((OP,), "llvm", Config, schedule, space)
