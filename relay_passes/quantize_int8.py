"""QuantizeInt8Conv2d: conv2d chains (+ bias/residual/ReLU) whose input has a calibrated range -> the int8
sparse direct conv2d (te_ops_int8): input quantised to uint8 quads inside the kernel's pad stage, weights
as int8 quads (int8_rows), int32 accumulation, the dequantising epilogue fused.

Runs before SparsifyConv2d, so the layers it takes never reach the fp32 passes; layers without a range
(or with a conv it cannot take) are left to them. Every layer it takes is int8 whatever its sparsity:
the quad rows of a dense layer are simply full.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import tvm
from tvm import relax
from tvm.ir import IRModule
from tvm.target import Target

from unsparse_tvm import te_ops_int8
from unsparse_tvm.int8_rows import ActQuant, conv_quad_rows, epilogue_consts, quantize_weight
from unsparse_tvm.schedules._x86_int8 import act_qmax

from ._conv_match import ConvChainRewriter, unsupported_reason
from ._util import fused_label, mark
from .layers import LayerDecision, LayerNames, fingerprint

OP = "sparse_conv2d_int8"
FORMAT = "int8q4"  # the report's format column: int8 weight quads (ELL rows)


def _known_name(names: LayerNames, weight: np.ndarray) -> str | None:
    """The layer's PyTorch name if the weight is known (name_of would number unknown ones, and the fp32
    passes that see the layer next number them again)."""
    return names._names.get(fingerprint(weight))  # noqa: SLF001 (LayerNames has no lookup-only method)


@relax.expr_functor.mutator
class _Int8Rewriter(ConvChainRewriter):
    def __init__(self, mod: IRModule, ranges: dict, names: LayerNames, report: list, qmax: int):
        super().__init__(mod)
        self.ranges, self.names, self.report, self.qmax = ranges, names, report, qmax

    def rewrite(self, conv, weight, geo, ep):
        name = _known_name(self.names, weight)
        if name is None or name not in self.ranges or geo is None or unsupported_reason(conv, weight) is not None:
            return None
        lo, hi = self.ranges[name]
        act = ActQuant.from_range(lo, hi, self.qmax)
        wq, wscale = quantize_weight(weight)
        rows = conv_quad_rows(wq, geo)
        comp, out_scale = epilogue_consts(wq, wscale, act)
        extra, flags = self.epilogue_args(ep)
        op = partial(te_ops_int8.sparse_conv2d_int8, geo=geo, act=act, quads=rows.pad_quads, **flags)
        args = [self.visit_expr(conv.args[0])] + [relax.const(a) for a in (rows.data, rows.off, comp, out_scale)]
        call = self.builder_.call_te(op, *args, *extra, primfunc_name_hint=OP)
        pad_shape = [rows.pad_quads, geo.stride[0] * geo.stride[1] * geo.hq, geo.wq]
        mark(self.builder_, call, {"op": OP, "unsparse.fmt": FORMAT, "unsparse.pad_shape": pad_shape})
        sparsity = float((weight == 0).sum()) / weight.size
        self.report.append(LayerDecision(name, "conv2d", list(weight.shape), round(sparsity, 4), "sparse",
                                         FORMAT, rows.nnz, rows.padded_size, [geo.n, geo.c, geo.h, geo.w],
                                         fused_label(ep)))
        return call


@tvm.transform.module_pass(opt_level=0, name="QuantizeInt8Conv2d")
class QuantizeInt8Conv2d:
    """Replace calibrated conv2d chains by the int8 sparse direct conv2d (llvm: VNNI/AVX2, cuda: dp4a)."""

    def __init__(self, ranges: dict, target: Target, names: LayerNames | None = None, report: list | None = None):
        self.ranges, self.qmax = dict(ranges), act_qmax(target)
        self.names = names if names is not None else LayerNames()
        self.report = report if report is not None else []

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        return _Int8Rewriter(mod, self.ranges, self.names, self.report, self.qmax).run(mod)
