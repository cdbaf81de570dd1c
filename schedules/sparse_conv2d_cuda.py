"""CUDA schedule for the sparse direct conv2d (sparse_ops.sparse_conv2d).

One thread block per (batch, tile of output channels, range of output positions); threadIdx.x runs
over consecutive output positions, so each nonzero's input loads are coalesced, and the row's
(weight, offset) pairs are the same address across a warp (a broadcast). Each thread accumulates
`per_thread` outputs, strided by the thread count, in registers: the per-thread axis is a virtual
thread (vthread.x), so TVM keeps one accumulator per output and writes back exactly those. (A plain
loop there made the local write-back cover the bounding box of a thread's strided outputs, storing
uninitialised values over other threads' results: wrong whenever per_thread > 1.)
Grouped rows (vellV, op sparse_conv2d_grouped) take the same schedule with threads_k over groups: each
thread keeps the V rows of its group in registers, so one input load feeds V FMAs.
With batch > 1, each thread also keeps `batch_per_thread` images' outputs (a second virtual thread), so
one load of a (weight, offset) pair feeds per_thread * batch_per_thread FMAs instead of per_thread.
Where the output is exactly the flat domain (pointwise convs, ConvGeometry.flat_output) and the rows have
no hyb overflow, bias, residual and activation are applied in each thread's write-back: two kernels (pad,
conv) instead of three, and no [N, K, Q] sums written and read back (as the x86 schedules do). Where the
flat padded input is the input itself (stride-1 pointwise convs whose maps the domain covers exactly,
ConvGeometry.input_is_flat: 56x56 and 28x28), the pass hands the conv a view of it and there is no pad
kernel: one kernel in all (the H200's profile: that copy was 2.3-4.9 us of a 1x1 layer at batch 1).
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.target import Target

from unsparse_tvm.cost.gpu import auto_threads_q  # the default fitted on the H200 grid, shared with the model
from unsparse_tvm.ops import names

from ._common import (ScheduleRule, bind_elementwise_cuda, extents, flat_epilogue, has_block, largest_divisor,
                      sample_divisor)

OP = names.SPARSE_CONV2D
OPS = (OP, names.SPARSE_CONV2D_GROUPED)  # grouped rows (vellV): the same schedule, each thread's V rows in registers


@dataclass
class Config:
    threads_q: int = 0     # threads over output positions (coalesced loads); 0: auto_threads_q
    threads_k: int = 2     # threads over output channels (different rows in one block)
    per_thread: int = 2    # outputs per thread kept in registers
    batch_per_thread: int = 2  # images per thread (clamped to a divisor of the batch): weight loads shared



def schedule(sch: s_tir.Schedule, func: tirx.PrimFunc, target: Target, cfg: Config) -> None:
    """The schedule at the knobs cfg (defaults fitted to the shapes where a knob is 0 or too large)."""
    threads_q = cfg.threads_q
    if not threads_q:
        loops = sch.get_loops(sch.get_sblock("conv"))
        batch, width = extents(sch, [loops[0], loops[-1]])
        threads_q = auto_threads_q(batch, width)
    _schedule(sch, threads_q, cfg.threads_k, cfg.per_thread, cfg.batch_per_thread, clamp=True)


def space(sch: s_tir.Schedule) -> None:
    threads_q = sch.sample_categorical([32, 64, 128, 256], [0.25] * 4)
    k = sch.get_loops(sch.get_sblock("conv"))[1]
    threads_k = sch.sample_perfect_tile(k, n=2, max_innermost_factor=8)[1]
    per_thread = sch.sample_categorical([1, 2, 4], [0.3, 0.4, 0.3])
    batch = extents(sch, [sch.get_loops(sch.get_sblock("conv"))[0]])[0]
    batch_per_thread = sample_divisor(sch, batch, 4)
    _schedule(sch, threads_q, threads_k, per_thread, batch_per_thread, clamp=False)


def _rows(sch, name, threads_q, threads_k, per_thread, batch_per_thread, clamp):
    block = sch.get_sblock(name)
    acc = sch.cache_write(block, 0, "local")
    loops = sch.get_loops(block)
    n, k, q, j = loops[0], loops[1], loops[-2], loops[-1]  # k: rows, or groups of V rows; q = y*Wq + x
    v = loops[2] if len(loops) == 5 else None               # grouped: the V rows sharing each offset
    if clamp:
        threads_k = largest_divisor(extents(sch, [k])[0], threads_k)
        batch_per_thread = largest_divisor(extents(sch, [n])[0], batch_per_thread)
        if extents(sch, [q])[0] % (per_thread * threads_q):
            per_thread = 1  # a ragged 3-way split trips TVM's bound analyzer
    no, nb = sch.split(n, [None, batch_per_thread])
    ko, ki = sch.split(k, [None, threads_k])
    qo, qp, qi = sch.split(q, [None, per_thread, threads_q])
    sch.reorder(no, ko, qo, nb, qp, ki, qi, j, *([v] if v is not None else []))
    sch.bind(sch.fuse(no, ko), "blockIdx.y")
    sch.bind(qo, "blockIdx.x")
    sch.bind(nb, "vthread.y")
    sch.bind(qp, "vthread.x")
    sch.bind(ki, "threadIdx.y")
    sch.bind(qi, "threadIdx.x")
    sch.reverse_compute_at(acc, qi)
    if v is not None:
        sch.unroll(v)
    sch.decompose_reduction(block, j)


def _schedule(sch, threads_q, threads_k, per_thread, batch_per_thread, clamp: bool) -> None:
    if has_block(sch, "pad_flat"):  # else the pass gave the input's flat view (ConvGeometry.input_is_flat)
        bind_elementwise_cuda(sch, "pad_flat")
    hyb = has_block(sch, "conv_ovf")  # ask before decompose_reduction renames it
    _, _, cols = (int(v) for v in sch.mod["main"].attrs["unsparse.pad_shape"])
    # a pointwise conv whose output is the flat domain: the epilogue (bias, residual, activation) in each
    # thread's write-back, one kernel and one output pass fewer (hyb's second producer keeps it apart)
    flat = not hyb and flat_epilogue(sch, "conv", cols)
    for name in ("conv", "conv_ovf") if hyb else ("conv",):
        _rows(sch, name, threads_q, threads_k, per_thread, batch_per_thread, clamp)
    if flat:
        sch.reverse_compute_inline(sch.get_sblock("epilogue"))
    else:
        bind_elementwise_cuda(sch, "epilogue")


RULE = ScheduleRule(OPS, "cuda", Config, schedule, space)
