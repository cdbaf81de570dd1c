"""The int8 sparse conv's CUDA rule: numerics on PoCL (its OpenCL twin: plain integer multiply-adds, as
OpenCL has no dp4a) against the PyTorch integer reference, and the dp4a version compiled by nvcc."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import needs_nvcc, sparse_weight
from test_int8 import CASES, QUANTUM_SHARE
from unsparse_tvm.ops.int8_formats import ActQuant, epilogue_consts, quantize_weight, torch_reference
from unsparse_tvm.relay_passes import LayerNames
from unsparse_tvm.single_layer import LayerSpec, layer_module

OP = "sparse_conv2d_int8"


def int8_layer(case, seed=3):
    """(Relax module, input, pipeline kwargs making its conv int8, weight, bias, input range)."""
    n, c, h, w, k, r, s, stride, pad, dil, sp = case
    rng = np.random.default_rng(seed)
    weight = sparse_weight((k, c, r, s), sp, rng, empty_rows=k // 8, dense_rows=1 if sp < 0.99 else 0)
    bias = rng.standard_normal(k).astype(np.float32)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    spec = LayerSpec("conv2d", x.shape, weight, bias, True,
                     {"strides": list(stride), "padding": list(pad), "dilation": list(dil), "groups": 1})
    lo_hi = [float(x.min()), float(x.max())]
    kwargs = {"threshold": 0.0, "names": LayerNames({"conv.weight": weight}), "activations": {"conv": lo_hi}}
    return layer_module(spec), x, kwargs, weight, bias, lo_hi


def _schedule(mod, kwargs, dp4a: bool):
    from unsparse_tvm.schedules.sparse_conv2d_int8_cuda import Config
    from unsparse_tvm.testing.opencl import schedule_for_cuda

    report = []
    sched = schedule_for_cuda(mod, report=report, configs={OP: Config(dp4a=dp4a)}, **kwargs)
    assert report[0].format == "int8q4" and report[0].decision == "sparse"
    return sched


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:7])) + f"-s{c[7][0]}{c[7][1]}-p{c[10]}")
def test_int8_conv_cuda_schedule_on_pocl_is_exact(case):
    from unsparse_tvm.testing.opencl import OpenCLModule, PoCL

    mod, x, kwargs, weight, bias, lo_hi = int8_layer(case)
    y = OpenCLModule(_schedule(mod, kwargs, dp4a=False), PoCL())(x)
    y = y if isinstance(y, np.ndarray) else y.numpy()
    _, _, _, _, _, _, _, stride, pad, dil, _ = case
    act = ActQuant.from_range(*lo_hi, 255)  # CUDA: all 8 bits
    wq, wscale = quantize_weight(weight)
    ref = torch_reference(x, wq, wscale, act, bias, None, True, stride, pad, dil).numpy()
    _, out_scale = epilogue_consts(wq, wscale, act)
    assert not np.isnan(y).any()
    assert (np.abs(y - ref) <= QUANTUM_SHARE * out_scale.reshape(1, -1, 1, 1)).all(), float(np.abs(y - ref).max())


@needs_nvcc
def test_int8_conv_cuda_uses_dp4a_and_compiles(cuda):
    from unsparse_tvm.ops.names import op_of
    from unsparse_tvm.testing.cuda_limits import module_cuda_limits
    from unsparse_tvm.testing.opencl import device_source, lower

    mod, _, kwargs, *_ = int8_layer(CASES[1])
    sched = _schedule(mod, kwargs, dp4a=True)
    (func,) = [f for _, f in sched.functions_items() if op_of(f) == OP]
    source = device_source(lower(func, cuda)[1], cuda)
    assert "__dp4a((*(uint *)" in source  # unsigned input bytes, signed weight bytes
    for use in module_cuda_limits(sched, cuda, registers=True):  # nvcc compiles it; limits hold
        assert not use.problems, use


def test_smallcnn_int8_cuda_on_pocl_matches_the_integer_reference():
    """Whole network on the CUDA pipeline (OpenCL twin): uint8 between convs, through a max pool."""
    import torch
    import torch.nn as nn

    from test_int8 import _int8_reference
    from unsparse_tvm.compress.calibrate import calibrate, calibration_batches
    from unsparse_tvm.frontend import import_program
    from unsparse_tvm.models import build_model, export_program
    from unsparse_tvm.schedules.sparse_conv2d_int8_cuda import Config
    from unsparse_tvm.testing.opencl import OpenCLModule, PoCL, schedule_for_cuda

    torch.manual_seed(0)
    model = build_model("smallcnn")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight[torch.rand_like(m.weight) < 0.8] = 0
    ranges = {k: v for k, v in calibrate(model, calibration_batches((2, 1, 8, 8), None, 2, 16))["layers"].items()
              if k.startswith("features")}  # linear layers stay fp32 on CUDA
    mod, names = import_program(export_program(model, (2, 1, 8, 8)))
    report = []
    sched = schedule_for_cuda(mod, threshold=0.5, names=names, report=report, activations=ranges,
                              configs={OP: Config(dp4a=False)})
    assert [r.fused for r in report if r.format == "int8q4"] == ["bias+relu+requant", "bias+relu+requant", "bias+relu"]
    x = torch.randn(2, 1, 8, 8)
    y = OpenCLModule(sched, PoCL())(x.numpy())
    y = y if isinstance(y, np.ndarray) else (y[0] if isinstance(y, (list, tuple)) else y.numpy())
    ref = _int8_reference(model, ranges, 255)(x).detach().numpy()
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()
