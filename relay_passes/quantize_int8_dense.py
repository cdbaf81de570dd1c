"""QuantizeInt8Dense: linear layers (matmul with a constant weight, + bias, + ReLU) whose input has a
calibrated range -> the int8 sparse linear operator (int8_ops.sparse_dense_int8), llvm only (there is
no CUDA rule for it: on cuda these layers stay fp32). As QuantizeInt8Conv2d, before SparsifyDense."""

from __future__ import annotations

from functools import partial

import tvm
from tvm import relax
from tvm.ir import IRModule
from tvm.target import Target

from unsparse_tvm.ops import names
from unsparse_tvm.ops import sparse_int8 as int8_ops
from unsparse_tvm.ops.int8_formats import ActQuant, dense_quad_rows, epilogue_consts, quantize_weight, record_int8
from unsparse_tvm.schedules._x86_int8 import act_qmax

from ._util import ChainRewriter, fused_label, mark, match_epilogue, shape_of, use_counts, users_of
from .layers import LayerDecision, LayerNames
from .quantize_int8 import FORMAT, _known_name
from .sparsify_dense import _linear_weight

OP = names.SPARSE_DENSE_INT8


@relax.expr_functor.mutator
class _Int8DenseRewriter(ChainRewriter):
    def __init__(self, mod: IRModule, ranges: dict, names: LayerNames, report: list, qmax: int):
        super().__init__(mod)
        self.ranges, self.names, self.report, self.qmax = ranges, names, report, qmax

    def plan(self, func: relax.Function) -> None:
        var2val = relax.analysis.get_var2val(func)
        counts, users = use_counts(func), users_of(func)
        self.plans = {}
        for block in func.body.blocks:
            for b in block.bindings:
                weight = _linear_weight(b.value, var2val)
                if weight is None or weight.dtype.name != "float32":
                    continue
                xshape, out = shape_of(b.value.args[0]), shape_of(b.var)
                name = _known_name(self.names, weight)
                if xshape is None or len(xshape) != 2 or out is None or name not in self.ranges:
                    continue
                ep = match_epilogue(b.var, out[1], 1, out, var2val, users, counts, allow_residual=False)
                self.plans[ep.last] = (b.value, weight, ep, name)

    def rewrite_plan(self, planned) -> relax.Expr | None:
        call, weight, ep, name = planned
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
        sparsity = float((weight == 0).sum()) / weight.size
        decision = LayerDecision(name, "dense", list(weight.shape), round(sparsity, 4), "sparse", FORMAT,
                                 rows.nnz, rows.padded_size, list(shape_of(call.args[0])), fused_label(ep))
        record_int8(decision, rows, comp, out_scale)
        self.report.append(decision)
        return new


@tvm.transform.module_pass(opt_level=0, name="QuantizeInt8Dense")
class QuantizeInt8Dense:
    """Replace calibrated linear layers by the int8 sparse linear operator (llvm)."""

    def __init__(self, ranges: dict, target: Target, names: LayerNames | None = None, report: list | None = None):
        self.ranges, self.qmax = dict(ranges), act_qmax(target)
        self.names = names if names is not None else LayerNames()
        self.report = report if report is not None else []

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        return _Int8DenseRewriter(mod, self.ranges, self.names, self.report, self.qmax).run(mod)
