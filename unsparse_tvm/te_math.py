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


def _let(name: str, value: tirx.PrimExpr, body) -> tirx.PrimExpr:
    """body(v) with v bound once to value: the polynomial uses x and n a dozen times each, and as a plain
    expression tree every use would be a copy of the whole operand (a conv epilogue's gather, bias and
    residual loads included), which LLVM did not merge back (a hyb epilogue ran 5x slower)."""
    var = tirx.Var(name, "float32")
    return tirx.Let(var, value, body(var))


def fast_exp(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """exp(x) for float32 x, saturating at +/-88.38 (where float32 exp over/underflows)."""
    def from_clamped(x):
        def from_n(n):
            def from_r(r):
                p = _f32(_POLY[0])
                for c in _POLY[1:]:
                    p = p * r + _f32(c)
                return (p * r * r + r + _f32(1.0)) * tirx.reinterpret("float32", (n.astype("int32") + 127) << 23)
            return _let("r", x - n * _f32(_LN2_HI) - n * _f32(_LN2_LO), from_r)
        return _let("n", tirx.floor(x * _f32(_LOG2E) + _f32(0.5)), from_n)
    return _let("x", tirx.max(tirx.min(x, _f32(88.3762626647950)), _f32(-88.3762626647949)), from_clamped)


def fast_sigmoid(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """1 / (1 + exp(-x)) on fast_exp."""
    return _f32(1.0) / (_f32(1.0) + fast_exp(-x))


def fast_silu(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """SiLU (swish): x * sigmoid(x), x computed once."""
    return _let("v", x, lambda v: v * fast_sigmoid(v))
