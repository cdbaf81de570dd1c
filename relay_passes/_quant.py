"""The quantised branch of SparsifyConv2d / SparsifyDense: where the .pt2's `unsparse_quant.json` names a
layer and its compiled weight fits the scheme, the sparse operator reads codes and 16-bit offsets
(unsparse_tvm.ops.quant_formats, te_quant_ops) instead of fp32 values and int32 offsets. Same op names as the
fp32 operators, so the same schedule rules apply."""

from __future__ import annotations

from dataclasses import fields
from functools import partial

import numpy as np
from tvm import relax

from unsparse_tvm.ops import sparse_quant as quant_ops
from unsparse_tvm.ops.formats import SparseRows
from unsparse_tvm.ops.geometry import ConvGeometry
from unsparse_tvm.ops.names import sparse_op
from unsparse_tvm.ops.quant_formats import QuantGeometry, QuantRows, encode, fp32_nbytes
from unsparse_tvm.ops.sparse_quant import QSpec


def layer_entry(quant: dict | None, name: str, left_fp32: set | None = None) -> dict | None:
    """The layer's entry in unsparse_quant.json (keys are parameter names, `features.0.weight`). None for a layer
    the int8 passes left fp32 for speed (LayerNames.left_fp32): it runs the fp32 kernel on its weights' int8 values
    (the same values as floats): with AVX2 code the weight-quantised kernels ran vgg16-cifar unstructured 90%'s such
    layers in 1.95 ms, the fp32 ones in 1.73 (fp32 weights: 1.74)."""
    if not quant or name in (left_fp32 or ()):
        return None
    layers = quant.get("layers", {})
    return layers.get(f"{name}.weight", layers.get(name))


def _consts(q: QuantRows) -> list[relax.Expr]:
    arrays = [q.codes, q.off, q.scale]
    if q.table is not None:
        arrays.append(q.table)
    if q.tap_table is not None:
        arrays.append(q.tap_table)
    if q.rows.fmt == "hyb":
        arrays += [q.ovf_codes, q.ovf_off, q.rows.ovf_slot]
    return [relax.const(np.ascontiguousarray(a)) for a in arrays]


def quant_conv(builder: relax.BlockBuilder, x: relax.Expr, rows: SparseRows, weight: np.ndarray,
               geo: ConvGeometry, entry: dict | None, extra: list, flags: dict, target_kind: str = "llvm"):
    """(call, QuantRows, geometry) of the quantised conv, or None where the layer stays fp32. x86 rows
    decode a task's weights once (its row tile, reused by every output tile), not next to each FMA."""
    qgeo = QuantGeometry(*[getattr(geo, f.name) for f in fields(ConvGeometry)])
    q = encode(rows, weight.reshape(weight.shape[0], -1), entry, geo=qgeo)
    if q is None:
        return None
    spec = QSpec(q.kind, q.off_mode, rows.fmt, qgeo.channel_plane, q.tap_bits,
                 predecode=target_kind == "llvm")
    op = partial(quant_ops.qsparse_conv2d, geo=qgeo, spec=spec, **flags)
    kind = sparse_op("conv2d", rows)
    return builder.call_te(op, x, *_consts(q), *extra, primfunc_name_hint=kind), q, qgeo


def quant_dense(builder: relax.BlockBuilder, x: relax.Expr, rows: SparseRows, weight: np.ndarray,
                entry: dict | None, bias: np.ndarray | None, relu: bool):
    """(call, QuantRows) of the quantised linear layer, or None where it stays fp32. Its input gets one
    zero column appended (a separate small pad op): padding slots point there."""
    q = encode(rows, weight, entry, zero_col=weight.shape[1])
    if q is None:
        return None
    spec = QSpec(q.kind, q.off_mode, rows.fmt)
    padded = builder.emit(relax.op.nn.pad(x, [0, 0, 0, 1]))
    args = [padded, *_consts(q)] + ([relax.const(bias)] if bias is not None else [])
    kind = sparse_op("dense", rows)
    op = partial(quant_ops.qsparse_dense, spec=spec, has_bias=bias is not None, relu=relu)
    return builder.call_te(op, *args, primfunc_name_hint=kind), q


def record_bytes(decision, rows: SparseRows | None, q: QuantRows | None, weight: np.ndarray) -> None:
    """Stored precision and bytes of a layer's weight operands (inspect and bench show them)."""
    if q is not None:
        decision.precision, decision.weight_bytes = q.precision, q.nbytes
    elif rows is not None and decision.decision == "sparse":
        decision.precision, decision.weight_bytes = "fp32", fp32_nbytes(rows)
    else:
        decision.precision, decision.weight_bytes = "fp32", int(weight.size * 4)
