"""The sparse formats: packing round-trips, format choice, padding accounting, geometry bounds."""

import numpy as np
import pytest

from unsparse_tvm.formats import ConvGeometry, choose_format, conv_weight_rows, dense_weight_rows, to_sparse_rows


def unpack(rows, ncols, col_of_offset):
    """Dense matrix back from ell/hyb rows (offset -> column through the inverse map)."""
    k = rows.shape[0]
    m = np.zeros((k, ncols), np.float32)
    for i in range(k):
        for v, o in zip(rows.data[i], rows.off[i]):
            m[i, col_of_offset[o]] += v
        if rows.fmt == "hyb" and rows.ovf_slot[i] >= 0:
            for v, o in zip(rows.ovf_data[rows.ovf_slot[i]], rows.ovf_off[rows.ovf_slot[i]]):
                m[i, col_of_offset[o]] += v
    return m


@pytest.mark.parametrize("fmt", ["ell", "hyb"])
def test_round_trip_with_empty_and_dense_rows(fmt):
    rng = np.random.default_rng(0)
    m = rng.standard_normal((20, 30)).astype(np.float32)
    m[rng.random(m.shape) < 0.9] = 0
    m[3] = 0                                  # empty row
    m[7] = rng.standard_normal(30) + 5        # fully dense row
    rows = dense_weight_rows(m, fmt)
    assert rows.fmt == fmt and rows.nnz == int((m != 0).sum())
    np.testing.assert_array_equal(unpack(rows, 30, np.arange(30)), m)


def test_hyb_chosen_and_smaller_when_few_rows_are_long():
    counts = np.array([5] * 60 + [100] * 2)
    assert choose_format(counts) == "hyb"
    assert choose_format(np.array([5, 6, 5, 7, 6])) == "ell"
    m = np.zeros((62, 120), np.float32)
    for i, c in enumerate(counts):
        m[i, :c] = 1.0
    ell, hyb = to_sparse_rows(m, np.arange(120), "ell"), to_sparse_rows(m, np.arange(120), "hyb")
    assert ell.padded_size == 62 * 100
    assert hyb.padded_size == 62 * 5 + 2 * 95
    assert hyb.nnz == ell.nnz == counts.sum()


def test_all_zero_matrix_packs_to_one_zero_column():
    rows = dense_weight_rows(np.zeros((4, 9), np.float32))
    assert rows.data.shape == (4, 1) and not rows.data.any() and rows.nnz == 0 and rows.sparsity == 1.0


@pytest.mark.parametrize("stride,pad,dil", [((1, 1), (1, 1, 1, 1), (1, 1)), ((2, 2), (3, 3, 3, 3), (1, 1)),
                                            ((1, 2), (0, 1, 2, 1), (2, 2))])
def test_conv_offsets_address_the_padded_input(stride, pad, dil):
    geo = ConvGeometry(1, 5, 9, 11, 4, 3, 3, stride, pad, dil)
    w = np.random.default_rng(0).standard_normal((4, 5, 3, 3)).astype(np.float32)
    rows = conv_weight_rows(w, geo, "ell")
    offs = geo.column_offsets()
    assert offs.max() < geo.c * geo.hp * geo.wp
    inverse = {int(o): j for j, o in enumerate(offs)}
    np.testing.assert_array_equal(unpack(rows, 45, inverse), w.reshape(4, -1))
    # the flat buffer (with its extra zero channels) covers every read of the extended domain
    last_read = offs.max() + (geo.q_extent - 1 if geo.flat_output
                              else (geo.oh - 1) * stride[0] * geo.wp + (geo.ow - 1) * stride[1])
    assert last_read < geo.pad_channels * geo.hp * geo.wp
