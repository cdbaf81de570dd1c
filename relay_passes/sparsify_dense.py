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
from ._dense_match import DenseChainRewriter
from ._util import SparsifyPass, choose_sparse, mark, record_sparse, rows_consts, shape_of
from .layers import LayerDecision


@relax.expr_functor.mutator
class _Sparsifier(DenseChainRewriter):
    def __init__(self, mod, threshold, names, report, fmt, cost: CostModel):
        super().__init__(mod)
        self.threshold, self.names, self.report, self.fmt = threshold, names, report, fmt
        self.cost, self.target_kind = cost, cost.kind
        self.quant = None

    def rewrite(self, call, weight, ep) -> relax.Expr | None:
        sparsity = float((weight == 0).sum()) / weight.size
        decision = LayerDecision(self.names.name_of(weight, "linear"), "dense", list(weight.shape),
                                 round(sparsity, 4), "dense", nnz=int((weight != 0).sum()),
                                 input_shape=list(shape_of(call.args[0])))
        self.report.append(decision)
        record_bytes(decision, None, None, weight)
        if weight.dtype != np.float32 or getattr(call.args[0].ty, "dtype", None) != "float32":
            decision.keep_dense(f"dtype {weight.dtype}, not float32" if weight.dtype != np.float32 else "input not float32")
            return None
        batch = shape_of(call.args[0])[0]
        rows = choose_sparse(decision, sparsity, self.threshold,
                             lambda: dense_weight_rows(weight, self.fmt, HYB_MIN_SAVING[self.target_kind]),
                             lambda rows: self.cost.linear(batch, weight.shape, rows))
        if rows is None:
            return None
        quantised = quant_dense(self.builder_, self.visit_expr(call.args[0]), rows, weight,
                                layer_entry(self.quant, decision.name, self.names.left_fp32()), ep.bias, ep.relu)
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
