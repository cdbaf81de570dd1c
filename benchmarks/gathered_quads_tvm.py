"""The gathered-quads int8 conv kernel (docs/design.md item 37) as TVM builds it, on random layers: checked against
numpy, timed alone (one thread). Each row's nonzeros in groups of 4 whatever their channel and tap; per group and
16 output positions the 4 inputs' 16 bytes are loaded, interleaved by one T.Shuffle (LLVM: vinserti128, vpermt2b)
and summed by one vpdpbusd with the group's 4 weights as one broadcast dword. Kept here, off the compile path: as a
per-layer int8 format (the local branch experiment/gathered-quads) it was level with the quads end to end.

    python benchmarks/gathered_quads_tvm.py          # AVX-512 VNNI and VBMI hosts only

Prints per layer the kernel's time and its ns per nonzero and 16 positions (fp32 rows: 0.55-0.78 ns, item 36).
"""

from __future__ import annotations

import sys

import numpy as np

LANES, GROUP = 16, 4
SHAPES = [(64, 64, 32, 2, 4), (128, 128, 16, 2, 4), (256, 256, 14, 2, 4), (256, 256, 8, 2, 2), (512, 512, 7, 2, 2)]


def kernel(length: int, tiles: int, groups: int, tile: int, q: int, unroll: int):
    """conv[k, p] = sum over row k's weights of int32(x[off + p]) * int32(w), p < q (one image)."""
    from tvm.script import tirx as T

    k, chunks = tiles * tile, q // (LANES * unroll)
    vpdpbusd = T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512")
    pick = [LANES * v + i for i in range(LANES) for v in range(GROUP)]  # lane i, byte v <- weight v, position i

    @T.prim_func(s_tir=True)
    def main(xp: T.Buffer((length,), "uint8"), data: T.Buffer((tiles * groups * tile * GROUP,), "int8"),
             off: T.Buffer((tiles, groups, tile, GROUP), "int32"), glen: T.Buffer((tiles,), "int32"),
             conv: T.Buffer((k * q,), "int32")):
        T.func_attr({"tirx.noalias": True, "global_symbol": "main"})
        for t in T.parallel(tiles):
            for ch in range(chunks):
                acc = T.decl_buffer((tile * unroll * LANES,), "int32", scope="local")
                for i in T.unroll(tile * unroll):
                    acc[T.Ramp(i * LANES, 1, LANES)] = T.Broadcast(T.int32(0), LANES)
                for j in range(glen[t]):
                    for r in T.unroll(tile):
                        w = T.reinterpret(T.Broadcast(T.reinterpret(
                            data[T.Ramp(((t * groups + j) * tile + r) * GROUP, 1, GROUP)], dtype="int32"), LANES),
                            dtype="int8x64")
                        for u in T.unroll(unroll):
                            base = (ch * unroll + u) * LANES
                            gathered = T.Shuffle([xp[T.Ramp(base + off[t, j, r, v], 1, LANES)] for v in range(GROUP)],
                                                 pick)
                            at = T.Ramp((r * unroll + u) * LANES, 1, LANES)
                            acc[at] = T.call_llvm_pure_intrin(vpdpbusd, acc[at], gathered, w, dtype="int32x16")
                for r in T.unroll(tile):
                    for u in T.unroll(unroll):
                        conv[T.Ramp((t * tile + r) * q + (ch * unroll + u) * LANES, 1, LANES)] = \
                            acc[T.Ramp((r * unroll + u) * LANES, 1, LANES)]

    return main


def layer(c: int, k: int, h: int, tile: int, unroll: int, rng: np.random.Generator) -> None:
    import tvm

    from unsparse_tvm.target import make_target

    pitch, plane = h + 2, (h + 2) ** 2  # stride-1 3x3, padding 1: the padded planes, q = y * pitch + x
    q = -(-h * pitch // (LANES * unroll)) * LANES * unroll
    per = -(-c * 9 // 10 // GROUP) * GROUP  # 10% of the taps, whole groups
    length = c * plane + q + 64
    x = rng.integers(0, 256, length, dtype=np.uint8)
    taps = np.sort(np.stack([rng.choice(c * 9, per, replace=False) for _ in range(k)]), axis=1)
    offs = (taps // 9 * plane + taps % 9 // 3 * pitch + taps % 3).astype(np.int32)  # [K, per]
    w = rng.integers(-127, 128, (k, per)).astype(np.int8)
    tiles, groups = k // tile, per // GROUP

    def tiled(a: np.ndarray) -> np.ndarray:  # [K, G*4] -> [K/T, G, T, 4], a tile's rows side by side
        return np.ascontiguousarray(a.reshape(tiles, tile, groups, GROUP).transpose(0, 2, 1, 3))

    func = kernel(length, tiles, groups, tile, q, unroll)
    lib = tvm.compile(tvm.IRModule({"main": func}), target=make_target("llvm"))
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in (x, tiled(w).reshape(-1), tiled(offs), np.full(tiles, groups, np.int32),
                                                 np.zeros(k * q, np.int32))]
    lib["main"](*args)
    got = args[-1].numpy().reshape(k, q)
    valid = np.array([p for p in range(q) if p // pitch < h and p % pitch < h])  # not the thrown-away columns
    ref = (x[offs[:, :, None] + valid[None, None, :]].astype(np.int64) * w[:, :, None]).sum(axis=1)
    ok = np.array_equal(got[:, valid], ref)
    ms = sorted(lib.mod.time_evaluator("main", dev, number=20, repeat=15)(*args).results)[7] * 1e3
    print(f"{k:4d}x{c:<4d} 3x3 on {h:2d}x{h:<2d} (tile {tile} x {unroll} vectors): {ms * 1e3:7.1f} us, "
          f"{ms * 1e6 / (k * per * q / LANES):.3f} ns per nonzero and 16 positions{'' if ok else '  WRONG'}")
    if not ok:
        sys.exit(1)


def main() -> None:
    from unsparse_tvm.hostcpu import host_features
    from unsparse_tvm.timing import set_threads

    if not {"avx512vnni", "avx512vbmi"} <= set(host_features()):
        print("gathered_quads_tvm needs AVX-512 VNNI and VBMI on this host")
        sys.exit(2)
    set_threads(1)
    rng = np.random.default_rng(0)
    for shape in SHAPES:
        layer(*shape, rng)


if __name__ == "__main__":
    main()
