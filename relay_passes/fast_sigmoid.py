"""FastSigmoid (llvm): sigmoid and SiLU as TE ops on a polynomial exp that vectorises
(unsparse_tvm/fast_math.py says why), written as TE so FuseOps still fuses them into the neighbouring
elementwise chain. Runs before LegalizeOps; a SiLU that follows a conv was already fused into the conv's
epilogue by the substitution passes.
"""

from __future__ import annotations

import tvm
from tvm import relax, te
from tvm.ir import IRModule

from unsparse_tvm.ops.fast_math import fast_sigmoid, fast_silu

from ._util import FunctionRewriter, dtype_of, is_op


def _sigmoid_te(x: te.Tensor, silu: bool) -> te.Tensor:
    def value(*i):
        return fast_silu(x(*i)) if silu else fast_sigmoid(x(*i))

    return te.compute(x.shape, value, name="fast_silu" if silu else "fast_sigmoid", tag="elemwise")


@relax.expr_functor.mutator
class _Rewriter(FunctionRewriter):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        for name, silu in (("relax.sigmoid", False), ("relax.nn.silu", True)):
            if is_op(call, name) and dtype_of(call.args[0]) == "float32":
                return self.builder_.call_te(_sigmoid_te, call.args[0], silu,
                                             primfunc_name_hint="fast_silu" if silu else "fast_sigmoid")
        return call


@tvm.transform.module_pass(opt_level=0, name="FastSigmoid")
class FastSigmoid:
    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        return _Rewriter(mod).run(mod)
