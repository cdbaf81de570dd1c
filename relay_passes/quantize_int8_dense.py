"""QuantizeInt8Dense: linear layers (matmul with a constant weight, + bias, + ReLU) whose input has a
calibrated range -> the int8 sparse linear operator (int8_ops.sparse_dense_int8), llvm only (there is
no CUDA rule for it: on cuda these layers stay fp32). As QuantizeInt8Conv2d, before SparsifyDense."""

from __future__ import annotations

from functools import partial

import numpy as np
import tvm
from tvm import relax
from tvm.ir import IRModule

from unsparse_tvm.ops import names
from unsparse_tvm.ops import sparse_int8 as int8_ops
from unsparse_tvm.ops.int8_formats import ActQuant, dense_quad_rows, epilogue_consts, quantize_weight

from ._dense_match import DenseChainRewriter
from ._util import fused_label, mark, shape_of
from .layers import LayerNames
from .quantize_int8 import FORMAT, Int8LayerPass, int8_decision

OP = names.SPARSE_DENSE_INT8


@relax.expr_functor.mutator
class _Int8DenseRewriter(DenseChainRewriter):
    def __init__(self, mod: IRModule, ranges: dict, names: LayerNames, report: list, qmax: int):
        super().__init__(mod)
        self.ranges, self.names, self.report, self.qmax = ranges, names, report, qmax

    def takes(self, weight: np.ndarray) -> bool:
        return weight.dtype.name == "float32" and self.names.known(weight) in self.ranges

    def rewrite(self, call, weight, ep) -> relax.Expr | None:
        name = self.names.known(weight)
        act = ActQuant.from_range(*self.ranges[name], self.qmax)
        wq, wscale = quantize_weight(weight)
        rows = dense_quad_rows(wq)
        comp, out_scale = epilogue_consts(wq, wscale, act)
        args = [self.visit_expr(call.args[0])] + [relax.const(a) for a in (rows.data, rows.off, comp, out_scale)]
        if ep.bias is not None:
            args.append(relax.const(ep.bias))
        op = partial(int8_ops.sparse_dense_int8, act=act, quads=rows.pad_quads, has_bias=ep.bias is not None,
                     relu=ep.relu)  # call_te only passes TE-able kwargs
        new = self.builder_.call_te(op, *args, primfunc_name_hint=OP)
        mark(self.builder_, new, {"op": OP, "unsparse.fmt": FORMAT})
        self.report.append(int8_decision(name, "dense", weight, rows, list(shape_of(call.args[0])), fused_label(ep),
                                         (comp, out_scale)))
        return new


@tvm.transform.module_pass(opt_level=0, name="QuantizeInt8Dense")
class QuantizeInt8Dense(Int8LayerPass):
    """Replace calibrated linear layers by the int8 sparse linear operator (llvm)."""

    rewriter = _Int8DenseRewriter
