"""CUDA builds without a GPU: every operator schedule compiles for sm_90, and every built-in model's
module carries device code compiled by nvcc (cubin for sm_90 in a fatbin), not source."""

import numpy as np
import pytest

from conftest import needs_nvcc, pruned_program, sparse_weight
from unsparse_tvm.single_layer import LayerSpec, layer_module


@pytest.mark.parametrize("stride,fmt", [((1, 1), "ell"), ((2, 2), "hyb"), ((1, 2), "ell")])
def test_sparse_conv_cuda_schedule_builds(stride, fmt, cuda):
    import tvm

    from unsparse_tvm.relay_passes import build_pipeline

    rng = np.random.default_rng(0)
    w = sparse_weight((16, 8, 3, 3), 0.9, rng, empty_rows=2, dense_rows=1)
    spec = LayerSpec("conv2d", (2, 8, 13, 11), w, np.ones(16, np.float32), True,
                     {"strides": list(stride), "padding": [1, 1, 1, 1], "dilation": [1, 1], "groups": 1})
    report = []
    ex = tvm.compile(layer_module(spec), target=cuda, relax_pipeline=build_pipeline(cuda, threshold=0.5, fmt=fmt, report=report))
    assert report[0].decision == "sparse" and report[0].format == fmt
    cuda_mods = [m for m in ex.mod.imports[0].imports if m.kind == "cuda"]
    assert len(cuda_mods) == 1
    src = cuda_mods[0].inspect_source()
    assert "__global__" in src and "threadIdx.x" in src


def test_sparse_dense_cuda_schedule_uses_warp_reduction(cuda):
    import tvm

    from unsparse_tvm.relay_passes import build_pipeline

    w = sparse_weight((48, 96), 0.9, np.random.default_rng(0), dense_rows=1)
    spec = LayerSpec("dense", (1, 96), w, np.ones(48, np.float32), False, {})
    ex = tvm.compile(layer_module(spec), target=cuda, relax_pipeline=build_pipeline(cuda, threshold=0.5, fmt="hyb"))
    src = [m for m in ex.mod.imports[0].imports if m.kind == "cuda"][0].inspect_source()
    assert "__shfl" in src  # the row's lanes reduce with warp shuffles


@needs_nvcc
@pytest.mark.parametrize("model", ["smallcnn", "vgg16-cifar", "resnet18",  # vgg16 (224): vgg16-cifar's layers, 40 s more
                                   pytest.param("resnet50", marks=pytest.mark.slow)])
def test_model_cuda_module_carries_sm90_device_code(model, cuda, tmp_path):
    from unsparse_tvm.build import compile_program, write_module
    from unsparse_tvm.runtime import device_code_summary, fatbin_images, read_metadata

    compiled = compile_program(pruned_program(model), cuda, threshold=0.7)
    assert sum(r.decision == "sparse" for r in compiled.report) == len(compiled.report)
    path = str(tmp_path / f"{model}.so")
    write_module(compiled, path, model=model)
    data = open(path, "rb").read()
    assert ("cubin", 90) in fatbin_images(data)
    assert b'extern "C" __global__' not in data  # no CUDA source: nothing to compile at load time
    meta = read_metadata(path)
    assert meta["arch"] == "sm_90" and meta["device_code"] == "fatbin"
    assert "cubin sm_90" in device_code_summary(path)
