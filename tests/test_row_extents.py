"""TrimRowLoops (schedules/row_extents.py): a sparse conv's loop over its stored entries (int8 quads, fp32
ell and hyb rows) ends at the longest row among the rows it serves, read from the offsets' last column."""

import re

import numpy as np
import pytest

from conftest import sparse_weight
from test_int8 import QUANTUM_SHARE, build_int8_conv, run_built
from unsparse_tvm.ops.geometry import ConvGeometry
from unsparse_tvm.ops.int8_formats import ActQuant, QuadRows, epilogue_consts, torch_reference
from unsparse_tvm.testing.isa import skip_unless_runs_here

# a 3x3 with rows of very different lengths: empty rows, one dense row, the rest at 90%
GEO = ConvGeometry(2, 16, 12, 12, 24, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1))


def _build(rng):
    weight = sparse_weight((GEO.k, GEO.c, 3, 3), 0.9, rng, empty_rows=3, dense_rows=1)
    x = np.abs(rng.standard_normal((GEO.n, GEO.c, GEO.h, GEO.w))).astype(np.float32)
    act = ActQuant.from_range(0.0, float(x.max()), 255)
    lib, arrays, out_shape, wq, wscale, target = build_int8_conv(x, weight, None, None, True, GEO, act)
    ref = torch_reference(x, wq, wscale, act, None, None, True, GEO.stride, GEO.padding, GEO.dilation).numpy()
    tolerance = QUANTUM_SHARE * epilogue_consts(wq, wscale, act)[1].reshape(1, -1, 1, 1)
    return lib, arrays, out_shape, target, ref, tolerance


def _lengths_one_short(monkeypatch, rows_class) -> None:
    """rows_class.off_with_lengths says every row is one entry shorter than it is (the negative control)."""
    real = rows_class.off_with_lengths

    def one_short(self):
        off = real(self)
        off[:, -1] = np.maximum(off[:, -1].astype(np.int64) - 1, 0).astype(off.dtype)
        return off

    monkeypatch.setattr(rows_class, "off_with_lengths", one_short)


def test_quad_loop_ends_at_the_rows_lengths():
    lib, arrays, out_shape, target, ref, tolerance = _build(np.random.default_rng(0))
    loops = re.findall(r"for j in range\((.*)\):", lib.scheduled)
    assert loops and all(not extent.isdigit() and "T.Cast" in extent for extent in loops)  # read at run time
    skip_unless_runs_here(target)
    assert (np.abs(run_built(lib, arrays, out_shape) - ref) <= tolerance).all()


def test_lengths_one_short_drop_each_rows_last_quad(monkeypatch):
    """The negative control: the same kernel told every row is one quad shorter computes something else, so
    the loop really ends where the lengths say."""
    _lengths_one_short(monkeypatch, QuadRows)
    lib, arrays, out_shape, target, ref, tolerance = _build(np.random.default_rng(0))
    skip_unless_runs_here(target)
    assert not (np.abs(run_built(lib, arrays, out_shape) - ref) <= tolerance).all()


def test_offsets_without_lengths_keep_the_whole_loop(monkeypatch):
    """Offsets with no lengths column (as CUDA's int8 convs store them) leave the loop at the layer's longest
    row, and the kernel still computes the integer arithmetic."""
    monkeypatch.setattr(QuadRows, "off_with_lengths", lambda self: self.off)
    lib, arrays, out_shape, target, ref, tolerance = _build(np.random.default_rng(0))
    loops = re.findall(r"for j in range\((.*)\):", lib.scheduled)
    assert loops and all(extent.isdigit() for extent in loops)
    skip_unless_runs_here(target)
    assert (np.abs(run_built(lib, arrays, out_shape) - ref) <= tolerance).all()


@pytest.mark.parametrize("mcpu", ["haswell", "cascadelake"])
def test_other_isas_trim_too(mcpu):
    """The AVX2 (vpmaddubsw) and VNNI kernels tensorize alike, so their loops end at the lengths too
    (assembly-level check: built, not run)."""
    rng = np.random.default_rng(1)
    weight = sparse_weight((GEO.k, GEO.c, 3, 3), 0.9, rng, empty_rows=3, dense_rows=1)
    x = np.abs(rng.standard_normal((GEO.n, GEO.c, GEO.h, GEO.w))).astype(np.float32)
    lib, *_ = build_int8_conv(x, weight, None, None, True, GEO, ActQuant.from_range(0.0, 3.0, 127), mcpu)
    loops = re.findall(r"for j in range\((.*)\):", lib.scheduled)
    assert loops and all("T.Cast" in extent for extent in loops)


def _fp32_layer(fmt, rng):
    from unsparse_tvm.single_layer import LayerSpec

    weight = sparse_weight((24, 16, 3, 3), 0.9, rng, empty_rows=3, dense_rows=1)
    bias = rng.standard_normal(24).astype(np.float32)
    x = rng.standard_normal((2, 16, 13, 11)).astype(np.float32)
    attrs = {"strides": (1, 1), "padding": (1, 1, 1, 1), "dilation": (1, 1), "groups": 1}
    return LayerSpec("conv2d", x.shape, weight, bias, True, attrs), x


@pytest.mark.parametrize("fmt", ["ell", "hyb", "vell4"])
@pytest.mark.parametrize("short", [False, True])
def test_fp32_row_loops_end_at_the_rows_lengths(fmt, short, llvm, monkeypatch):
    """The fp32 ell rows (hyb's main part, vell4's row groups) store their lengths too: exact against PyTorch as
    stored, and wrong when every row is said to be one entry shorter (the negative control)."""
    from conftest import rel_err, run_layer, torch_conv
    from unsparse_tvm.ops.formats import SparseRows

    if short:
        _lengths_one_short(monkeypatch, SparseRows)
    spec, x = _fp32_layer(fmt, np.random.default_rng(2))
    y, report = run_layer(spec, llvm, threshold=0.5, fmt=fmt, x=x)
    assert report[0].format == fmt
    ref = torch_conv(x, spec.weight, spec.bias, (1, 1), (1, 1, 1, 1), (1, 1), relu=True)
    assert (rel_err(y, ref) < 1e-5) != short
