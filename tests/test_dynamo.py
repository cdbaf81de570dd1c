"""`torch.compile(model, backend="unsparse")`: the one line a PyTorch user tries first. Registered by the
`torch_dynamo_backends` entry point; each captured graph compiled by unsparse_tvm.compile; what it cannot
take runs eagerly with one warning naming the reason."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as tprune

from unsparse_tvm.dynamo import UnsparseFallback


def _compiled(model, x, **options):
    """(output of torch.compile(model, backend="unsparse"), the UnsparseFallback warnings it gave)."""
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            y = torch.compile(model, backend="unsparse", options={"calibrate": False, **options})(x)
    return y, [str(w.message) for w in caught if issubclass(w.category, UnsparseFallback)]


def _prune(model: nn.Module, amount: float = 0.9) -> nn.Module:
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            tprune.l1_unstructured(m, "weight", amount=amount)
            tprune.remove(m, "weight")
    return model.eval()


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def test_the_backend_is_registered_by_name():
    from torch._dynamo.backends.registry import lookup_backend

    from unsparse_tvm.dynamo import backend

    assert lookup_backend("unsparse") is backend


@pytest.mark.parametrize("name", ["smallcnn", "vgg16-cifar", "resnet18"])  # all: benchmarks/door_matrix.py
def test_builtin_models_match_eager(name):
    from unsparse_tvm.models import BUILTIN_MODELS, build_model

    model = _prune(build_model(name))
    x = torch.randn(1, *BUILTIN_MODELS[name].input_shape, generator=torch.Generator().manual_seed(3))
    y, fallbacks = _compiled(model, x)
    assert not fallbacks
    with torch.no_grad():
        assert _rel(y, model(x)) < 1e-4


def test_a_torchvision_architecture_matches_eager():
    """One of the eight (depthwise, SE, hardswish); all of them: benchmarks/door_matrix.py."""
    from unsparse_tvm.models import build_model

    model = _prune(build_model("tv:mobilenet_v3_small@64"))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    y, fallbacks = _compiled(model, x)
    assert not fallbacks, fallbacks
    with torch.no_grad():
        assert _rel(y, model(x)) < 1e-4


def test_the_door_matrix_checks_a_model(tmp_path):
    """benchmarks/door_matrix.py (the whole matrix, run outside CI) on one small model: it cannot rot."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    from door_matrix import check_model

    row = check_model("smallcnn", str(tmp_path))
    assert row["ok"], row


class _Breaks(nn.Module):
    """Two convs with a graph break between them."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        torch._dynamo.graph_break()
        return self.b(y)


def test_a_graph_break_compiles_each_piece():
    seen = []
    from unsparse_tvm import dynamo

    real = dynamo._compile

    def counting(gm, ex, options):
        seen.append(len([n for n in gm.graph.nodes if n.op == "placeholder"]))
        return real(gm, ex, options)

    dynamo._compile = counting
    try:
        model = _prune(_Breaks(), 0.8)
        x = torch.randn(1, 3, 8, 8)
        y, fallbacks = _compiled(model, x)
    finally:
        dynamo._compile = real
    assert len(seen) >= 2 and not fallbacks
    with torch.no_grad():
        assert _rel(y, model(x)) < 1e-4


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x, z):
        return self.conv(x) + z


@pytest.mark.parametrize("case, reason", [
    ("training", "training mode (batch_norm): call model.eval() first"),
    ("two inputs", "2 tensor inputs"),
    ("float64", "float64"),
    ("bad option", "unknown option"),
])
def test_what_it_cannot_take_runs_eagerly_with_one_warning(case, reason):
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    x, options = torch.randn(1, 3, 8, 8), {}
    if case == "training":
        conv.train()
    elif case == "float64":
        conv, x = conv.double(), x.double()
    elif case == "bad option":
        options = {"colour": "red"}
    if case == "two inputs":
        model, z = _TwoInputs().eval(), torch.randn(1, 4, 6, 6)
        torch._dynamo.reset()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.no_grad():
                y = torch.compile(model, backend="unsparse")(x, z)
                ref = model(x, z)
        got = [str(w.message) for w in caught if issubclass(w.category, UnsparseFallback)]
    else:
        y, got = _compiled(conv, x, **options)
        with torch.no_grad():
            ref = conv(x)
    assert len(got) == 1 and reason in got[0] and "runs eagerly" in got[0], got
    assert torch.allclose(y, ref)


@pytest.mark.parametrize("drop", [True, False])  # False: the negative control, Dynamo's own guards
def test_weight_guards_are_dropped_but_mode_and_input_guards_stay(drop, monkeypatch):
    from unsparse_tvm import dynamo

    if not drop:
        monkeypatch.setattr(dynamo, "_drop_weight_guards", lambda: 0)
    model = _prune(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)))
    entries = []

    def spy(found):  # sees the guards Dynamo is about to install, after the backend ran
        entries.extend(found)
        return [True] * len(found)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="unsparse", dynamic=False,
                             options={"calibrate": False, "guard_filter_fn": spy})
    x, x2 = torch.randn(1, 3, 8, 8), torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        y, y2 = compiled(x), compiled(x2)  # the input's own guard stays: a new shape compiles anew
        assert _rel(y, model(x)) < 1e-4 and _rel(y2, model(x2)) < 1e-4
    on_weights = [e for e in entries if e.orig_guard.source.is_unspecialized_nn_module()
                  and e.guard_type == "TENSOR_MATCH"]
    assert (not on_weights) if drop else len(on_weights) >= 8  # 2 convs weight + bias, BN weight, bias, mean, var
    assert any(e.guard_type == "TENSOR_MATCH" and not e.orig_guard.source.is_unspecialized_nn_module()
               for e in entries)
    model.train()  # the `training` attribute's guard stays: train mode recompiles, and falls back to eager
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            compiled(x)
    assert any("training mode" in str(w.message) for w in caught if issubclass(w.category, UnsparseFallback))


def _recompiles(fn):
    """(fn's result, how many UnsparseRecompile warnings it gave)."""
    from unsparse_tvm.dynamo import UnsparseRecompile

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            y = fn()
    return y, sum(issubclass(w.category, UnsparseRecompile) for w in caught)


def _small(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return _prune(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1)), 0.8)


def test_each_instance_and_each_weight_change_gets_its_own_compiled_graph():
    """Dynamo shares one graph between modules of the same class and structure (the weights are its arguments),
    but ours holds them as constants: another instance, a replaced weight or one written in place
    (load_state_dict) must not run the first instance's weights."""
    torch._dynamo.reset()
    a, b = _small(0), _small(1)
    x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(4))
    fa = torch.compile(a, backend="unsparse", options={"calibrate": False})
    fb = torch.compile(b, backend="unsparse", options={"calibrate": False})
    with torch.no_grad():
        ya, yb = a(x), b(x)
    assert _rel(ya, yb) > 0.1  # the two instances' outputs differ, so sharing would show
    got, n = _recompiles(lambda: (fa(x), fa(x)))
    assert n == 0 and all(_rel(g, ya) < 1e-4 for g in got)  # the same weights: no recompile
    got, n = _recompiles(lambda: fb(x))
    assert n == 1 and _rel(got, yb) < 1e-4
    got, n = _recompiles(lambda: fa(x))  # both sets stay compiled
    assert n == 0 and _rel(got, ya) < 1e-4
    a.load_state_dict(_small(2).state_dict())  # written in place: same tensors, new versions
    got, n = _recompiles(lambda: fa(x))
    with torch.no_grad():
        assert n == 1 and _rel(got, a(x)) < 1e-4 and _rel(got, ya) > 0.1
    a[2].weight = nn.Parameter(torch.zeros_like(a[2].weight))  # replaced
    got, n = _recompiles(lambda: fa(x))
    with torch.no_grad():
        assert n == 1 and _rel(got, a(x)) < 1e-4
