"""x86 schedule for the int8 sparse direct conv2d (int8_ops.sparse_conv2d_int8).

As sparse_conv2d_cpu's register tile, with int32 accumulators: per output-channel row and stored weight
quad j, the broadcast quad times `unroll` vectors of `lanes` input quads, tensorized to one vpdpbusd
(VNNI) or vpmaddubsw + vpmaddwd (AVX2) per vector; parallel over (batch, output-channel tiles).
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.target import Target

from unsparse_tvm.ops import names
from unsparse_tvm.ops.geometry import MAP_SPLIT_POSITIONS

from ._common import (MAX_DEFAULT_ROWS, ScheduleRule, cpu_vector_lanes, domain_attr, extents, flat_epilogue,
                      has_block, lanes_of_domain, largest_divisor, offset_dtype, pow2_divisor, rows_are_domain,
                      sample_choice, schedule_epilogue_cpu, split_row_tile, vectorize_flat)
from .x86_int8 import int8_kind, intrin

OP = names.SPARSE_CONV2D_INT8


@dataclass
class Config:
    tile_k: int = 16   # output channels per parallel task
    unroll: int = 0    # vectors accumulated per loaded weight quad; 0 = largest divisor up to 8
    k_inner: int = 0   # rows interleaved inside the quad loop; 0 = enough rows for ~16 accumulators, at most
                       # MAX_DEFAULT_ROWS (as the fp32 rule: vgg16-cifar channel4 90%'s 2x2 layers 50 -> 38 us)
                       # and what the registers hold (_tile_registers)
    map_parts: int = 2  # on maps of MAP_SPLIT_POSITIONS or more, parts of the map outermost in the parallel loop
                        # (where its step count divides), so each thread writes and reads its own part of the map


def _lanes(target: Target, q_extent: int) -> int:
    from tvm.target import codegen

    lanes = cpu_vector_lanes(target)[0]
    if int8_kind(target) == "pmadd" and not codegen.target_has_features("avx512bw", target):
        lanes = 8  # 512-bit vpmaddubsw needs AVX512BW
    return pow2_divisor(q_extent, lanes)  # q_extent is a multiple of 8


def schedule(sch: s_tir.Schedule, func: tirx.PrimFunc, target: Target, cfg: Config) -> None:
    _schedule(sch, func, target, cfg.tile_k, cfg.unroll, cfg.k_inner or domain_attr(func, "interleave"), clamp=True,
              cfg_parts=cfg.map_parts)


def _tile_registers(target_lanes: int) -> int:
    """The vector registers a register tile's accumulators may take: AVX-512's 32 (16 int32 lanes) or AVX2's 16
    (8), less the 3 the quad loop holds besides them (the broadcast weight quad, a product, vpmaddwd's ones).
    AVX2 code took 16 accumulators as AVX-512's did and LLVM kept 3-4 of them on the stack, a load and a store
    each per quad (vgg16-cifar channel4 int8's 32x32 layers, 8 vectors x 2 rows)."""
    return (32 if target_lanes >= 16 else 16) - 3


def interleave_tile(rows: int, q_extent: int, lanes: int, row: int = 0) -> int:
    """The rows the default schedule interleaves (the clamp below, at the Config defaults; lanes: the target's
    int8 vector lanes, narrowed to a row domain's row as the schedule does): the tile by which the pass
    stores a layer's quad rows (formats.interleave_rows)."""
    cfg = Config()
    return _clamp(rows, q_extent, pow2_divisor(q_extent, lanes_of_domain(lanes, row=row)), cfg.tile_k, cfg.unroll,
                  cfg.k_inner, _tile_registers(lanes))[2]


def map_parts(q_extent: int, lanes: int) -> int:
    """The parts the default schedule runs a conv's map in, outermost in its parallel loop (1: the map whole,
    threads taking ranges of output channels): for the relay that writes the conv's input to split its planes
    alike. lanes: the target's int8 vector lanes."""
    cfg = Config()
    lanes = pow2_divisor(q_extent, lanes)
    steps = q_extent // lanes // _clamp(1, q_extent, lanes, 1, cfg.unroll, 1)[1]
    return _parts(q_extent, steps, cfg.map_parts, lanes)


def _parts(q_extent: int, steps: int, parts: int, lanes: int) -> int:
    """A map of MAP_SPLIT_POSITIONS or more in `parts` of whole steps, under AVX-512 (16 lanes). AVX2's 56x56
    maps run in odd step counts (49, 51: 8 vectors of 8 a step), so its kernels keep the channel split: the stem
    and its relay alone split measured level to 2% slower."""
    return parts if lanes >= 16 and q_extent >= MAP_SPLIT_POSITIONS and steps % parts == 0 else 1


def _clamp(rows: int, q_extent: int, lanes: int, tile_k: int, unroll: int, k_inner: int,
           registers: int = _tile_registers(16)) -> tuple:
    """The knobs fitted to the conv's extents, defaults where a knob is 0: (tile_k, unroll, k_inner); the
    default k_inner keeps the tile's accumulators within `registers` (_tile_registers)."""
    tile_k = largest_divisor(rows, tile_k)
    unroll = largest_divisor(q_extent // lanes, unroll or 8)
    rows_default = min(MAX_DEFAULT_ROWS, max(1, -(-16 // unroll)), max(1, registers // unroll))
    return tile_k, unroll, largest_divisor(tile_k, k_inner or rows_default)


def space(sch: s_tir.Schedule) -> list[s_tir.Schedule]:
    """Design space for MetaSchedule: tile_k and unroll sampled from exact divisors (k_inner fixed per
    space: the loop structure depends on it)."""
    func = sch.mod["main"]
    target = Target.current(allow_none=True)
    if target is None:  # outside a target scope: this machine's CPU
        from unsparse_tvm.target import llvm_target_dict

        target = Target(llvm_target_dict())
    ext = extents(sch, sch.get_loops(sch.get_sblock("conv")))
    rows, inner = ext[1], ext[2]
    lanes = _lanes(target, inner)
    spaces = []
    tile = domain_attr(func, "interleave")  # rows stored by tiles of T (the pass): T, the default, is in the space
    for k_inner in sorted({d for d in (1, 2, 4, tile) if d and rows % d == 0}):
        tiles = [k_inner * m for m in range(1, 32 // k_inner + 1) if rows % (k_inner * m) == 0]
        unrolls = [u for u in range(1, 9) if (inner // lanes) % u == 0 and k_inner * u <= 24]
        if not unrolls:
            continue
        s = sch.copy()
        _schedule(s, func, target, sample_choice(s, tiles), sample_choice(s, unrolls), k_inner, clamp=False)
        spaces.append(s)
    return spaces


def _schedule(sch: s_tir.Schedule, func: tirx.PrimFunc, target: Target, tile_k, unroll, k_inner,
              clamp: bool, cfg_parts: int = Config.map_parts) -> None:
    quads, rows, cols = (int(x) for x in func.attrs["unsparse.pad_shape"])
    if has_block(sch, "pad_patch"):
        _schedule_patches(sch, quads, rows, cols)
    elif has_block(sch, "pad_q"):  # else the input arrives in quads (ops.quad_relay)
        n, i, v = sch.get_loops(sch.get_sblock("pad_q"))
        ci, _, _ = sch.split(i, [quads, rows, cols])
        sch.parallel(sch.fuse(n, ci))
        sch.vectorize(v)
    # the output is the flat domain: a pointwise conv whose map is whole vectors (re-indexed), or a wide one
    pair = domain_attr(func, "pair")  # two convs' rows, 2k + h, in one kernel (ops.sparse_int8.sparse_conv2d_int8_pair)
    wide = len(sch.get_loops(sch.get_sblock("epilogue"))) == 3
    flat = wide or (not pair and flat_epilogue(sch, "conv", cols, rows_are_domain(func)))  # see _schedule_epilogue

    block = sch.get_sblock("conv")
    acc = sch.cache_write(block, 0, "local")
    n, k, q, j, v = sch.get_loops(block)
    ext = extents(sch, [n, k, q, j, v])
    lanes = lanes_of_domain(_lanes(target, ext[2]), row=domain_attr(func, "row_domain"))  # vectors inside a row
    if clamp:
        tile_k, unroll, k_inner = _clamp(ext[1], ext[2], lanes, tile_k, unroll, k_inner,
                                         _tile_registers(cpu_vector_lanes(target)[0]))
    ko, kio, kii, qo, qu, qv = split_row_tile(sch, k, q, tile_k, k_inner, unroll, lanes)
    parts = _parts(ext[2], extents(sch, [qo])[0], cfg_parts, lanes)
    if parts > 1:  # the map's parts outermost: thread t takes part t (TVM hands each thread a contiguous range
        qp, qo = sch.split(qo, [parts, None])  # of the parallel loop), as the relays and the pool split theirs
        sch.reorder(n, qp, ko, qo, kio, j, kii, qu, qv, v)
        par = sch.fuse(n, qp, ko)
    else:
        sch.reorder(n, ko, qo, kio, j, kii, qu, qv, v)
        par = sch.fuse(n, ko)
    sch.parallel(par)
    sch.reverse_compute_at(acc, kio)
    init = sch.decompose_reduction(block, j)
    sch.vectorize(sch.get_loops(init)[-1])
    # the write-back (dequantise, epilogue, requantise where flat) in vectors of one register: left as one
    # vector of the whole tile width, LLVM emitted the uint8 requantisation in 8-lane pieces (resnet50 95%
    # channel4, one thread: 7.78 -> 7.53 ms). On AVX2 a whole-width vector of 8 registers ran faster (11.4 vs
    # 12.0 ms), but one of 7 (int32x56: the 28x28, 14x14 and 7x7 maps' tiles) LLVM took apart lane by lane
    # through the stack, ~84 vpextrd/vpinsrd a row tile (resnet50 95% channel4 on Zen 3: 1.31x one thread)
    wb = sch.get_loops(acc)[-1]
    sch.vectorize(wb if _whole_write_back(lanes, extents(sch, [wb])[0]) else sch.split(wb, [None, lanes])[1])
    sch.tensorize(qv, intrin(int8_kind(target), lanes, offset_dtype(sch, block)))
    sch.unroll(qu)
    sch.unroll(kii)
    if pair:
        _schedule_pair_epilogue(sch, qo, lanes)
        return
    _schedule_epilogue(sch, target, par, flat, cols, ordered=bool(domain_attr(func, "row_order")))


def _whole_write_back(lanes: int, width: int) -> bool:
    """The register tile's write-back as one vector of its whole width (AVX2, a power of two) rather than
    one register at a time (see _schedule)."""
    return lanes < 16 and width & (width - 1) == 0


def _schedule_pair_epilogue(sch: s_tir.Schedule, qo, lanes: int) -> None:
    """A pair's epilogue reads two rows' sums per output, which no write-back can inline: over the flat output
    p = y*OW + x, right after each step of the row tile's sums (qo), which are still in L1, in vectors."""
    ep = sch.get_sblock("epilogue")
    _, _, oh, ow = extents(sch, sch.get_loops(ep))
    sch.transform_block_layout(ep, lambda n, k, y, x: (n, k, y * ow + x))
    sch.reverse_compute_at(ep, qo)
    vectorize_flat(sch, sch.get_loops(ep)[-1], lanes)


def _schedule_patches(sch: s_tir.Schedule, quads: int, rows: int, ow: int) -> None:
    """Patches (int8_ops._quad_patches, pad shape [Cq, R*S*OH, OW]): per channel quad (in parallel) its padded
    plane of quads, then its taps' rows cut from it, each one vector of OW words."""
    n, i, v = sch.get_loops(sch.get_sblock("pad_patch"))
    ci, _, x = sch.split(i, [quads, rows, ow])
    par = sch.fuse(n, ci)
    sch.parallel(par)
    sch.vectorize(sch.fuse(x, v))
    plane = sch.get_sblock("pad_q")
    sch.compute_at(plane, par)
    sch.vectorize(sch.get_loops(plane)[-1])


def _schedule_epilogue(sch: s_tir.Schedule, target: Target, par, flat: bool, cols: int, ordered: bool) -> None:
    """flat: dequantise, bias, residual, ReLU (and requantise) in the accumulators' write-back, as the fp32
    kernel does: the int32 sums are not written out and read back (resnet50's 256x64 1x1s on 56x56, whose
    3.2 MB of sums made them the slowest int8 layers). Else a pass of its own: see below; rows stored sorted
    (ordered: the sums read at row_of[k], which no region pattern matches) always in a pass of its own."""
    if flat:
        schedule_epilogue_cpu(sch, True)
        return
    ep = sch.get_sblock("epilogue")
    ow = extents(sch, sch.get_loops(ep))[3]
    if ow != cols or ordered:
        schedule_epilogue_cpu(sch, False)
        return
    # a pointwise conv whose map is not whole vectors (14x14, 7x7: Wq == OW, q_extent > OH*OW): its epilogue
    # over the flat output p = y*OW + x, in whole vectors and a short tail (loop_partition), run inside the
    # conv's parallel row tile right after the tile's sums, which are still in cache (resnet50 95% channel4,
    # one thread: 8.21 -> 7.99 ms; layer4's 1x1s 12-30% each). Over (y, x) reverse_compute_at cannot place it:
    # the read conv[y*Wq + x] does not match a region pattern where Wq > OW (3x3s keep their own pass)
    sch.transform_block_layout(ep, lambda n, k, y, x: (n, k, y * ow + x))
    sch.reverse_compute_at(ep, par)
    vectorize_flat(sch, sch.get_loops(ep)[-1], cpu_vector_lanes(target)[0])


RULE = ScheduleRule((OP,), "llvm", Config, schedule, space)
