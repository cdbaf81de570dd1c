"""Elementwise math as TIR expressions that vectorise on every target.

TVM lowers `exp` to LLVM's exp intrinsic, which on x86 without a vector math library becomes one libm
call per lane: efficientnet's SiLU epilogues and SE gates then cost more than the convs they follow. This
is the Cephes-style exp of TOPI's fast_exp (range reduction by ln 2, degree-6 polynomial, exponent bits
set directly; relative error ~1e-7 in float32). The conv epilogues (te_ops, te_quant_ops) and the
FastSigmoid pass share it.
"""

from __future__ import annotations

from tvm import tirx

_LOG2E = 1.44269504088896341
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4
_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


def _f32(v: float) -> tirx.PrimExpr:
    return tirx.const(v, "float32")


def _float_var(name: str) -> tirx.Var:
    return tirx.Var(name, "float32")


def fast_exp(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """exp(x) for float32 x, saturating at +/-88.38 (where float32 exp over/underflows).

    The clamped x, n and r are bound once with Let: the polynomial uses each a dozen times, and as a plain
    expression tree every use was a copy of the whole operand (a conv epilogue's gather, bias and residual
    loads included), which LLVM did not merge back (a hyb epilogue ran 5x slower)."""
    xc, n, r = _float_var("x"), _float_var("n"), _float_var("r")
    p = _f32(_POLY[0])
    for c in _POLY[1:]:
        p = p * r + _f32(c)
    value = (p * r * r + r + _f32(1.0)) * tirx.reinterpret("float32", (n.astype("int32") + 127) << 23)
    value = tirx.Let(r, xc - n * _f32(_LN2_HI) - n * _f32(_LN2_LO), value)
    value = tirx.Let(n, tirx.floor(xc * _f32(_LOG2E) + _f32(0.5)), value)
    return tirx.Let(xc, tirx.max(tirx.min(x, _f32(88.3762626647950)), _f32(-88.3762626647949)), value)


def fast_sigmoid(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """1 / (1 + exp(-x)) on fast_exp."""
    return _f32(1.0) / (_f32(1.0) + fast_exp(-x))


def fast_silu(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """SiLU (swish): x * sigmoid(x), x computed once."""
    v = _float_var("v")
    return tirx.Let(v, x, v * fast_sigmoid(v))
