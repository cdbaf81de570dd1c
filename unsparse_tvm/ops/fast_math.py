"""Elementwise math as TIR expressions that vectorise on every target.

TVM lowers `exp` to LLVM's exp intrinsic, which on x86 without a vector math library becomes one libm
call per lane: efficientnet's SiLU epilogues and SE gates then cost more than the convs they follow. Here
sigmoid is 1 / (1 + 2^y), y = -x log2(e): 2^y = 2^n 2^f with n = round(y) put into the exponent bits and
2^f, |f| <= 1/2, a degree-5 polynomial (relative error 2.4e-7 in float32). The conv epilogues (te_ops,
te_quant_ops), SE gates and the FastSigmoid pass share it.

It was TOPI's fast_exp before (Cody-Waite reduction by ln 2 in two FMAs, degree-6 polynomial in r, the
exponent by convert-shift-add-multiply): 12 multiply-class ops per vector where this has 8 (and a
compare-select for the overflow). Whole efficientnet_b0@128 at 90% on a Zen 4, the two .so files
alternating (benchmarks/so_profile.py): 2.41 -> 2.20 ms one thread, 1.82 -> 1.75 two, 3.23 -> 2.68 ms on
the AVX2 code path. Without the two-step reduction, y = x log2(e) carries float32's rounding (|y| 2^-24):
at |x| near 88 a few 1e-6 relative in a sigmoid of ~1e-38 or within 1e-38 of 1, invisible next to the
values it is added to.
"""

from __future__ import annotations

from tvm import tirx

_LOG2E = 1.4426950408889634
# 2^f on [-1/2, 1/2], c0..c5: least squares on Chebyshev nodes reweighted toward minimax relative error
_EXP2_POLY = (1.0000001192092896, 0.6931469440460205, 0.24022120237350464, 0.05550713464617729,
              0.009675541892647743, 0.00132764654699713)
_Y_MAX = 126.0  # 2^n is a normal float for |n| <= 126; 1 + 2^-126 == 1, and above 126 2^y is +inf


def _f32(v: float) -> tirx.PrimExpr:
    return tirx.const(v, "float32")


def _float_var(name: str) -> tirx.Var:
    return tirx.Var(name, "float32")


def fast_exp2(y: tirx.PrimExpr) -> tirx.PrimExpr:
    """2^y for float32 y: 2^-126 below -126, +inf above 126 (so that 1 / (1 + 2^y) and x / (1 + 2^y)
    reach 0 where float32's exp overflows, even for x near float32's limit).

    The clamped y, n and f are bound once with Let: the polynomial uses each several times, and as a plain
    expression tree every use was a copy of the whole operand (a conv epilogue's gather, bias and residual
    loads included), which LLVM did not merge back (a hyb epilogue ran 5x slower)."""
    y0, yc, n, f = _float_var("y0"), _float_var("y"), _float_var("n"), _float_var("f")
    p = _f32(_EXP2_POLY[-1])
    for c in _EXP2_POLY[-2::-1]:
        p = p * f + _f32(c)
    # 2^n * p by adding n to p's exponent bits (p in [0.70, 1.42]: no carry out of the exponent for |n| <= 126)
    value = tirx.reinterpret("float32", tirx.reinterpret("int32", p) + (n.astype("int32") << 23))
    value = tirx.Let(f, yc - n, value)
    value = tirx.Let(n, tirx.round(yc), value)
    value = tirx.Let(yc, tirx.max(tirx.min(y0, _f32(_Y_MAX)), _f32(-_Y_MAX)), value)
    return tirx.Let(y0, y, tirx.Select(y0 > _f32(_Y_MAX), _f32(float("inf")), value))


def _one_plus_exp_neg(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """1 + exp(-x), the denominator sigmoid and SiLU share."""
    return _f32(1.0) + fast_exp2(x * _f32(-_LOG2E))


def fast_sigmoid(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """1 / (1 + exp(-x)) on fast_exp2."""
    return _f32(1.0) / _one_plus_exp_neg(x)


def fast_silu(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """SiLU (swish): x * sigmoid(x) as x / (1 + exp(-x)), x computed once."""
    v = _float_var("v")
    return tirx.Let(v, x, v / _one_plus_exp_neg(v))
