"""x86 tensor intrinsic for grouped rows with row lanes (ops.sparse._grouped_conv's [N, G, Q, V] stage,
ConvGeometry.with_row_lanes), registered on first use.

Description: C[i, v] += W[v] * X[i] for P positions i and the V rows v of one group and stored entry: one
vector of P x V lanes (ConvGeometry.with_row_lanes). Implementation: the V weights loaded once and repeated P
times (a 16-byte broadcast load, `vbroadcastf32x4` / `vbroadcastf128`), the P inputs loaded once and each
repeated V times (`vpermps`), one FMA. Left to TVM's vectoriser the same body indexed both operands by
lane % V and lane // V and became 16 scalar loads. (The input stored with each position repeated V times
instead, a plain vector load, ran 1.2x slower on vgg16-cifar's 512x512 3x3 on 2x2 at 90% vector-4, one thread,
AVX-512 and AVX2 code: four times the copy, and its reads from L2.)
"""

from __future__ import annotations

import functools
import re

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T


def _desc_one(v: int, offset: str):
    """P = 1 (AVX2's 8 lanes over 8 rows): the position loop of extent 1 is not in the block being tensorized, so
    the description has the row loop only."""
    @T.prim_func(s_tir=True)
    def desc(x: T.handle, o: T.handle, w: T.handle, c: T.handle) -> None:
        X = T.match_buffer(x, (1,), "float32", offset_factor=1)
        O = T.match_buffer(o, (1,), offset, offset_factor=1)  # noqa: E741 (the block's offset read)
        W = T.match_buffer(w, (v,), "float32", offset_factor=1)
        C = T.match_buffer(c, (v,), "float32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:v], W[0:v], X[0:1], O[0:1])
            T.writes(C[0:v])
            for r in T.serial(0, v):
                with T.sblock("update"):
                    vr = T.axis.remap("S", [r])
                    T.reads(C[vr], W[vr], X[0], O[0])
                    T.writes(C[vr])
                    C[vr] = C[vr] + W[vr] * X[0]

    @T.prim_func(s_tir=True)
    def impl(X: T.Buffer((1,), "float32", offset_factor=1), O: T.Buffer((1,), offset, offset_factor=1),
             W: T.Buffer((v,), "float32", offset_factor=1),
             C: T.Buffer((v,), "float32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:v], W[0:v], X[0:1], O[0:1])
            T.writes(C[0:v])
            C.vstore([0], C.vload([0], dtype=f"float32x{v}") + W.vload([0], dtype=f"float32x{v}")
                     * T.Broadcast(X[0], v))

    return desc, impl


def _desc(p: int, v: int, offset: str):
    @T.prim_func(s_tir=True)
    def desc(x: T.handle, o: T.handle, w: T.handle, c: T.handle) -> None:
        X = T.match_buffer(x, (p,), "float32", offset_factor=1)
        O = T.match_buffer(o, (1,), offset, offset_factor=1)  # noqa: E741 (the block's offset read)
        W = T.match_buffer(w, (v,), "float32", offset_factor=1)
        C = T.match_buffer(c, (p, v), "float32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:p, 0:v], W[0:v], X[0:p], O[0:1])
            T.writes(C[0:p, 0:v])
            for i in T.serial(0, p):
                for r in T.serial(0, v):
                    with T.sblock("update"):
                        vi, vr = T.axis.remap("SS", [i, r])
                        T.reads(C[vi, vr], W[vr], X[vi], O[0])
                        T.writes(C[vi, vr])
                        C[vi, vr] = C[vi, vr] + W[vr] * X[vi]

    return desc


def _impl(p: int, v: int, offset: str):
    lanes = p * v

    @T.prim_func(s_tir=True)
    def impl(X: T.Buffer((p,), "float32", offset_factor=1), O: T.Buffer((1,), offset, offset_factor=1),
             W: T.Buffer((v,), "float32", offset_factor=1),
             C: T.Buffer((p, v), "float32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:p, 0:v], W[0:v], X[0:p], O[0:1])
            T.writes(C[0:p, 0:v])
            w = T.Shuffle([W.vload([0], dtype=f"float32x{v}")] * p, list(range(lanes)))  # lane i*V + r: weight r
            x = T.Shuffle([X.vload([0], dtype=f"float32x{p}")] * v, [i // v for i in range(lanes)])  # input i
            C.vstore([0, 0], C.vload([0, 0], dtype=f"float32x{lanes}") + w * x)

    return impl


NAME = re.compile(r"unsparse_f32_row_lanes_(\d+)x(\d+)_(int32|uint16)")


@functools.cache
def intrin(p: int, v: int, offset: str = "int32") -> str:
    """The registered name of the intrinsic for P positions x V rows and offsets stored as `offset` (int32 or
    uint16), registering it on first use (see x86_int8.intrin: TVMScript parsing is slow once torch is loaded)."""
    name = f"unsparse_f32_row_lanes_{p}x{v}_{offset}"
    TensorIntrin.register(name, *(_desc_one(v, offset) if p == 1 else (_desc(p, v, offset), _impl(p, v, offset))),
                          override=True)
    return name


def register_named(text: str) -> None:
    """Register every intrinsic of this module that `text` (a tuning record's trace as JSON) names: a trace
    replayed in another process than the one that tuned it tensorizes by name."""
    for p, v, offset in set(NAME.findall(text)):
        intrin(int(p), int(v), offset)
