"""The int8 sparse linear layer with output features in vector lanes (llvm): at batch 1 a linear layer has no
positions to put in lanes, so sparse_int8.sparse_dense_int8's schedule runs scalar code, one stored quad's 4 products
at a time (resnet50's 1000x2048 fc at 95%: 0.050 ms, more than a 1x1 conv on 7x7). Here `lanes` rows side by side
(formats.interleave_rows): per step j, the j-th stored quad of each row, one 4-byte input quad per lane (scalar loads
put together: Zen 4's vpgatherdd took longer, design.md item 38 (d)) times the rows' weight quads (one vector load),
one vpdpbusd (or vpmaddubsw + vpmaddwd) for `lanes` rows; a tile runs to its longest row. The input is quantised
first into a buffer of quads, as the TE operator's "pad_q" stage; the epilogue (dequantise, bias, ReLU) is its
arithmetic, written as one vector of rows (a partial last tile lane by lane)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import tirx

from .formats import compact_offsets, interleave_rows
from .gathered_vectors import dot_product
from .int8_formats import QUAD, ActQuant, QuadRows
from .sparse_int8 import quantize

# rows sorted by length where the tiles then run this share fewer entries: a tile runs to its longest row (resnet50's
# fc at 95% channel4, 25600 nonzero quads: 34720 entries in order, 25968 sorted); the output is then written lane by
# lane
SORT_MIN_SAVING = 0.05
QUANTIZE_LANES = 16  # the input quantised 16 floats a vector (a 512-bit load), the rest of it one at a time


@dataclass(frozen=True)
class LaneRows:
    """A linear layer's quad rows in tiles of `lanes` rows (zero rows past the layer's), side by side, each tile's
    entries up to its longest row, tile after tile: data [E, lanes, 4] int8, off [E, lanes] int32, or uint16 where
    they fit (input quad numbers; padding reads quad 0 with zero weights), start [T + 1] int32 (tile t's entries
    are start[t] .. start[t + 1]: one stream of weights for the whole layer, which the prefetcher follows; the
    weights come from memory every inference), order [T * lanes] int32: stored row i is output feature order[i]
    (rows sorted by length; past the layer's features: padding rows), or None: in order."""

    data: np.ndarray
    off: np.ndarray
    start: np.ndarray
    order: np.ndarray | None = None

    @property
    def tiles(self) -> int:
        return len(self.start) - 1

    @property
    def rows(self) -> int:
        return self.tiles * int(self.data.shape[1])

    @property
    def entries(self) -> int:  # quads the kernel multiplies, padding included
        return int(self.data.shape[0] * self.data.shape[1])


def lane_rows(rows: QuadRows, lanes: int, min_saving: float = SORT_MIN_SAVING) -> LaneRows:
    """QuadRows (ELL rows, nonzero quads first: int8_formats.dense_quad_rows) as LaneRows of `lanes` rows a tile,
    sorted by length where the tiles then run at least `min_saving` fewer entries."""
    k, width = rows.data.shape[:2]
    tiles = -(-k // lanes)
    data = np.zeros((tiles * lanes, width, QUAD), np.int8)                       # [T*L, W, 4]
    off = np.zeros((tiles * lanes, width), np.int32)                             # [T*L, W]
    data[:k], off[:k] = rows.data, rows.off
    stored = (data != 0).any(axis=2).sum(axis=1)                                  # [T*L] quads a row

    def lengths(order):
        return stored[order].reshape(tiles, lanes).max(axis=1)                   # [T]

    order = np.argsort(-stored, kind="stable").astype(np.int32)
    if lengths(order).sum() >= (1 - min_saving) * lengths(np.arange(len(stored))).sum():
        order = None
    else:
        data, off, stored = data[order], off[order], stored[order]
    length = lengths(np.arange(len(stored)))
    data, off = interleave_rows(data, lanes), interleave_rows(off, lanes)        # [T, W, L, 4], [T, W, L]
    start = np.concatenate([[0], np.cumsum(length)]).astype(np.int32)             # [T + 1]
    if length.any():
        data = np.concatenate([data[t, :n] for t, n in enumerate(length)])      # [E, L, 4]
        off = np.concatenate([off[t, :n] for t, n in enumerate(length)])        # [E, L]
    else:  # no quad at all: one zero entry (a buffer of none would not build)
        data, off = data[0, :1], off[0, :1]
    return LaneRows(data, compact_offsets(off), start, order)


def padded(values: np.ndarray, packed: LaneRows) -> np.ndarray:
    """A per-row constant (comp, out_scale, bias) for the stored rows: zeros past the layer's, in their order."""
    out = np.zeros(packed.rows, values.dtype)
    out[: len(values)] = values
    return out if packed.order is None else out[packed.order]


def row_order(packed: LaneRows) -> np.ndarray:
    """The kernel's row_of argument: the output feature of each stored row (past the layer's: padding)."""
    return packed.order if packed.order is not None else np.arange(packed.rows, dtype=np.int32)


def sparse_dense_int8_lanes(n: int, fin: int, fout: int, quads: int, rows: LaneRows, act: ActQuant, kind: str,
                            relu: bool) -> tirx.PrimFunc:
    """out[n, o] = float32(sum_j x_q[n, off[o, j]] . w[o, j] - comp[o]) * out_scale[o] + bias[o] (ReLU): x [N, fin]
    float32, quantised in `act` into `quads` input quads (zero point past fin); comp, out_scale, bias padded to
    rows.rows in its order (`padded`); row_of: `row_order(rows)`. kind: schedules.x86_int8.int8_kind of the target."""
    from tvm.script import tirx as T

    entries, lanes, _ = (int(d) for d in rows.data.shape)
    tiles, k, off_dtype = rows.tiles, rows.rows, str(rows.off.dtype)
    vec, dot = fin // QUANTIZE_LANES * QUANTIZE_LANES, dot_product(kind, lanes)
    full = fout // lanes if rows.order is None else 0  # tiles stored as one vector of the output's features
    zp, fzero = tirx.const(act.zero_point, "uint8"), tirx.const(0.0, "float32")

    def value(acc, comp, scale, bias, count: int = 0):  # the epilogue, on `count` lanes (0: a scalar)
        val = (acc - comp).astype(f"float32x{count}" if count else "float32") * scale + bias
        return T.max(val, T.Broadcast(fzero, count) if count else fzero) if relu else val

    @T.prim_func(s_tir=True)
    def dense(x: T.Buffer((n, fin), "float32"), data: T.Buffer((entries, lanes, QUAD), "int8"),
              off: T.Buffer((entries, lanes), off_dtype), start: T.Buffer((tiles + 1,), "int32"),
              comp: T.Buffer((k,), "int32"), scale: T.Buffer((k,), "float32"), bias: T.Buffer((k,), "float32"),
              row_of: T.Buffer((k,), "int32"), out: T.Buffer((n, fout), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})  # opaque: never fused
        with T.sblock("root"):
            xq = T.alloc_buffer((n * quads * QUAD,), "uint8")
            xi = T.decl_buffer((n * quads,), "int32", data=xq.data)  # an input quad as one dword
            xf = T.decl_buffer((n * fin,), "float32", data=x.data)
            df = T.decl_buffer((entries * lanes * QUAD,), "int8", data=data.data)
            of = T.decl_buffer((entries * lanes,), off_dtype, data=off.data)
            yf = T.decl_buffer((n * fout,), "float32", data=out.data)
            for b in range(n):
                for i in range(vec // QUANTIZE_LANES):
                    xq[T.Ramp(b * quads * QUAD + i * QUANTIZE_LANES, 1, QUANTIZE_LANES)] = quantize(
                        xf[T.Ramp(b * fin + i * QUANTIZE_LANES, 1, QUANTIZE_LANES)], act, lanes=QUANTIZE_LANES)
                for i in range(quads * QUAD - vec):  # the tail, then the zero point up to whole quads
                    xq[b * quads * QUAD + vec + i] = T.if_then_else(
                        vec + i < fin, quantize(xf[b * fin + T.min(vec + i, fin - 1)], act), zp)
            for bt in T.parallel(n * tiles):  # (image, row tile)
                acc = T.decl_buffer((lanes,), "int32", scope="local")
                acc[T.Ramp(0, 1, lanes)] = T.Broadcast(T.int32(0), lanes)
                for j in range(start[bt % tiles], start[bt % tiles + 1]):
                    acc[T.Ramp(0, 1, lanes)] = dot(
                        acc[T.Ramp(0, 1, lanes)],
                        T.reinterpret(T.Shuffle([xi[bt // tiles * quads + T.Cast("int32", of[j * lanes + r])]
                                                 for r in range(lanes)], list(range(lanes))),
                                      dtype=f"uint8x{QUAD * lanes}"),
                        df[T.Ramp(j * lanes * QUAD, 1, QUAD * lanes)])
                if bt % tiles < full:  # rows in order, all the layer's: one vector
                    yf[T.Ramp(bt // tiles * fout + bt % tiles * lanes, 1, lanes)] = value(
                        acc[T.Ramp(0, 1, lanes)], comp[T.Ramp(bt % tiles * lanes, 1, lanes)],
                        scale[T.Ramp(bt % tiles * lanes, 1, lanes)], bias[T.Ramp(bt % tiles * lanes, 1, lanes)], lanes)
                else:  # lane by lane, each to its output feature (sorted rows, or a partial last tile)
                    for r in range(lanes):
                        if row_of[bt % tiles * lanes + r] < fout:
                            yf[bt // tiles * fout + row_of[bt % tiles * lanes + r]] = value(
                                acc[r], comp[bt % tiles * lanes + r], scale[bt % tiles * lanes + r],
                                bias[bt % tiles * lanes + r])

    return dense.without_attr("global_symbol")  # the module names each (one per layer shape)
