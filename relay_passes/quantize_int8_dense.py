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

from . import quantize_int8
from ._dense_match import DenseChainRewriter
from ._util import fused_label, mark, shape_of
from ._gathered_int8 import MAX_FILL, quad_fill
from .layers import LayerNames
from .quantize_int8 import FORMAT, Int8LayerPass, int8_decision

OP = names.SPARSE_DENSE_INT8


@relax.expr_functor.mutator
class _Int8DenseRewriter(DenseChainRewriter):
    saturating = False  # Int8LayerPass sets it (ActQuant.saturating)

    def __init__(self, mod: IRModule, ranges: dict, names: LayerNames, report: list, qmax: int):
        super().__init__(mod)
        self.ranges, self.names, self.report, self.qmax = ranges, names, report, qmax

    def takes(self, weight: np.ndarray) -> bool:
        name = self.names.known(weight)
        if weight.dtype.name != "float32" or name not in self.ranges:
            return False
        # at batch 1 the int8 linear has no positions to put in vector lanes: its scalar code multiplies a stored
        # quad's 4 bytes, so on scattered nonzeros it loses to an fp32 FMA per nonzero (vgg16-cifar unstructured
        # 90%, 512x512: 0.035 against 0.020 ms; channel4, 4 a quad: 0.016 against 0.022), on every CPU
        if quantize_int8.SCATTERED_FP32 and (fill := quad_fill(weight)) < MAX_FILL:
            self.names.fp32_int8[name] = round(fill, 3)
            return False
        return True

    def rewrite(self, call, weight, ep) -> relax.Expr | None:
        name = self.names.known(weight)
        act = ActQuant.from_range(*self.ranges[name], self.qmax, self.saturating)
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
