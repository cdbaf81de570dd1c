"""VectorMaxPool / ops.pool.max_pool_3x3s2: ResNet's stem pool as a vector kernel, equal to PyTorch's pool on
fp32 and uint8, odd sizes, batch > 1, and left to TVM's pool where rows are narrower than a vector."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F


@pytest.mark.parametrize("shape,dtype,lanes", [
    ((1, 8, 112, 112), "float32", 16),   # the stem's map
    ((2, 3, 37, 40), "float32", 16),     # batch 2, odd height, rows shifted back at their end
    ((1, 4, 35, 35), "float32", 8),      # AVX2's 8 lanes, odd width: the last column pads on the right
    ((1, 5, 17, 33), "uint8", 16),
    ((2, 6, 66, 71), "uint8", 32),
    ((2, 3, 97, 90), "uint8", 16),     # an output map in two parts, one per thread (odd rows: 49)
])
def test_kernel_is_pytorchs_pool(shape, dtype, lanes, llvm):
    import tvm

    from unsparse_tvm.ops.pool import max_pool_3x3s2

    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * 60).astype(np.float32)
    x = np.clip(x + 100, 0, 255).astype(np.uint8) if dtype == "uint8" else x - 50  # all-negative windows too
    ref = F.max_pool2d(torch.from_numpy(x.astype(np.float32)), 3, 2, 1).numpy().astype(dtype)
    lib = tvm.compile(tvm.IRModule({"main": max_pool_3x3s2(shape, dtype, lanes, 2).with_attr("global_symbol", "main")}),
                      target=llvm)
    y = tvm.runtime.tensor(np.full(ref.shape, 7, dtype))
    lib["main"](tvm.runtime.tensor(x), y)
    np.testing.assert_array_equal(y.numpy(), ref)


class _Stem(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.pool = nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(3, 2, 1)

    def forward(self, x):
        return self.pool(torch.relu(self.conv(x))) - 0.5


@pytest.mark.parametrize("width,vector", [(40, True), (12, False)])
def test_pass_takes_the_stem_pool_where_rows_are_a_vector_wide(width, vector, llvm):
    """The compiled module runs the vector kernel for a 40-wide map (20 outputs per row) and TVM's pool for a
    12-wide one (6 outputs, less than a vector); both equal PyTorch."""
    import tvm
    from tvm import relax

    from unsparse_tvm.build import compile_program
    from unsparse_tvm.frontend import import_program
    from unsparse_tvm.models import export_program
    from unsparse_tvm.relay_passes import build_pipeline

    torch.manual_seed(width)
    net = _Stem().eval()
    shape = (2, 3, width, width)
    ep = export_program(net, shape)
    mod, names = import_program(ep)
    lowered = build_pipeline(llvm, names=names, threshold=0.5, stop_after="lower_dense")(mod)
    kernels = [gv.name_hint for gv, _ in lowered.functions_items()]
    assert any(k.startswith("max_pool_3x3s2") for k in kernels) == vector
    x = np.random.default_rng(width).standard_normal(shape).astype(np.float32)
    vm = relax.VirtualMachine(compile_program(ep, llvm, threshold=0.5).executable, tvm.cpu())
    y = vm["main"](tvm.runtime.tensor(x))
    y = (y if hasattr(y, "numpy") else y[0]).numpy()
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
