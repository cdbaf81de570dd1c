"""The sparse formats: packing round-trips, format choice, padding accounting, geometry bounds."""

import numpy as np
import pytest

from unsparse_tvm.ops.formats import HYB_MIN_SAVING, choose_format, conv_weight_rows, dense_weight_rows, to_sparse_rows
from unsparse_tvm.ops.geometry import ConvGeometry


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
    assert choose_format(np.array([5, 6, 5, 7, 6])) == "ell"  # hyb would save 11% (31 vs 35 entries)
    assert choose_format(np.array([5, 6, 5, 7, 6]), HYB_MIN_SAVING["llvm"]) == "hyb"  # x86 takes 5%
    assert choose_format(np.array([6, 6, 6, 6]), 0.0) == "ell"  # nothing to save
    m = np.zeros((62, 120), np.float32)
    for i, c in enumerate(counts):
        m[i, :c] = 1.0
    ell, hyb = to_sparse_rows(m, np.arange(120), "ell"), to_sparse_rows(m, np.arange(120), "hyb")
    assert ell.padded_size == 62 * 100
    assert hyb.padded_size == 62 * 5 + 8 * 95  # 2 overflow rows, padded with empty ones to 8
    assert not hyb.ovf_data[2:].any() and (hyb.ovf_slot >= 0).sum() == 2
    assert hyb.nnz == ell.nnz == counts.sum()


def test_all_zero_matrix_packs_to_one_zero_column():
    rows = dense_weight_rows(np.zeros((4, 9), np.float32))
    assert rows.data.shape == (4, 1) and not rows.data.any() and rows.nnz == 0 and rows.sparsity == 1.0


def _phase_split(xpad: np.ndarray, geo: ConvGeometry) -> np.ndarray:
    """Reference layout, written independently of ConvGeometry.tap_offset: [C, Hp, Wp] padded image ->
    flat [C, sh, sw, Hq, Wq] with padded pixel (h, w) at phase (h % sh, w % sw), position (h // sh, w // sw)."""
    (sh, sw), (c, hp, wp) = geo.stride, xpad.shape
    out = np.zeros((geo.pad_channels, sh, sw, geo.hq, geo.wq), np.float32)  # extra channels, ragged phases: 0
    for h in range(hp):
        for w in range(wp):
            out[:c, h % sh, w % sw, h // sh, w // sw] = xpad[:, h, w]
    return out.reshape(-1)


@pytest.mark.parametrize("stride,pad,dil", [((1, 1), (1, 1, 1, 1), (1, 1)), ((2, 2), (3, 3, 3, 3), (1, 1)),
                                            ((1, 2), (0, 1, 2, 1), (2, 2)), ((3, 2), (1, 0, 1, 2), (1, 1)),
                                            ((2, 2), (0, 0, 0, 0), (1, 1))])
def test_conv_offsets_address_the_padded_input(stride, pad, dil):
    geo = ConvGeometry(1, 5, 9, 11, 4, 3, 3, stride, pad, dil)
    w = np.random.default_rng(0).standard_normal((4, 5, 3, 3)).astype(np.float32)
    rows = conv_weight_rows(w, geo, "ell")
    offs = geo.column_offsets()
    inverse = {int(o): j for j, o in enumerate(offs)}
    assert len(inverse) == len(offs)  # distinct taps, distinct offsets
    np.testing.assert_array_equal(unpack(rows, 45, inverse), w.reshape(4, -1))
    # tap (c, r, s) of output (y, x) at offs + y*Wq + x is padded pixel (y*sh + r*dh, x*sw + s*dw) of channel c
    xpad = np.random.default_rng(1).standard_normal((geo.c, geo.hp, geo.wp)).astype(np.float32)
    flat = _phase_split(xpad, geo)
    (sh, sw), (dh, dw) = stride, dil
    for j, (c, r, s_) in enumerate(np.ndindex(geo.c, geo.r, geo.s)):
        for y in range(geo.oh):
            got = flat[offs[j] + y * geo.wq + np.arange(geo.ow)]
            np.testing.assert_array_equal(got, xpad[c, y * sh + r * dh, np.arange(geo.ow) * sw + s_ * dw])
    # the flat buffer (with its extra zero channels) covers every read of the extended domain
    assert offs.max() + geo.q_extent - 1 < flat.size == geo.pad_channels * geo.channel_plane


@pytest.mark.parametrize("size,stride", [(2, 1), (4, 1), (7, 1), (14, 1), (28, 1), (56, 1), (224, 2), (56, 2),
                                         (14, 2), (13, 3), (31, 1)])
def test_flat_domain_covers_the_output_and_splits_into_register_tiles(size, stride):
    geo = ConvGeometry(1, 4, size, size, 4, 3, 3, (stride, stride), (1, 1, 1, 1), (1, 1))
    q, need = geo.q_extent, geo.oh * geo.wq
    assert need <= q < need + 64 and q % 8 == 0
    if q > 128:  # several-vector register tiles fit exactly: the 16-lane vector count has a divisor 2..6
        assert q % 16 == 0 and any((q // 16) % u == 0 for u in range(2, 7))
    if size == 2:
        assert q == 8  # a 2x2 map's 2 rows of Wp = 4 fill one 8-lane vector, not 16 lanes
