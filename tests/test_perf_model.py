"""The GPU performance model's predictions behave as its terms say they must."""

import numpy as np

from unsparse_tvm.ops.geometry import ConvGeometry
from unsparse_tvm.cost.gpu import H200, Knobs, magnitude_row_nnz, predict_cudnn, predict_sparse

GEO = ConvGeometry(1, 256, 28, 28, 256, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1))


def test_sparser_is_faster_and_cudnn_modes_are_ordered():
    times = [predict_sparse(GEO, magnitude_row_nnz(256, 256 * 9, sp)).seconds for sp in (0.5, 0.8, 0.9, 0.98)]
    assert all(a > b for a, b in zip(times, times[1:]))
    fp32, tf32, fp16 = (predict_cudnn(GEO, m).seconds for m in ("fp32", "tf32", "fp16"))
    assert fp32 > tf32 > fp16


def test_magnitude_pruning_keeps_the_share_asked_for():
    nnz = magnitude_row_nnz(64, 1000, 0.9)
    assert abs(nnz.sum() / 64000 - 0.1) < 0.002


def test_grouped_rows_cut_the_l1_term_and_batch_blocking_the_weight_loads():
    rows = magnitude_row_nnz(256, 256 * 9, 0.9)
    plain = predict_sparse(GEO, rows)
    grouped = predict_sparse(GEO, magnitude_row_nnz(64, 256 * 9, 0.9), Knobs(group=4))
    assert plain.bound == "l1" and grouped.terms["l1"] < plain.terms["l1"] / 3
    geo8 = ConvGeometry(8, *list(GEO.__dict__.values())[1:])
    one, two = (predict_sparse(geo8, rows, Knobs(batch_per_thread=b)) for b in (1, 2))
    assert two.terms["l1"] < one.terms["l1"]


def test_tiny_layers_are_launch_bound():
    tiny = ConvGeometry(1, 16, 7, 7, 16, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1))
    p = predict_sparse(tiny, magnitude_row_nnz(16, 144, 0.9))
    assert p.bound == "launch" and np.isclose(p.terms["launch"], 3 * H200.launch_s)


def test_offset_bytes_are_what_the_format_stores():
    """The model counts 2-byte offsets exactly where formats.compact_offsets stores them as uint16."""
    from unsparse_tvm.ops.formats import compact_offsets, conv_weight_rows
    from unsparse_tvm.cost.gpu import offset_bytes

    rng = np.random.default_rng(0)
    for c, hw in ((16, 14), (64, 30), (64, 34), (256, 28)):
        geo = ConvGeometry(1, c, hw, hw, 8, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1))
        w = rng.standard_normal((8, c, 3, 3)).astype(np.float32)
        w[:, :-1] = 0  # keep only the last input channel: the largest offsets
        stored = compact_offsets(conv_weight_rows(w, geo, "ell").off)
        assert offset_bytes(geo) == stored.dtype.itemsize


def test_launches_follow_the_fused_epilogue():
    """(Pad +) conv (+ overflow) (+ epilogue): a stride-1 pointwise conv on a flat output with ell rows is
    one launch (sparse_conv2d_cuda fuses its epilogue and reads a view of the input), with hyb rows three;
    a padded 3x3 is three; a strided pointwise (a copy into phases) two."""
    pointwise = ConvGeometry(1, 64, 16, 16, 64, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1))
    padded = ConvGeometry(1, 64, 16, 16, 64, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1))
    even = np.full(64, 6)                      # every row 6 nonzeros: ell
    skewed = np.array([60] + [2] * 63)         # one long row: hyb (a fractional mean width)
    strided = ConvGeometry(1, 64, 16, 16, 64, 1, 1, (2, 2), (0, 0, 0, 0), (1, 1))
    assert pointwise.input_is_flat and not strided.input_is_flat
    assert np.isclose(predict_sparse(pointwise, even).terms["launch"], 1 * H200.launch_s)
    assert np.isclose(predict_sparse(pointwise, skewed).terms["launch"], 3 * H200.launch_s)
    assert np.isclose(predict_sparse(padded, even).terms["launch"], 3 * H200.launch_s)
    assert np.isclose(predict_sparse(strided, even).terms["launch"], 2 * H200.launch_s)
