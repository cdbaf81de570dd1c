"""The vectors of the gathered-quads kernel (sparse_int8_gathered.gathered_conv): a group's 4 nonzeros' input bytes
interleaved so that each 32-bit lane holds one position of all 4, the group's weights as one dword in every lane,
and the dot product that sums them into int32 lanes: one `vpdpbusd` (AVX-512 VNNI; on AVX2 `vpmaddubsw` +
`vpmaddwd`); every int8 kernel's x86 dot product (`dot_product`)."""

from __future__ import annotations

from functools import cache

GROUP = 4  # nonzeros per dot product (4 byte products per 32-bit lane)
TINY = 4  # a 2x2 map's positions: gathered_conv's unroll-0 vectors are 4 rows x 4 positions

# a 2x2 map's tiles (unroll 0, 16 lanes): in 128-bit lane l, byte (position p, nonzero v) <- the loaded (v, p); row
# r's 4 weights in each dword of lane r; the epilogue's constants of row r in lane r's 4 dwords
TRANSPOSE = [lane * 16 + v * 4 + p for lane in range(4) for p in range(4) for v in range(4)]
SPREAD = [r * 4 + v for r in range(4) for _ in range(4) for v in range(4)]
SPREAD_ROWS = [r for r in range(TINY) for _ in range(TINY)]


@cache
def unpack_patterns(lanes: int) -> tuple:
    """(lo8, hi8, lo16, hi16): the byte and word unpacks (per 128-bit block, as vpunpck{l,h}bw / {l,h}wd) of two
    vectors of 4 x `lanes` bytes, as shuffle indices into their concatenation."""
    n, blocks = 4 * lanes, lanes // 4
    lo8, hi8 = ([src * n + 16 * b + i for b in range(blocks) for i in half for src in range(2)]
                for half in (range(8), range(8, 16)))
    lo16, hi16 = ([src * n + 16 * b + 2 * i + k
                   for b in range(blocks) for i in half for src in range(2) for k in range(2)]
                  for half in (range(4), range(4, 8)))
    return lo8, hi8, lo16, hi16


@cache
def from_unpacked(lanes: int) -> list:
    """Per output vector u (positions u*lanes ..), the shuffle of the 4 unpacked accumulators that puts its lanes in
    position order: unpacked vector a holds position 16B + 4a + j in lane 4B + j (B: its 128-bit block)."""
    def source(pos: int) -> int:
        block, a, j = pos // 16, pos % 16 // 4, pos % 4
        return a * lanes + 4 * block + j

    return [[source(u * lanes + t) for t in range(lanes)] for u in range(4)]


def pick(u, options: list):
    """options[u] for an unrolled loop's u (a Select chain its unrolling folds)."""
    from tvm.script import tirx as T

    return options[-1] if len(options) == 1 else T.Select(u == 0, options[0], pick(u - 1, options[1:]))


def unpacked_inputs(xf, off, start, unit: int, at, u, lanes: int):
    """uint8 x 4*lanes: vector u of a group's 4 nonzeros' 4*lanes bytes from `start` (each nonzero's in one load),
    interleaved by two rounds of unpacks (from_unpacked's lane order)."""
    from tvm.script import tirx as T

    lo8, hi8, lo16, hi16 = unpack_patterns(lanes)
    x = [xf[T.Ramp(start + T.Cast("int32", off[at + v]) * unit, 1, 4 * lanes)] for v in range(GROUP)]
    vec = [T.Shuffle([T.Shuffle([x[0], x[1]], first), T.Shuffle([x[2], x[3]], first)], second)
           for first in (lo8, hi8) for second in (lo16, hi16)]
    return pick(u, vec)


def unpacked_sums(acc, r, u, lanes: int):
    """Accumulator (row r, vector u) of unpacked_inputs' sums, its lanes in position order."""
    from tvm.script import tirx as T

    return pick(u, [T.Shuffle([acc[T.Ramp((r * 4 + a) * lanes, 1, lanes)] for a in range(4)], order)
                    for order in from_unpacked(lanes)])


def gathered_inputs(xf, off, start, unit: int, at, lanes: int):
    """uint8 x 4*lanes: the `lanes` bytes from `start` each of a group's 4 nonzeros reads (offsets off[at..at+3] x
    unit), interleaved so that lane i holds position i of all 4 (VBMI's vpermb)."""
    from tvm.script import tirx as T

    order = [lanes * v + i for i in range(lanes) for v in range(GROUP)]
    return T.Shuffle([xf[T.Ramp(start + T.Cast("int32", off[at + v]) * unit, 1, lanes)] for v in range(GROUP)], order)


@cache
def paired_patterns(lanes: int) -> tuple:
    """AVX2 (8 lanes), two vectors from 16 bytes a nonzero: (lo8, hi8, order). With A = (x0 | x2) and B = (x1 | x3)
    (16-byte halves), lo8/hi8 are the byte unpacks per 128-bit block (vpunpck{l,h}bw: positions 0-7 / 8-15 as words
    of nonzeros 0,1 in the low block, 2,3 in the high one) and order the one-input shuffle that makes dword i of
    the result position i's 4 bytes (vpermq + vpshufb)."""
    lo8, hi8, _, _ = unpack_patterns(lanes)
    # an unpacked vector's byte (block b, position j, nonzero v % 2) at 16b + 2j + v % 2, nonzeros 2b, 2b + 1
    order = [16 * (v // 2) + 2 * i + v % 2 for i in range(lanes) for v in range(GROUP)]
    return lo8, hi8, order


def paired_inputs(xf, off, start, unit: int, at, u, lanes: int):
    """uint8 x 4*lanes: vector u (positions u*lanes ..) of a group's 4 nonzeros' 2*lanes bytes from `start` (each
    nonzero's 16 in one load), lane i holding position u*lanes + i of all 4 (paired_patterns). LLVM's lowering of
    gathered_inputs' one shuffle of four 8-byte loads took ~12 instructions a vector; this ~5."""
    from tvm.script import tirx as T

    lo8, hi8, order = paired_patterns(lanes)
    x = [xf[T.Ramp(start + T.Cast("int32", off[at + v]) * unit, 1, 2 * lanes)] for v in range(GROUP)]
    a, b = T.Shuffle([x[0], x[2]], list(range(4 * lanes))), T.Shuffle([x[1], x[3]], list(range(4 * lanes)))
    return pick(u, [T.Shuffle([T.Shuffle([a, b], half)], order) for half in (lo8, hi8)])


def quad_weights(df, at, lanes: int):
    """int8 x 4*lanes: a group's 4 weights as one dword in every lane."""
    from tvm.script import tirx as T

    return T.reinterpret(T.Broadcast(T.reinterpret(df[T.Ramp(at, 1, GROUP)], dtype="int32"), lanes),
                         dtype=f"int8x{4 * lanes}")


def tiny_inputs(xi, off, start, at, lanes: int = 16, shared: bool = False):
    """uint8 x 4*lanes: the `lanes` four-byte patches that lanes/4 rows' group reads (xi: the input as int32; 16
    lanes: a tile of 4 rows, 8: half of one), transposed per 128-bit lane. 16 scalar loads: one `vpgatherdd` of
    them ran 94 us where these run 63 (512x512 3x3 at 90% on 2x2, alone; Zen 4's gathers take about 12 cycles,
    its loads 3 a cycle). shared: the rows read row 0's 4 patches (GatheredRows.shared), 4 loads."""
    from tvm.script import tirx as T

    patches = T.Shuffle([xi[start + T.Cast("int32", off[at + (i % GROUP if shared else i)])] for i in range(lanes)],
                        list(range(lanes)))
    return T.Shuffle([T.reinterpret(patches, dtype=f"uint8x{4 * lanes}")], TRANSPOSE[:4 * lanes])


def tiny_weights(df, at, lanes: int = 16):
    """int8 x 4*lanes: the lanes/4 rows' group weights from `at` (4 a row), row r's 4 in each dword of 128-bit
    lane r."""
    from tvm.script import tirx as T

    return T.Shuffle([df[T.Ramp(at, 1, lanes)]] * 4, SPREAD[:4 * lanes])


def dot_product(kind: str, lanes: int):
    """(acc, x, w) -> acc + the 4-byte dot products of u8 x and s8 w per int32 lane, as x86 computes them: `vnni`
    one vpdpbusd (AVX-512 VNNI), `pmadd` vpmaddubsw + vpmaddwd (saturating u8 x s8 pairs, exact for activations
    <= 127: schedules.x86_int8's module doc). Every int8 kernel's dot product (the tensor intrinsics, the gathered
    and the linear kernels) is built here."""
    from tvm.script import tirx as T

    if kind == "vnni":  # this LLVM declares vpdpbusd's byte operands as <4L x i8> (older ones: <L x i32>)
        op = T.llvm_lookup_intrinsic_id(f"llvm.x86.avx512.vpdpbusd.{32 * lanes}")
        return lambda acc, x, w: T.call_llvm_pure_intrin(op, acc, x, w, dtype=f"int32x{lanes}")
    ub, wd = (("llvm.x86.avx512.pmaddubs.w.512", "llvm.x86.avx512.pmaddw.d.512") if lanes == 16
              else ("llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd"))
    ub, wd = T.llvm_lookup_intrinsic_id(ub), T.llvm_lookup_intrinsic_id(wd)

    def pmadd(acc, x, w):
        pairs = T.call_llvm_pure_intrin(ub, x, w, dtype=f"int16x{2 * lanes}")
        return acc + T.call_llvm_pure_intrin(wd, pairs, T.broadcast(T.int16(1), 2 * lanes), dtype=f"int32x{lanes}")

    return pmadd
