"""Small helpers shared by the schedule rules."""

from __future__ import annotations

import math
from typing import Callable

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl

from unsparse_tvm.ops.names import STRIDE, op_of

class ScheduleRule(dl.ScheduleRule):
    """One hand-written schedule for some unsparse operators (ops/names.py) on one target kind: a TVM dlight
    rule, so `dl.ApplyDefaultSchedule` applies it. `apply(func, target, tunable)` returns None where the rule
    does not apply, the schedule at this rule's knobs (`config`, default `Config()`), or with tunable the
    design space (`space(sch)`: the same schedule with its knobs sampled, what MetaSchedule tunes).
    `schedule(sch, func, target, cfg)` does the work; `with_config(cfg)` is the rule at other knobs."""

    def __init__(self, ops: tuple[str, ...], target_kind: str, Config: type, schedule: Callable, space: Callable,
                 config=None):
        self.ops, self.target_kind, self.Config = ops, target_kind, Config
        self.schedule, self.space, self.config = schedule, space, config

    def with_config(self, config) -> "ScheduleRule":
        return ScheduleRule(self.ops, self.target_kind, self.Config, self.schedule, self.space, config)

    def apply(self, func: tirx.PrimFunc, target, tunable: bool = False):
        if op_of(func) not in self.ops or target.kind.name != self.target_kind:
            return None
        sch = s_tir.Schedule(func)
        if tunable:
            return self.space(sch)
        self.schedule(sch, func, target, self.config or self.Config())
        return sch


def largest_divisor(n: int, cap: int) -> int:
    """Largest divisor of n that is <= cap (>= 1)."""
    for d in range(min(n, max(cap, 1)), 0, -1):
        if n % d == 0:
            return d
    return 1


def pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two <= cap dividing n (the vector widths a flat output domain allows)."""
    v = 1
    while v * 2 <= cap and n % (v * 2) == 0:
        v *= 2
    return v


def sample_divisor(sch: s_tir.Schedule, n: int, cap: int, low: int = 1):
    """For space(): a divisor of n in [low, cap] (or 1 if there is none), drawn with sample_categorical
    (uniform), so a tuned split is never ragged; a plain int when there is only one such divisor."""
    return sample_choice(sch, [d for d in range(low, min(n, cap) + 1) if n % d == 0] or [1])


def row_tile(rows: int, tile_cap: int, inner_cap: int) -> tuple[int, int]:
    """(row groups per task, rows interleaved in a group) for a rows-by-nonzeros kernel at its default knobs:
    a task of up to tile_cap rows, inner_cap of them interleaved (independent FMA chains), no ragged tile.
    The interleave is chosen first: a 1000-row classifier with the task first (10 rows) got 2 chains, not 4
    (1000x1280 at 90%, one thread, AVX2 Zen 3: 99.8 -> 80.1 us with 4)."""
    inner = largest_divisor(rows, inner_cap)
    return largest_divisor(rows // inner, max(1, tile_cap // inner)), inner


def inner_spaces(sch: s_tir.Schedule, rows: int, cap: int, build: Callable, inners=(1, 2, 4, 8)) -> list:
    """Design spaces of a rows-by-nonzeros kernel: one per rows-interleaved count (a structural choice)
    dividing `rows`, the groups per task drawn from the exact divisors (up to `cap` rows a task);
    `build(sch, groups_per_task, inner)` schedules a copy."""
    spaces = []
    for inner in [d for d in inners if rows % d == 0]:
        s = sch.copy()
        build(s, sample_divisor(s, rows // inner, max(1, cap // inner)), inner)
        spaces.append(s)
    return spaces


def sample_choice(sch: s_tir.Schedule, choices: list[int]):
    """For space(): a knob drawn uniformly from choices (a plain int when there is only one)."""
    if len(choices) == 1:
        return choices[0]
    return sch.sample_categorical(choices, [1.0 / len(choices)] * len(choices))


def has_block(sch: s_tir.Schedule, name: str) -> bool:
    try:
        sch.get_sblock(name)
        return True
    except Exception:  # tvm raises a generic error for a missing block
        return False


def extents(sch: s_tir.Schedule, loops) -> list[int]:
    return [int(sch.get(l).extent) for l in loops]


def offset_dtype(sch: s_tir.Schedule, block) -> str:
    """The stored offsets' dtype (int32, or uint16: formats.compact_offsets) a conv update block reads: the
    global int32/uint16 buffer, not int32 accumulators. Tensor intrinsics are registered per offset dtype."""
    return next(str(r.source.dtype) for r in sch.get(block).reads
                if r.source.dtype in ("int32", "uint16") and r.source.scope() == "global")


PAD_VECTOR = 16  # lanes of the pad copy's explicit vector loop (a power of two dividing a row, >= 4)


# A strided padded copy (phase rows narrower than the input) unrolls its rows up to this many columns: each
# column's bounds test and source offset become constants. resnet50's 3x3/2 layers, one thread: 128 channels
# on 56x56 1019 -> 891 us, 256 on 28x28 827 -> 779 us (the copy alone, at 99.95% sparsity: 310 -> 196 us).
# Stride-1 copies stay rolled (a 64-channel 3x3 on 56x56: 629 -> 653 us unrolled).
PAD_UNROLL = 64


def fork_join(sch: s_tir.Schedule, loop, parallel: bool = True) -> None:
    """`loop` across the thread pool, or left serial: a parallel loop costs a fork and a join through TVM's
    pool on every call, even on one thread (a small kernel pays more for them than it gains)."""
    if parallel:
        sch.parallel(loop)


def schedule_pad_cpu(sch: s_tir.Schedule, c: int, rows: int, cols: int, parallel: bool = True) -> None:
    """Flat padded input: split i back into (channel, phase row, column) so the index div/mod fold away,
    parallel over channels.

    An unpadded input (1x1 convs, strided or not: rows x cols covers exactly H x W) is copied with an
    explicit vector loop: left alone, LLVM vectorised that copy across rows with 64-bit gathers and
    scatters, slower than the sparse conv it feeds (resnet50's 256->64 1x1 on 56x56: 1.4 ms -> 0.36 ms
    for the whole operator; its strided 256->512: 2.9 -> 1.2 ms). A padded copy stays scalar: its
    bounds test per lane made the vector loop slower (a 3x3 on 56x56: 0.57 -> 0.95 ms). An operator given
    the flat view of its input (ConvGeometry.input_is_flat) has no copy to schedule. parallel=False: the
    channel loop runs serially (a small kernel, see fork_join)."""
    if not has_block(sch, "pad_flat"):
        return
    if has_block(sch, "pad_plane"):
        _schedule_patches(sch, c, rows, cols, parallel)
        return
    block = sch.get_sblock("pad_flat")
    x_shape = [int(v) for v in sch.get(block).reads[0].source.shape]
    n, i = sch.get_loops(block)
    attrs = sch.mod["main"].attrs
    sh, sw = (int(v) for v in (attrs[STRIDE] if attrs is not None and STRIDE in attrs else (1, 1)))  # passes mark it
    if len(x_shape) == 4 and (sh, sw) != (1, 1) and rows % (sh * sw) == 0:
        # phase planes [c, ph, pw, hq, wq]: for each source row, the column phases innermost and unrolled and
        # the columns left to LLVM, which loads the row with contiguous vectors and deinterleaves them with
        # shuffles into the planes (split this way, no index div/mod is left either)
        ci, ph, pw, hh, ww = sch.split(i, [c, sh, sw, rows // (sh * sw), cols])
        sch.reorder(ci, ph, hh, ww, pw)
        fork_join(sch, sch.fuse(n, ci), parallel)
        sch.unroll(pw)
        return
    ci, row, col = sch.split(i, [c, rows, cols])
    fork_join(sch, sch.fuse(n, ci), parallel)
    if len(x_shape) == 4 and rows * cols == x_shape[2] * x_shape[3]:
        _vectorize_rows(sch, row, col, rows, cols)
    elif len(x_shape) == 4 and cols < x_shape[3] and cols <= PAD_UNROLL:
        sch.unroll(col)  # a strided conv's phase rows (narrower than the input), see PAD_UNROLL


PATCH_UNROLL_ROWS = 36  # patches' rows (taps x output rows) unrolled up to a 3x3 on 4x4: each row's tap and output row
                        # then constants, where a loop over them divided by 6 (a 2x2 map) twice per 2-float row


def _schedule_patches(sch: s_tir.Schedule, c: int, rows: int, ow: int, parallel: bool = True) -> None:
    """An input stored as patches (ops.sparse._patches, pad shape [C, R*S*OH, OW]): per channel (in parallel)
    its padded plane, then its taps' slices of it, each output row one explicit vector of OW lanes."""
    block = sch.get_sblock("pad_flat")
    n, i = sch.get_loops(block)
    ci, row, x = sch.split(i, [c, rows, ow])
    par = sch.fuse(n, ci)
    fork_join(sch, par, parallel)
    sch.compute_at(sch.get_sblock("pad_plane"), par)
    sch.vectorize(x)
    if rows <= PATCH_UNROLL_ROWS:
        sch.unroll(row)


def _vectorize_rows(sch: s_tir.Schedule, row, col, rows: int, cols: int) -> None:
    """An explicit vector loop over the innermost of a (rows, cols) nest: PAD_VECTOR lanes or the largest
    power of two down to 4 dividing a row, else over the fused nest (14x14, 7x7 maps); left scalar where
    neither has 4 lanes."""
    if pow2_divisor(cols, PAD_VECTOR) >= 4:
        sch.vectorize(sch.split(col, [None, pow2_divisor(cols, PAD_VECTOR)])[1])
    elif pow2_divisor(rows * cols, PAD_VECTOR) >= 4:
        sch.vectorize(sch.split(sch.fuse(row, col), [None, pow2_divisor(rows * cols, PAD_VECTOR)])[1])


def bind_elementwise_cuda(sch: s_tir.Schedule, block_name: str, threads: int = 256) -> None:
    block = sch.get_sblock(block_name)
    fused = sch.fuse(*sch.get_loops(block))
    bx, tx = sch.split(fused, [None, threads])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")


def tile_rows(sch: s_tir.Schedule, block, per_task: int, inner: int, *, reduction: int, lanes: int) -> tuple:
    """A row-tiled CPU kernel over loops (batch, rows, ...): the accumulator cached in registers, the rows
    split into parallel tasks of `per_task` groups of `inner` rows, iterated as (batch x task, group,
    reduction, row, lane); `reduction` and `lanes` are the positions of those loops in the block's nest.
    Returns (accumulator block, group loop, row loop, reduction loop, lane loop)."""
    acc = sch.cache_write(block, 0, "local")
    loops = sch.get_loops(block)
    outer, group, row = sch.split(loops[1], [None, per_task, inner])
    sch.reorder(loops[0], outer, group, loops[reduction], row, loops[lanes])
    sch.parallel(sch.fuse(loops[0], outer))
    return acc, group, row, loops[reduction], loops[lanes]


def split_row_tile(sch: s_tir.Schedule, rows, q, tile: int, inner: int, unroll: int, lanes: int) -> tuple:
    """A CPU register tile's splits: rows (or groups) in tasks of `tile`, `inner` of them interleaved inside
    the nonzero loop; the flat domain q in steps of `unroll` vectors of `lanes`. Returns (rows outer, tile
    outer, interleaved, q outer, unrolled, lanes) for the rule to order."""
    ko, ki = sch.split(rows, [None, tile])
    kio, kii = sch.split(ki, [None, inner])
    qo, qu, qv = sch.split(q, [None, unroll, lanes])
    return ko, kio, kii, qo, qu, qv


def finish_register_tile(sch: s_tir.Schedule, block, acc, at, vector, unrolled: list, reduction) -> None:
    """A CPU register tile: its write-back (`acc`, the cache_write block) placed at loop `at`, the `vector`
    loop vectorised and the `unrolled` loops unrolled; its init (zeroing) split off the reduction at loop
    `reduction`, and init and write-back vectorised too."""
    sch.reverse_compute_at(acc, at)
    lanes = extents(sch, [vector])[0]
    sch.vectorize(vector)
    for loop in unrolled:
        sch.unroll(loop)
    init = sch.decompose_reduction(block, reduction)
    sch.vectorize(sch.get_loops(init)[-1])
    # the write-back one register at a time: vectorised whole (unroll x lanes, e.g. 64), a SiLU epilogue's
    # temporaries took unroll registers each and spilled (efficientnet_b0's 16->96 expand 0.168 -> 0.149 ms)
    write_back = sch.get_loops(acc)[-1]
    positions = extents(sch, [write_back])[0]
    if positions > lanes and positions % lanes == 0:
        write_back = sch.split(write_back, [None, lanes])[1]
    sch.vectorize(write_back)


def schedule_epilogue_cpu(sch: s_tir.Schedule, flat: bool = False, overlap: int = 0, parallel: bool = True) -> None:
    """Crop + bias + residual + ReLU. flat (flat_epilogue re-indexed it): inlined into the accumulators'
    write-back. Else in its own parallel loop over (batch, channel), the flat domain's index map y*Wq + x
    being not invertible for reverse_compute_at (and hyb having two producers), with explicit vectors as
    in the pad copy: LLVM otherwise vectorised hyb's epilogue across rows with gathers and scatters (65% of
    a 144x24 1x1 conv's time on a 32x32 map). Rows of no 4-lane vectors (14x14, 7x7 maps) run per row in
    whole vectors and a short one: fused over (y, x) in 4-lane vectors, each lane's flat index y*Wq + x needed a
    division by OW, and the pass took 17% of a 256x256 3x3 on 14x14 (one thread, 90%: 0.536 -> 0.460 ms;
    the pass alone, at 0.1% of the weights, 0.101 -> 0.025 ms)."""
    if flat:
        sch.reverse_compute_inline(sch.get_sblock("epilogue"))
        return
    if overlap:
        _overlap_epilogue(sch, overlap, parallel)
        return
    n, k, y, x = sch.get_loops(sch.get_sblock("epilogue"))
    fork_join(sch, sch.fuse(n, k), parallel)
    rows, cols = extents(sch, [y, x])
    if cols >= 4 and pow2_divisor(cols, PAD_VECTOR) < 4:  # 14- or 7-wide rows: vectors and a short one (above)
        vectorize_flat(sch, x, 1 << (min(cols, PAD_VECTOR).bit_length() - 1))
        return
    _vectorize_rows(sch, y, x, rows, cols)


def _overlap_epilogue(sch: s_tir.Schedule, lanes: int, parallel: bool = True) -> None:
    """The epilogue of an overlapped flat domain (ConvGeometry.with_overlap; no thrown-away columns) over
    the flat output p = y*OW + x (ops.sparse.output_shape), in whole vectors of `lanes` up to the last one and
    a short vector for the rest (loop_partition): over (y, x), a 14x14 map ran in 4-lane vectors with 64-bit
    vector divisions by OW (the index simplifier left them), slower than no overlap at all."""
    n, k, p = sch.get_loops(sch.get_sblock("epilogue"))  # flat: ops.sparse.output_shape
    fork_join(sch, sch.fuse(n, k), parallel)
    vectorize_flat(sch, p, lanes)


def vectorize_flat(sch: s_tir.Schedule, loop, lanes: int) -> None:
    """A flat loop in whole vectors of `lanes` and, where they do not fill it, a short vector for the rest
    (loop_partition); under one vector, one short vector."""
    positions = extents(sch, [loop])[0]
    whole = positions - positions % lanes
    if whole == 0:
        sch.vectorize(loop)
        return
    if whole < positions:
        loop, tail = sch.loop_partition(loop, [whole, None])
        sch.vectorize(tail)
    sch.vectorize(sch.split(loop, [None, lanes])[1])


def flat_epilogue(sch: s_tir.Schedule, conv: str, cols: int, row_domain: bool = False) -> bool:
    """Where the output is exactly the flat domain (a pointwise conv: no padding, stride 1, q_extent ==
    OH*OW; formats.ConvGeometry.flat_output), re-index the epilogue over q = y*OW + x, so that
    schedule_epilogue_cpu(flat=True) can inline it into the accumulators' write-back: the output is then written once,
    from registers, instead of [N, K, Q] sums written, read back and written again (mobilenet's 96x16 1x1
    on a 64x64 map, 1-2 nonzeros a row, where the stores are the work: 0.118 -> 0.095 ms). False, and
    nothing changed, elsewhere."""
    if domain_attr(sch.mod["main"], "row_order"):  # rows stored sorted: the epilogue reads them by an index
        return False
    ep = sch.get_sblock("epilogue")
    n, _, oh, ow = extents(sch, sch.get_loops(ep))
    shape = sch.get(sch.get_sblock(conv)).writes[0].source.shape  # [N, K, Q] or grouped [N, G, V, Q]
    m, q = n // int(shape[0]), int(shape[-1])  # m images side by side in patches (ConvGeometry.images)
    if (cols != ow and not row_domain) or q != m * oh * ow:  # a row domain's rows are OW long whatever Wq
        return False
    sch.transform_block_layout(ep, lambda n, k, y, x: (n // m, k, n % m * (oh * ow) + y * ow + x))
    return True


def domain_attr(func: tirx.PrimFunc, name: str) -> int:
    """A conv's flat-domain attribute (relay_passes/sparsify_conv2d): unsparse.overlap (its lanes) or
    unsparse.row_domain (its output row length); 0 where unset."""
    key = f"unsparse.{name}"
    return int(func.attrs[key]) if func.attrs is not None and key in func.attrs else 0


def rows_are_domain(func: tirx.PrimFunc) -> bool:
    """Whether a conv's flat domain is its output map q = y*OW + x whatever its input pitch: a row domain
    (ConvGeometry.with_row_domain) or an input stored as patches (with_patches); for flat_epilogue."""
    return domain_attr(func, "row_domain") > 0 or domain_attr(func, "patches") > 0


def domain_lanes(func: tirx.PrimFunc, vec: int) -> int:
    """The vector width a conv's flat domain allows: vec; where the pass overlapped its last vectors
    (attribute unsparse.overlap = L, ConvGeometry.with_overlap) a divisor of L, which keeps every vector
    inside one shifted group of L lanes; in a row domain (unsparse.row_domain = OW, with_row_domain) a
    divisor of the output row: either way every vector is one contiguous load."""
    return lanes_of_domain(vec, domain_attr(func, "overlap"), domain_attr(func, "row_domain"))


def vector_widths(func: tirx.PrimFunc, q: int) -> list[int]:
    """The vector widths a design space may use over a flat domain of q positions: 16 and 8 where they divide
    it and the domain allows them (domain_lanes), else 4 (a 2x2 map's patches: 4 or 12 positions)."""
    return [v for v in (16, 8) if q % v == 0 and domain_lanes(func, v) == v] or [4] * (q % 4 == 0)


def lanes_of_domain(vec: int, overlap: int = 0, row: int = 0) -> int:
    """domain_lanes from the domain itself: an overlapped domain's lanes L (gcd), a row domain's row of OW."""
    return math.gcd(vec, overlap) if overlap else pow2_divisor(row, vec) if row else vec


# The x86 rules' default k_inner ceiling (rows interleaved in a register tile). Eight independent FMA chains
# cover an FMA's latency times its throughput (4 x 2 on Intel's 512-bit units, 4 x 1 on Zen 4's), and a taller
# tile runs each of its rows to the longest one's length. It binds on rows of one vector (4x4 and 2x2 maps with
# AVX-512, int8's 2x2 maps), which took 16 rows before. One thread, Xeon (rocketlake) VM, vgg16-cifar with rows
# sorted: 80% 3.88 -> 3.50 ms, 90% and 95% level (1.756/1.760, 0.933/0.930); int8 channel4 90% 0.639 -> 0.604 ms
# (2x2 layers 50 -> 38 us), 95% 0.424 -> 0.408, AVX2 code 1.054 -> 1.027.
MAX_DEFAULT_ROWS = 8


def cpu_vector_lanes(target) -> tuple[int, int]:
    """(float32 lanes of one vector register, vector registers) of an llvm target: AVX-512's 16 x 32 where
    the target has it, AVX2's 8 x 16 otherwise (read from the target, never assumed)."""
    from tvm.target import codegen

    return (16, 32) if codegen.target_has_features("avx512f", target) else (8, 16)


PREDECODE_MIN_TILES = 4  # output tiles per task from which decoding a task's rows once pays (measured 1.9x
                         # faster on a 64-channel 32x32 layer; on 4x4 maps, one tile, it was 2x slower)


def place_decode(sch, name, par, tiles: int) -> None:
    """Quantised weights (te_quant_ops, stages "<name>_wdec"/"_odec"): where a task walks several output
    tiles, decode its rows once into a small buffer at the task's loop; else inline the decode next to
    the FMA (a single tile decodes each weight once anyway, and the buffer would only add traffic)."""
    for stage in ("_wdec", "_odec"):
        if has_block(sch, name + stage):
            block = sch.get_sblock(name + stage)
            if tiles >= PREDECODE_MIN_TILES:
                sch.compute_at(block, par)
            else:
                sch.compute_inline(block)
