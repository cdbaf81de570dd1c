"""Weight-only quantised sparse rows: what the kernels read instead of fp32 values and int32 offsets.

A `SparseRows` (formats.py) is re-encoded from the layer's *compiled* weight (batch norm already folded
in, so each output row carries its own factor) and the scheme that `quantize` stored in the .pt2:

- values: every stored weight is `scale[k] * level(code)`, one float scale per output row k (factored
  out of the row's sum: the kernel accumulates levels times inputs and the epilogue multiplies once);
    - "int8": int8 codes, level = code (intB, B = 5..8: symmetric per output channel);
    - "t4": 4-bit codes, two per byte, level = table[code] with a per-layer 16-entry table (int2..4:
      the integers; kmeans2..4: the codebook; pow2: +-2^e);
    - "t8": byte codes into a table of up to 256 levels: kmeans5..8 codebooks, and 4-bit tables whose 16
      levels are all nonzero in a layer whose grouped rows store explicit zeros (vellV fill-in: + a zero).
- offsets: "flat16" where every offset fits 16 bits; "ct16" (conv) (c << b | tap), decoded as
  c * channel_plane + tap_table[tap], b the bits of the tap count (4 for 3x3: < 4096 input channels;
  6 for a 7x7 stem: < 1024); else int32.
- padding: a slot whose weights are all zero (ELL padding, hyb's empty overflow rows) points at a
  region of zeros (conv: an extra zero input channel; linear: one zero column appended to the input),
  so its level does not matter and a 16-level table needs no zero code.

The levels and scales are found from the weight itself (a per-row fit, checked to reproduce every
weight within 1e-5 relative), so batch-norm folding, or a layer quantised by hand, just work; a layer
that does not fit its scheme stays fp32 (`encode` returns None).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .formats import SparseRows, compact_offsets
from .geometry import ConvGeometry

FIT_RTOL = 1e-5          # decoded weights must equal the compiled ones within this (float rounding)


@dataclass(frozen=True)
class QuantGeometry(ConvGeometry):
    """A ConvGeometry with at least one zero channel after the real ones, long enough for a whole flat
    output domain: padding slots read it (a zero level would cost a code, a mask a select per FMA)."""

    @property
    def pad_channels(self) -> int:
        need = -(-(self.c * self.channel_plane + self.q_extent) // self.channel_plane)
        return max(super().pad_channels, need)

    @property
    def zero_offset(self) -> int:
        return self.c * self.channel_plane


@dataclass
class QuantRows:
    """Encoded rows: `rows` keeps the fp32 layout (format, shapes, nnz) the decisions are made on."""

    rows: SparseRows
    kind: str                      # "int8", "t4" or "t8"
    codes: np.ndarray              # int8 [K, L] / [G, L, V]; t4: uint8 [K, ceil(L/2)] / [G, L, V/2]; t8: uint8
    off: np.ndarray                # uint16 or int32, shape of rows.off
    off_mode: str                  # "flat16", "ct16" or "int32"
    scale: np.ndarray              # float32 [K]
    table: np.ndarray | None = None     # float32 [16] (t4) or [17] (t8)
    tap_table: np.ndarray | None = None  # int32 [2^tap_bits] (ct16)
    tap_bits: int = 0
    ovf_codes: np.ndarray | None = None
    ovf_off: np.ndarray | None = None

    @property
    def precision(self) -> str:
        bits = {"int8": "int8", "t4": "4-bit", "t8": "8-bit idx"}[self.kind]
        return f"{bits}/{'16' if self.off_mode != 'int32' else '32'}-bit off"

    @property
    def nbytes(self) -> int:
        """Bytes the kernel's constant operands take (values, offsets, scales, tables, hyb's slots)."""
        arrays = [self.codes, self.off, self.scale, self.table, self.tap_table, self.ovf_codes, self.ovf_off,
                  self.rows.ovf_slot]
        return int(sum(a.nbytes for a in arrays if a is not None))


def fp32_nbytes(rows: SparseRows) -> int:
    """Bytes of an fp32 SparseRows' constant operands (the baseline `inspect` compares against)."""
    arrays = [rows.data, compact_offsets(rows.off), rows.ovf_data, rows.ovf_slot]
    arrays += [compact_offsets(rows.ovf_off)] if rows.ovf_off is not None else []
    return int(sum(a.nbytes for a in arrays if a is not None))


def scheme_levels(entry: dict) -> tuple[str, np.ndarray | None, int]:
    """(kind, table of levels or None, qmax) for one layer's unsparse_quant.json entry."""
    kind, bits = entry.get("kind"), int(entry.get("bits", 0))
    if kind == "linear" and 5 <= bits <= 8:
        return "int8", None, 2 ** (bits - 1) - 1
    if kind == "linear" and 2 <= bits <= 4:
        q = 2 ** (bits - 1) - 1
        return "t4", np.arange(-q, q + 1, dtype=np.float64), q
    if kind == "kmeans" and 2 <= bits <= 8 and entry.get("codebook"):
        return ("t4" if bits <= 4 else "t8"), np.unique(np.asarray(entry["codebook"], np.float64)), 0
    if kind == "pow2":
        emin, emax = int(entry.get("min_exponent", -7)), int(entry.get("max_exponent", 0))
        mags = 2.0 ** np.arange(emin, emax + 1)
        if 2 * len(mags) <= 16:
            return "t4", np.unique(np.concatenate([-mags, mags])), 0
    return "none", None, 0


def _row_entries(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.nonzero(matrix)
    return rows, matrix[rows, cols].astype(np.float64)


def _nearest(table: np.ndarray, ratio: np.ndarray) -> np.ndarray:
    """Index of the nearest table level to each ratio (table sorted)."""
    hi = np.clip(np.searchsorted(table, ratio), 1, len(table) - 1)
    lo = hi - 1
    return np.where(np.abs(ratio - table[lo]) <= np.abs(ratio - table[hi]), lo, hi)


def fit_rows(matrix: np.ndarray, kind: str, table: np.ndarray | None, qmax: int) -> np.ndarray | None:
    """Per-row scales such that every nonzero weight is scale * level, or None where a row does not fit.

    int8: scale = max|w| / qmax (the row's largest weight is +-qmax: symmetric per-channel quantisation).
    Tables: one of the scales max|w| / level fits (the row's largest weight is some level times the row's
    factor); all are tried and the first that reproduces the row is kept."""
    k = matrix.shape[0]
    rows, vals = _row_entries(matrix)
    vmax = np.zeros(k)
    np.maximum.at(vmax, rows, np.abs(vals))
    signed_max = np.zeros(k)  # each row's weight of largest magnitude, with its sign
    order = np.lexsort((np.abs(vals), rows))
    last = np.r_[rows[order][1:] != rows[order][:-1], True] if len(order) else np.zeros(0, bool)
    signed_max[rows[order][last]] = vals[order][last]
    tol = FIT_RTOL * np.maximum(vmax, 1e-30)
    if kind == "int8":
        scale = vmax / qmax
        ok = np.ones(k, bool)
        code = np.rint(vals / np.where(scale[rows] > 0, scale[rows], 1.0))
        bad = (np.abs(code * scale[rows] - vals) > tol[rows]) | (np.abs(code) > qmax)
        ok[rows[bad]] = False
        return scale.astype(np.float32) if ok.all() else None
    scale = np.zeros(k)
    done = vmax == 0
    for level in table:
        if level == 0 or done.all():
            continue
        cand = signed_max / level
        safe = np.where(cand != 0, cand, 1.0)
        ratio = vals / safe[rows]
        err = np.abs(table[_nearest(table, ratio)] * cand[rows] - vals)
        bad = np.zeros(k, bool)
        bad[rows[err > tol[rows]]] = True
        fits = ~done & ~bad
        scale[fits] = cand[fits]
        done |= fits
    return scale.astype(np.float32) if done.all() else None


def _codes(values: np.ndarray, row_of: np.ndarray, scale: np.ndarray, kind: str, table) -> np.ndarray:
    """Codes of stored values (any shape); row_of broadcasts to it. Zeros get the zero level (int8: 0;
    tables: the index of 0 when there is one, else 0: only padding, which reads zeros)."""
    s = scale[row_of].astype(np.float64)
    ratio = np.where(s != 0, values / np.where(s != 0, s, 1.0), 0.0)
    if kind == "int8":
        return np.rint(ratio).astype(np.int8)
    idx = _nearest(table, ratio)
    zero = np.flatnonzero(table == 0)
    return np.where(values == 0, zero[0] if len(zero) else 0, idx).astype(np.uint8)


def _pack4(codes: np.ndarray, axis: int) -> np.ndarray:
    """Two 4-bit codes per byte along `axis` (element 2i low nibble, 2i+1 high), padded to even."""
    codes = np.moveaxis(codes.astype(np.uint8), axis, -1)
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (1,), np.uint8)], axis=-1)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return np.ascontiguousarray(np.moveaxis(packed, -1, axis))


def _encode_offsets(offs: list[np.ndarray], geo: ConvGeometry | None, zero: int):
    """(mode, encoded arrays, tap table) for flat offsets (already redirected to `zero` where padding)."""
    top = max(int(o.max(initial=0)) for o in offs)
    if top < 2 ** 16:
        return "flat16", [o.astype(np.uint16) for o in offs], None
    bits = (geo.r * geo.s - 1).bit_length() if geo is not None else 16
    if geo is not None and geo.c < 2 ** (16 - bits):
        taps = np.zeros(2 ** bits, np.int32)
        rs = [(r, s) for r in range(geo.r) for s in range(geo.s)]
        for t, (r, s) in enumerate(rs):
            taps[t] = geo.tap_offset(0, r, s)
        plane = geo.channel_plane
        lookup = np.full(plane, -1, np.int64)  # offset within a channel -> tap number
        lookup[taps[: len(rs)]] = np.arange(len(rs))
        out = []
        for o in offs:
            c, rem = o.astype(np.int64) // plane, o.astype(np.int64) % plane
            t = lookup[rem]
            if (t < 0).any():
                return "int32", [x.astype(np.int32) for x in offs], None
            out.append(((c << bits) | t).astype(np.uint16))
        return "ct16", out, taps
    return "int32", [o.astype(np.int32) for o in offs], None


def encode(rows: SparseRows, matrix: np.ndarray, entry: dict | None, geo: QuantGeometry | None = None,
           zero_col: int | None = None) -> QuantRows | None:
    """Quantised rows for a layer's fp32 `rows` (of the [K, cols] `matrix`), or None where the entry's
    scheme has no kernel or the weights do not fit it. Conv: `geo` (its zero channel); linear: `zero_col`
    (the appended zero input column)."""
    if entry is None:
        return None
    kind, table, qmax = scheme_levels(entry)
    if kind == "none":
        return None
    scale = fit_rows(matrix, kind, table, qmax)
    if scale is None:
        return None
    zero = geo.zero_offset if geo is not None else int(zero_col)
    v = rows.group
    if v > 1:                                    # [G, L, V]: row g*V + v
        row_of = np.arange(rows.shape[0]).reshape(-1, 1, v)
        pad = ~(rows.data != 0).any(axis=2)      # [G, L] slots of all-zero weights
        fill = ((rows.data == 0) & ~pad[..., None]).any()
    else:
        row_of = np.arange(rows.shape[0]).reshape(-1, 1)
        pad, fill = rows.data == 0, False
    if kind in ("t4", "t8") and fill and not (table == 0).any():  # a zero level for grouped rows' explicit zeros
        if kind == "t4" and len(table) >= 16:
            kind = "t8"
        if len(table) >= 256:
            return None
        table = np.unique(np.append(table, 0.0))
    arrays = [(rows.data, row_of, np.where(pad, zero, rows.off))]
    if rows.fmt == "hyb":
        owner = np.zeros(rows.ovf_data.shape[0], np.int64)
        real = rows.ovf_slot >= 0
        owner[rows.ovf_slot[real]] = np.flatnonzero(real)
        arrays.append((rows.ovf_data, owner.reshape(-1, 1), np.where(rows.ovf_data == 0, zero, rows.ovf_off)))
    codes = [_codes(d, r, scale, kind, table) for d, r, _ in arrays]
    if kind == "t4":
        codes = [_pack4(c, 2 if v > 1 else 1) for c in codes]
    mode, offs, taps = _encode_offsets([o for _, _, o in arrays], geo, zero)
    out = QuantRows(rows, kind, codes[0], offs[0], mode, scale,
                    None if table is None else table.astype(np.float32), taps,
                    0 if taps is None else len(taps).bit_length() - 1)
    if rows.fmt == "hyb":
        out.ovf_codes, out.ovf_off = codes[1], offs[1]
    return out

