"""The per-layer cost choice: sparse where its predicted time beats the dense kernel's."""

import numpy as np
import pytest

from conftest import sparse_weight
from unsparse_tvm.formats import ConvGeometry, conv_weight_rows, dense_weight_rows
from unsparse_tvm.layer_cost import conv_cost, linear_cost

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
