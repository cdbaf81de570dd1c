"""CUDA schedule for the int8 sparse direct conv2d (int8_ops.sparse_conv2d_int8).

As sparse_conv2d_cuda's: one thread block per (batch x tile of output channels, range of output
positions), threadIdx.x over consecutive positions (coalesced 32-bit loads of input quads; the row's
weight quad and offset are one address across the warp, a broadcast), `per_thread` outputs per thread in
registers (a virtual thread). Per stored quad, one `__dp4a(u8x4 input word, s8x4 weight word, acc)`.
`dp4a=False` leaves the 4 products as plain integer multiply-adds: the OpenCL twin the PoCL checks run
(OpenCL has no dp4a), and the same TIR otherwise.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T
from tvm.target import Target

from unsparse_tvm.ops import names

from ._common import ScheduleRule, bind_elementwise_cuda, extents, largest_divisor, sample_divisor

OP = names.SPARSE_CONV2D_INT8
DP4A_INTRIN = "unsparse_u8s8_dp4a"


@functools.cache
def _dp4a_intrin() -> str:
    """DP4A_INTRIN, registered on first use (TVMScript parses each @T.prim_func by walking the whole
    Python stack: ~0.4 s apiece on import, paid by every command; see schedules/x86_int8.intrin)."""
    @T.prim_func(s_tir=True)
    def _dp4a_desc(x: T.handle, o: T.handle, w: T.handle, c: T.handle) -> None:
        X = T.match_buffer(x, (4,), "uint8", offset_factor=1)
        O = T.match_buffer(o, (1,), "int32", offset_factor=1)  # noqa: E741
        W = T.match_buffer(w, (4,), "int8", offset_factor=1)
        C = T.match_buffer(c, (1,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:1], X[0:4], O[0:1], W[0:4])
            T.writes(C[0:1])
            for v in T.serial(0, 4):
                with T.sblock("update"):
                    vv = T.axis.remap("R", [v])
                    T.reads(C[0], X[vv], O[0], W[vv])  # O: the block's offset read (see schedules/x86_int8.py)
                    T.writes(C[0])
                    C[0] = C[0] + T.Cast("int32", X[vv]) * T.Cast("int32", W[vv])

    @T.prim_func(s_tir=True)
    def _dp4a_impl(X: T.Buffer((4,), "uint8", offset_factor=1), O: T.Buffer((1,), "int32", offset_factor=1),
                   W: T.Buffer((4,), "int8", offset_factor=1),
                   C: T.Buffer((1,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:1], X[0:4], O[0:1], W[0:4])
            T.writes(C[0:1])
            # CUDA's __dp4a(unsigned, int, int): the first word's bytes unsigned, the second's signed
            C[0] = T.call_pure_extern("int32", "__dp4a", T.reinterpret(X.vload([0], dtype="uint8x4"), dtype="uint32"),
                                      T.reinterpret(W.vload([0], dtype="int8x4"), dtype="int32"), C[0])

    TensorIntrin.register(DP4A_INTRIN, _dp4a_desc, _dp4a_impl, override=True)
    return DP4A_INTRIN


@dataclass
class Config:
    threads_q: int = 64    # threads over output positions
    threads_k: int = 2     # threads over output channels
    per_thread: int = 2    # outputs per thread kept in registers
    dp4a: bool = True      # False: plain integer multiply-adds (OpenCL, for the PoCL checks)


def schedule(sch: s_tir.Schedule, func: tirx.PrimFunc, target: Target, cfg: Config) -> None:
    _schedule(sch, cfg.threads_q, cfg.threads_k, cfg.per_thread, cfg.dp4a, clamp=True)


def space(sch: s_tir.Schedule) -> list[s_tir.Schedule]:
    """One design space per per_thread (the q split must be exact, see _schedule), threads_q drawn from
    the exact divisors of what is left, threads_k a perfect tile of the rows."""
    q = extents(sch, sch.get_loops(sch.get_sblock("conv")))[2]
    spaces = []
    for per_thread in [p for p in (1, 2, 4) if (q // 8) % p == 0]:
        s = sch.copy()
        threads_q = sample_divisor(s, q // per_thread, 256, low=8)
        threads_k = s.sample_perfect_tile(s.get_loops(s.get_sblock("conv"))[1], n=2, max_innermost_factor=8)[1]
        _schedule(s, threads_q, threads_k, per_thread, True, clamp=False)
        spaces.append(s)
    return spaces


def _schedule(sch, threads_q, threads_k, per_thread, dp4a: bool, clamp: bool) -> None:
    bind_elementwise_cuda(sch, "pad_q")
    block = sch.get_sblock("conv")
    acc = sch.cache_write(block, 0, "local")
    n, k, q, j, v = sch.get_loops(block)
    if clamp:
        # exact splits of q (a multiple of 8): a ragged one puts a predicate on the block, and tensorize
        # does not match a predicated block
        qext = extents(sch, [q])[0]
        threads_k = largest_divisor(extents(sch, [k])[0], threads_k)
        threads_q = largest_divisor(qext, threads_q)
        if qext % (per_thread * threads_q):
            per_thread = 1
    ko, ki = sch.split(k, [None, threads_k])
    qo, qp, qi = sch.split(q, [None, per_thread, threads_q])
    sch.reorder(n, ko, qo, qp, ki, qi, j, v)
    sch.bind(sch.fuse(n, ko), "blockIdx.y")
    sch.bind(qo, "blockIdx.x")
    sch.bind(qp, "vthread.x")
    sch.bind(ki, "threadIdx.y")
    sch.bind(qi, "threadIdx.x")
    sch.reverse_compute_at(acc, qi)
    sch.decompose_reduction(block, j)
    if dp4a:
        sch.tensorize(v, _dp4a_intrin())
    else:
        sch.unroll(v)
    bind_elementwise_cuda(sch, "epilogue")


RULE = ScheduleRule((OP,), "cuda", Config, schedule, space)
