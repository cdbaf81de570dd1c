"""The per-layer cost choice: sparse where its predicted time beats the dense kernel's."""

import numpy as np
import pytest

from conftest import sparse_weight
from unsparse_tvm.ops.formats import conv_weight_rows, dense_weight_rows
from unsparse_tvm.ops.geometry import ConvGeometry
from unsparse_tvm.cost.model import conv_cost, linear_cost

GEO = ConvGeometry(1, 64, 16, 16, 64, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1))


@pytest.mark.parametrize("kind", ["llvm", "cuda"])
def test_sparse_wins_at_90_and_loses_at_20(kind):
    rng = np.random.default_rng(0)
    assert conv_cost(GEO, conv_weight_rows(sparse_weight((64, 64, 3, 3), 0.9, rng), GEO), kind).sparse_wins
    assert not conv_cost(GEO, conv_weight_rows(sparse_weight((64, 64, 3, 3), 0.2, rng), GEO), kind).sparse_wins


def test_grouped_rows_are_predicted_cheaper_than_the_same_entries_ungrouped():
    w = sparse_weight((64, 64, 3, 3), 0.8, np.random.default_rng(1))
    ell, grouped = conv_weight_rows(w, GEO, "ell"), conv_weight_rows(w, GEO, "vell4")
    per_entry = [conv_cost(GEO, r, "llvm").sparse_us / r.padded_size for r in (ell, grouped)]
    assert per_entry[1] < per_entry[0]


def test_sparse_linear_wins_at_90():
    w = sparse_weight((512, 512), 0.9, np.random.default_rng(2))
    assert linear_cost(1, w.shape, dense_weight_rows(w), "llvm").sparse_wins


def test_a_memory_bound_first_layer_stays_dense_and_a_stem_goes_sparse():
    """vgg16's 3->64 at 224x224 writes three 13 MB passes whatever the kernel (measured: dense 3.07 ms,
    sparse 2.95-4.1): the DRAM floor makes it a tie, which goes to dense. resnet's 7x7/2 stem (3.3 MB
    passes, under the cache bound) keeps its FMA-count win."""
    rng = np.random.default_rng(3)
    vgg = ConvGeometry(1, 3, 224, 224, 64, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1))
    for fmt in ("ell", "hyb"):
        cost = conv_cost(vgg, conv_weight_rows(sparse_weight((64, 3, 3, 3), 0.9, rng), vgg, fmt), "llvm")
        assert not cost.sparse_wins and cost.dense_us > 3000
    stem = ConvGeometry(1, 3, 224, 224, 64, 7, 7, (2, 2), (3, 3, 3, 3), (1, 1))
    assert conv_cost(stem, conv_weight_rows(sparse_weight((64, 3, 7, 7), 0.9, rng), stem), "llvm").sparse_wins


def test_weights_streamed_once_are_the_floor_on_small_maps():
    """vgg16-cifar's 512x512 3x3 on a 2x2 map: each weight meets 8 outputs, so the 9.4 MB of weights, not the
    FMAs, set the time (measured 470-500 us on one thread against 280 us from the FMA rate); the floor scales
    with what each kernel stores (values and offsets), and leaves a 16x16 map (compute-bound) alone."""
    from unsparse_tvm.cost.model import BUILTIN
    from unsparse_tvm.ops.quant_formats import fp32_nbytes

    rng = np.random.default_rng(4)
    small = ConvGeometry(1, 512, 2, 2, 512, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1))
    rows = conv_weight_rows(sparse_weight((512, 512, 3, 3), 0.85, rng), small, "ell")
    cost = conv_cost(small, rows, "llvm")
    assert cost.dense_us == pytest.approx(4 * 512 * 512 * 9 / BUILTIN.dram_bytes_s * 1e6)
    assert cost.sparse_us == pytest.approx(fp32_nbytes(rows) / BUILTIN.dram_bytes_s * 1e6)
    w16 = sparse_weight((64, 64, 3, 3), 0.9, rng)
    c16 = conv_cost(GEO, conv_weight_rows(w16, GEO, "ell"), "llvm")
    assert c16.dense_us > 2 * 4 * 64 * 64 * 9 / BUILTIN.dram_bytes_s * 1e6  # far above its floor


def test_a_flat_pointwise_layer_on_a_large_map_takes_ell_over_hyb():
    """hyb's unfused epilogue writes its sums and reads them back: on 56x56 a 256x64 1x1 has 3.2 MB of them,
    past L2 (measured one thread: hyb 678 us, ell 391), so ell is packed there though its padding is larger;
    the same rows on an 8x8 map (64 KB of output, in cache) stay hyb."""
    from unsparse_tvm.relay_passes.sparsify_conv2d import pack_conv_rows
    from unsparse_tvm.cost.model import CostModel, unfused_epilogue_us

    rng = np.random.default_rng(5)
    w = rng.standard_normal((256, 64, 1, 1)).astype(np.float32)
    w[rng.random(w.shape) < 0.9] = 0  # unstructured 90%: rows of 6 +- 2.4 nonzeros, the longest ~15
    cost = CostModel("llvm")
    for size, fmt in ((56, "ell"), (8, "hyb")):
        geo = ConvGeometry(1, 64, size, size, 256, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1))
        assert geo.flat_output and conv_weight_rows(w, geo, None).fmt == "hyb"  # by padding alone
        assert pack_conv_rows(w, geo, None, cost).fmt == fmt
        assert (unfused_epilogue_us(geo) > 0) == (size == 56)


# rates of the kind `calibrate` measured on the 2-vCPU Xeon (format 3, both threads): the dense direct conv
# runs 3x3s at ~2.6x ell's rate per stored FMA
XEON = dict(dense_conv=107e9, dense_pointwise=52e9, ell=41e9, hyb=39e9, vell=67e9, output=9.5e9, dram_bytes_s=25e9)


def _vgg_layer(size: int, sparsity: float, lanes: int = 16):
    """vgg16-cifar's 512x512 (64x64 at 32x32) 3x3 at `sparsity`, costed as the pass costs it."""
    from unsparse_tvm.cost.model import BUILTIN, CostModel
    from unsparse_tvm.relay_passes.sparsify_conv2d import kernel_geometry, pack_conv_rows
    import dataclasses

    ch = 64 if size == 32 else 512
    geo = ConvGeometry(1, ch, size, size, ch, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1))
    cost = CostModel("llvm", dataclasses.replace(BUILTIN, **XEON), lanes)
    ours = kernel_geometry(geo, cost)
    w = sparse_weight((ch, ch, 3, 3), sparsity, np.random.default_rng(size))
    return cost.conv(ours, pack_conv_rows(w, ours, None, cost), dense_geo=geo), ours


def test_a_weight_on_a_map_smaller_than_a_vector_costs_a_whole_vector():
    """A 2x2 map's 4 positions (its input as patches) run one 4-lane FMA per stored weight under AVX-512, no
    cheaper than a 16-lane one: at 50% the sparse 512x512 3x3 there measured 0.385 ms against the dense kernel's
    0.286 (two threads, Xeon; then 8 lanes over the padded plane), where counting its positions predicted it the
    faster. At 90% it still goes sparse."""
    half, ours = _vgg_layer(2, 0.5)
    assert ours.patches and ours.q_extent == 4 and not half.sparse_wins
    assert _vgg_layer(2, 0.9)[0].sparse_wins
    # on an 8-lane target a weight's FMA is a vector of 8 lanes: priced at half AVX-512's
    assert _vgg_layer(2, 0.5, lanes=8)[0].sparse_us < half.sparse_us


def test_each_kernel_is_priced_at_its_own_domain():
    """The sparse kernel reads a 4x4 map's patches (16 positions per weight), the dense one the padded plane
    (4 rows of 6: 24): at 50% on the Xeon sparse ran 0.42 against 0.61 ms (two threads), and is chosen; on
    32x32 the sparse kernel's rows (1024 positions) against the dense plane's 32 x 34 tie at 50% (0.343
    against 0.339 ms two threads, 0.63 against 0.56 one), dense is chosen, and sparse wins at 70% (0.24
    against 0.34)."""
    four, ours = _vgg_layer(4, 0.5)
    assert ours.patches and four.sparse_wins
    assert not _vgg_layer(32, 0.5)[0].sparse_wins
    assert _vgg_layer(32, 0.7)[0].sparse_wins
