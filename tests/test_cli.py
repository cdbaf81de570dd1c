"""The command line end to end: prune -> compile -> run (runtime only, in a subprocess) -> inspect,
bench's JSON, and every user error as one clear line with a non-zero exit status."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, assert_proc_one_line_error, cli, copy_vgg16_cifar_flow
from unsparse_tvm.cli import main


@pytest.fixture(scope="module")
def flow(vgg16_cifar_flow, tmp_path_factory):
    """prune vgg16-cifar -> compile for llvm (both CLI processes), once per session (conftest's
    vgg16_cifar_flow, shared with test_quant_cli), copied into a folder of this module's own."""
    _, out = vgg16_cifar_flow
    assert "sparse" in out and "wrote" in out
    return copy_vgg16_cifar_flow(vgg16_cifar_flow, tmp_path_factory.mktemp("flow"))


def test_prune_compile_run_matches_torch_in_runtime_only_mode(flow):
    x = np.random.default_rng(3).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.save(flow / "x.npy", x)
    # run in a process that reports whether torch or the TVM compiler got imported
    code = (
        "import sys; from unsparse_tvm.cli import main; rc = main(sys.argv[1:]);"
        "import tvm; from tvm import base;"
        "print('TORCH', 'torch' in sys.modules and sys.modules['torch'] is not None);"
        "print('RUNTIME_ONLY', base._RUNTIME_ONLY); sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code, "run", str(flow / "v.so"), "--input", str(flow / "x.npy"),
                           "-o", str(flow / "y.npy")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "TORCH False" in proc.stdout and "RUNTIME_ONLY True" in proc.stdout
    y = np.load(flow / "y.npy")
    ep = torch.export.load(str(flow / "v.pt2"))
    with torch.no_grad():
        ref = ep.module()(torch.from_numpy(x)).numpy()
    assert np.abs(y - ref).max() / np.abs(ref).max() < 1e-4


def test_run_print_time_without_input_times_the_module(flow):
    out = cli("run", flow / "v.so", "--print-time", "--number", 2, "--repeat", 3).stdout
    assert "random normal [1, 3, 32, 32] float32" in out and "3 repeats x 2 calls" in out
    stats = {k: float(v) for k, v in re.findall(r"(mean|median|min|max) ([0-9.]+) ms", out)}
    assert set(stats) == {"mean", "median", "min", "max"}
    assert 0 < stats["min"] <= stats["median"] <= stats["max"]


def test_run_with_nothing_to_do_says_so(flow, capsys):
    assert_one_line_error(["run", flow / "v.so"], capsys, "nothing to do: give -o OUT.npy")


def test_inspect_pt2_and_so(flow):
    out = cli("inspect", flow / "v.pt2").stdout
    assert "features.0" in out and "0.9" in out
    out = cli("inspect", flow / "v.so").stdout
    assert "target:       llvm" in out and "[1, 3, 32, 32]" in out and "sparse layers: 15 of 15" in out


def test_bench_json_has_the_promised_keys(tmp_path):
    out = tmp_path / "b.json"
    cli("bench", "smallcnn", "--sparsity", 0.9, "--target", "llvm", "--repeat", 1, "--json", out)  # keys, not times
    r = json.loads(out.read_text())
    assert {"model", "target", "sparsity", "end_to_end", "layers"} <= set(r)
    assert set(r["end_to_end"]) >= {"unsparse_ms", "tvm_dense_ms", "torch_ms"}
    assert all(v > 0 for v in r["end_to_end"].values())
    assert len(r["layers"]) == 5
    for layer in r["layers"]:
        assert {"name", "shape", "sparsity", "format", "unsparse_ms", "torch_ms"} <= set(layer)
        assert layer["max_rel_error"] < 1e-4


def test_dense_model_compiles_with_a_note(tmp_path, capsys):
    assert main(["compile", "smallcnn", "--target", "llvm", "-o", str(tmp_path / "d.so")]) == 0
    out = capsys.readouterr().out
    assert "no layer is predicted faster sparse than dense" in out and os.path.exists(tmp_path / "d.so")
    assert main(["compile", "smallcnn", "--threshold", "0.7", "-o", str(tmp_path / "e.so")]) == 0
    assert "no layer reaches the sparsity threshold 0.7" in capsys.readouterr().out


@pytest.mark.parametrize("args,expect", [
    (["compile", "nosuchmodel.pt2", "-o", "{d}/a.so"], "no such file"),
    (["compile", "{d}/notes.txt", "-o", "{d}/a.so"], "not a .pt2 file"),
    (["compile", "{d}/unsup.pt2", "-o", "{d}/a.so"], "aten.special_i0, which unsparse-tvm does not verify"),
    (["compile", "smallcnn", "--target", "opencl", "-o", "{d}/a.so"], "unknown target 'opencl'"),
    (["compile", "smallcnn", "--target", "cuda", "--arch", "sm90", "-o", "{d}/a.so"], "unknown CUDA arch 'sm90'"),
    (["compile", "smallcnn", "--target", "llvm", "-o", "{d}/a.txt"], "must end in .so"),
    (["compile", "nomodel", "-o", "{d}/a.so"], "unknown model 'nomodel'"),
    (["inspect", "{d}/missing.so"], "no such file"),
    (["run", "{d}/notes.txt", "--input", "{d}/x.npy", "-o", "{d}/y.npy"], "not a module written by"),
])
def test_errors_are_one_clear_line(args, expect, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    np.save(tmp_path / "x.npy", np.zeros(3, np.float32))

    class Unsupported(torch.nn.Module):
        def forward(self, x):
            return torch.special.i0(x)

    torch.export.save(torch.export.export(Unsupported(), (torch.randn(2),)), str(tmp_path / "unsup.pt2"))
    assert_one_line_error([a.format(d=tmp_path) for a in args], capsys, expect)


@pytest.mark.parametrize("flag,value", [("--threshold", "1.5"), ("--threshold", "-0.1"), ("--sparsity", "2")])
def test_fractions_outside_0_1_are_rejected(flag, value, capsys):
    cmd = ["bench", "smallcnn", flag, value] if flag == "--sparsity" else ["compile", "smallcnn", flag, value, "-o", "x.so"]
    assert_one_line_error(cmd, capsys, "must be in [0, 0.99]" if flag == "--sparsity" else "must be in [0, 1]")


@pytest.mark.parametrize("arr,expect", [(np.zeros((1, 3, 30, 32), np.float32), "input shape is [1, 3, 30, 32]"),
                                        (np.zeros((1, 3, 32, 32), np.float64), "input dtype is float64")])
def test_wrong_input_at_run_time(flow, arr, expect, capsys, tmp_path):
    np.save(tmp_path / "bad.npy", arr)
    proc = cli("run", flow / "v.so", "--input", tmp_path / "bad.npy", "-o", tmp_path / "y.npy", check=False)
    assert_proc_one_line_error(proc, expect)


def test_existing_output_is_not_overwritten(flow, capsys):
    before = os.path.getmtime(flow / "v.so")
    assert_one_line_error(["compile", "smallcnn", "-o", flow / "v.so"], capsys, "exists; pass --force")
    assert os.path.getmtime(flow / "v.so") == before


@pytest.mark.parametrize("preset", [None, "1"])
def test_tvm_thread_pool_is_sized_to_the_cores_unless_the_user_chose(preset):
    """TVM's own default on x86 is half the hardware threads (one on a 2-vCPU machine, run by a worker the
    caller waits for: 2.4x slower end to end on mobilenet_v2); importing unsparse_tvm sizes the pool to the
    cores it may use, and leaves a TVM_NUM_THREADS the user set alone."""
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    if preset is not None:
        env["TVM_NUM_THREADS"] = preset
    code = "import unsparse_tvm, tvm; print(tvm.get_global_func('runtime.NumThreads')())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    expect = int(preset) if preset is not None else len(os.sched_getaffinity(0))
    assert int(out.stdout.strip()) == expect
