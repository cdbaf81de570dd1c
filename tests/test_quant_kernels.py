"""Weight-only quantised sparse kernels (ops/quant_formats.py, ops/sparse_quant.py) on llvm against PyTorch
on the dequantised weights: int8 / 4-bit table codes (int4, kmeans4, pow2), 16-bit (flat and channel/tap)
and 32-bit offsets, ell / hyb / grouped rows, per-row factors as batch-norm folding leaves them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import case_rng, rel_err, sparse_weight, torch_conv
from unsparse_tvm.compress.quantize import codebook_quantize, fit_codebook, linear_quantize, pow2_quantize
from unsparse_tvm.ops.formats import conv_weight_rows
from unsparse_tvm.ops.quant_formats import QuantGeometry, encode, fp32_nbytes
from unsparse_tvm.relay_passes.layers import LayerNames
from unsparse_tvm.single_layer import LayerSpec, layer_module
from unsparse_tvm.testing.isa import skip_unless_runs_here


def quantised(weight: np.ndarray, scheme: str, rng, fold: bool = True) -> tuple[np.ndarray, dict]:
    """(dequantised weight, unsparse_quant.json layer entry), rows then scaled by random signed factors
    as FoldBatchNormIntoConv would (the entry stays the one `quantize` wrote)."""
    w = torch.from_numpy(weight)
    if scheme in ("int8", "int4"):
        bits = int(scheme[3:])
        wq, scale = linear_quantize(w, bits)
        entry = {"kind": "linear", "bits": bits, "axis": 0, "scales": scale.tolist()}
    elif scheme.startswith("kmeans"):
        bits = int(scheme[6:])
        book = fit_codebook(w, bits)
        wq, entry = codebook_quantize(w, book), {"kind": "kmeans", "bits": bits, "codebook": book.tolist()}
    else:
        wq, scale, emin = pow2_quantize(w)
        entry = {"kind": "pow2", "bits": 4, "scale": scale, "min_exponent": emin, "max_exponent": 0}
    out = wq.numpy().astype(np.float32)
    if fold:
        factor = (rng.uniform(0.5, 2.0, out.shape[0]) * rng.choice([-1, 1], out.shape[0])).astype(np.float32)
        out = (out * factor.reshape(-1, *[1] * (out.ndim - 1))).astype(np.float32)
    return out, entry


def run_quant(spec: LayerSpec, target, entry: dict, fmt: str | None, x: np.ndarray):
    import tvm
    from tvm import relax

    from unsparse_tvm.relay_passes import build_pipeline

    report: list = []
    names = LayerNames({"layer.weight": spec.weight})
    quant = {"layers": {"layer.weight": entry}} if entry is not None else None
    pipeline = build_pipeline(target, threshold=0.3, fmt=fmt, report=report, names=names, quant=quant)
    ex = tvm.compile(layer_module(spec), target=target, relax_pipeline=pipeline)
    skip_unless_runs_here(target)
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x))
    return out.numpy(), report


def conv_spec(x_shape, weight, bias, relu, stride, pad):
    return LayerSpec("conv2d", x_shape, weight, bias, relu,
                     {"strides": list(stride), "padding": list(pad), "dilation": [1, 1], "groups": 1})


# (N, C, H, W, K, R, S, stride, padding, sparsity)
CASES = [
    (2, 8, 9, 7, 16, 3, 3, (1, 1), (1, 1, 1, 1), 0.8),       # batch 2, odd sizes
    (1, 16, 11, 11, 16, 3, 3, (2, 2), (1, 1, 1, 1), 0.9),    # stride 2
    (3, 16, 5, 5, 24, 1, 1, (2, 2), (0, 0, 0, 0), 0.9),      # 1x1 stride 2, batch 3
    (1, 32, 2, 2, 16, 3, 3, (1, 1), (1, 1, 1, 1), 0.95),     # tiny map (VGG's last block)
]


@pytest.mark.parametrize("scheme", ["int8", "int4", "kmeans4", "pow2"])
@pytest.mark.parametrize("fmt", [None, "ell", "hyb", "vell4"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:7])))
def test_quant_conv_matches_dequantised_torch(case, fmt, scheme, llvm):
    n, c, h, w, k, r, s, stride, pad, sp = case
    rng = case_rng(case, fmt, scheme)
    base = sparse_weight((k, c, r, s), sp, rng, empty_rows=k // 8, dense_rows=1)
    weight, entry = quantised(base, scheme, rng)
    bias = rng.standard_normal(k).astype(np.float32)
    relu = bool(rng.integers(2))
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    y, report = run_quant(conv_spec(x.shape, weight, bias, relu, stride, pad), llvm, entry, fmt, x)
    assert report[0].decision == "sparse" and report[0].precision != "fp32", report[0]
    assert report[0].precision.startswith("int8" if scheme == "int8" else ("4-bit", "8-bit idx"))
    assert rel_err(y, torch_conv(x, weight, bias, stride, pad, (1, 1), relu=relu)) < 1e-5


@pytest.mark.parametrize("scheme", ["int8", "kmeans4"])
@pytest.mark.parametrize("shape, pad, mode", [
    ((1, 64, 32, 32, 8, 3, 3), (1, 1, 1, 1), "ct16"),    # 64 x 34 x 34 > 65535: (c << 4 | tap)
    ((1, 48, 32, 32, 8, 7, 7), (3, 3, 3, 3), "ct16"),    # 49 taps: 6 tap bits, 10 channel bits
    ((1, 1040, 8, 8, 8, 7, 7), (3, 3, 3, 3), "int32"),   # 1040 channels do not fit 10 bits
    ((1, 16, 12, 12, 8, 3, 3), (1, 1, 1, 1), "flat16"),
])
def test_offset_codings(shape, pad, mode, scheme, llvm):
    n, c, h, w, k, r, s = shape
    rng = np.random.default_rng(7)
    weight, entry = quantised(sparse_weight((k, c, r, s), 0.9, rng, empty_rows=1), scheme, rng)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    y, report = run_quant(conv_spec(x.shape, weight, None, False, (1, 1), pad), llvm, entry, "ell", x)
    assert report[0].precision.endswith("32-bit off" if mode == "int32" else "16-bit off")
    geo = QuantGeometry(n, c, h, w, k, r, s, (1, 1), pad, (1, 1))
    q = encode(conv_weight_rows(weight, geo, "ell"), weight.reshape(k, -1), entry, geo=geo)
    assert q.off_mode == mode
    assert rel_err(y, torch_conv(x, weight, None, (1, 1), pad, (1, 1))) < 1e-5


def test_full_codebook_with_group_fill_in_uses_byte_codes(llvm):
    """kmeans4's 16 nonzero levels leave no code for the explicit zeros of grouped rows: byte codes
    into the table plus a zero ("t8"); without fill-in the same layer keeps 4-bit codes."""
    rng = np.random.default_rng(3)
    weight, entry = quantised(sparse_weight((16, 16, 3, 3), 0.7, rng), "kmeans4", rng)
    assert len(entry["codebook"]) == 16
    x = rng.standard_normal((2, 16, 8, 8)).astype(np.float32)
    y, report = run_quant(conv_spec(x.shape, weight, None, True, (1, 1), (1, 1, 1, 1)), llvm, entry, "vell4", x)
    assert report[0].precision.startswith("8-bit idx")
    assert rel_err(y, torch_conv(x, weight, None, (1, 1), (1, 1, 1, 1), (1, 1), relu=True)) < 1e-5
    # vector-4 pattern: the 4 rows of a group share their columns, no explicit zeros -> 4-bit
    weight = np.repeat(weight[::4] != 0, 4, axis=0) * np.abs(rng.standard_normal(weight.shape)).astype(np.float32) + 0
    weight, entry = quantised(weight.astype(np.float32), "kmeans4", rng, fold=False)
    y, report = run_quant(conv_spec(x.shape, weight, None, False, (1, 1), (1, 1, 1, 1)), llvm, entry, "vell4", x)
    assert report[0].precision.startswith("4-bit")
    assert rel_err(y, torch_conv(x, weight, None, (1, 1), (1, 1, 1, 1), (1, 1))) < 1e-5


def test_weights_off_the_scheme_stay_fp32(llvm):
    """A layer whose weights are not on its scheme's levels (hand-edited, or the wrong entry) keeps fp32."""
    rng = np.random.default_rng(5)
    weight = sparse_weight((8, 8, 3, 3), 0.8, rng)
    _, entry = quantised(weight, "kmeans4", rng)
    x = rng.standard_normal((1, 8, 6, 6)).astype(np.float32)
    y, report = run_quant(conv_spec(x.shape, weight, None, False, (1, 1), (1, 1, 1, 1)), llvm, entry, None, x)
    assert report[0].decision == "sparse" and report[0].precision == "fp32"
    assert rel_err(y, torch_conv(x, weight, None, (1, 1), (1, 1, 1, 1), (1, 1))) < 1e-5


@pytest.mark.parametrize("scheme", ["int8", "int4", "kmeans4", "pow2"])
@pytest.mark.parametrize("fmt", [None, "ell", "hyb", "vell4"])
@pytest.mark.parametrize("batch, inp, out", [(1, 64, 32), (3, 70, 24)])
def test_quant_linear_matches_dequantised_torch(batch, inp, out, fmt, scheme, llvm):
    rng = case_rng(batch, inp, fmt, scheme)
    weight, entry = quantised(sparse_weight((out, inp), 0.85, rng, empty_rows=2, dense_rows=1), scheme, rng)
    bias = rng.standard_normal(out).astype(np.float32)
    x = rng.standard_normal((batch, inp)).astype(np.float32)
    spec = LayerSpec("dense", x.shape, weight, bias, True, {})
    y, report = run_quant(spec, llvm, entry, fmt, x)
    assert report[0].decision == "sparse" and report[0].precision.endswith("16-bit off"), report[0]
    ref = F.relu(F.linear(torch.from_numpy(x), torch.from_numpy(weight), torch.from_numpy(bias))).numpy()
    assert rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("scheme, ratio", [("int8", 3 / 6), ("kmeans4", 2.5 / 6)])
def test_bytes_per_stored_entry(scheme, ratio):
    """int8 codes + 16-bit offsets are 3 of fp32's 6 bytes per stored entry (a 4-byte value and, where
    every offset fits, a 16-bit offset: formats.compact_offsets), 4-bit codes 2.5 (plus one scale per
    row and a 16-entry table)."""
    rng = np.random.default_rng(11)
    weight, entry = quantised(sparse_weight((64, 32, 3, 3), 0.9, rng), scheme, rng)
    geo = QuantGeometry(1, 32, 16, 16, 64, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1))
    rows = conv_weight_rows(weight, geo, "ell")
    q = encode(rows, weight.reshape(64, -1), entry, geo=geo)
    overhead = 64 * 4 + (0 if q.table is None else q.table.nbytes)
    assert q.nbytes - overhead <= ratio * fp32_nbytes(rows) + 64  # + an odd row width's half byte per row


@pytest.mark.parametrize("fmt", ["hyb", "vell4"])
def test_quant_conv_on_an_avx2_target(fmt):
    """An AVX2-only CPU (haswell: 8-lane registers, 16 of them) gets the same numerics."""
    import tvm

    from unsparse_tvm.target import llvm_target_dict

    target = tvm.target.Target(llvm_target_dict("haswell"))
    rng = np.random.default_rng(9)
    weight, entry = quantised(sparse_weight((16, 64, 3, 3), 0.9, rng, empty_rows=2, dense_rows=1), "kmeans4", rng)
    x = rng.standard_normal((2, 64, 32, 32)).astype(np.float32)
    y, report = run_quant(conv_spec(x.shape, weight, None, True, (1, 1), (1, 1, 1, 1)), target, entry, fmt, x)
    assert report[0].precision.startswith(("4-bit", "8-bit idx"))
    assert rel_err(y, torch_conv(x, weight, None, (1, 1), (1, 1, 1, 1), (1, 1), relu=True)) < 1e-5


@pytest.mark.parametrize("fmt", ["hyb", "vell4"])
def test_kmeans6_takes_byte_codes(fmt, llvm):
    """A 64-level codebook (kmeans6): byte codes into the table, grouped rows' zeros included."""
    rng = np.random.default_rng(13)
    weight, entry = quantised(sparse_weight((16, 32, 3, 3), 0.8, rng, empty_rows=1, dense_rows=1), "kmeans6", rng)
    assert len(entry["codebook"]) == 64
    x = rng.standard_normal((2, 32, 9, 9)).astype(np.float32)
    y, report = run_quant(conv_spec(x.shape, weight, None, False, (1, 1), (1, 1, 1, 1)), llvm, entry, fmt, x)
    assert report[0].precision.startswith("8-bit idx")
    assert rel_err(y, torch_conv(x, weight, None, (1, 1), (1, 1, 1, 1), (1, 1))) < 1e-5


@pytest.mark.parametrize("hw, staged", [(32, True), (2, False)])
def test_x86_decode_placement(hw, staged, llvm):
    """A task walking many output tiles (32x32 map) decodes its rows once into a buffer ("conv_wdec" stays
    a stage under the parallel loop); a single-tile task (2x2 map) decodes next to the FMA (inlined)."""
    from unsparse_tvm.relay_passes import build_pipeline

    rng = np.random.default_rng(1)
    weight, entry = quantised(sparse_weight((16, 16, 3, 3), 0.9, rng), "kmeans4", rng)
    mod = layer_module(conv_spec((1, 16, hw, hw), weight, None, False, (1, 1), (1, 1, 1, 1)))
    sched = build_pipeline(llvm, stop_after="schedule", threshold=0.3, fmt="ell", names=LayerNames({"layer.weight": weight}),
                           quant={"layers": {"layer.weight": entry}})(mod)
    text = "\n".join(f.script() for gv, f in sched.functions_items() if gv.name_hint.startswith("sparse_conv2d"))
    assert ('T.sblock("conv_wdec")' in text) == staged and ('T.sblock("conv_odec")' in text) == staged
    if staged:
        assert text.index("T.parallel") < text.index('T.sblock("conv_wdec")')
