"""The public Python API (unsparse_tvm.compile / load / prune / quantize / CompiledModel): what a script
gets without touching an internal module."""

from __future__ import annotations

import ast
import glob
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import unsparse_tvm
from unsparse_tvm import CompileOptions, UnsparseError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


@pytest.fixture(scope="module")
def compiled():
    net = unsparse_tvm.prune(_net(), 0.9)
    x = torch.randn(2, 3, 16, 16)
    return net, x, unsparse_tvm.compile(net, example_input=x)


def test_compile_a_module_and_call_it_like_the_module(compiled):
    net, x, model = compiled
    with torch.no_grad():
        ref = net(x)
    y = model(x)
    assert isinstance(y, torch.Tensor) and y.shape == ref.shape
    assert float((y - ref).abs().max() / ref.abs().max()) < 1e-5
    y_np = model(x.numpy())  # numpy in, numpy out
    assert isinstance(y_np, np.ndarray) and np.allclose(y_np, y.numpy())
    assert [r["decision"] for r in model.report] == ["sparse"] * 3  # pruned to 90%: every layer pays sparse
    assert model.inputs == [{"name": "x", "shape": [2, 3, 16, 16], "dtype": "float32"}]
    assert model.outputs[0]["shape"] == [2, 10]
    t = model.benchmark(number=2, repeat=3)
    assert 0 < t["min_ms"] <= t["median_ms"] <= t["max_ms"]


def test_every_kind_of_input_array_gives_the_same_answer_and_outputs_are_the_callers(compiled):
    """The call path takes the caller's memory where it can (DLPack) and copies where it cannot; both must
    agree, the outputs must be arrays of the caller's own (not TVM's memory a later call or a constant
    could change), and the NaN/Inf check must not refuse large finite values."""
    net, x, model = compiled
    ref = model(x.numpy())
    base = np.empty(x.numel() + 1, np.float32)  # one float in: not 64-byte aligned
    unaligned = base[1:].reshape(tuple(x.shape))
    unaligned[...] = x.numpy()
    strided = np.asfortranarray(x.numpy())  # not C-contiguous
    readonly = x.numpy().copy()
    readonly.flags.writeable = False
    for arr in (unaligned, strided, readonly):
        assert np.array_equal(model(arr), ref)
    assert torch.equal(model(x.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)), torch.from_numpy(ref))
    first = model(x.numpy())
    first += 1.0  # the caller's array: changing it changes nothing the module keeps
    assert np.array_equal(model(x.numpy()), ref)
    kept = first.copy()
    other = model(np.random.default_rng(1).standard_normal(x.shape).astype(np.float32))
    assert not np.array_equal(other, ref) and np.array_equal(first, kept)  # a later call leaves it alone
    huge = np.full(x.shape, 3e38, np.float32)  # finite, but their float32 sum overflows
    model(huge)  # what the module makes of them may overflow; the call must not refuse them
    bad = x.numpy().copy()
    bad[0, 0, 0, 0] = np.inf
    with pytest.raises(UnsparseError, match="1 NaN/Inf value;"):
        model(bad)
    for other in (torch.bfloat16, torch.float16, torch.float64, torch.int64):  # bfloat16: numpy has none
        with pytest.raises(UnsparseError, match=rf"input dtype is {other}, the module expects float32 \(convert "
                                                r"with x.to\(torch.float32\)\)"):
            model(x.to(other))
    with pytest.raises(UnsparseError, match="input dtype is float64"):
        model(x.numpy().astype(np.float64))


def test_save_then_load_runs_with_the_runtime_only(compiled, tmp_path):
    _, x, model = compiled
    path = model.save(str(tmp_path / "m.so"))
    with pytest.raises(UnsparseError, match="exists; pass --force"):
        model.save(path)
    np.save(tmp_path / "x.npy", x.numpy())
    code = ("import sys, numpy as np, unsparse_tvm; m = unsparse_tvm.load(sys.argv[1]); "
            "np.save(sys.argv[3], m(np.load(sys.argv[2]))); assert 'torch' not in sys.modules or "
            "sys.modules['torch'] is None, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code, path, tmp_path / "x.npy", tmp_path / "y.npy"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert np.allclose(np.load(tmp_path / "y.npy"), model(x.numpy()), rtol=1e-6, atol=1e-6)
    loaded = unsparse_tvm.load(path)
    assert loaded.report == model.report and loaded.inputs == model.inputs
    loaded.save(str(tmp_path / "copy.so"))
    assert np.array_equal(unsparse_tvm.load(str(tmp_path / "copy.so"))(x.numpy()), loaded(x.numpy()))


def test_a_builtin_name_a_pt2_and_an_exported_program_compile_alike(tmp_path):
    from unsparse_tvm.models import example_input

    ep = torch.export.export(unsparse_tvm.prune(_net(), 0.8), (torch.randn(1, 3, 16, 16),))
    torch.export.save(ep, tmp_path / "n.pt2")
    x = example_input((1, 3, 16, 16)).numpy()
    a = unsparse_tvm.compile(ep)(x)
    b = unsparse_tvm.compile(str(tmp_path / "n.pt2"), options=CompileOptions(threshold=0.5))(x)
    assert np.allclose(a, b, rtol=1e-5, atol=1e-6)
    small = unsparse_tvm.compile("smallcnn", batch=3)
    assert small.inputs[0]["shape"] == [3, 1, 8, 8]


def test_quantize_with_int8_activations_reaches_compile():
    net = unsparse_tvm.prune(_net(), 0.75, method="channel4")
    x = torch.randn(2, 3, 16, 16)
    unsparse_tvm.quantize(net, "int8", activations="int8", calibration_data="random", example_input=x)
    assert net.unsparse_quant["scheme"] == "int8" and net.unsparse_quant["activations"]["layers"]
    model = unsparse_tvm.compile(net, example_input=x)
    assert any(r["format"].startswith("int8") for r in model.report), model.report
    with torch.no_grad():
        ref = net(x)
    assert float((model(x) - ref).abs().max() / ref.abs().max()) < 0.1  # int8 activations: quantisation error


@pytest.mark.parametrize("call, message", [
    (lambda: unsparse_tvm.compile(_net()), "needs example_input"),
    (lambda: unsparse_tvm.compile(42), "not int"),
    (lambda: unsparse_tvm.compile("smallcnn", options=CompileOptions(), threshold=0.5), "not both"),
    (lambda: CompileOptions(threshold=1.5), r"threshold must be in \[0, 1\]"),
    (lambda: CompileOptions(batch=0), "batch must be"),
    (lambda: unsparse_tvm.compile("no_such_model"), "unknown model"),
    (lambda: unsparse_tvm.compile("smallcnn", target="tpu"), "unknown target"),
    (lambda: unsparse_tvm.prune(_net(), 0.9, method="diagonal"), "diagonal"),
    (lambda: unsparse_tvm.prune(_net(), 0.9, colour="red"), "colour"),
    (lambda: unsparse_tvm.quantize(_net(), "int3x"), "unknown quantisation scheme"),
    (lambda: unsparse_tvm.quantize(_net(), "int8", activations="int8"), "needs calibration_data"),
    (lambda: unsparse_tvm.load("missing.so"), "no such file"),
])
def test_bad_calls_raise_one_unsparse_error(call, message):
    with pytest.raises(UnsparseError, match=message):
        call()


def test_import_is_light_and_the_names_are_public():
    code = "import sys, unsparse_tvm; print('torch' in sys.modules, 'tvm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout.split()
    assert out == ["False", "False"]
    assert {"compile", "load", "prune", "quantize", "tune", "calibrate", "CompiledModel"} <= set(unsparse_tvm.__all__)
    with pytest.raises(AttributeError):
        unsparse_tvm.no_such_name


def test_examples_use_only_the_public_api():
    """examples/*.py import `unsparse_tvm` (and torch, numpy, the standard library), never a submodule."""
    offenders = []
    for path in sorted(glob.glob(os.path.join(ROOT, "examples", "*.py"))):
        for node in ast.walk(ast.parse(open(path).read())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{os.path.basename(path)}: {n}" for n in names if n.startswith("unsparse_tvm.")]
    assert not offenders, offenders
