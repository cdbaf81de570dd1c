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
