"""x86 schedule for the grouped sparse direct conv2d (sparse_ops.sparse_conv2d with fmt "vellV").

The V rows of a group share their offsets, so per stored offset the kernel loads `unroll` contiguous input
vectors once and multiplies each by the V rows' weights (broadcasts): a register tile of V x unroll
accumulators for 1 + V + unroll loads, against ~2 loads per FMA for ungrouped rows. Parallel over
(batch, tiles of groups); the row tile's weights stay in L1 while it walks the whole flat domain. On a map
smaller than a vector (2x2), row lanes instead: a vector spans positions x a group's rows (_schedule_row_lanes).
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.target import Target

from unsparse_tvm.ops import names
from unsparse_tvm.ops.geometry import row_lanes_fit

from ._common import (ScheduleRule, cpu_vector_lanes, domain_attr, domain_lanes, extents, finish_register_tile,
                      flat_epilogue, largest_divisor, offset_dtype, place_decode, pow2_divisor, rows_are_domain,
                      sample_choice, schedule_epilogue_cpu, schedule_pad_cpu, split_row_tile, vector_widths)
from .x86_row_lanes import intrin as row_lanes_intrin

OP = names.SPARSE_CONV2D_GROUPED
# Entries per group (the format's width) from which the default interleaves groups: a tile of g groups runs to
# its longest (schedules/row_extents), 5-8% more entries with 4 groups of 115-230 (vgg16-cifar vector-4 at 95%:
# its 512x256 3x3 on 4x4, 139 wide, 0.029 -> 0.031 ms with 4 groups; 260-wide layers level or faster)
MIN_INTERLEAVED_WIDTH = 192
# Row lanes (ConvGeometry.with_row_lanes): the default interleaves groups up to half the vector registers in
# accumulators (16 of AVX-512's 32: 16 groups of one vector; AVX2's 8: 4 groups of two), in tasks of up to 32
# groups (at least 4 tasks where that leaves a whole interleaved tile each).
# vgg16-cifar's 512x512 3x3 on 2x2 at 90% vector-4, one thread, old kernel 0.053 ms: AVX-512 4 / 8 / 16 groups
# 0.050 / 0.043 / 0.038 (tasks of 8, 8, 32); AVX2 code 2 / 4 / 8 groups 0.056 / 0.049 / 0.053 (16 accumulators spill).
# Not kept: the interleaved groups' weights stored side by side (formats.interleave_rows: one stream, not 16),
# level in the model, 0.056 -> 0.056 ms (AVX2 code 0.062 -> 0.064), the weights streaming from L3 either way;
# their offsets side by side too, which LLVM loaded as one vector and took apart lane by lane on the shuffle
# port the FMAs' input shuffles need: 0.038 -> 0.050 ms alone.
ROW_LANE_TILE = 32


@dataclass
class Config:
    tile_g: int = 0   # groups per parallel task; 0 = ~16 rows' worth (as the ungrouped rule's tile_k)
    vec: int = 0      # lanes of the output axis; 0 = one vector register of the target (16 AVX-512, 8 AVX2)
    unroll: int = 0   # vectors per group and offset; 0 = the most that keeps V x unroll accumulators within
                      # 3/4 of the vector registers (the rest: the input vectors and the broadcast weight)
    g_inner: int = 0  # groups interleaved inside the nonzero loop: more independent FMA chains where a group's
                      # tile is a vector or two (a 4x4 or 2x2 map: V = 4 chains, each FMA waiting on the last);
                      # 0 = as many as keep g_inner x V x unroll within 3/4 of the registers, where rows are
                      # long enough (MIN_INTERLEAVED_WIDTH)


def schedule(sch: s_tir.Schedule, func: tirx.PrimFunc, target: Target, cfg: Config) -> None:
    """The schedule at the knobs cfg (defaults fitted to the shapes where a knob is 0 or too large)."""
    lanes, registers = cpu_vector_lanes(target)
    if domain_attr(func, "row_lanes"):
        _, groups, positions, v, _ = extents(sch, sch.get_loops(sch.get_sblock("conv")))
        # accumulators up to half the registers, positions * V / lanes a group (see ROW_LANE_TILE)
        chains = max(1, registers // 2 // (positions * v // lanes))
        tile_g = largest_divisor(groups, cfg.tile_g or max(chains, min(ROW_LANE_TILE, groups // 4)))
        g_inner = largest_divisor(tile_g, cfg.g_inner or chains)
        _schedule_row_lanes(sch, func, lanes, tile_g, g_inner)
        return
    _, groups, v, q, width = extents(sch, sch.get_loops(sch.get_sblock("conv")))
    vec = pow2_divisor(q, domain_lanes(func, cfg.vec or lanes))  # the flat domain: 8k positions (patches: 4k)
    unroll = largest_divisor(q // vec, cfg.unroll or max(1, registers * 3 // 4 // v))
    tile_g = largest_divisor(groups, cfg.tile_g or max(1, 16 // v))
    chains = max(1, registers * 3 // 4 // (v * unroll)) if width >= MIN_INTERLEAVED_WIDTH else 1
    g_inner = largest_divisor(tile_g, cfg.g_inner or chains)
    _schedule(sch, func, tile_g, vec, unroll, g_inner)


def space(sch: s_tir.Schedule) -> list[s_tir.Schedule]:
    """One design space per vector width and g_inner; tile_g (a multiple of g_inner) and unroll drawn from
    exact divisors, the register tile g_inner x V x unroll kept within 4..24 accumulators where the loops
    allow."""
    func = sch.mod["main"]
    if domain_attr(func, "row_lanes"):
        return _row_lane_space(sch, func)
    _, groups, v, q, _ = extents(sch, sch.get_loops(sch.get_sblock("conv")))
    spaces = []
    for vec in vector_widths(func, q):
        for g_inner in [d for d in (1, 2, 4) if groups % d == 0 and (d == 1 or d * v * 2 <= 24)]:
            chains = g_inner * v
            unrolls = [u for u in range(1, 9) if (q // vec) % u == 0]
            unrolls = [u for u in unrolls if 4 <= chains * u <= 24] or [u for u in unrolls if chains * u <= 24] or [1]
            tiles = [t for t in range(g_inner, min(groups, 32) + 1, g_inner) if groups % t == 0]
            s = sch.copy()
            _schedule(s, func, sample_choice(s, tiles), vec, sample_choice(s, unrolls), g_inner)
            spaces.append(s)
    return spaces


def _row_lane_space(sch: s_tir.Schedule, func: tirx.PrimFunc) -> list[s_tir.Schedule]:
    """Row lanes: one design space per vector width (16 or 8 lanes, as the other spaces: the target is not
    known here) and g_inner (up to 24 accumulators); tile_g a multiple of g_inner up to 64 groups."""
    _, groups, positions, v, _ = extents(sch, sch.get_loops(sch.get_sblock("conv")))
    spaces = []
    for lanes in [w for w in (16, 8) if row_lanes_fit(positions, w, v)]:
        vectors = positions * v // lanes
        for g_inner in [d for d in (2, 4, 8, 16) if groups % d == 0 and d * vectors <= 24]:
            tiles = [t for t in range(g_inner, min(groups, 64) + 1, g_inner) if groups % t == 0]
            s = sch.copy()
            _schedule_row_lanes(s, func, lanes, sample_choice(s, tiles), g_inner)
            spaces.append(s)
    return spaces


def _schedule(sch: s_tir.Schedule, func: tirx.PrimFunc, tile_g, vec, unroll, g_inner: int = 1) -> None:
    cx, rows, cols = (int(d) for d in func.attrs["unsparse.pad_shape"])
    schedule_pad_cpu(sch, cx, rows, cols)
    overlap = domain_attr(func, "overlap")
    flat = not overlap and flat_epilogue(sch, "conv", cols, rows_are_domain(func))
    block = sch.get_sblock("conv")
    acc = sch.cache_write(block, 0, "local")
    n, g, v, q, j = sch.get_loops(block)
    go, gio, gii, qo, qu, qv = split_row_tile(sch, g, q, tile_g, g_inner, unroll, vec)
    sch.reorder(n, go, qo, gio, j, gii, v, qu, qv)
    par = sch.fuse(n, go)
    sch.parallel(par)
    finish_register_tile(sch, block, acc, gio, qv, [qu, v, gii], j)
    place_decode(sch, "conv", par, extents(sch, [qo])[0])  # quantised weights (te_quant_ops)
    schedule_epilogue_cpu(sch, flat, overlap)  # flat: bias/residual/ReLU in the accumulators' write-back


def _schedule_row_lanes(sch: s_tir.Schedule, func: tirx.PrimFunc, lanes: int, tile_g: int, g_inner: int) -> None:
    """Row lanes (ConvGeometry.with_row_lanes; the conv stage [N, G, Q, V]): per stored entry, each vector of
    P positions x V rows one tensorized FMA (x86_row_lanes), g_inner groups interleaved for independent FMA
    chains, tile_g groups a parallel task. The epilogue runs in its own loop (its reads transpose [Q, V]
    back to channels: 8 KB for 512 channels)."""
    cx, rows, cols = (int(d) for d in func.attrs["unsparse.pad_shape"])
    schedule_pad_cpu(sch, cx, rows, cols)
    block = sch.get_sblock("conv")
    acc = sch.cache_write(block, 0, "local")
    n, g, q, r, j = sch.get_loops(block)
    v = extents(sch, [r])[0]
    p = lanes // v  # positions per vector
    go, gi = sch.split(g, [None, tile_g])
    gio, gii = sch.split(gi, [None, g_inner])
    qo, qi = sch.split(q, [None, p])
    sch.reorder(n, go, gio, j, gii, qo, qi, r)
    sch.parallel(sch.fuse(n, go))
    sch.reverse_compute_at(acc, gio)
    init = sch.decompose_reduction(block, j)
    sch.vectorize(sch.split(sch.fuse(*sch.get_loops(init)[-2:]), [None, lanes])[1])
    sch.vectorize(sch.split(sch.fuse(*sch.get_loops(acc)[-2:]), [None, lanes])[1])
    sch.tensorize(r if p == 1 else qi, row_lanes_intrin(p, v, offset_dtype(sch, block)))  # p 1: AVX2, v 8
    sch.unroll(qo)
    sch.unroll(gii)
    schedule_epilogue_cpu(sch)


RULE = ScheduleRule((OP,), "llvm", Config, schedule, space)
