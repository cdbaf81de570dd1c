"""The per-layer cost choice: sparse where its predicted time beats the dense kernel's."""

import numpy as np
import pytest

from conftest import sparse_weight
from unsparse_tvm.ops.formats import ConvGeometry, conv_weight_rows, dense_weight_rows
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
