"""Sparse rows stored by register tiles (formats.interleave_rows, relay_passes/sparsify_conv2d.INTERLEAVE):
the same outputs bit for bit as rows stored one after another, the loops still ending at each tile's
longest row, and the layout the pass gives the kernel."""

import re

import numpy as np
import pytest

from conftest import cpu_target, rel_err, run_layer, sparse_weight, torch_conv
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
    from unsparse_tvm.schedules._common import cpu_vector_lanes
    from unsparse_tvm.single_layer import layer_module

    rng = np.random.default_rng(size)
    weight = sparse_weight((48, 16, 3, 3), 0.9, rng, empty_rows=5, dense_rows=2)
    x = rng.standard_normal((2, 16, size, size)).astype(np.float32)
    spec = LayerSpec("conv2d", x.shape, weight, None, True,
                     {"strides": [1, 1], "padding": [1] * 4, "dilation": [1, 1], "groups": 1})
    def sparsified(target):
        pipeline = build_pipeline(target, threshold=0.5, fmt=fmt, stop_after="sparsify")
        return pipeline(layer_module(spec))["sparse_conv2d"]

    # AVX-512 (compiled only, on any host): every map size interleaves its rows
    assert int(sparsified(cpu_target("znver4")).attrs["unsparse.interleave"]) > 1
    func = sparsified(llvm)
    tile = int(func.attrs.get("unsparse.interleave", 1))
    if tile == 1:  # AVX2's 8 accumulators: a wide map's row fills them with its own vectors (32x32, 8x8, 7x7)
        assert cpu_vector_lanes(llvm)[0] == 8 and size > 4, size
    else:  # the rows' constants as the pass stores them: data [K/T, L, T], off [K/T, L + 1, T]
        shapes = re.findall(r"T\.Buffer\(\(T\.int64\((\d+)\), T\.int64\((\d+)\), T\.int64\((\d+)\)\)",
                            func.script())
        assert sum(1 for s in shapes if (int(s[0]), int(s[2])) == (48 // tile, tile)) >= 2, shapes
    y, report = run_layer(spec, llvm, threshold=0.5, fmt=fmt, x=x)
    monkeypatch.setattr(sparsify_conv2d, "INTERLEAVE", False)
    y_in_order, _ = run_layer(spec, llvm, threshold=0.5, fmt=fmt, x=x)
    assert report[0].format == fmt
    assert np.array_equal(y, y_in_order)
    assert rel_err(y, torch_conv(x, weight, None, (1, 1), (1, 1, 1, 1), (1, 1), relu=True)) < 1e-5


def _int8_chain_both_ways(size: int, llvm, monkeypatch, switch: str) -> None:
    """A compiled int8 chain 8 -> 32 -> 48 on a size x size map (batch 2, 85% sparse, three empty rows), with
    the pass's `switch` on and off: the same bits, and within quantisation error of PyTorch."""
    monkeypatch.setattr("unsparse_tvm.relay_passes.quantize_int8.GATHERED", False)  # the quads' rows, on any host
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
    for on in (True, False):
        monkeypatch.setattr(switch, on)
        compiled = compile_program(export_program(model, shape), llvm, threshold=0.5, activations=ranges)
        assert [r.format for r in compiled.report] == ["int8q4", "int8q4"]
        vm = relax.VirtualMachine(compiled.executable, tvm.cpu())
        outs.append(vm["main"](tvm.runtime.tensor(x.numpy()))[0].numpy())
    assert np.array_equal(outs[0], outs[1])
    ref = model(x).detach().numpy()
    assert np.abs(outs[0] - ref).max() <= 0.05 * np.abs(ref).max()  # int8 against fp32: quantisation error only


@pytest.mark.parametrize("size", [16, 8, 4])
def test_int8_quad_rows_interleaved_compute_the_same_bits(size, llvm, monkeypatch):
    """int8 quad rows stored by row tiles: a compiled int8 model (convs on a 16x16, 8x8 or 4x4 map, the last
    as patches) gives the same bits as with its rows stored in order, and the trimmed loops still end at each
    tile's longest row (rows of very different lengths: some empty). The 16x16 case once crashed: the loop
    trimming took the accumulators' local buffer for the offsets where its second extent matched L + 1."""
    _int8_chain_both_ways(size, llvm, monkeypatch, "unsparse_tvm.relay_passes.quantize_int8.INTERLEAVE")


@pytest.mark.parametrize("size", [4, 2])
def test_int8_quad_rows_sorted_by_length_compute_the_same_bits(size, llvm, monkeypatch):
    """int8 quad rows on small maps stored sorted by their stored quads (the epilogue reading output channel k
    from stored row row_of[k], comp and scales by k): the same bits as rows in order; the sort did happen."""
    from unsparse_tvm.relay_passes import sparsify_conv2d

    sorted_layers = []
    real = sparsify_conv2d.length_order
    monkeypatch.setattr(sparsify_conv2d, "length_order", lambda *a, **k: sorted_layers.append(real(*a, **k))
                        or sorted_layers[-1])
    _int8_chain_both_ways(size, llvm, monkeypatch, "unsparse_tvm.relay_passes.sparsify_conv2d.ROW_ORDER")
    assert any(order is not None for order in sorted_layers)


def test_length_order_sorts_where_tiles_run_fewer_entries():
    from unsparse_tvm.ops.formats import inverse_order, length_order

    lengths = np.array([9, 1, 8, 2, 7, 3, 6, 4])                       # tiles of 2 run 9+8+7+6 = 30 of 40
    order = length_order(lengths, 2, parts=1)
    assert list(lengths[order]) == [1, 2, 3, 4, 6, 7, 8, 9]            # sorted tiles run 2+4+7+9 = 22 of 40
    row_of = inverse_order(order)
    assert row_of.dtype == np.int32 and all(order[row_of[k]] == k for k in range(8))
    assert length_order(np.array([5, 5, 4, 4, 3, 3]), 2) is None       # already grouped: nothing to save
    assert length_order(np.array([50, 49, 50, 49]), 2, min_saving=0.02) is None  # 1% saved: under the bar


def test_length_order_keeps_each_part_of_the_rows_its_own():
    """By default the rows are sorted within each half (formats.ROW_ORDER_PARTS), so that the thread computing
    the first half of the stored rows computes the first half of the output channels; rows that do not split
    into whole tiles per part are sorted whole. Fails if the sort crosses the halves."""
    from unsparse_tvm.ops.formats import ROW_ORDER_PARTS, length_order

    assert ROW_ORDER_PARTS == 2
    lengths = np.array([9, 1, 8, 2, 7, 3, 6, 4])
    order = length_order(lengths, 2)
    assert sorted(order[:4]) == [0, 1, 2, 3] and sorted(order[4:]) == [4, 5, 6, 7]
    assert list(lengths[order]) == [1, 2, 8, 9, 3, 4, 6, 7]            # tiles run 2+9+4+7 = 22 of 40, as sorted whole
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 60, 96)
    order = length_order(lengths, 4, min_saving=0.0)
    half = len(lengths) // 2
    assert sorted(order[:half]) == list(range(half))
    assert all(np.diff(lengths[order[:half]]) >= 0) and all(np.diff(lengths[order[half:]]) >= 0)
    odd = np.array([5, 1, 4, 2, 3, 9])                                 # 6 rows: no halves of whole tiles of 2
    assert list(odd[length_order(odd, 2, min_saving=0.0)]) == [1, 2, 3, 4, 5, 9]


@pytest.mark.parametrize("size,batch,fmt", [(4, 1, "ell"), (2, 8, "ell"), (4, 3, "ell"), (32, 1, "ell"),
                                            (4, 1, "hyb"), (2, 2, "hyb")])
def test_rows_sorted_by_length_compute_the_same_bits(size, batch, fmt, llvm, monkeypatch):
    """ell rows (hyb: its main rows; the overflow rows stay in channel order) on small maps (4x4, 2x2; at
    batch 8 several images a patch) stored sorted by length, the epilogue reading each output channel from its
    stored row: the same bits as rows in order, the bias in output-channel order; a 32x32 map keeps its order
    (its fused epilogue is worth more)."""
    from unsparse_tvm.relay_passes import build_pipeline, sparsify_conv2d
    from unsparse_tvm.single_layer import layer_module

    rng = np.random.default_rng(size * 10 + batch)
    weight = sparse_weight((64, 16, 3, 3), 0.85, rng, empty_rows=6, dense_rows=3)
    bias = rng.standard_normal(64).astype(np.float32)
    x = rng.standard_normal((batch, 16, size, size)).astype(np.float32)
    spec = LayerSpec("conv2d", x.shape, weight, bias, True,
                     {"strides": [1, 1], "padding": [1] * 4, "dilation": [1, 1], "groups": 1})
    func = build_pipeline(llvm, threshold=0.5, fmt=fmt, stop_after="sparsify")(layer_module(spec))["sparse_conv2d"]
    assert ("unsparse.row_order" in func.attrs) == (size <= 4)
    assert func.attrs["unsparse.fmt"] == fmt
    y, _ = run_layer(spec, llvm, threshold=0.5, fmt=fmt, x=x)
    monkeypatch.setattr(sparsify_conv2d, "ROW_ORDER", False)
    y_in_order, _ = run_layer(spec, llvm, threshold=0.5, fmt=fmt, x=x)
    assert np.array_equal(y, y_in_order)
    assert rel_err(y, torch_conv(x, weight, bias, (1, 1), (1, 1, 1, 1), (1, 1), relu=True)) < 1e-5


def test_default_register_tile_takes_at_most_eight_rows():
    """The default k_inner (the rows a register tile interleaves, and the pass's storage tile) fills half the
    vector registers with accumulators, but with no more than MAX_DEFAULT_ROWS rows: AVX-512 rows of one
    vector (4x4 patches, 2x2 maps) took 16 and ran each tile to its longest of 16 rows."""
    from unsparse_tvm.schedules.sparse_conv2d_cpu import MAX_DEFAULT_ROWS, interleave_tile

    assert MAX_DEFAULT_ROWS == 8
    assert interleave_tile(512, 16, 16) == 8  # AVX-512, one vector per row: capped (16 accumulators)
    assert interleave_tile(512, 8, 8) == 8    # AVX2, one vector: 8 accumulators
    assert interleave_tile(512, 64, 16) == 4  # four vectors per row: 4 rows x 4 vectors
    assert interleave_tile(4, 16, 16) == 4    # no more rows than the layer has
    from unsparse_tvm.schedules.sparse_conv2d_int8_cpu import interleave_tile as int8_tile

    assert int8_tile(512, 8, 16) == 8         # int8, a 2x2 map's one vector of 8 words: capped (was 16)
    assert int8_tile(512, 64, 16) == 4        # four vectors a row: 16 accumulators in 4 rows
