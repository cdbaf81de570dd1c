"""The generic x86 schedule (schedules/fallback_cpu.py) on what SE blocks and classifier heads run:
global average pooling as vector partial sums, and a per-channel gate computed once, not per pixel."""

import re

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import rel_err


def _mean_func(c, hw, n=1):
    from tvm import te, topi

    x = te.placeholder((n, c, hw, hw), name="x")
    s = topi.sum(x, axis=[2, 3], keepdims=True)
    y = te.compute(s.shape, lambda *i: s(*i) / float(hw * hw), name="T_divide")
    return te.create_prim_func([x, y])


@pytest.mark.parametrize("c,hw,n,vector", [(24, 16, 1, True), (40, 8, 2, True), (16, 7, 1, True), (8, 14, 2, True),
                                            (8, 3, 1, False), (4, 17, 1, False)])  # 49 = 7 x 7 lanes; 289 = 17 x 17
def test_global_average_pool_sums_in_vector_lanes_where_the_map_allows(c, hw, n, vector, llvm):
    import tvm

    from unsparse_tvm.schedules import fallback_cpu

    sch = fallback_cpu.RULE.apply(_mean_func(c, hw, n), llvm)
    text = sch.mod.script()
    assert bool(re.search(r'T\.vectorized\([^\n]*\):\s*\n\s*with T\.sblock\("\w+_rf"\)', text)) == vector
    lib = tvm.compile(sch.mod, target=llvm)
    x = np.random.default_rng(c).standard_normal((n, c, hw, hw)).astype(np.float32)
    y = tvm.runtime.tensor(np.zeros((n, c, 1, 1), np.float32))
    lib["main"](tvm.runtime.tensor(x), y)
    assert rel_err(y.numpy(), x.mean(axis=(2, 3), keepdims=True)) < 1e-5


class SE(nn.Module):
    """torchvision's SqueezeExcitation after a conv, as efficientnet/mobilenet_v3 use it."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

    def forward(self, x):
        y = nn.functional.silu(self.conv(x))
        s = torch.sigmoid(self.fc2(nn.functional.silu(self.fc1(nn.functional.adaptive_avg_pool2d(y, 1)))))
        return y * s


@pytest.mark.parametrize("c,hw,n", [(16, 16, 1), (24, 7, 2)])
def test_squeeze_excitation_matches_torch(c, hw, n, llvm):
    import tvm
    from tvm import relax

    from unsparse_tvm.build import compile_program

    torch.manual_seed(c)
    model = SE(c).eval()
    x = torch.randn(n, c, hw, hw)
    ep = torch.export.export(model, (x,))
    compiled = compile_program(ep, llvm, sparse=False)
    y = relax.VirtualMachine(compiled.executable, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))
    with torch.no_grad():
        ref = model(x).numpy()
    assert rel_err((y if hasattr(y, "numpy") else y[0]).numpy(), ref) < 1e-5


def _linear_func(n, k, j):
    """out[n, j] = sum_k x[n, k] * W[k, j]: a linear layer as Relax leaves it, its weight folded to [in, out]."""
    from tvm import te

    x, w = te.placeholder((n, k), name="x"), te.placeholder((k, j), name="W")
    r = te.reduce_axis((0, k), name="k")
    y = te.compute((n, j), lambda a, b: te.sum(x[a, r] * w[r, b], axis=r), name="matmul")
    return te.create_prim_func([x, w, y])


@pytest.mark.parametrize("n,k,j,over_j", [(1, 512, 512, True), (3, 1280, 1000, True), (8, 96, 1000, True),
                                          (17, 64, 48, True), (2, 64, 36, True), (1, 512, 10, False)])
def test_linear_vectorises_over_outputs_with_the_weight_streamed_by_rows(n, k, j, over_j, llvm):
    """A batch-1..17 linear: vectors along the weight's contiguous output axis, the sum over k outside them
    (no rfactor block gathering the weight across rows); 10 outputs (no 4-lane divisor) keep the old schedule."""
    import tvm

    from unsparse_tvm.schedules import fallback_cpu

    sch = fallback_cpu.RULE.apply(_linear_func(n, k, j), llvm)
    text = sch.mod.script()
    vectorised_update = re.search(r'T\.vectorized\([^\n]*\):\s*\n\s*with T\.sblock\("matmul_update"\)', text)
    assert bool(vectorised_update) == over_j and ("_rf" not in text) == over_j
    lib = tvm.compile(sch.mod, target=llvm)
    rng = np.random.default_rng(n * j)
    x, w = rng.standard_normal((n, k)).astype(np.float32), rng.standard_normal((k, j)).astype(np.float32)
    y = tvm.runtime.tensor(np.zeros((n, j), np.float32))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), y)
    assert rel_err(y.numpy(), x @ w) < 1e-5


def _pool_func(kind, c, hw, n, k, stride, pad, ceil):
    from tvm import te, topi

    x = te.placeholder((n, c, hw, hw), name="x")
    y = topi.nn.pool2d(x, [k, k], [stride, stride], [1, 1], [pad] * 4, kind, ceil_mode=ceil, layout="NCHW",
                       count_include_pad=True)
    return te.create_prim_func([x, y])


@pytest.mark.parametrize("kind,c,hw,n,k,stride,pad,ceil", [
    ("max", 64, 112, 1, 3, 2, 1, False),   # resnet's stem pool
    ("max", 8, 57, 2, 3, 2, 0, True),      # googlenet/squeezenet: ceil mode, batch 2
    ("avg", 16, 32, 1, 2, 2, 0, False),    # densenet's transition (no padding: nothing to inline)
    ("max", 8, 13, 1, 3, 2, 1, False),     # odd sizes
])
def test_pooling_windows_read_their_padding_in_place(kind, c, hw, n, k, stride, pad, ceil, llvm):
    """Pooling: the padding (or ceil mode's extra row and column) read in place, no padded copy first; the
    window innermost in a parallel loop nest. Equal to PyTorch."""
    import tvm

    from unsparse_tvm.schedules import fallback_cpu

    sch = fallback_cpu.RULE.apply(_pool_func(kind, c, hw, n, k, stride, pad, ceil), llvm)
    text = sch.mod.script()
    assert "pad_temp" not in text and "T.parallel" in text
    lib = tvm.compile(sch.mod, target=llvm)
    x = np.random.default_rng(hw).standard_normal((n, c, hw, hw)).astype(np.float32)
    pool = nn.MaxPool2d(k, stride, pad, ceil_mode=ceil) if kind == "max" else nn.AvgPool2d(k, stride, pad, ceil_mode=ceil)
    ref = pool(torch.from_numpy(x)).numpy()
    y = tvm.runtime.tensor(np.zeros(ref.shape, np.float32))
    lib["main"](tvm.runtime.tensor(x), y)
    assert rel_err(y.numpy(), ref) < 1e-6
