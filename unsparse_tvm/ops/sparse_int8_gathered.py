"""int8 for scattered nonzeros: any 4 nonzeros of a row in one `vpdpbusd` ("gathered quads", design.md items 37-38).

The quad kernels (sparse_int8) store 4 adjacent input channels per 32-bit word, so one vpdpbusd takes the 4 weights
a row has at those channels and tap; on unstructured 90% masks a stored quad holds 1.16 nonzeros, and int8 ran
1.2x our fp32 rows. Here the input is one byte per position and each row's nonzeros are grouped by 4 whatever their
channels and taps. Per group and 16 output positions the kernel loads the 16 bytes each of the 4 nonzeros reads
(4 loads of 16 bytes), puts them side by side and interleaves them so that lane i holds position i of all 4 (LLVM:
3 inserts and one `vpermb`, AVX-512 VBMI), then one vpdpbusd with the group's 4 weights as one broadcast dword. A
byte per position per nonzero is read where fp32 reads 4, and every dot product is full. A layer runs as:
  input     gathered_inputs: x (fp32, quantised; or uint8 already in this layer's quantisation) -> uint8, as the
            padded planes [N, C', Hq, Wq], or for a 2x2, 4x4 or 8x8 map one patch of OH*OW bytes per (tap, channel)
  conv      gathered_conv: [N, K, Q], Q the flat domain (y*Wq + x rounded up to whole register tiles; patches:
            exactly the output map, so there the epilogue is applied in the write-back: WriteBack)
  epilogue  on the padded planes: sparse_int8.int8_epilogue (dequantise, bias, residual, ReLU, requantise),
            cropped to [N, K, OH, OW]
A 2x2 map (4 positions) puts 4 rows x 4 positions in a vector, each group's 16 four-byte patches loaded one by
one (gathered_conv, unroll 0). In zmm (16 lanes) with AVX-512 VNNI and VBMI; in ymm (8 lanes) on AVX2, with
`vpmaddubsw` + `vpmaddwd` for the vpdpbusd, a 4x4 map's inputs by paired 16-byte loads and a 2x2 map's tiles in two
vectors (design.md item 61): `gather_lanes`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import tirx

from .gathered_vectors import (GROUP, SPREAD_ROWS, TINY, dot_product, gathered_inputs, paired_inputs, quad_weights,
                               tiny_inputs, tiny_weights, unpacked_inputs, unpacked_sums)
from .gathered_writes import IntoPlanes, WriteBack, crop_domain, quantize_lanes, row_store, write_layout
from .geometry import ConvGeometry

LANES = 16  # output positions per vector (int32 lanes of a zmm); AVX2: 8 (gather_lanes)
# rows x vectors held in registers per tile, of 32 zmm (with 4 inputs, the weights and the index): 16, not 8, ran
# resnet50's 7x7 layers in 8-row tiles, 0.237 -> 0.194 ms (1x1 2048 -> 512), 0.310 -> 0.277 (3x3); end to end
# resnet50 unstructured int8 15.02 -> 14.67 ms, vgg16-cifar 1.012 -> 0.997
MAX_ACCUMULATORS = 16
# AVX2 has 16 ymm, and its dot product a temporary more (the int16 pairs): 4 vectors a tile in one row (a row's 4
# loads and 4 unpacked vectors take the rest; in 2-row tiles vgg16-cifar's 16x16 3x3s ran 0.089 / 0.169 ms, in
# one 0.060 / 0.105, its stem 0.039 -> 0.029), 2 vectors in tiles of 4 rows (its 4x4 maps: 2 rows 0.218 ms, 4 0.182)
MAX_ACCUMULATORS_YMM = {4: 4, 2: 8, 1: 8}  # by vectors a tile
# rows that share their nonzeros' columns (vector and block masks: GatheredRows.shared) interleave a group's inputs
# once for the whole tile, so on AVX2 a tile holds more rows: 2 rows x 4 vectors, 4 x 2
SHARED_ACCUMULATORS_YMM = {4: 8, 2: 8, 1: 8}
# 4 vectors a tile, each nonzero's 64 bytes in one load, interleaved by unpacks (gathered_vectors): vgg16-cifar's
# 32x32 3x3 0.086 -> 0.067 ms, resnet50's 56x56 3x3s 0.27-0.30 -> 0.21-0.23, where 16-byte loads put side by side
# and a vpermb took 4 loads and 4 shuffles a vector
UNPACKED = True


@dataclass
class GatheredRows:
    """A layer's rows for gathered_conv: by register tiles of `tile` rows, each row's nonzeros in groups of 4."""

    data: np.ndarray  # int8 [K/T, G, T, 4]: group g of row t*T + r (zero weights pad a row's last group)
    off: np.ndarray   # [K/T, G, T, 4] each weight's flat input position, in units (uint16 where they fit, else int32)
    glen: np.ndarray  # int32 [K/T]: the groups each tile runs (its longest row's)
    tile: int
    nnz: int
    stored: int       # weights the tiles run (groups x 4 x rows), padding included
    unit: int = 1     # off counts this many bytes (a patch's length: the offsets then fit uint16 where bytes would not)
    shared: bool = False  # a tile's rows share their columns (each row's offsets are its tile's): read as row 0's

    @property
    def padded_size(self) -> int:
        return self.stored


@dataclass(frozen=True)
class GatheredPlan:
    """The shapes of one gathered layer: register tile (rows x vectors), the conv's flat domain Q, the channels
    of the padded input (trailing ones at the zero point, so that every read of q + 15 stays inside)."""

    tile: int
    unroll: int
    q: int
    channels: int
    lanes: int = LANES

    def input_length(self, geo: ConvGeometry) -> int:
        return self.channels * geo.channel_plane


def plan(geo: ConvGeometry, lanes: int = LANES, shared: int = 0) -> GatheredPlan:
    """Vectors of `lanes` per row tile: 4 where the domain has them (rounded up to whole tiles), else 2 or 1, and
    rows to fill MAX_ACCUMULATORS; trailing zero channels to cover the last offset's reach. A map of TINY
    positions as patches: tiles of 4 rows x 4 positions (unroll 0)."""
    positions = geo.q_extent if geo.patches else geo.oh * geo.wq
    if geo.patches and positions == TINY:
        return GatheredPlan(TINY, 0, TINY, geo.c, lanes)
    vectors = -(-positions // lanes)
    # 4 wherever there are 4 (UNPACKED), even where pairs would throw fewer away: 2 a tile ran a 14x14 3x3 in 0.35 ms
    # as 14 vectors, not 16, but 4 unpacked run it in 0.24 (an 8x8 map 0.099 -> 0.072, a 7x7 3x3 0.285 -> 0.210)
    unroll = 4 if vectors >= 4 and UNPACKED else 2 if vectors >= 2 else 1
    most = MAX_ACCUMULATORS if lanes == LANES else (SHARED_ACCUMULATORS_YMM if shared else MAX_ACCUMULATORS_YMM)[unroll]
    tile = next(t for t in (8, 4, 2, 1) if geo.k % t == 0 and t * unroll <= most and (not shared or shared % t == 0))
    q = -(-vectors // unroll) * unroll * lanes
    reach = int(geo.column_offsets().max()) * geo.offset_unit + q  # bytes past the last stored offset read
    return GatheredPlan(tile, unroll, q, max(geo.c, -(-reach // geo.channel_plane)), lanes)


def gathered_rows(wq: np.ndarray, geo: ConvGeometry, tile: int, shared: bool = False) -> GatheredRows:
    """An int8 OIHW weight as rows of groups of 4 nonzeros (in input order: channel, then tap), by tiles; shared:
    each row at its tile's columns (the union of its rows' nonzeros; a row's zeros there stored too)."""
    k = wq.shape[0]
    flat = wq.reshape(k, -1)
    offsets = geo.column_offsets() * geo.offset_unit  # flat input position of column (c, r, s) for output 0
    if geo.patches:  # pad_patches' layout: patch (tap, c) at (tap * C + c) * Q
        col = np.arange(flat.shape[1])
        offsets = (col % (geo.r * geo.s) * geo.c + col // (geo.r * geo.s)) * geo.offset_unit
    cols = [np.flatnonzero(flat[row]) for row in range(k)]
    if shared:
        cols = [np.flatnonzero(flat[row // tile * tile:row // tile * tile + tile].any(axis=0)) for row in range(k)]
    groups = max(max((-(-len(c) // GROUP) for c in cols), default=1), 1)
    data = np.zeros((k, groups * GROUP), np.int8)
    off = np.zeros((k, groups * GROUP), np.int64)
    for row, c in enumerate(cols):
        data[row, : len(c)], off[row, : len(c)] = flat[row, c], offsets[c]
    lengths = np.array([-(-len(c) // GROUP) for c in cols]).reshape(k // tile, tile)

    def tiled(a: np.ndarray) -> np.ndarray:  # [K, G*4] -> [K/T, G, T, 4]
        return np.ascontiguousarray(a.reshape(k // tile, tile, groups, GROUP).transpose(0, 2, 1, 3))

    glen = np.maximum(lengths.max(axis=1), 0).astype(np.int32)
    unit = geo.offset_unit  # a patch (whole patches apart): offsets that fit 16 bits where positions would not
    off = tiled(off) // unit
    off = off.astype(np.uint16) if off.max(initial=0) < 1 << 16 else off.astype(np.int32)
    return GatheredRows(tiled(data), off, glen, tile, int((wq != 0).sum()), int(glen.sum()) * tile * GROUP, unit,
                        shared)


def _lane_consts(bufs, row, tiny: bool, lanes: int = LANES) -> list:
    """The epilogue's constants per lane: row `row`'s in all lanes (tiny: rows row.. row+lanes/4-1's, 4 lanes
    each)."""
    from tvm.script import tirx as T

    if tiny:  # lanes // TINY rows, TINY positions each
        return [T.Shuffle([buf[T.Ramp(row, 1, lanes // TINY)]] * TINY, SPREAD_ROWS[:lanes]) for buf in bufs]
    return [T.Broadcast(buf[row], lanes) for buf in bufs]


def gathered_conv(n: int, length: int, rows: GatheredRows, q: int, unroll: int, out: WriteBack = WriteBack(),
                  out_shape: tuple | None = None, lanes: int = LANES) -> tirx.PrimFunc:
    """conv[n, k, p] = sum of row k's x[n, off + p] * w, p < q (x: [N, length]), written as `out` says (comp, scale,
    bias: the epilogue's), in vectors of `lanes` int32 (16: vpdpbusd; 8: AVX2's pair of multiply-adds); unroll 0:
    a 2x2 map's 4 rows x 4 positions (module doc)."""
    from tvm.script import tirx as T

    wshape = tiles, _, tile, _ = tuple(int(d) for d in rows.data.shape)
    k, off_dtype, res_dtype = tiles * tile, str(rows.off.dtype), "float32" if out.res_act is None else "uint8"
    main = _conv_body(n, length, rows, q, unroll, out, lanes)

    if out.residual:  # the residual [N, K, positions] as one more input, read like the output (row_store)
        @T.prim_func(s_tir=True)
        def kernel(xp: T.Buffer((n, length), "uint8"), data: T.Buffer(wshape, "int8"),
                   off: T.Buffer(wshape, off_dtype), glen: T.Buffer((tiles,), "int32"), comp: T.Buffer((k,), "int32"),
                   scale: T.Buffer((k,), "float32"), bias: T.Buffer((k,), "float32"),
                   res: T.Buffer(out_shape, res_dtype), conv: T.Buffer(out_shape, out.dtype)):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})  # opaque: never fused
            with T.sblock("root"):
                rf = T.decl_buffer((n * k * out.positions,), res_dtype, data=res.data)
                main(xp, data, off, conv, glen, comp, scale, bias, rf)
    else:
        @T.prim_func(s_tir=True)
        def kernel(xp: T.Buffer((n, length), "uint8"), data: T.Buffer(wshape, "int8"),
                   off: T.Buffer(wshape, off_dtype), glen: T.Buffer((tiles,), "int32"), comp: T.Buffer((k,), "int32"),
                   scale: T.Buffer((k,), "float32"), bias: T.Buffer((k,), "float32"),
                   conv: T.Buffer(out_shape or (n, k, q), out.dtype)):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})  # opaque: never fused
            with T.sblock("root"):
                main(xp, data, off, conv, glen, comp, scale, bias, None)

    return kernel.without_attr("global_symbol")  # the module names each (one per layer shape)


def _conv_body(n: int, length: int, rows: GatheredRows, q: int, unroll: int, out: WriteBack, lanes: int):
    """gathered_conv's body as a macro main(xp, data, off, conv, glen, comp, scale, bias, rf) (rf: the residual,
    flat; None without one)."""
    from tvm.script import tirx as T

    tiles, groups, tile, _ = (int(d) for d in rows.data.shape)
    k, off_dtype, tiny, pairs = tiles * tile, str(rows.off.dtype), unroll == 0, tiles // 2
    dot = dot_product("vnni" if lanes == LANES else "pmadd", lanes)
    chunks, acc_len = (0, 0) if tiny else (q // (lanes * unroll), tile * unroll * lanes)  # (tiny: _tiny_pairs')
    (pitch, plane, at0, padding), (inputs, sums) = write_layout(out, q, k, tile, tiles), _loads(unroll, lanes)
    store = row_store(out, q, lanes)
    group = lambda b, j, r: ((b % tiles * groups + j) * tile + r) * GROUP  # noqa: E731  tile b's group j, row r
    # the offsets row r reads: row 0's where the rows share them (one interleave for the tile: LLVM merges the
    # unrolled rows' identical loads and shuffles)
    offsets = lambda b, j, r: group(b, j, 0 if rows.shared else r)  # noqa: E731
    tiny_pairs = _tiny_pairs(n, k, length, groups, pairs, lanes, out, dot, rows.shared) if tiny else None

    @T.macro
    def main(xp, data, off, conv, glen, comp, scale, bias, rf):
        xf = T.decl_buffer((n * length,), "uint8", data=xp.data)
        xi = T.decl_buffer((n * length // TINY,), "int32", data=xp.data)  # tiny: a patch is a dword
        df = T.decl_buffer((tiles * groups * tile * GROUP,), "int8", data=data.data)
        of = T.decl_buffer((tiles * groups * tile * GROUP,), off_dtype, data=off.data)
        cf = T.decl_buffer((n * pitch * plane,), out.dtype, data=conv.data)
        if tiny:
            tiny_pairs(xi, df, of, glen, comp, scale, bias, cf)
        else:
            for b in T.parallel(n * tiles):  # (image, row tile)
                for ch in range(chunks):
                    acc = T.decl_buffer((acc_len,), "int32", scope="local")
                    for i in T.unroll(tile * unroll):
                        acc[T.Ramp(i * lanes, 1, lanes)] = T.Broadcast(T.int32(0), lanes)
                    for j in range(glen[b % tiles]):
                        for r in T.unroll(tile):
                            for u in T.unroll(unroll):
                                at = T.Ramp((r * unroll + u) * lanes, 1, lanes)
                                acc[at] = dot(acc[at], inputs(xf, of, b // tiles * length + ch * unroll * lanes,
                                                              rows.unit, offsets(b, j, r), u),
                                              quad_weights(df, group(b, j, r), lanes))
                    for r in T.unroll(tile):
                        for u in T.unroll(unroll):
                            store(cf, rf, (b // tiles * pitch + b % tiles * tile + r) * plane + at0,
                                  (ch * unroll + u) * lanes, sums(acc, r, u),
                                  *_lane_consts((comp, scale, bias), b % tiles * tile + r, False, lanes))
                if padding is not None:  # the zero point over the padding, after the tile's rows went in
                    padding(cf, b)

    return main


def _tiny_pairs(n: int, k: int, length: int, groups: int, pairs: int, lanes: int, out: WriteBack, dot,
                shared: bool = False):
    """gathered_conv's body for a 2x2 map (unroll 0), as a macro: per (image, pair of row tiles) 2 tiles of 4 rows x
    4 positions, each 16 / lanes vectors (rows s*lanes/4.. in vector s), every group's 4 nonzeros per row."""
    from tvm.script import tirx as T

    halves = TINY * TINY // lanes  # vectors a tile takes (1 zmm, 2 ymm)
    at = lambda h, s: T.Ramp((h * halves + s) * lanes, 1, lanes)  # noqa: E731  tile h's vector s in acc
    entries = lambda b, h, j, s: ((b % pairs * 2 + h) * groups + j) * 16 + s * lanes  # noqa: E731  what it reads

    @T.macro
    def body(xi, df, of, glen, comp, scale, bias, cf):
        for b in T.parallel(n * pairs):  # (image, pair of row tiles)
            acc = T.decl_buffer((2 * TINY * TINY,), "int32", scope="local")
            for i in T.unroll(2 * halves):
                acc[T.Ramp(i * lanes, 1, lanes)] = T.Broadcast(T.int32(0), lanes)
            for j in range(T.max(glen[b % pairs * 2], glen[b % pairs * 2 + 1])):
                for h in T.unroll(2):
                    for s in T.unroll(halves):
                        acc[at(h, s)] = dot(acc[at(h, s)], tiny_inputs(xi, of, b // pairs * length // TINY,
                                                                     entries(b, h, j, 0 if shared else s), lanes,
                                                                     shared),
                                            tiny_weights(df, entries(b, h, j, s), lanes))
            for h in T.unroll(2):
                for s in T.unroll(halves):
                    cf[T.Ramp((b // pairs * k + (b % pairs * 2 + h) * TINY) * TINY + s * lanes, 1, lanes)] = \
                        out.value(acc[at(h, s)], *_lane_consts(
                            (comp, scale, bias), (b % pairs * 2 + h) * TINY + s * lanes // TINY, True, lanes), lanes)

    return body


def _loads(unroll: int, lanes: int) -> tuple:
    """(inputs, sums): vector u of a group's gathered inputs (xf, off, start of the chunk, unit, at, u), and
    accumulator (r, u)'s sums in position order (acc, r, u): unpacked for unroll 4 (UNPACKED), else `lanes` bytes a
    load put side by side."""
    from tvm.script import tirx as T

    if unroll == 4 and UNPACKED:
        return (lambda xf, off, start, unit, at, u: unpacked_inputs(xf, off, start, unit, at, u, lanes),
                lambda acc, r, u: unpacked_sums(acc, r, u, lanes))
    in_order = lambda acc, r, u: acc[T.Ramp((r * unroll + u) * lanes, 1, lanes)]  # noqa: E731
    if unroll == 2 and lanes == 8:  # AVX2: 16 bytes a nonzero, unpacked and permuted into 2 vectors
        return (lambda xf, off, start, unit, at, u: paired_inputs(xf, off, start, unit, at, u, lanes), in_order)
    return (lambda xf, off, start, unit, at, u: gathered_inputs(xf, off, start + u * lanes, unit, at, lanes),
            in_order)


def gather_lanes(target) -> int:
    """The int32 lanes gathered_conv runs in on an llvm target: 16 with AVX-512 VNNI and VBMI (vpdpbusd; vpermb for
    the interleaves that are not unpacks), 8 on AVX2 without AVX-512 (vpmaddubsw + vpmaddwd, activations <= 127:
    schedules.x86_int8), else 0 (no gathered kernels: AVX-512 without VNNI keeps the quads)."""
    from tvm.target import codegen

    if target.kind.name != "llvm":
        return 0
    if codegen.target_has_features(["avx512vnni", "avx512vbmi"], target):
        return LANES
    avx512 = codegen.target_has_features(["avx512f"], target)
    return 8 if codegen.target_has_features(["avx2"], target) and not avx512 else 0


def gathers(target) -> bool:
    """Whether the llvm target runs gathered_conv (gather_lanes)."""
    return gather_lanes(target) > 0
