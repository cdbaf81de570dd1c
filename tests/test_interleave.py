"""Sparse rows stored by register tiles (formats.interleave_rows, relay_passes/sparsify_conv2d.INTERLEAVE):
the same outputs bit for bit as rows stored one after another, the loops still ending at each tile's
longest row, and the layout the pass gives the kernel."""

import re

import numpy as np
import pytest

from conftest import rel_err, run_layer, sparse_weight, torch_conv
from unsparse_tvm.ops.formats import interleave_rows
from unsparse_tvm.single_layer import LayerSpec


def test_interleave_rows_puts_a_tiles_entries_side_by_side():
    a = np.arange(6 * 5).reshape(6, 5)
    t = interleave_rows(a, 2)                                          # [3, 5, 2]
    assert t.shape == (3, 5, 2) and t.flags.c_contiguous
    assert all(t[k // 2, j, k % 2] == a[k, j] for k in range(6) for j in range(5))


@pytest.mark.parametrize("size,fmt", [(32, "ell"), (8, "hyb"), (4, "ell"), (2, "hyb"), (7, "ell")])
def test_interleaved_rows_compute_what_rows_in_order_compute(size, fmt, llvm, monkeypatch):
    """Row tiles of 2 to 16 rows (the tile follows the map: 32x32 interleaves 2 rows, 2x2 16): each output
    equal to the one from rows stored in order, and to PyTorch; empty and dense rows included."""
    from unsparse_tvm.relay_passes import build_pipeline, sparsify_conv2d
    from unsparse_tvm.single_layer import layer_module

    rng = np.random.default_rng(size)
    weight = sparse_weight((48, 16, 3, 3), 0.9, rng, empty_rows=5, dense_rows=2)
    x = rng.standard_normal((2, 16, size, size)).astype(np.float32)
    spec = LayerSpec("conv2d", x.shape, weight, None, True,
                     {"strides": [1, 1], "padding": [1] * 4, "dilation": [1, 1], "groups": 1})
    func = build_pipeline(llvm, threshold=0.5, fmt=fmt, stop_after="sparsify")(layer_module(spec))["sparse_conv2d"]
    tile = int(func.attrs["unsparse.interleave"])
    # the rows' constants as the pass stores them: data [K/T, L, T], off [K/T, L + 1, T]
    shapes = re.findall(r"T\.Buffer\(\(T\.int64\((\d+)\), T\.int64\((\d+)\), T\.int64\((\d+)\)\)", func.script())
    assert tile > 1 and sum(1 for s in shapes if (int(s[0]), int(s[2])) == (48 // tile, tile)) >= 2, shapes
    y, report = run_layer(spec, llvm, threshold=0.5, fmt=fmt, x=x)
    monkeypatch.setattr(sparsify_conv2d, "INTERLEAVE", False)
    y_in_order, _ = run_layer(spec, llvm, threshold=0.5, fmt=fmt, x=x)
    assert report[0].format == fmt
    assert np.array_equal(y, y_in_order)
    assert rel_err(y, torch_conv(x, weight, None, (1, 1), (1, 1, 1, 1), (1, 1), relu=True)) < 1e-5


@pytest.mark.parametrize("size", [16, 8, 4])
def test_int8_quad_rows_interleaved_compute_the_same_bits(size, llvm, monkeypatch):
    """int8 quad rows stored by row tiles: a compiled int8 model (convs on a 16x16, 8x8 or 4x4 map, the last
    as patches) gives the same bits as with its rows stored in order, and the trimmed loops still end at each
    tile's longest row (rows of very different lengths: some empty). The 16x16 case once crashed: the loop
    trimming took the accumulators' local buffer for the offsets where its second extent matched L + 1."""
    import torch
    import tvm
    from torch import nn
    from tvm import relax

    from unsparse_tvm.build import compile_program
    from unsparse_tvm.compress.calibrate import calibrate, calibration_batches
    from unsparse_tvm.models import export_program

    torch.manual_seed(size)
    model = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 48, 3, padding=1), nn.ReLU()).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight[torch.rand_like(m.weight) < 0.85] = 0
                m.weight[:3] = 0                                      # empty rows
    shape = (2, 8, size, size)
    ranges = calibrate(model, calibration_batches(shape, None, 2, 16))["layers"]
    x = torch.randn(*shape)
    outs = []
    for interleave in (True, False):
        monkeypatch.setattr("unsparse_tvm.relay_passes.quantize_int8.INTERLEAVE", interleave)
        compiled = compile_program(export_program(model, shape), llvm, threshold=0.5, activations=ranges)
        assert [r.format for r in compiled.report] == ["int8q4", "int8q4"]
        vm = relax.VirtualMachine(compiled.executable, tvm.cpu())
        outs.append(vm["main"](tvm.runtime.tensor(x.numpy()))[0].numpy())
    assert np.array_equal(outs[0], outs[1])
    ref = model(x).detach().numpy()
    assert np.abs(outs[0] - ref).max() <= 0.05 * np.abs(ref).max()  # int8 against fp32: quantisation error only
