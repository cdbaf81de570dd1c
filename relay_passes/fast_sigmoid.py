"""FastSigmoid (llvm): sigmoid and SiLU as TE ops on a polynomial exp that vectorises.

TVM lowers `exp` (inside sigmoid, SiLU = x * sigmoid(x)) to LLVM's exp intrinsic, which on x86 without
a vector math library becomes one libm call per lane: efficientnet's SiLU epilogues and SE gates then
cost more than the convs they follow. This is the Cephes-style exp of TOPI's fast_exp (range reduction
by ln 2, degree-6 polynomial, exponent bits set directly; relative error ~1e-7 in float32), written as TE
so FuseOps still fuses it into the neighbouring elementwise chain. Runs before LegalizeOps.
"""

from __future__ import annotations

import tvm
from tvm import relax, te, tirx
from tvm.ir import IRModule

from ._util import dtype_of, is_op

_LOG2E = 1.44269504088896341
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4
_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


def fast_exp(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """exp(x) for float32 x, saturating at +/-88.38 (where float32 exp over/underflows)."""
    f = lambda v: tirx.const(v, "float32")  # noqa: E731
    x = tirx.max(tirx.min(x, f(88.3762626647950)), f(-88.3762626647949))
    n = tirx.floor(x * f(_LOG2E) + f(0.5))
    r = x - n * f(_LN2_HI) - n * f(_LN2_LO)
    p = f(_POLY[0])
    for c in _POLY[1:]:
        p = p * r + f(c)
    p = p * r * r + r + f(1.0)
    scale = tirx.reinterpret("float32", (n.astype("int32") + 127) << 23)
    return p * scale


def _sigmoid_te(x: te.Tensor, silu: bool) -> te.Tensor:
    one = tirx.const(1.0, "float32")

    def value(*i):
        s = one / (one + fast_exp(-x(*i)))
        return x(*i) * s if silu else s

    return te.compute(x.shape, value, name="fast_silu" if silu else "fast_sigmoid", tag="elemwise")


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
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
        rewriter = _Rewriter(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        return rewriter.builder_.finalize()
