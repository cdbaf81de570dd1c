"""Small maps' flat domains (ops.geometry): a 4x4 map's input stored as patches (with_patches), an 8x8 map's
rows as half vectors under AVX-512 (with_row_domain(narrow=True)). Numerics against PyTorch on the native
and the AVX2 code paths, and which domain the pass picks, read from the scheduled IR."""

import re

import numpy as np
import pytest

from conftest import case_rng, rel_err, residual_block_matches_torch, run_layer, sparse_weight, torch_conv
from unsparse_tvm.ops.geometry import ConvGeometry
from unsparse_tvm.single_layer import LayerSpec

# (N, C, H, W, K, R, S, stride, padding, dilation, sparsity): outputs of 16 positions (patches) or 8-wide rows
CASES = [
    (2, 16, 4, 4, 24, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 0.9),   # vgg16-cifar's 4x4 block, batch 2
    (1, 8, 8, 8, 16, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1), 0.8),    # strided to 4x4: patches of stride-2 taps
    (1, 6, 4, 4, 8, 5, 5, (1, 1), (2, 2, 2, 2), (1, 1), 0.7),     # 5x5 on 4x4: most taps read padding
    (1, 8, 4, 4, 8, 3, 3, (1, 1), (2, 2, 2, 2), (2, 2), 0.9),     # dilation 2
    (1, 5, 3, 7, 8, 2, 3, (1, 1), (0, 1, 1, 0), (1, 1), 0.8),     # a 3x6 output (18 positions): keeps its plane
    (1, 8, 2, 8, 8, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 0.9),     # 2x8: 16 positions in 8-wide rows
    (2, 12, 8, 8, 16, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 0.9),   # 8x8: half-vector rows under AVX-512
    (1, 16, 2, 2, 24, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 0.9),   # 2x2: 4 positions, one 4-lane vector
    (1, 8, 7, 5, 16, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1), 0.8),    # strided to 4x3: 12 positions, 3 vectors of 4
]
# batch > 1 on maps under a vector: the pass stores several images' patches side by side (geometry.images)
FOLDED = [
    (8, 16, 2, 2, 24, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 0.9),   # vgg16-cifar's 2x2 block, batch 8: 32 lanes
    (4, 8, 4, 3, 16, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1), 0.8),    # strided to 2x2, batch 4: 16 lanes
    (2, 6, 2, 2, 8, 3, 3, (1, 1), (2, 2, 2, 2), (2, 2), 0.7),     # dilation 2 on 2x2, batch 2: 8 lanes
    (6, 5, 1, 3, 8, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 0.9),     # a 1x3 map, batch 6: 18 positions, no patches
]


@pytest.fixture(scope="module")
def haswell():
    import tvm

    from unsparse_tvm.target import llvm_target_dict

    return tvm.target.Target(llvm_target_dict("haswell"))


def _domain(case, lanes: int, depthwise: bool = False, fold: bool = False) -> ConvGeometry:
    n, c, h, w, k, r, s, stride, pad, dil, _ = case
    geo = ConvGeometry(n, c, h, w, k, r, s, stride, pad, dil)
    geo = geo.with_overlap(lanes).with_row_domain(lanes, narrow=not depthwise)
    return geo if depthwise else geo.with_patches(lanes, fold_images=fold, whole=4)  # as the fp32 pass does


def _spec(case, weight):
    n, c, h, w, _, _, _, stride, pad, dil, _ = case
    return LayerSpec("conv2d", (n, c, h, w), weight, None, True,
                     {"strides": list(stride), "padding": list(pad), "dilation": list(dil), "groups": 1})


@pytest.mark.parametrize("case", CASES + FOLDED, ids=lambda c: "x".join(map(str, c[:7])) + f"-s{c[7][0]}")
@pytest.mark.parametrize("fmt", [None, "ell", "hyb", "vell4"])
@pytest.mark.parametrize("path", ["native", "avx2"])
def test_small_maps_match_torch(case, fmt, path, llvm, haswell):
    n, c, h, w, k, r, s, stride, pad, dil, sp = case
    rng = case_rng(case, fmt, path)
    weight = sparse_weight((k, c, r, s), sp, rng, empty_rows=k // 8, dense_rows=1)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    y, report = run_layer(_spec(case, weight), llvm if path == "native" else haswell, threshold=0.0, fmt=fmt, x=x)
    assert report[0].decision == "sparse"
    assert rel_err(y, torch_conv(x, weight, None, stride, pad, dil, relu=True)) < 1e-5


@pytest.mark.parametrize("lanes", [16, 8])
def test_which_maps_get_which_domain(lanes):
    """Patches for maps of 4, 12 or 16 positions with several taps (at both widths: the fp32 kernels' vectors
    may be 4 lanes), half-vector rows for 8-wide maps
    only where a row is half a vector; 1x1 convs, 8x8 maps at 16 lanes and depthwise convs never copy
    patches; a depthwise conv keeps whole-vector rows."""
    patches = [_domain(c, lanes).patches for c in CASES]
    assert patches == [True, True, True, True, False, False, False, True, True]
    assert _domain(CASES[7], lanes).q_extent == 4 and _domain(CASES[8], lanes).q_extent == 12
    assert _domain(CASES[6], lanes).row_domain                        # 8 wide: half of 16, or all of 8
    assert _domain(CASES[5], lanes).row_domain and not _domain(CASES[5], lanes).patches
    assert not _domain(CASES[0], lanes, depthwise=True).patches
    assert _domain(CASES[6], lanes, depthwise=True).row_domain == (lanes == 8)
    one = ConvGeometry(1, 16, 4, 4, 16, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1))
    assert not one.with_patches(lanes).patches


def test_patch_offsets_address_the_tap_slices():
    """Every column's offset is its patch number (channel-major, taps in (r, s) order), a patch being 16
    positions: the flat input holds exactly C*R*S patches, so every read of a 16-position vector stays
    inside it, and 512 channels' offsets still fit 16 bits."""
    geo = _domain(CASES[0], 16)
    offs = geo.column_offsets().reshape(16, 9)
    assert (offs == np.arange(16 * 9).reshape(16, 9)).all() and geo.offset_unit == 16
    big = _domain((1, 512, 4, 4, 512, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 0.9), 16)
    assert big.column_offsets().max() < 1 << 16 <= big.column_offsets().max() * big.offset_unit
    assert geo.pad_channels * geo.channel_plane == 16 * 9 * 16 and geo.flat_output and geo.q_extent == 16


def test_the_patch_copy_has_no_bounds_test_and_stores_whole_rows(llvm):
    """The copy is cut from the per-channel padded plane (computed inside the channel loop): the patch
    stage's innermost loop is an OW-lane vector, and the plane alone tests bounds."""
    from unsparse_tvm.relay_passes import build_pipeline
    from unsparse_tvm.single_layer import layer_module

    weight = sparse_weight((32, 16, 3, 3), 0.9, np.random.default_rng(3), dense_rows=1)
    mod = build_pipeline(llvm, threshold=0.5, stop_after="schedule")(layer_module(_spec(CASES[0], weight)))
    func = mod["sparse_conv2d"]
    assert "unsparse.patches" in func.attrs
    text = func.script()
    assert re.search(r'T\.vectorized\([^\n]*\):\s*\n\s*with T\.sblock\("pad_flat"\)', text)
    pad_flat = text[text.index('T.sblock("pad_flat")'):]
    assert "T.if_then_else" not in pad_flat[:pad_flat.index("T.sblock", 10)]


def test_images_side_by_side_where_a_map_is_under_a_vector():
    """Batch > 1: the largest divisor of N whose images' patches fit 32 positions (8 of a 2x2 map, 2 of a
    4x4), only where that fills whole 8-lane vectors; the conv stage's batch axis shrinks by as much, and
    offsets stay patch numbers (one patch: all images' positions for one tap)."""
    geos = [_domain(c, 16, fold=True) for c in FOLDED]
    assert [(g.patches, g.images, g.q_extent, g.batch) for g in geos] == [
        (True, 8, 32, 1), (True, 4, 16, 1), (True, 2, 8, 1), (False, 1, geos[3].q_extent, 6)]
    four = _domain(CASES[0], 16, fold=True)
    assert (four.images, four.q_extent, four.batch, four.pad_shape) == (2, 32, 1, [16, 9 * 2 * 4, 4])
    assert _domain(CASES[0], 16).images == 1  # without fold_images (the int8 kernels' patches)
    two = ConvGeometry(*CASES[7][:10])
    assert not two.with_patches(16).patches and two.with_patches(16, whole=4).patches  # int8's: whole vectors of 8
    assert (geos[0].column_offsets() == np.arange(16 * 9)).all() and geos[0].offset_unit == 32


def test_the_pass_stores_images_side_by_side_and_the_epilogue_joins_the_write_back(llvm, monkeypatch):
    from unsparse_tvm.relay_passes import build_pipeline, sparsify_conv2d
    from unsparse_tvm.single_layer import layer_module

    monkeypatch.setattr(sparsify_conv2d, "ROW_ORDER", False)  # rows sorted by length are read back by an index

    weight = sparse_weight((24, 16, 3, 3), 0.9, np.random.default_rng(5), dense_rows=1)
    mod = build_pipeline(llvm, threshold=0.0, fmt="ell", stop_after="schedule")(layer_module(_spec(FOLDED[0], weight)))
    func = mod["sparse_conv2d"]
    assert int(func.attrs["unsparse.patches"]) == 8
    text = func.script()
    assert 'T.sblock("epilogue")' not in text  # inlined into the accumulators' write-back (flat_epilogue)


def test_a_residual_block_with_images_side_by_side_matches_torch():
    """A whole model through the public API at batch 8 on a 2x2 map: two sparse 3x3 convs with folded
    batch-norm, a residual add and ReLUs (the epilogue's reads of the side-by-side images)."""
    report = residual_block_matches_torch((8, 24, 2, 2), "residual-folded", 0.85)
    assert sum(d["decision"] == "sparse" for d in report) == 2
