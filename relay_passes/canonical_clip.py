"""CanonicalizeClip: a clip that a frontend emitted as TE calls becomes `relax.clip` (or `relax.nn.relu`).

TVM's ONNX importer converts Clip (opset >= 11, bounds as inputs: ReLU6 from every exporter) into
`call_tir(maximum, (x, lo))` then `call_tir(minimum, (., hi))` through `emit_te`, which no epilogue
matcher can read; torch's importer gives `relax.clip(x, 0, 6)`. Recognised by structure, not by name:
the PrimFunc must be exactly TOPI's elementwise maximum/minimum of x and a scalar, the bound a constant.
Runs after FoldConstant (the importer wraps float bounds in a where(isnan(b), inf, b), folded there).
"""

from __future__ import annotations

import math

import numpy as np
import tvm
import tvm_ffi
from tvm import relax, te, topi
from tvm.ir import IRModule

from ._util import FunctionRewriter, const_array, shape_of


def _scalar_extremum(call: relax.Expr, mod: IRModule) -> tuple[str, relax.Expr, float] | None:
    """("max" | "min", x, bound) when `call` is call_tir of TOPI's maximum/minimum(x, scalar constant)."""
    if not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.call_tir"):
        return None
    args = call.args[1]
    if not isinstance(args, relax.Tuple) or len(args.fields) != 2:
        return None
    x, bound = args.fields
    arr = const_array(bound)
    xshape = shape_of(x)
    if arr is None or arr.shape != () or xshape is None or str(arr.dtype) != "float32" \
            or getattr(x.ty, "dtype", None) != "float32" or shape_of(call) != xshape:
        return None
    func = mod[call.args[0]]
    if not isinstance(func, tvm.tirx.PrimFunc):
        return None
    a = te.placeholder(list(x.ty.shape.values), "float32", "A")
    b = te.placeholder((), "float32", "B")
    for kind, op in (("max", topi.maximum), ("min", topi.minimum)):
        ref = te.create_prim_func([a, b, op(a, b)])
        if tvm_ffi.structural_equal(func.body, ref.body, map_free_vars=True):
            return kind, x, float(arr)
    return None


@relax.expr_functor.mutator
class _Rewriter(FunctionRewriter):
    def __init__(self, mod: IRModule):
        super().__init__(mod)
        self.mod = mod

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        found = _scalar_extremum(call, self.mod)
        if found is None:
            return super().visit_call_(call)
        kind, x, bound = found
        lo, hi = (bound, math.inf) if kind == "max" else (-math.inf, bound)
        inner = _scalar_extremum(self.var2val.get(x), self.mod) if isinstance(x, relax.Var) else None
        if kind == "min" and inner is not None and inner[0] == "max" and self.counts.get(x, 0) == 1:
            x, lo = inner[1], inner[2]  # min(max(x, lo), hi): the inner call becomes dead
        if not lo <= hi or np.isnan(lo) or np.isnan(hi):
            return super().visit_call_(call)  # ONNX's order of max then min differs from clip's there
        new_x = self.visit_expr(x)
        if lo == 0.0 and hi == math.inf:
            return relax.op.nn.relu(new_x)
        return relax.op.clip(new_x, lo, hi)


@tvm.transform.module_pass(opt_level=0, name="CanonicalizeClip")
class CanonicalizeClip:
    """call_tir(minimum, (call_tir(maximum, (x, lo)), hi)) -> relax.clip(x, lo, hi); maximum(x, 0) -> relu."""

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        return _Rewriter(mod).run(mod)
