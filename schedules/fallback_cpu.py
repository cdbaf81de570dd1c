"""x86 fallback for every PrimFunc no other rule scheduled (pooling, elementwise, dense matmul,
grouped convs): parallelise the outer data-parallel loops of each root block, vectorise the
innermost one where it is data parallel. Nothing is left as a serial naive loop nest."""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.target import Target

from ._common import extents


@dataclass
class Config:
    min_parallel: int = 2       # fuse outer spatial loops until this many parallel iterations exist
    max_vector: int = 64        # innermost spatial extents up to this are vectorised


def apply(func: tirx.PrimFunc, target: Target, config: Config | None = None) -> s_tir.Schedule | None:
    if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
        return None
    cfg = config or Config()
    sch = s_tir.Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root")) if _has_root(sch) else []
    if not blocks:
        return None
    blocks = _inline_elementwise(sch, blocks)
    for block in blocks:
        _schedule_block(sch, block, cfg)
    return sch


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
        if not last and _is_spatial(sch, block) and consumers and all(_is_spatial(sch, c) for c in consumers):
            try:
                sch.compute_inline(block)
                continue
            except Exception:  # e.g. a block writing an output buffer: keep it
                pass
        remaining.append(block)
    return remaining


def _has_root(sch: s_tir.Schedule) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:
        return False


def _schedule_block(sch: s_tir.Schedule, block, cfg: Config) -> None:
    loops = sch.get_loops(block)
    if not loops:
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
