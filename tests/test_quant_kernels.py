"""Weight-only quantised sparse kernels (qformats.py, te_quant_ops.py) on llvm against PyTorch on the
dequantised weights: int8 / 4-bit table codes (int4, kmeans4, pow2), 16-bit (flat and channel/tap) and
32-bit offsets, ell / hyb / grouped rows, per-row factors as batch-norm folding leaves them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err, sparse_weight, torch_conv
from unsparse_tvm.bench import LayerSpec, layer_module
from unsparse_tvm.compress.quantize import codebook_quantize, fit_codebook, linear_quantize, pow2_quantize
from unsparse_tvm.formats import conv_weight_rows
from unsparse_tvm.qformats import QuantGeometry, encode, fp32_nbytes
from unsparse_tvm.relay_passes.layers import LayerNames


def quantised(weight: np.ndarray, scheme: str, rng, fold: bool = True) -> tuple[np.ndarray, dict]:
    """(dequantised weight, unsparse_quant.json layer entry), rows then scaled by random signed factors
    as FoldBatchNormIntoConv would (the entry stays the one `quantize` wrote)."""
    w = torch.from_numpy(weight)
    if scheme in ("int8", "int4"):
        bits = int(scheme[3:])
        wq, scale = linear_quantize(w, bits)
        entry = {"kind": "linear", "bits": bits, "axis": 0, "scales": scale.tolist()}
    elif scheme == "kmeans4":
        book = fit_codebook(w, 4)
        wq, entry = codebook_quantize(w, book), {"kind": "kmeans", "bits": 4, "codebook": book.tolist()}
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
    rng = np.random.default_rng(abs(hash((case, fmt, scheme))) % 2**32)
    base = sparse_weight((k, c, r, s), sp, rng, empty_rows=k // 8, dense_rows=1)
    weight, entry = quantised(base, scheme, rng)
    bias = rng.standard_normal(k).astype(np.float32)
    relu = bool(rng.integers(2))
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    y, report = run_quant(conv_spec(x.shape, weight, bias, relu, stride, pad), llvm, entry, fmt, x)
    assert report[0].decision == "sparse" and report[0].precision != "fp32", report[0]
    assert report[0].precision.startswith("int8" if scheme == "int8" else ("4-bit", "8-bit idx"))
    assert rel_err(y, torch_conv(x, weight, bias, stride, pad, (1, 1), relu=relu)) < 1e-5
