"""unsparse_tvm.reference, the TVM-free definitions the project and the GPU kit share: the error measure,
magnitude pruning, batch-norm folding and operand packing agree with PyTorch and with the compiler."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as tprune

from unsparse_tvm import reference
from unsparse_tvm.ops.formats import compact_offsets, conv_weight_rows
from unsparse_tvm.ops.geometry import ConvGeometry


def test_rel_error_is_max_abs_difference_over_max_abs_reference():
    ref = np.array([1.0, -4.0, 2.0], np.float32)
    assert reference.rel_error(ref, ref) == 0.0
    assert reference.rel_error(np.array([1.0, -4.0, 3.0]), ref) == pytest.approx(1.0 / 4.0)
    assert reference.rel_error(np.zeros(3), np.zeros(3)) == 0.0               # no division by zero
    assert reference.rel_error(np.full(3, 1e-6), np.zeros(3)) == pytest.approx(1e6)  # floor 1e-12
    assert reference.rel_error(np.array([1.0, np.nan, 2.0]), ref) == math.inf   # NaN fails every <= check
    assert reference.rel_error(np.array([np.inf, 0.0, 0.0]), ref) == math.inf


def test_rel_error_on_torch_tensors_matches_numpy():
    a, b = torch.randn(4, 5, generator=torch.Generator().manual_seed(0)), torch.randn(4, 5)
    assert reference.rel_error(a, b) == pytest.approx(reference.rel_error(a.numpy(), b.numpy()), rel=1e-12)
    assert reference.rel_error(a, b.numpy()) == pytest.approx(reference.rel_error(a.numpy(), b.numpy()), rel=1e-12)
    assert reference.rel_error(torch.full((2,), float("nan")), b[0, :2]) == math.inf


def test_usable_cores_is_this_process_affinity():
    expect = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert reference.usable_cores() == expect >= 1


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))


def test_magnitude_prune_equals_torch_l1_unstructured_per_layer():
    ours, theirs = _net(), _net()
    reference.magnitude_prune(ours, 0.7)
    for m in theirs.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            tprune.l1_unstructured(m, "weight", amount=0.7)
            tprune.remove(m, "weight")
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, b), name
    assert [n for n, _, _ in reference.prunable_layers(ours)] == ["0.weight", "4.weight"]
    assert float((ours[0].weight == 0).float().mean()) == pytest.approx(0.7, abs=1 / ours[0].weight.numel())


@pytest.mark.parametrize("bias", [False, True])
def test_batchnorm_folding_matches_pytorch_conv_then_bn(bias):
    torch.manual_seed(1)
    conv, bn = nn.Conv2d(4, 6, 3, padding=1, bias=bias), nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2), bn.bias.uniform_(-1, 1)
        conv.weight[conv.weight.abs() < 0.1] = 0  # pruned zeros stay zero
    conv.eval(), bn.eval()
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        expect = bn(conv(x)).numpy()
    w, b = reference.folded_weights(conv, bn)
    assert w.dtype == np.float32 and b.dtype == np.float32 and b.shape == (6,)
    assert np.array_equal(w == 0, conv.weight.detach().numpy() == 0)
    got = torch.nn.functional.conv2d(x, torch.from_numpy(w), torch.from_numpy(b), padding=1).numpy()
    assert reference.rel_error(got, expect) < 1e-6


def test_pack_layer_is_the_compilers_rows_with_compact_offsets():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    w[rng.random(w.shape) < 0.8] = 0
    attrs = {"strides": [1, 1], "padding": [1, 1, 1, 1], "dilation": [1, 1]}
    fmt, arrays = reference.pack_layer("conv2d", w, [1, 4, 10, 10], attrs)
    rows = conv_weight_rows(w, ConvGeometry(1, 4, 10, 10, 8, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)))
    assert fmt == rows.fmt and list(arrays)[:2] == ["data", "off"]
    assert np.array_equal(arrays["data"], rows.data)
    assert arrays["off"].dtype == np.uint16 and np.array_equal(arrays["off"], compact_offsets(rows.off))


def test_the_gpu_kit_ships_this_module_with_what_it_imports_and_refuses_tvm(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    from gpu_kit_build import scaffold

    shipped = scaffold.kitlib_sources()
    assert set(shipped) == {"reference.py", "models.py", "errors.py", os.path.join("ops", "formats.py"),
                            os.path.join("ops", "geometry.py")}
    assert shipped["reference.py"] == open(reference.__file__).read()  # copied as is: one definition
    monkeypatch.setattr(scaffold, "KITLIB_MODULES", (*scaffold.KITLIB_MODULES, "parallel_build"))
    with pytest.raises(SystemExit, match="parallel_build.py imports tvm"):
        scaffold.kitlib_sources()
