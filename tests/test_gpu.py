"""CUDA numerics on a real GPU (marked `gpu`: skipped where torch sees no CUDA device). Every sparse
kernel configuration and the built-in models, compiled for the device's own arch, against PyTorch CUDA
with TF32 off (true FP32)."""

import numpy as np
import pytest
import torch

from conftest import pruned_program, rel_err, sparse_weight
from test_ops_llvm import CONV_CASES
from test_pocl import EXTRA_CONV_CASES
from unsparse_tvm.single_layer import LayerSpec, layer_module

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_target():
    from unsparse_tvm.target import make_target

    major, minor = torch.cuda.get_device_capability(0)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    return make_target("cuda", f"sm_{major}{minor}")


def _run_cuda(spec, target, x, fmt=None, threshold=0.5):
    import tvm
    from tvm import relax

    from unsparse_tvm.relay_passes import build_pipeline

    from unsparse_tvm.cuda_package import embed_device_code

    ex = tvm.compile(layer_module(spec), target=target, relax_pipeline=build_pipeline(target, threshold=threshold, fmt=fmt))
    embed_device_code(ex, str(target.attrs["arch"]))  # run what a deployed module runs: nvcc's fatbin
    dev = tvm.cuda(0)
    return relax.VirtualMachine(ex, dev)["main"](tvm.runtime.tensor(x, dev)).numpy()


@pytest.mark.parametrize("case", CONV_CASES + EXTRA_CONV_CASES, ids=lambda c: "x".join(map(str, c[:7])) + f"-s{c[7][0]}{c[7][1]}")
@pytest.mark.parametrize("fmt", ["ell", "hyb"])
def test_sparse_conv2d_cuda_matches_torch(case, fmt, gpu_target):
    import torch.nn.functional as F

    n, c, h, w, k, r, s, stride, pad, dil, sp = case
    rng = np.random.default_rng(11)
    weight = sparse_weight((k, c, r, s), sp, rng, empty_rows=k // 8, dense_rows=1 if sp < 0.99 else 0)
    bias = rng.standard_normal(k).astype(np.float32)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    spec = LayerSpec("conv2d", x.shape, weight, bias, True,
                     {"strides": list(stride), "padding": list(pad), "dilation": list(dil), "groups": 1})
    y = _run_cuda(spec, gpu_target, x, fmt, threshold=0.0 if sp == 0 else 0.5)
    t, l, b, rr = pad
    xt = F.pad(torch.from_numpy(x).cuda(), (l, rr, t, b))
    ref = F.relu(F.conv2d(xt, torch.from_numpy(weight).cuda(), torch.from_numpy(bias).cuda(), stride, 0, dil))
    assert rel_err(y, ref.cpu().numpy()) < 1e-5


@pytest.mark.parametrize("fmt", ["ell", "hyb"])
def test_sparse_dense_cuda_matches_torch(fmt, gpu_target):
    rng = np.random.default_rng(5)
    weight = sparse_weight((96, 200), 0.9, rng, empty_rows=4, dense_rows=2)
    bias = rng.standard_normal(96).astype(np.float32)
    x = rng.standard_normal((4, 200)).astype(np.float32)
    y = _run_cuda(LayerSpec("dense", x.shape, weight, bias, False, {}), gpu_target, x, fmt)
    ref = torch.from_numpy(x).cuda() @ torch.from_numpy(weight).cuda().T + torch.from_numpy(bias).cuda()
    assert rel_err(y, ref.cpu().numpy()) < 1e-5


@pytest.mark.parametrize("model", ["smallcnn", "vgg16-cifar", "resnet18", "resnet50", "vgg16"])
def test_builtin_model_cuda_matches_torch(model, gpu_target):
    import tvm
    from tvm import relax

    from unsparse_tvm.build import compile_program
    from unsparse_tvm.frontend import program_input_shape

    ep = pruned_program(model, 0.9)
    from unsparse_tvm.cuda_package import embed_device_code

    ex = embed_device_code(compile_program(ep, gpu_target).executable, str(gpu_target.attrs["arch"]))
    x = torch.randn(*program_input_shape(ep), generator=torch.Generator().manual_seed(2))
    dev = tvm.cuda(0)
    y = relax.VirtualMachine(ex, dev)["main"](tvm.runtime.tensor(x.numpy(), dev))[0].numpy()
    net = ep.module().cuda()
    with torch.no_grad():
        ref = net(x.cuda()).cpu().numpy()
    assert rel_err(y, ref) < 1e-4
