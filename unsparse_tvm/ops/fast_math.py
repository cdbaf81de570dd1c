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
_Y_MIN = -126.0  # 2^n is a normal float (or zero's neighbour) for n >= -126; below, 1 + 2^y == 1 anyway
# SiLU's inputs below this read as this: 2^y with y = -X_MIN log2(e) = 125.5 stays finite, and SiLU there is
# -1.4e-36 (true: between that and -0), nothing a conv output can tell apart. Bounding x instead of y spares
# the overflow test (a compare and a select per vector); sigmoid keeps it (fast_sigmoid).
_X_MIN = -87.0
# 2^23 + 128: y + this (y in [-126, 125.5]) lies in [2^23 + 2, 2^23 + 254], where floats are the integers, so
# the sum is rounded, and its low mantissa bits hold round(y) + 128. (1.5 * 2^23, the usual rounder, takes 8
# digits, and TVM's C and CUDA code generators print float constants with 7: 12582910 broke the rounding.)
_ROUNDER = 8388736.0
_BIAS_BITS = 128 << 23  # the + 128 above, out of the exponent field


def _f32(v: float) -> tirx.PrimExpr:
    return tirx.const(v, "float32")


def _float_var(name: str) -> tirx.Var:
    return tirx.Var(name, "float32")


def _one_plus_exp_neg(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """1 + exp(-x) for x >= _X_MIN (the denominator sigmoid and SiLU share): 1 + 2^y, y = -x log2(e),
    2^y = 2^n 2^f with n = round(y), |f| <= 1/2.

    n comes from one add of _ROUNDER, t = y + _ROUNDER, where round + convert took three to four
    instructions: t - _ROUNDER is n, and t's bits shifted into the exponent field are (n + 128) << 23 modulo
    2^32 (its own exponent bits shift out); 2^n p is p's bits plus that, less 128 << 23 (p in [0.70, 1.42]:
    no carry out of the exponent for |n| <= 126).
    y, t and f are bound once with Let: the polynomial uses f several times, and as a plain expression tree
    every use was a copy of the whole operand (a conv epilogue's gather, bias and residual loads included),
    which LLVM did not merge back (a hyb epilogue ran 5x slower)."""
    y, t, f = _float_var("y"), _float_var("t"), _float_var("f")
    p = _f32(_EXP2_POLY[-1])
    for c in _EXP2_POLY[-2::-1]:
        p = p * f + _f32(c)
    # uint32, whose shifts and sums wrap (int32 ones would overflow: undefined in OpenCL C and CUDA)
    bits = tirx.reinterpret("uint32", p) + (tirx.reinterpret("uint32", t) << tirx.const(23, "uint32"))
    exp2 = tirx.reinterpret("float32", bits - tirx.const(_BIAS_BITS, "uint32"))
    exp2 = tirx.Let(f, y - (t - _f32(_ROUNDER)), exp2)
    exp2 = tirx.Let(t, y + _f32(_ROUNDER), exp2)
    return tirx.Let(y, tirx.max(x * _f32(-_LOG2E), _f32(_Y_MIN)), _f32(1.0) + exp2)


def fast_sigmoid(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """1 / (1 + exp(-x)), exactly 0 below _X_MIN: a graph's own x * sigmoid(x) must reach -0 for any x (SE
    gates and such products are small tensors; the conv epilogues' SiLU is fast_silu)."""
    v = _float_var("v")
    return tirx.Let(v, x, tirx.Select(v < _f32(_X_MIN), _f32(0.0),
                                      _f32(1.0) / _one_plus_exp_neg(tirx.max(v, _f32(_X_MIN)))))


def fast_silu(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """SiLU (swish): x * sigmoid(x) as x / (1 + exp(-x)), x (bounded below, _X_MIN) computed once."""
    v = _float_var("v")
    return tirx.Let(v, tirx.max(x, _f32(_X_MIN)), v / _one_plus_exp_neg(v))
