"""TE definitions of the weight-only quantised sparse operators (formats in qformats.py).

The same stages, names and loop nests as te_ops' fp32 operators ("pad_flat", "conv" [N, K, Q] or
[N, G, V, Q], "conv_ovf", "epilogue"), so every x86 and CUDA schedule rule applies unchanged; only the
reduction's body differs: the weight is decoded from its code (an int8 cast, or a 4-bit nibble looked up
in the layer's table) and the offset from 16 bits, right where the FMA uses them. The row's scale is
factored out of the sum and applied once per output in the epilogue, before bias, residual and ReLU.

Operands, in order: x, codes, off, scale, [table] (t4/t8), [tap_table] (ct16),
[ovf_codes, ovf_off, slot] (hyb), [bias], [residual] (conv).
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import te, tirx

from .sparse import F32_ZERO, epilogue_stage, pad_flat


@dataclass(frozen=True)
class QSpec:
    """Static facts of one quantised layer: value coding, offset coding, sparse format."""

    kind: str        # "int8", "t4" or "t8"
    off_mode: str    # "flat16", "ct16" or "int32"
    fmt: str         # "ell", "hyb" or "vellV"
    plane: int = 0   # ct16: flat size of one input channel
    tap_bits: int = 0  # ct16: low bits of an offset holding the tap
    predecode: bool = False  # rows: decode into "<stage>_wdec"/"<stage>_odec" stages the schedule places

    @property
    def has_table(self) -> bool:
        return self.kind in ("t4", "t8")


class _Decoder:
    """Decodes levels and offsets of one stored array (codes, off) inside a TE expression."""

    def __init__(self, spec: QSpec, table, taps):
        self.spec, self.table, self.taps = spec, table, taps

    def level(self, codes: te.Tensor, *idx):
        """Level of entry idx ((k, j) or (g, j, v)); t4 reads the nibble of the last index."""
        if self.spec.kind == "int8":
            return codes[idx].astype("float32")
        if self.spec.kind == "t8":
            return self.table[codes[idx].astype("int32")]
        *head, last = idx
        byte = codes[(*head, last // 2)].astype("int32")
        return self.table[tirx.bitwise_and(tirx.shift_right(byte, (last % 2) * 4), 15)]

    def offset(self, off: te.Tensor, *idx):
        if self.spec.off_mode == "int32":
            return off[idx]
        o = off[idx].astype("int32")
        if self.spec.off_mode == "flat16":
            return o
        bits = self.spec.tap_bits
        return tirx.shift_right(o, bits) * self.spec.plane + self.taps[tirx.bitwise_and(o, 2 ** bits - 1)]


def _take(rest: list, spec: QSpec):
    table = rest.pop(0) if spec.has_table else None
    taps = rest.pop(0) if spec.off_mode == "ct16" else None
    ovf = [rest.pop(0) for _ in range(3)] if spec.fmt == "hyb" else None
    return _Decoder(spec, table, taps), ovf


def qsparse_conv2d(x: te.Tensor, codes: te.Tensor, off: te.Tensor, scale: te.Tensor, *rest: te.Tensor, geo,
                   spec: QSpec, has_bias: bool, has_residual: bool, relu: bool,
                   relu_max: float | None = None, silu: bool = False) -> te.Tensor:
    """Quantised sparse direct conv2d over geo (a qformats.QuantGeometry, with its zero channel)."""
    rest = list(rest)
    dec, ovf = _take(rest, spec)
    bias = rest.pop(0) if has_bias else None
    residual = rest.pop(0) if has_residual else None
    xf = pad_flat(x, geo)
    shape = (geo.n, geo.k, geo.oh, geo.ow)
    if spec.fmt.startswith("vell"):
        groups, width = off.shape
        v = int(spec.fmt[4:])
        j = te.reduce_axis((0, width), name="j")
        if spec.predecode:  # x86: decoded once per task's groups (schedules compute_at), not per output tile
            w = te.compute((groups, width, v), lambda g, i, r: dec.level(codes, g, i, r), name="conv_wdec")
            at = te.compute((groups, width), lambda g, i: dec.offset(off, g, i), name="conv_odec")
            conv = te.compute((geo.n, groups, v, geo.q_extent),
                              lambda n, g, r, q: te.sum(w[g, j, r] * xf[n, at[g, j] + q], axis=j), name="conv")
        else:
            conv = te.compute((geo.n, groups, v, geo.q_extent),
                              lambda n, g, r, q: te.sum(dec.level(codes, g, j, r) * xf[n, dec.offset(off, g, j) + q],
                                                        axis=j),
                              name="conv")
        return epilogue_stage(lambda n, k, y, x_: conv[n, k // v, k % v, y * geo.wq + x_] * scale[k],
                         shape, bias, residual, relu, relu_max, silu)

    def rows(c, o, name):
        j = te.reduce_axis((0, o.shape[1]), name="j")
        if spec.predecode:  # x86: decoded once per task's row tile (schedules compute_at), not per output tile
            w = te.compute(o.shape, lambda k, i: dec.level(c, k, i), name=f"{name}_wdec")
            at = te.compute(o.shape, lambda k, i: dec.offset(o, k, i), name=f"{name}_odec")
            return te.compute((geo.n, o.shape[0], geo.q_extent),
                              lambda n, k, q: te.sum(w[k, j] * xf[n, at[k, j] + q], axis=j), name=name)
        return te.compute((geo.n, o.shape[0], geo.q_extent),
                          lambda n, k, q: te.sum(dec.level(c, k, j) * xf[n, dec.offset(o, k, j) + q], axis=j),
                          name=name)

    conv = rows(codes, off, "conv")
    if ovf is None:
        return epilogue_stage(lambda n, k, y, x_: conv[n, k, y * geo.wq + x_] * scale[k], shape, bias, residual, relu,
                         relu_max, silu)
    ovf_codes, ovf_off, slot = ovf
    conv_ovf = rows(ovf_codes, ovf_off, "conv_ovf")

    def acc(n, k, y, x_):
        q = y * geo.wq + x_
        extra = tirx.if_then_else(slot[k] >= 0, conv_ovf[n, tirx.max(slot[k], 0), q], F32_ZERO)
        return (conv[n, k, q] + extra) * scale[k]

    return epilogue_stage(acc, shape, bias, residual, relu, relu_max, silu)


def qsparse_dense(x: te.Tensor, codes: te.Tensor, off: te.Tensor, scale: te.Tensor, *rest: te.Tensor,
                  spec: QSpec, has_bias: bool, relu: bool) -> te.Tensor:
    """Quantised sparse linear layer; x is [N, in + 1], its last column zero (padding slots read it)."""
    rest = list(rest)
    dec, ovf = _take(rest, spec)
    bias = rest.pop(0) if has_bias else None
    batch, rows_out = x.shape[0], scale.shape[0]
    if spec.fmt.startswith("vell"):
        groups, width = off.shape
        v = int(spec.fmt[4:])
        j = te.reduce_axis((0, width), name="j")
        mm = te.compute((batch, groups, v),
                        lambda n, g, r: te.sum(dec.level(codes, g, j, r) * x[n, dec.offset(off, g, j)], axis=j),
                        name="conv")
        return epilogue_stage(lambda n, k: mm[n, k // v, k % v] * scale[k], (batch, rows_out), bias, None, relu)

    def rows(c, o, name):
        j = te.reduce_axis((0, o.shape[1]), name="j")
        return te.compute((batch, o.shape[0]),
                          lambda n, k: te.sum(dec.level(c, k, j) * x[n, dec.offset(o, k, j)], axis=j), name=name)

    mm = rows(codes, off, "conv")
    if ovf is None:
        return epilogue_stage(lambda n, k: mm[n, k] * scale[k], (batch, rows_out), bias, None, relu)
    ovf_codes, ovf_off, slot = ovf
    mm_ovf = rows(ovf_codes, ovf_off, "conv_ovf")

    def acc(n, k):
        extra = tirx.if_then_else(slot[k] >= 0, mm_ovf[n, tirx.max(slot[k], 0)], F32_ZERO)
        return (mm[n, k] + extra) * scale[k]

    return epilogue_stage(acc, (batch, rows_out), bias, None, relu)
