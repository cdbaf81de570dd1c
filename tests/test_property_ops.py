"""Property-based check of the operators on llvm against PyTorch (hypothesis): random conv2d and linear
configurations (shapes, strides, padding, dilation, depthwise or not, sparsity, format, epilogue) must all
match.
Kept small (a couple of dozen compiles) so that it runs in well under a minute."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import rel_err, run_layer, sparse_weight, torch_conv
from unsparse_tvm.single_layer import LayerSpec

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])


@st.composite
def conv_configs(draw):
    n = draw(st.integers(1, 2))
    c = draw(st.integers(1, 8))
    k = draw(st.integers(1, 12))
    r, s = draw(st.sampled_from([1, 3, 5])), draw(st.sampled_from([1, 2, 3]))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dil = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    pad = tuple(draw(st.integers(0, 2)) for _ in range(4))  # top, left, bottom, right
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    assume(h + pad[0] + pad[2] >= dil[0] * (r - 1) + 1 and w + pad[1] + pad[3] >= dil[1] * (s - 1) + 1)
    depthwise = draw(st.booleans())  # k == c, one input channel each: block-diagonal rows
    k = c if depthwise else k
    return dict(n=n, c=c, k=k, r=r, s=s, stride=stride, dil=dil, pad=pad, h=h, w=w, groups=c if depthwise else 1,
                sparsity=draw(st.floats(0.5, 0.98)), fmt=draw(st.sampled_from([None, "ell", "hyb"])),
                bias=draw(st.booleans()), relu=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


@settings(max_examples=25, **SETTINGS)
@given(cfg=conv_configs())
def test_random_sparse_conv2d_matches_torch(cfg, llvm):
    rng = np.random.default_rng(cfg["seed"])
    k, c, r, s = cfg["k"], cfg["c"], cfg["r"], cfg["s"]
    groups = cfg["groups"]
    weight = sparse_weight((k, c // groups, r, s), cfg["sparsity"], rng)
    if not (weight == 0).any():  # tiny layers: make sure it is sparse enough for the threshold below
        weight.reshape(-1)[0] = 0.0
    bias = rng.standard_normal(k).astype(np.float32) if cfg["bias"] else None
    x = rng.standard_normal((cfg["n"], c, cfg["h"], cfg["w"])).astype(np.float32)
    spec = LayerSpec("conv2d", x.shape, weight, bias, cfg["relu"],
                     {"strides": list(cfg["stride"]), "padding": list(cfg["pad"]), "dilation": list(cfg["dil"]),
                      "groups": groups})
    y, report = run_layer(spec, llvm, threshold=0.0, fmt=cfg["fmt"], x=x)
    assert report[0].decision == "sparse", report[0].label
    ref = torch_conv(x, weight, bias, cfg["stride"], cfg["pad"], cfg["dil"], groups, relu=cfg["relu"])
    assert y.shape == ref.shape
    assert rel_err(y, ref) < 1e-5 or np.abs(y - ref).max() < 1e-5


@st.composite
def strided_depthwise_configs(draw):
    """Strided depthwise convs, which run on the phase planes their nonzeros read (ops.phase_planes) where
    those are few: odd and even filters, one or both axes strided, asymmetric padding, batch > 1."""
    r, s = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    stride = draw(st.sampled_from([(2, 2), (3, 3), (2, 1), (1, 3), (3, 2)]))
    pad = tuple(draw(st.integers(0, 2)) for _ in range(4))
    h, w = draw(st.integers(1, 20)), draw(st.integers(1, 20))
    assume(h + pad[0] + pad[2] >= r and w + pad[1] + pad[3] >= s)
    c = draw(st.integers(1, 16))
    return dict(n=draw(st.integers(1, 3)), c=c, k=c, r=r, s=s, stride=stride, dil=(1, 1), pad=pad, h=h, w=w,
                groups=c, sparsity=draw(st.floats(0.5, 0.98)), fmt="ell", bias=draw(st.booleans()),
                relu=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


@settings(max_examples=20, **SETTINGS)
@given(cfg=strided_depthwise_configs())
def test_random_strided_depthwise_matches_torch(cfg, llvm):
    test_random_sparse_conv2d_matches_torch.hypothesis.inner_test(cfg, llvm)


@settings(max_examples=15, **SETTINGS)
@given(n=st.integers(1, 3), i=st.integers(1, 64), o=st.integers(1, 32), sparsity=st.floats(0.5, 0.98),
       fmt=st.sampled_from([None, "ell", "hyb"]), bias=st.booleans(), relu=st.booleans(), seed=st.integers(0, 2**16))
def test_random_sparse_linear_matches_torch(n, i, o, sparsity, fmt, bias, relu, seed, llvm):
    rng = np.random.default_rng(seed)
    weight = sparse_weight((o, i), sparsity, rng)
    b = rng.standard_normal(o).astype(np.float32) if bias else None
    x = rng.standard_normal((n, i)).astype(np.float32)
    y, report = run_layer(LayerSpec("dense", (n, i), weight, b, relu, {}), llvm, threshold=0.0, fmt=fmt, x=x)
    assert report[0].decision == "sparse"
    ref = x @ weight.T + (b if b is not None else 0)
    ref = np.maximum(ref, 0) if relu else ref
    assert rel_err(y, ref) < 1e-5 or np.abs(y - ref).max() < 1e-5


@st.composite
def grouped_configs(draw):
    """Vector-pruned convs (V output channels share each zero pattern) on output maps up to 4x4, where the grouped
    kernel takes row lanes (a map under one vector, ConvGeometry.with_row_lanes) or interleaves groups."""
    v = draw(st.sampled_from([2, 4, 8]))
    r, s = draw(st.sampled_from([1, 3])), draw(st.sampled_from([1, 2, 3]))
    stride, dil = (draw(st.integers(1, 2)), draw(st.integers(1, 2))), (draw(st.integers(1, 2)), 1)
    pad = tuple(draw(st.integers(0, 2)) for _ in range(4))
    oh, ow = draw(st.integers(1, 4)), draw(st.integers(1, 4))  # the output map; the input size follows
    h = (oh - 1) * stride[0] + dil[0] * (r - 1) + 1 - pad[0] - pad[2] + draw(st.integers(0, stride[0] - 1))
    w = (ow - 1) * stride[1] + dil[1] * (s - 1) + 1 - pad[1] - pad[3] + draw(st.integers(0, stride[1] - 1))
    assume(h >= 1 and w >= 1)
    return dict(n=draw(st.integers(1, 3)), c=draw(st.integers(2, 12)), k=v * draw(st.integers(2, 6)), v=v, r=r, s=s,
                stride=stride, dil=dil, pad=pad, h=h, w=w, sparsity=draw(st.floats(0.5, 0.9)),
                path=draw(st.sampled_from(["native", "avx2"])), seed=draw(st.integers(0, 2**16)))


@settings(max_examples=40, **SETTINGS)
@given(cfg=grouped_configs())
def test_random_grouped_conv2d_matches_torch(cfg, llvm):
    import tvm

    from unsparse_tvm.target import llvm_target_dict

    rng = np.random.default_rng(cfg["seed"])
    k, c, v = cfg["k"], cfg["c"], cfg["v"]
    keep = rng.random((k // v, c, cfg["r"], cfg["s"])) >= cfg["sparsity"]
    keep.reshape(-1)[0] = True  # at least one nonzero
    weight = rng.standard_normal((k, c, cfg["r"], cfg["s"])).astype(np.float32) * np.repeat(keep, v, axis=0)
    bias = rng.standard_normal(k).astype(np.float32)
    x = rng.standard_normal((cfg["n"], c, cfg["h"], cfg["w"])).astype(np.float32)
    spec = LayerSpec("conv2d", x.shape, weight, bias, True,
                     {"strides": list(cfg["stride"]), "padding": list(cfg["pad"]), "dilation": list(cfg["dil"]),
                      "groups": 1})
    target = llvm if cfg["path"] == "native" else tvm.target.Target(llvm_target_dict("haswell"))
    y, report = run_layer(spec, target, threshold=0.0, fmt=f"vell{v}", x=x)
    assert report[0].decision == "sparse" and report[0].format == f"vell{v}", report[0].label
    ref = torch_conv(x, weight, bias, cfg["stride"], cfg["pad"], cfg["dil"], relu=True)
    assert rel_err(y, ref) < 1e-5 or np.abs(y - ref).max() < 1e-5
