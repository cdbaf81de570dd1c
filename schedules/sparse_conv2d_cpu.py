"""x86 schedule for the sparse direct conv2d (sparse_ops.sparse_conv2d).

Per output channel k and nonzero j, one broadcast weight times `unroll` contiguous input vectors,
accumulated in registers over the row's nonzeros; parallel over (batch, output-channel tiles).
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.target import Target

from unsparse_tvm.hostcpu import l2_bytes
from unsparse_tvm.ops import names
from unsparse_tvm.target import runnable_here

from ._common import (MAX_DEFAULT_ROWS, ScheduleRule, cpu_vector_lanes, domain_attr, domain_lanes, extents,
                      finish_register_tile, flat_epilogue, fork_join, has_block, lanes_of_domain, largest_divisor,
                      place_decode, pow2_divisor, rows_are_domain, sample_choice, schedule_epilogue_cpu,
                      schedule_pad_cpu, split_row_tile, vector_widths, vectorize_flat)

OP = names.SPARSE_CONV2D


@dataclass
class Config:
    tile_k: int = 16   # output channels per parallel task (enough tasks for two cores on VGG's 64-row layers)
    vec: int = 0       # lanes of the innermost output axis; 0 = one vector register of the target (16 AVX-512,
                       # 8 AVX2), narrowed where it does not divide the flat domain (4x4 and 2x2 maps)
    unroll: int = 0    # vectors accumulated in registers per loaded (weight, offset); 0 = the largest
                       # divisor of the row's vectors up to 8 (a 5- or 7-vector row stays in registers)
    k_inner: int = 0   # rows interleaved inside the nonzero loop: independent FMA chains where a row's
                       # output tile is only a vector or two; 0 = enough rows for half the vector registers
                       # in accumulators (16 of AVX-512's 32, 8 of AVX2's 16: the rest hold inputs, weights),
                       # at most MAX_DEFAULT_ROWS
    spatial_outer: int = 0  # 1: every row tile inside each spatial chunk, -1: row tiles outside; 0 = inside
                            # where the input outgrows L2 and each row uses it little (spatial_outer_pays)


# An input past L2 is streamed from L3 by every row tile. 2 MB: the core the rule was first fitted on (a Xeon VM).
DEFAULT_L2_BYTES = 2 << 20
# The tuning space's bar (space() has no target; the search runs where the code is measured): this machine's L2.
L2_INPUT_BYTES = l2_bytes() or DEFAULT_L2_BYTES


def l2_input_bytes(target: Target) -> int:
    """The L2 of the CPU the code will run on, as the calibration decides (cost.calibration.rates_for):
    this machine's (Linux sysfs) where it executes the target's code, else DEFAULT_L2_BYTES."""
    return (runnable_here(target) is None and l2_bytes()) or DEFAULT_L2_BYTES


def _input_bytes(func: tirx.PrimFunc) -> int:
    """Bytes of the padded float32 input the rows read (unsparse.pad_shape: channels x rows x columns)."""
    cx, rows, cols = (int(v) for v in func.attrs["unsparse.pad_shape"])
    return 4 * cx * rows * cols


def spatial_outer_pays(input_bytes: int, row_entries: int, channels: int, l2: int) -> bool:
    """Row tiles outermost re-read the whole padded input once per tile; past L2 that is a stream from L3
    each time, which only pays off where each row has many entries per input channel to spend it on.
    Measured one thread (rocketlake, 90%): 1x1 convs on 56x56 (3.2 MB of input, ~0.1 entries per row
    per channel) 128x256 1.33 -> 0.90 ms, 64x256 0.78 -> 0.62 with spatial chunks outermost; a 3x3 on
    224x224 (13 MB, ~1 entry per channel) 14.7 -> 17.3 ms (ell), so that one keeps its rows outermost;
    at 1.6 MB (256x512 1x1 on 28x28) and below either order is within 4% there (a 2 MB L2). On a Zen 3 core
    (512 KB L2), the inputs of 0.8-1.6 MB gain too: resnet50 90% end to end 1.03-1.04x one thread."""
    return input_bytes > l2 and 2 * row_entries < channels



# A kernel of fewer multiply-adds than this (stored entries x positions) runs without a parallel loop: its fork
# and join through TVM's pool cost more than a second core gains, on one thread too. The sparse conv rule
# alone, 90%, Xeon, so_profile.py A/B (ms, one thread / two): mobilenet_v2@128 0.712 / 0.741 -> 0.616 / 0.623
# (34 of its 51 convs), efficientnet_b0@128 1.546 / 1.463 -> 1.492 / 1.343, vgg16-cifar level (1.586 / 1.036
# -> 1.584 / 1.041); at 1M, efficientnet lost at two threads (1.588) and at 4M vgg16-cifar did (1.546).
SERIAL_FMAS = 200_000


def schedule(sch: s_tir.Schedule, func: tirx.PrimFunc, target: Target, cfg: Config) -> None:
    """The schedule at the knobs cfg (defaults fitted to the shapes where a knob is 0 or too large)."""
    lanes, registers = cpu_vector_lanes(target)
    cx = int(func.attrs["unsparse.pad_shape"][0])
    ext = extents(sch, sch.get_loops(sch.get_sblock("conv")))  # n, rows, positions, entries per row (hyb: ell's)
    outer = cfg.spatial_outer > 0 or (cfg.spatial_outer == 0 and
                                      spatial_outer_pays(_input_bytes(func), ext[3], cx, l2_input_bytes(target)))
    _schedule(sch, func, cfg.tile_k, domain_lanes(func, cfg.vec or lanes), cfg.unroll, clamp=True,
              k_inner=cfg.k_inner or domain_attr(func, "interleave"), accumulators=registers // 2, spatial_outer=outer,
              parallel=ext[0] * ext[1] * ext[2] * ext[3] >= SERIAL_FMAS)


def space(sch: s_tir.Schedule) -> list[s_tir.Schedule]:
    """MetaSchedule design spaces (unsparse-tvm tune): the same schedule with its knobs sampled.

    One design space per vector width and k_inner (rows interleaved inside the nonzero loop: 1 is a
    row's nonzeros innermost, k_inner = tile_k the nonzero loop outside the whole row tile); in each,
    tile_k (a multiple of k_inner) and unroll are drawn with sample_categorical from the exact divisors
    of their loops, so no tile is ragged. Where the loops allow, the register tile k_inner x unroll holds
    4..24 accumulator vectors (fewer leaves FMA latency exposed, more spills) and tile_k is at least 4
    (parallel tasks of a useful size): a budget of a few trials per layer goes to sensible points.
    Structure that depends on a knob is fixed per design space: a trace replays split factors, but a
    Python `if` on a sampled value would not be in it. So the loop order (spatial_outer) doubles the spaces,
    only where the input outgrows L2 (elsewhere both orders run alike)."""
    func = sch.mod["main"]
    ext = extents(sch, sch.get_loops(sch.get_sblock("conv")))
    rows, inner = ext[1], ext[2]
    orders = (False, True) if _input_bytes(func) > L2_INPUT_BYTES else (False,)
    spaces = []
    for vec in vector_widths(func, inner):
        # rows stored by tiles of T (unsparse.interleave) are read in storage order with k_inner T, the default;
        # the search may still find another k_inner faster, so every one stays in the space
        for k_inner in [d for d in (1, 2, 4, 8, 16) if rows % d == 0]:
            tiles = [k_inner * m for m in range(1, 32 // k_inner + 1) if rows % (k_inner * m) == 0]
            tiles = [t for t in tiles if t >= 4] or tiles
            unrolls = [u for u in range(1, 9) if (inner // vec) % u == 0]
            unrolls = [u for u in unrolls if 4 <= k_inner * u <= 24] or [u for u in unrolls if k_inner * u <= 24]
            if not unrolls:
                continue
            for outer in orders:
                s = sch.copy()
                _schedule(s, func, sample_choice(s, tiles), vec, sample_choice(s, unrolls), clamp=False,
                          k_inner=k_inner, spatial_outer=outer)
                spaces.append(s)
    return spaces


def _pow2_at_least(n: int) -> int:
    v = 1
    while v < n:
        v *= 2
    return v


def interleave_tile(rows: int, q_extent: int, lanes: int, overlap: int = 0, row: int = 0) -> int:
    """The rows the default schedule interleaves in its register tile (what _schedule_rows picks at the Config
    defaults for `lanes`, with an overlapped domain's or a row domain's lanes as domain_lanes narrows them):
    the tile by which the pass stores a layer's rows (formats.interleave_rows)."""
    cfg = Config()
    accumulators = lanes  # half the registers: AVX-512's 32 of 16 lanes, AVX2's 16 of 8 (schedule())
    return _clamp(rows, q_extent, cfg.tile_k, lanes_of_domain(lanes, overlap, row), cfg.unroll, cfg.k_inner,
                  accumulators)[3]


def _clamp(rows: int, q_extent: int, tile_k: int, vec: int, unroll: int, k_inner: int, accumulators: int) -> tuple:
    """The knobs fitted to a stage's extents, defaults where a knob is 0: (tile_k, vec, unroll, k_inner)."""
    tile_k = largest_divisor(rows, tile_k)
    vec = pow2_divisor(q_extent, vec)
    unroll = largest_divisor(q_extent // vec, unroll or min(8, accumulators))
    chains = min(MAX_DEFAULT_ROWS, _pow2_at_least(-(-accumulators // unroll)))
    return tile_k, vec, unroll, largest_divisor(tile_k, k_inner or chains)


def _schedule_rows(sch, name, tile_k, vec, unroll, clamp, k_inner=1, accumulators=16, spatial_outer=False,
                   parallel=True):
    """Schedule one reduction stage ("conv" or "conv_ovf", loops [n, k, q, j]); returns its outer loop, parallel
    unless `parallel` is False (a small kernel, SERIAL_FMAS).

    Register tile per step of the nonzero loop j: k_inner rows x unroll vectors of vec lanes.
    With clamp (apply), the knobs are fitted to the extents; without (space), they arrive sampled
    from exact divisors."""
    block = sch.get_sblock(name)
    acc = sch.cache_write(block, 0, "local")
    loops = sch.get_loops(block)
    ext = extents(sch, loops)
    if clamp:
        tile_k, vec, unroll, k_inner = _clamp(ext[1], ext[2], tile_k, vec, unroll, k_inner, accumulators)
    n, k, q, j = loops
    ko, kio, kii, qo, qu, qv = split_row_tile(sch, k, q, tile_k, k_inner, unroll, vec)  # q_extent: a multiple of 8
    if spatial_outer:
        sch.reorder(n, qo, ko, kio, j, kii, qu, qv)
        par = sch.fuse(n, qo)
    else:
        sch.reorder(n, ko, qo, kio, j, kii, qu, qv)
        par = sch.fuse(n, ko)
    fork_join(sch, par, parallel)
    finish_register_tile(sch, block, acc, kio, qv, [qu, kii], j)
    # hyb's overflow rows are few and short: their decode stays inline (a decode stage is ~7 KB of code)
    place_decode(sch, name, par, extents(sch, [qo])[0] if name == "conv" and not spatial_outer else 0)
    return par


def _schedule(sch: s_tir.Schedule, func: tirx.PrimFunc, tile_k, vec, unroll, clamp: bool,
              k_inner: int = 1, accumulators: int = 16, spatial_outer: bool = False, parallel: bool = True) -> None:
    cx, rows, cols = (int(v) for v in func.attrs["unsparse.pad_shape"])
    hyb = has_block(sch, "conv_ovf")  # ask before decompose_reduction renames it "conv_ovf_update"
    schedule_pad_cpu(sch, cx, rows, cols, parallel)
    if has_block(sch, "gate"):  # a folded squeeze-excitation gate (ops.sparse.gate_stage): its C scales once
        vectorize_flat(sch, sch.get_loops(sch.get_sblock("gate"))[-1], 8)
    overlap = domain_attr(func, "overlap")
    flat = not hyb and not overlap and flat_epilogue(sch, "conv", cols, rows_are_domain(func))
    _schedule_rows(sch, "conv", tile_k, vec, unroll, clamp, k_inner, accumulators, spatial_outer, parallel)
    if hyb:
        _schedule_rows(sch, "conv_ovf", tile_k, vec, unroll, clamp, k_inner, accumulators, spatial_outer, parallel)
    schedule_epilogue_cpu(sch, flat, overlap, parallel)  # flat: bias/residual/ReLU in the accumulators' write-back


RULE = ScheduleRule((OP,), "llvm", Config, schedule, space)
