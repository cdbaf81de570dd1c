"""x86 tensor intrinsics for the int8 sparse conv (te_ops_int8's "conv" body), registered on first use.

Description: C[i] += int32(X[i, v]) * int32(W[v]) for `lanes` output positions i and one quad v < 4:
X is `lanes` consecutive uint8 input quads (one vector load), W one int8 weight quad, broadcast.
TVM's own dot_16x4 intrinsics broadcast the *uint8* side; here the weights are broadcast and the
activations vary per lane, so these are our own (tvm.s_tir.tensor_intrin is not imported: ~50 s).

Implementations, picked from the target's features (`int8_intrin`):
  vnni   `vpdpbusd` (AVX-512 VNNI), 16 lanes in a zmm or 8 in a ymm (AVX512VL): u8 x s8 -> i32, exact
  pmadd  `vpmaddubsw` + `vpmaddwd` (AVX2 / AVX-512 without VNNI): u8 x s8 pairs into a *saturating* i16,
         then pairs into i32; exact only for activations <= 127 (2 * 127 * 127 < 2^15), which is why
         int8_rows uses qmax 127 on these CPUs. (Widening to i16 and `vpmaddwd` alone would be exact at
         255 but costs two extra unpacks per quad.)
"""

from __future__ import annotations

import functools

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from unsparse_tvm.ops.gathered_vectors import dot_product


def _desc(lanes: int, offset: str):
    @T.prim_func(s_tir=True)
    def desc(x: T.handle, o: T.handle, w: T.handle, c: T.handle) -> None:
        X = T.match_buffer(x, (lanes, 4), "uint8", offset_factor=1)
        O = T.match_buffer(o, (1,), offset, offset_factor=1)  # noqa: E741 (the block's offset, see intrin)
        W = T.match_buffer(w, (4,), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:lanes], X[0:lanes, 0:4], O[0:1], W[0:4])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for v in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vv = T.axis.remap("SR", [i, v])
                        T.reads(C[vi], X[vi, vv], O[0], W[vv])  # O: the block's offset read (see intrin)
                        T.writes(C[vi])
                        C[vi] = C[vi] + T.Cast("int32", X[vi, vv]) * T.Cast("int32", W[vv])

    return desc


def _impl(lanes: int, dot, offset: str):
    """The implementation: C += dot(C, the lanes' input quads, the broadcast weight quad), one vector op
    sequence (`dot` builds it from TIR expressions)."""
    @T.prim_func(s_tir=True)
    def impl(X: T.Buffer((lanes, 4), "uint8", offset_factor=1), O: T.Buffer((1,), offset, offset_factor=1),
             W: T.Buffer((4,), "int8", offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], X[0:lanes, 0:4], O[0:1], W[0:4])
            T.writes(C[0:lanes])
            # the operands as expressions: a name bound here became a local buffer that the kernels' parallel
            # loops allocated from the workspace pool on every iteration (design.md item 53)
            C[T.ramp(T.int32(0), 1, lanes)] = dot(
                C.vload([0], dtype=f"int32x{lanes}"), X.vload([0, 0], dtype=f"uint8x{lanes * 4}"),
                T.reinterpret(T.broadcast(T.reinterpret(W.vload([0], dtype="int8x4"), dtype="int32"), lanes),
                              dtype=f"int8x{lanes * 4}"))

    return impl


def _vnni(lanes: int, offset: str):
    return _impl(lanes, dot_product("vnni", lanes), offset)


def _pmadd(lanes: int, offset: str):
    return _impl(lanes, dot_product("pmadd", lanes), offset)


@functools.cache
def intrin(kind: str, lanes: int, offset: str = "int32") -> str:
    """The registered name of the (kind, lanes) intrinsic for offsets stored as `offset` (int32, or uint16
    where a layer's fit: formats.compact_offsets), registering it on first use: TVMScript's parser walks the
    whole Python stack (inspect.stack) for every @T.prim_func, ~0.4 s each once torch is loaded, so
    registering them all on import cost every command that imports the schedules seconds."""
    name = f"unsparse_u8s8_{kind}_{lanes}x4_{offset}"
    TensorIntrin.register(name, _desc(lanes, offset), {"vnni": _vnni, "pmadd": _pmadd}[kind](lanes, offset),
                          override=True)
    return name


def int8_kind(target) -> str:
    """'vnni' where the llvm target has AVX-512 VNNI (vpdpbusd, 8 lanes need AVX512VL), else 'pmadd'."""
    from tvm.target import codegen

    return "vnni" if codegen.target_has_features(["avx512vnni", "avx512vl"], target) else "pmadd"


def act_qmax(target) -> int:
    """Largest uint8 activation the target's dot product keeps exact (see the module docstring); CUDA's
    dp4a adds into int32, so all 8 bits."""
    if target.kind.name != "llvm":
        return 255
    return 255 if int8_kind(target) == "vnni" else 127
