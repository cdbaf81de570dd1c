"""SparsifyDense: linear layers (matmul with a constant weight, + bias, + ReLU) -> TE sparse dense
operator, where predicted faster than the dense one (or sparsity >= threshold if one is given)."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from unsparse_tvm.ops import sparse as sparse_ops
from unsparse_tvm.ops.formats import HYB_MIN_SAVING, dense_weight_rows
from unsparse_tvm.ops.names import sparse_op
from unsparse_tvm.cost.model import CostModel

from ._quant import layer_entry, quant_dense, record_bytes
from ._util import (ChainRewriter, SparsifyPass, choose_sparse, const_array, is_op, mark, match_epilogue, record_sparse,
                    rows_consts, shape_of, use_counts, users_of)
from .layers import LayerDecision


def _linear_weight(call: relax.Call, var2val: dict) -> np.ndarray | None:
    """[out, in] weight of matmul(x, W^T) where W^T is a constant or permute_dims of a constant."""
    if not is_op(call, "relax.matmul"):
        return None
    rhs = call.args[1]
    rhs = var2val.get(rhs, rhs)
    arr = const_array(rhs)
    if arr is not None and arr.ndim == 2:
        return np.ascontiguousarray(arr.T)
    if is_op(rhs, "relax.permute_dims"):
        inner = const_array(rhs.args[0])
        axes = [int(a) for a in rhs.attrs.axes] if rhs.attrs.axes is not None else [1, 0]
        if inner is not None and inner.ndim == 2 and axes == [1, 0]:
            return inner
    return None


@relax.expr_functor.mutator
class _Sparsifier(ChainRewriter):
    def __init__(self, mod, threshold, names, report, fmt, cost: CostModel):
        super().__init__(mod)
        self.threshold, self.names, self.report, self.fmt = threshold, names, report, fmt
        self.cost, self.target_kind = cost, cost.kind
        self.quant = None

    def plan(self, func: relax.Function) -> None:
        var2val = relax.analysis.get_var2val(func)
        counts, users = use_counts(func), users_of(func)
        self.plans = {}
        for block in func.body.blocks:
            for b in block.bindings:
                weight = _linear_weight(b.value, var2val)
                xshape, out = shape_of(b.value.args[0]) if weight is not None else None, shape_of(b.var)
                if weight is None or xshape is None or len(xshape) != 2 or out is None:
                    continue
                ep = match_epilogue(b.var, out[1], 1, out, var2val, users, counts, allow_residual=False)
                self.plans[ep.last] = (b.value, weight, ep)

    def rewrite_plan(self, planned) -> relax.Expr | None:
        call, weight, ep = planned
        sparsity = float((weight == 0).sum()) / weight.size
        decision = LayerDecision(self.names.name_of(weight, "linear"), "dense", list(weight.shape),
                                 round(sparsity, 4), "dense", nnz=int((weight != 0).sum()),
                                 input_shape=list(shape_of(call.args[0])))
        self.report.append(decision)
        record_bytes(decision, None, None, weight)
        if weight.dtype != np.float32 or getattr(call.args[0].ty, "dtype", None) != "float32":
            decision.decision = f"dense (dtype {weight.dtype}, not float32)" if weight.dtype != np.float32 else "dense (input not float32)"
            return None
        batch = shape_of(call.args[0])[0]
        rows = choose_sparse(decision, sparsity, self.threshold,
                             lambda: dense_weight_rows(weight, self.fmt, HYB_MIN_SAVING[self.target_kind]),
                             lambda rows: self.cost.linear(batch, weight.shape, rows))
        if rows is None:
            return None
        quantised = quant_dense(self.builder_, self.visit_expr(call.args[0]), rows, weight,
                                layer_entry(self.quant, decision.name), ep.bias, ep.relu)
        if quantised is not None:
            new, q = quantised
            kind = sparse_op("dense", rows)
            mark(self.builder_, new, {"op": kind, "unsparse.fmt": rows.fmt})
            record_sparse(decision, rows, ep)
            record_bytes(decision, rows, q, weight)
            return new
        args = [self.visit_expr(call.args[0]), *rows_consts(rows)]
        if ep.bias is not None:
            args.append(relax.const(ep.bias))
        kind = sparse_op("dense", rows)  # grouped rows: their own rules
        new = self.builder_.call_te(sparse_ops.sparse_dense, *args, fmt=rows.fmt, has_bias=ep.bias is not None,
                                    relu=ep.relu, primfunc_name_hint=kind)
        mark(self.builder_, new, {"op": kind, "unsparse.fmt": rows.fmt})
        record_sparse(decision, rows, ep)
        record_bytes(decision, rows, None, weight)
        return new


@tvm.transform.module_pass(opt_level=0, name="SparsifyDense")
class SparsifyDense(SparsifyPass):
    """Replace sufficiently sparse linear layers (+ bias/ReLU) by TE sparse dense operators."""

    mutator = staticmethod(_Sparsifier)
