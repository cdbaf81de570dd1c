"""The quantised sparse kernels (ops.sparse_quant) under the CUDA schedule rules, run on PoCL against PyTorch
on the dequantised weights: conv and linear, ell / hyb / grouped rows, int8 and 4-bit codes, 16-bit flat
and channel/tap offsets, batch > 1, strides; CUDA's static limits at the default knobs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import case_rng, needs_nvcc, sparse_weight, torch_conv
from test_pocl import check
from test_quant_kernels import conv_spec, quantised
from unsparse_tvm.relay_passes.layers import LayerNames
from unsparse_tvm.single_layer import LayerSpec, layer_module
from unsparse_tvm.testing.cuda_limits import module_cuda_limits
from unsparse_tvm.testing.opencl import OpenCLModule, schedule_for_cuda, schedule_space_point

CASES = [  # (N, C, H, W, K, R, S, stride, padding)
    (2, 8, 9, 7, 16, 3, 3, (1, 1), (1, 1, 1, 1)),        # batch 2, odd sizes
    (1, 16, 11, 11, 16, 3, 3, (2, 2), (1, 1, 1, 1)),     # stride 2
    (1, 64, 32, 32, 8, 3, 3, (1, 1), (1, 1, 1, 1)),      # ct16 offsets (64 x 34 x 34 > 65535)
    (8, 16, 4, 4, 16, 1, 1, (1, 1), (0, 0, 0, 0)),       # batch 8, 1x1
    (1, 16, 64, 64, 16, 7, 7, (2, 2), (3, 3, 3, 3)),     # 7x7/2 stem: ct16 with 6 tap bits, stride phases
]


def quant_kwargs(weight, entry, fmt, report):
    return dict(threshold=0.3, fmt=fmt, report=report, names=LayerNames({"layer.weight": weight}),
                quant={"layers": {"layer.weight": entry}})


@pytest.mark.parametrize("scheme", ["int8", "kmeans4", "pow2"])
@pytest.mark.parametrize("fmt", ["ell", "hyb", "vell4"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:7])))
def test_quant_conv_cuda_on_pocl(case, fmt, scheme, pocl, cuda):
    n, c, h, w, k, r, s, stride, pad = case
    rng = case_rng(case, fmt, scheme)
    weight, entry = quantised(sparse_weight((k, c, r, s), 0.85, rng, empty_rows=k // 8, dense_rows=1), scheme, rng)
    bias = rng.standard_normal(k).astype(np.float32)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    report = []
    sched = schedule_for_cuda(layer_module(conv_spec(x.shape, weight, bias, True, stride, pad)),
                              **quant_kwargs(weight, entry, fmt, report))
    assert report[0].decision == "sparse" and report[0].format == fmt and report[0].precision != "fp32"
    check(OpenCLModule(sched, pocl)(x), torch_conv(x, weight, bias, stride, pad, (1, 1), relu=True))
    for use in module_cuda_limits(sched, cuda, registers=False):
        assert not use.problems, use


@pytest.mark.parametrize("scheme", ["int8", "int4", "kmeans4", "kmeans6"])
@pytest.mark.parametrize("fmt", ["ell", "hyb", "vell4"])
@pytest.mark.parametrize("batch", [1, 4])
def test_quant_linear_cuda_on_pocl(batch, fmt, scheme, pocl):
    rng = case_rng(batch, fmt, scheme)
    weight, entry = quantised(sparse_weight((32, 72), 0.85, rng, empty_rows=2, dense_rows=1), scheme, rng)
    bias = rng.standard_normal(32).astype(np.float32)
    x = rng.standard_normal((batch, 72)).astype(np.float32)
    report = []
    sched = schedule_for_cuda(layer_module(LayerSpec("dense", x.shape, weight, bias, False, {})),
                              **quant_kwargs(weight, entry, fmt, report))
    assert report[0].decision == "sparse" and report[0].precision != "fp32"
    ref = F.linear(torch.from_numpy(x), torch.from_numpy(weight), torch.from_numpy(bias)).numpy()
    check(OpenCLModule(sched, pocl)(x), ref)


@pytest.mark.parametrize("seed", range(4))
def test_quant_conv_cuda_space_points_on_pocl(seed, pocl):
    """Random points of the CUDA design space (what tuning may pick) on a 4-bit, 16-bit-offset layer."""
    rng = np.random.default_rng(seed)
    weight, entry = quantised(sparse_weight((16, 16, 3, 3), 0.85, rng, empty_rows=2), "kmeans4", rng)
    x = rng.standard_normal((2, 16, 8, 8)).astype(np.float32)
    mod = layer_module(conv_spec(x.shape, weight, None, False, (1, 1), (1, 1, 1, 1)))
    sched, _ = schedule_space_point(mod, seed, **quant_kwargs(weight, entry, None, []))
    check(OpenCLModule(sched, pocl)(x), torch_conv(x, weight, None, (1, 1), (1, 1, 1, 1), (1, 1)))


@needs_nvcc
@pytest.mark.parametrize("scheme, fmt", [("kmeans4", "hyb"), ("int8", "vell4")])
def test_quant_cuda_modules_compile_with_nvcc(scheme, fmt, cuda, tmp_path):
    """nvcc (not just PoCL's OpenCL compiler) takes the generated CUDA for the byte/nibble/ushort loads."""
    import tvm

    from unsparse_tvm.build import Compiled, write_module
    from unsparse_tvm.relay_passes import build_pipeline
    from unsparse_tvm.runtime import fatbin_images

    rng = np.random.default_rng(2)
    weight, entry = quantised(sparse_weight((16, 64, 3, 3), 0.9, rng, dense_rows=1), scheme, rng)
    spec = conv_spec((1, 64, 32, 32), weight, None, True, (1, 1), (1, 1, 1, 1))
    report = []
    ex = tvm.compile(layer_module(spec), target=cuda,
                     relax_pipeline=build_pipeline(cuda, **quant_kwargs(weight, entry, fmt, report)))
    assert report[0].precision.endswith("16-bit off") and report[0].precision != "fp32"
    path = str(tmp_path / "q.so")
    write_module(Compiled(ex, cuda, (1, 64, 32, 32), [], report, threshold=0.3), path, model="q")
    assert ("cubin", 90) in fatbin_images(open(path, "rb").read())
