"""x86 fallback for every PrimFunc no other rule scheduled (pooling, elementwise, dense matmul,
grouped convs): parallelise the outer data-parallel loops of each root block, vectorise the
innermost one where it is data parallel. Nothing is left as a serial naive loop nest."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.target import Target

from ._common import cpu_vector_lanes, extents, finish_register_tile, pow2_divisor


@dataclass
class Config:
    min_parallel: int = 2       # fuse outer spatial loops until this many parallel iterations exist
    max_vector: int = 64        # innermost spatial extents up to this are vectorised


class FallbackCPU(dl.ScheduleRule):
    """The rule for what no other rule took (runs last in the pipeline's schedule phase, on llvm)."""

    def __init__(self, config: Config | None = None):
        self.config = config

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool = False) -> s_tir.Schedule | None:
        return schedule(func, target, self.config)


def schedule(func: tirx.PrimFunc, target: Target, config: Config | None = None) -> s_tir.Schedule | None:
    if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
        return None
    cfg = config or Config()
    sch = s_tir.Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root")) if _has_root(sch) else []
    if not blocks:
        return None
    blocks = _inline_window_padding(sch, _inline_elementwise(sch, blocks))
    lanes, registers = cpu_vector_lanes(target)
    for block in blocks:
        if _is_window(sch, block):  # a pool: parallel over (N, C), the rows, columns and window serial inside
            sch.parallel(sch.fuse(*sch.get_loops(block)[:2]))
        elif not _spatial_vector_reduction(sch, block, lanes, registers // 2):
            _schedule_block(sch, block, cfg)
    return sch


def _spatial_vector_reduction(sch: s_tir.Schedule, block, lanes: int, accumulators: int) -> bool:
    """A reduction whose largest operand runs contiguously along the innermost spatial axis, not along the
    reduction (a linear layer, its weight folded to [in, out]: out[n, j] = sum_k x[n, k] * W[k, j]): vectors
    over j, the sum over k outside them, accumulators in registers (up to `accumulators`: several vectors of
    j and, for a small batch, every row n, so each weight vector loaded serves them all), so the weight
    streams row by row. The rfactor of _vector_reduction gathers W across 16 rows per vector there: 1.6 ms
    for a 512x512 linear on one thread, 10 us this way. False, nothing changed, elsewhere."""
    b, loops = sch.get(block), sch.get_loops(block)
    spatial = _spatial_then_reduction(sch, block)
    if not spatial:  # None, or a reduction with no spatial axis to vectorise over
        return False
    big = max(b.reads, key=lambda r: math.prod(int(d) for d in r.source.shape), default=None)
    last = big.region[-1].min if big is not None else None
    ext = extents(sch, loops)
    lanes = pow2_divisor(ext[spatial - 1], lanes)  # 8 where 16 does not divide (1000 classes)
    if not isinstance(last, tirx.Var) or not last.same_as(b.iter_vars[spatial - 1].var) or lanes < 4 \
            or len(b.writes) != 1:  # argmax-like reducers write two buffers
        return False
    rows = ext[spatial - 2] if spatial >= 2 and ext[spatial - 2] <= accumulators else 1  # a small batch
    tile = next(t for t in (4, 2, 1) if ext[spatial - 1] % (t * lanes) == 0 and rows * t <= accumulators)
    jo, ju, jv = sch.split(loops[spatial - 1], [None, tile, lanes])
    outer = loops[:spatial - 1] if rows == 1 else loops[:spatial - 2]
    inner = [] if rows == 1 else [loops[spatial - 2]]
    sch.reorder(*outer, jo, *loops[spatial:], *inner, ju, jv)
    par = sch.fuse(*outer, jo) if outer else jo
    sch.parallel(par)
    acc = sch.cache_write(block, 0, "local")
    finish_register_tile(sch, block, acc, par, jv, inner + [ju], loops[spatial])
    return True


def _is_window(sch: s_tir.Schedule, block) -> bool:
    """A pooling window: [N, C, OH, OW] reduced over (kh, kw) of one input (not a global pool: OH x OW > 1,
    which _vector_reduction sums in vector lanes)."""
    loops = sch.get_loops(block)
    return _spatial_then_reduction(sch, block) == 4 and len(loops) == 6 and len(sch.get(block).reads) == 1 \
        and math.prod(extents(sch, loops[2:4])) > 1


def _inline_window_padding(sch: s_tir.Schedule, blocks: list) -> list:
    """A pooling window reads its padding in place (a bounds test per load) instead of from a padded copy
    made first, and runs parallel over (N, C) with its rows inside: resnet50's 3x3/2 max pool, 64 channels
    of 112x112, one thread, 436 -> 237 us (371 with (N, C, OH) fused into the parallel loop, as the generic
    schedule does). The window stays innermost and scalar: vectorised over output columns, its stride-2
    loads made a 2x2 pool of 64 channels on 32x32 4x slower (4.0 -> 19 us)."""
    names = [sch.get(b).name_hint for b in blocks]  # a block's handle is gone once it is inlined
    inlined = set()
    for block in blocks:
        if sch.get(block).name_hint in inlined or not _is_window(sch, block):
            continue
        for producer in sch.get_producers(block):
            if _is_spatial(sch, producer):
                inlined.add(sch.get(producer).name_hint)
                sch.compute_inline(producer)
    return [b for b, name in zip(blocks, names) if name not in inlined]


def _is_spatial(sch: s_tir.Schedule, block) -> bool:
    return all(iv.iter_type == 0 for iv in sch.get(block).iter_vars)


def _inline_elementwise(sch: s_tir.Schedule, blocks: list) -> list:
    """Inline each data-parallel block whose consumers are all data parallel (concat, BN's reshapes,
    subtract, multiply, add, ReLU of a fused group become one loop nest): one parallel region and no
    intermediate buffer instead of one of each per block. This also keeps LLVM's work small: densenet's
    concat + BN + ReLU groups were ten vectorised loop nests each. Producers of a reduction (a conv's
    pad) stay, so a window reads a buffer instead of recomputing its bounds test per tap."""
    remaining = []
    for i, block in enumerate(blocks):
        last = i == len(blocks) - 1
        consumers = sch.get_consumers(block)
        if not last and _is_spatial(sch, block) and consumers and all(_is_spatial(sch, c) for c in consumers) \
                and not _broadcast(sch, block, consumers):
            try:
                sch.compute_inline(block)
                continue
            except Exception:  # e.g. a block writing an output buffer: keep it
                pass
        remaining.append(block)
    return remaining


def _broadcast(sch: s_tir.Schedule, block, consumers: list) -> bool:
    """Whether a consumer iterates over many more points than the block (SE's sigmoid gate, one value
    per channel, multiplied into the whole map): inlined, the block's math would be redone per point."""
    size = _domain(sch, block)
    return any(_domain(sch, c) >= 4 * size for c in consumers)


def _domain(sch: s_tir.Schedule, block) -> int:
    return math.prod(extents(sch, sch.get_loops(block)))


def _has_root(sch: s_tir.Schedule) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:
        return False


REDUCE_LANES = 16  # partial sums per reduction (one AVX-512 register; AVX2 splits it in two)


def _spatial_then_reduction(sch: s_tir.Schedule, block) -> int | None:
    """The number of leading data-parallel axes of a block whose other axes are all reductions, one loop per
    axis (what both vectorised reductions below rewrite); None for any other block, or one with no reduction."""
    kinds = [iv.iter_type for iv in sch.get(block).iter_vars]
    spatial = next((i for i, k in enumerate(kinds) if k != 0), len(kinds))
    if spatial == len(kinds) or any(k != 2 for k in kinds[spatial:]) or len(kinds) != len(sch.get_loops(block)):
        return None
    return spatial


def _vector_reduction(sch: s_tir.Schedule, block) -> bool:
    """A sum over innermost reduction loops (global average pooling: SE blocks, classifier heads) as
    REDUCE_LANES vector partial sums (rfactor), then one short sum of those: as a scalar chain each add
    waits for the previous one (240 channels of a 16x16 map: 39 us). False, nothing changed, where the
    block is not that shape or the extent has no 4..16-lane divisor."""
    loops = sch.get_loops(block)
    spatial = _spatial_then_reduction(sch, block)
    if spatial is None:
        return False
    red_ext = math.prod(extents(sch, loops[spatial:]))
    # the widest divisor up to a register's lanes, not only powers of 2: a 7x7 map's 49 in vectors of 7 and a
    # 14x14's 196 of 14 (efficientnet_b0's squeeze-excitation means over 1152 channels of 7x7: 21 -> 7 us)
    lanes = next((d for d in range(REDUCE_LANES, 3, -1) if red_ext % d == 0), 0)
    if lanes < 4 or red_ext < 2 * lanes:
        return False
    try:
        r = sch.fuse(*loops[spatial:]) if len(loops) - spatial > 1 else loops[spatial]
        _, ri = sch.split(r, [None, lanes])
        rf = sch.rfactor(ri, factor_axis=spatial)
    except Exception:  # a reducer rfactor does not take (max, argmin...): keep the plain schedule
        return False
    rf_loops = sch.get_loops(rf)
    lead = sch.fuse(*rf_loops[:spatial]) if spatial > 1 else rf_loops[0]
    sch.parallel(lead)
    sch.reorder(sch.get_loops(rf)[-2], sch.get_loops(rf)[-1])  # lanes innermost: vector accumulators
    sch.vectorize(sch.get_loops(rf)[-1])
    sch.reverse_compute_at(block, lead)  # each (n, c)'s final short sum right after its partial sums
    return True


def _schedule_block(sch: s_tir.Schedule, block, cfg: Config) -> None:
    loops = sch.get_loops(block)
    if not loops:
        return
    if _vector_reduction(sch, block):
        return
    kinds = [iv.iter_type for iv in sch.get(block).iter_vars]
    # iter_type 0 is data parallel; only loops that map 1:1 to leading data-parallel block vars are safe
    spatial = 0
    for kind in kinds:
        if kind != 0 or spatial >= len(loops):
            break
        spatial += 1
    if spatial == 0:
        return
    ext = extents(sch, loops)
    lead, count = [], 1
    for i in range(spatial):
        lead.append(loops[i])
        count *= ext[i]
        if count >= cfg.min_parallel * 64:
            break
    try:
        sch.parallel(sch.fuse(*lead) if len(lead) > 1 else lead[0])
    except Exception:  # e.g. a loop carrying a dependence the primitive rejects: stay serial
        return
    inner = sch.get_loops(block)[-1]
    if spatial == len(loops) and len(lead) < spatial and ext[-1] <= cfg.max_vector:
        try:
            sch.vectorize(inner)
        except Exception:
            pass


RULE = FallbackCPU()
