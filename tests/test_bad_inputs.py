"""Bad input, one test per way of getting it wrong: every bad input is one line on stderr and exit
status 2; outputs are checked before any work, written through a temp file and never left half-written;
nothing is silently lost or wrong."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import (assert_one_line_error, assert_proc_one_line_error, cli, needs_nvcc, run_layer,
                      sparse_weight)
from unsparse_tvm.cli import main


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """smallcnn compiled for llvm once (dense: fast), in a folder of its own."""
    d = tmp_path_factory.mktemp("small")
    assert main(["compile", "smallcnn", "-o", str(d / "s.so")]) == 0
    return d


class TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y, torch.relu(y).mean((2, 3))


def _save(module: nn.Module, path, example, dynamic_shapes=None) -> None:
    torch.manual_seed(0)
    ep = torch.export.export(module.eval(), (example,), dynamic_shapes=dynamic_shapes)
    torch.export.save(ep, str(path))


# ---- compile --target cuda without --arch ------------------------------------------------------------
@needs_nvcc
def test_compile_cuda_without_arch_succeeds_and_names_the_default(tmp_path, capsys):
    out = tmp_path / "c.so"
    assert main(["compile", "smallcnn", "--target", "cuda", "-o", str(out)]) == 0
    assert "(cuda sm_90," in capsys.readouterr().out and out.exists()


# ---- run's input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_input_is_refused(small, tmp_path, value):
    x = np.zeros((1, 1, 8, 8), np.float32)
    x[0, 0, 3, 3] = value
    np.save(tmp_path / "x.npy", x)
    proc = cli("run", small / "s.so", "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npy", check=False)
    assert_proc_one_line_error(proc, "NaN/Inf")
    assert not (tmp_path / "y.npy").exists()


# ---- models with several outputs ---------------------------------------------------------------------
def test_every_output_is_kept_and_recorded(tmp_path, capsys):
    _save(TwoOutputs(), tmp_path / "two.pt2", torch.randn(1, 1, 8, 8))
    assert main(["compile", str(tmp_path / "two.pt2"), "-o", str(tmp_path / "two.so")]) == 0
    from unsparse_tvm.runtime import read_metadata

    meta = read_metadata(str(tmp_path / "two.so"))
    assert [o["shape"] for o in meta["outputs"]] == [[1, 4, 8, 8], [1, 4]]
    x = np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    cli("run", tmp_path / "two.so", "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npz")
    got = np.load(tmp_path / "y.npz")
    ep = torch.export.load(str(tmp_path / "two.pt2"))
    with torch.no_grad():
        ref = [t.numpy() for t in ep.module()(torch.from_numpy(x))]
    assert sorted(got.files) == ["out0", "out1"]
    for name, r in zip(["out0", "out1"], ref):
        np.testing.assert_allclose(got[name], r, rtol=1e-4, atol=1e-5)
    proc = cli("run", tmp_path / "two.so", "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npy", check=False)
    assert_proc_one_line_error(proc, "2 outputs: use -o OUT.npz")
    assert "outputs:      out0 [1, 4, 8, 8] float32, out1 [1, 4] float32" in cli("inspect", tmp_path / "two.so").stdout


# ---- outputs: written through a temp file, never left half-written -----------------------------------
def test_interrupted_export_leaves_nothing(tmp_path, capsys, monkeypatch):
    import unsparse_tvm.build

    seen = {}

    def export_then_interrupt(executable, file_name, workspace):  # parallel_build.export_library's signature
        seen["workspace"] = workspace
        seen["tvm_tmp"] = tempfile.mkdtemp()  # where TVM's own helpers would put their temp files
        with open(file_name, "wb") as f:
            f.write(b"half a library")
        raise KeyboardInterrupt

    # the name build.export uses (TVM's export_library, or the one writing object files on every core)
    monkeypatch.setattr(unsparse_tvm.build, "export_library", export_then_interrupt)
    out = tmp_path / "out"
    out.mkdir()
    assert main(["compile", "smallcnn", "-o", str(out / "m.so")]) == 130
    assert os.listdir(out) == []  # no m.so, no m.so.tmpPID.so, no work folder
    assert seen["workspace"].startswith(str(out)) and not os.path.exists(seen["workspace"])
    assert seen["tvm_tmp"].startswith(str(out)) and not os.path.exists(seen["tvm_tmp"])


def test_sigterm_while_writing_removes_the_temp_files(tmp_path):
    code = ("import os, signal, sys, time, tempfile\n"
            "from unsparse_tvm.outputs import writing\n"
            "with writing(sys.argv[1]) as tmp:\n"
            "    open(tmp, 'w').write('partial'); tempfile.mkdtemp()\n"
            "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(30)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.so")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0 and "KeyboardInterrupt" in proc.stderr
    assert os.listdir(tmp_path) == []


def test_kill_9_while_writing_leaves_nothing(tmp_path):
    code = ("import os, signal, sys, tempfile\n"
            "from unsparse_tvm.outputs import writing\n"
            "with writing(sys.argv[1]) as tmp:\n"
            "    open(tmp, 'w').write('partial'); tempfile.mkdtemp()\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.so")], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    for _ in range(100):  # the guard process removes the work folder once the writer is gone
        if not os.listdir(tmp_path):
            break
        time.sleep(0.05)
    assert os.listdir(tmp_path) == []


def test_work_folder_of_a_killed_run_is_swept(small, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".m.so.unsparse-tmp{dead.pid}"
    (stale / "tvm").mkdir(parents=True)
    (stale / "m.so").write_bytes(b"x" * 1000)  # what kill -9 during export leaves
    assert main(["compile", "smallcnn", "-o", str(tmp_path / "m.so")]) == 0
    assert sorted(os.listdir(tmp_path)) == ["m.so"]


def test_output_naming_a_directory_is_refused_even_with_force(tmp_path, capsys):
    (tmp_path / "d.so").mkdir()
    assert_one_line_error(["compile", "smallcnn", "-o", tmp_path / "d.so", "--force"], capsys, "is a directory")
    assert os.listdir(tmp_path) == ["d.so"] and os.listdir(tmp_path / "d.so") == []


# ---- --arch checked against this machine's nvcc ------------------------------------------------------
@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_50", "sm_70", "sm_72", "sm_999"])
def test_arch_nvcc_rejects_is_refused_before_compiling(arch, tmp_path, capsys, monkeypatch):
    import unsparse_tvm.build as build

    monkeypatch.setattr(build, "compile_program", lambda *a, **k: pytest.fail("compiled before checking"))
    assert_one_line_error(["compile", "smallcnn", "--target", "cuda", "--arch", arch, "-o", tmp_path / "a.so"], capsys,
                          "not supported by this machine's nvcc")


# ---- dynamic batch -----------------------------------------------------------------------------------
def test_dynamic_batch_is_specialised_and_said(tmp_path, capsys):
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))
    _save(net, tmp_path / "dyn.pt2", torch.randn(2, 1, 8, 8), ({0: torch.export.Dim("batch")},))
    assert main(["inspect", str(tmp_path / "dyn.pt2")]) == 0
    assert "dynamic axes 0" in capsys.readouterr().out
    assert main(["compile", str(tmp_path / "dyn.pt2"), "-o", str(tmp_path / "d.so")]) == 0
    assert "dynamic input" in capsys.readouterr().out
    assert main(["compile", str(tmp_path / "dyn.pt2"), "--batch", "3", "-o", str(tmp_path / "d3.so")]) == 0
    from unsparse_tvm.runtime import read_metadata

    assert read_metadata(str(tmp_path / "d.so"))["inputs"][0]["shape"] == [2, 1, 8, 8]
    assert read_metadata(str(tmp_path / "d3.so"))["inputs"][0]["shape"] == [3, 1, 8, 8]


# ---- --batch -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("cmd", ["compile", "bench", "tune"])
@pytest.mark.parametrize("batch", ["0", "-2", "x"])
def test_bad_batch_is_one_line(cmd, batch, tmp_path, capsys):
    extra = {"compile": ["-o", tmp_path / "a.so"], "bench": [], "tune": ["--trials", "1", "--log-dir", tmp_path / "l"]}
    assert_one_line_error([cmd, "smallcnn", "--batch", batch, *extra[cmd]], capsys, "batch must be")


# ---- tuning logs -------------------------------------------------------------------------------------
def _mismatch(path: str, scale: float) -> None:
    """Point every record at the next workload (what a mismatched input log looks like), `scale` x the time."""
    from test_tuning import record_lines
    from unsparse_tvm.tuning.log import RECORD_FILE, read_log

    n = len(read_log(path).workloads)
    lines = []
    for line in record_lines(path):
        idx, (trace, secs, target, args) = json.loads(line)
        lines.append(json.dumps([(idx + 1) % n, [trace, [s * scale for s in secs], target, args]]))
    with open(os.path.join(path, RECORD_FILE), "w") as f:
        f.write("\n".join(lines) + "\n")


def test_merge_and_show_skip_records_that_do_not_fit_their_workload(tmp_path, capsys):
    from test_tuning import TINY_TRIALS, copy_log
    from unsparse_tvm.tuning.log import read_log

    good = copy_log(tmp_path, "good")
    bad = copy_log(tmp_path, "bad")
    _mismatch(bad, 0.5)  # "faster" but for the wrong workloads
    out = str(tmp_path / "merged")
    assert main(["logs", "merge", good, bad, "-o", out]) == 0
    cap = capsys.readouterr()
    assert f"{TINY_TRIALS} records skipped" in cap.err and len(cap.err.strip().splitlines()) == 1
    merged = read_log(out)
    assert sorted(r.seconds for r in merged.records) == pytest.approx(sorted(r.seconds for r in read_log(good).records))
    assert main(["logs", "show", bad]) == 0
    shown = capsys.readouterr().out
    assert "0 records" in shown.splitlines()[0] and "do not fit their workload" in shown


def test_merge_into_one_of_its_inputs_is_refused(tmp_path, capsys):
    from test_tuning import copy_log, record_lines

    a, b = copy_log(tmp_path, "a"), copy_log(tmp_path, "b")
    before = record_lines(a)
    assert_one_line_error(["logs", "merge", a, b, "-o", a, "--force"], capsys, "is one of the inputs")
    assert record_lines(a) == before


# ---- damaged modules ---------------------------------------------------------------------------------
def test_truncated_library_with_intact_trailer_is_refused(small, tmp_path, capsys):
    from unsparse_tvm.runtime import trailer_size

    data = (small / "s.so").read_bytes()
    trailer = trailer_size(str(small / "s.so"))
    body, tail = data[:-trailer], data[-trailer:]
    (tmp_path / "t.so").write_bytes(body[: len(body) // 2] + tail)
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 8, 8), np.float32))
    proc = cli("run", tmp_path / "t.so", "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npy", check=False)
    assert_proc_one_line_error(proc, "truncated or damaged")
    assert "model:        smallcnn" in cli("inspect", tmp_path / "t.so").stdout  # the metadata is still readable


# ---- stderr holds our line alone ---------------------------------------------------------------------
def test_stderr_holds_nothing_but_our_line(tmp_path):
    proc = cli("compile", "smallcnn", "-o", tmp_path / "a.so")
    assert proc.stderr == ""  # no FutureWarning from torch
    (tmp_path / "bad.pt2").write_bytes(b"not a zip")
    proc = cli("compile", tmp_path / "bad.pt2", "-o", tmp_path / "b.so", check=False)
    assert_proc_one_line_error(proc, "could not be read as a torch.export program")  # no logged torch traceback


# ---- output folders checked before any work ----------------------------------------------------------
@pytest.mark.parametrize("argv,patch", [
    (["compile", "smallcnn", "-o", "{d}/missing/a.so"], "unsparse_tvm.build.compile_program"),
    (["bench", "smallcnn", "--json", "{d}/missing/b.json"], "unsparse_tvm.bench.bench"),
    (["prune", "smallcnn", "--sparsity", "0.5", "-o", "{d}/missing/p.pt2"], "unsparse_tvm.compress.prune.load_model"),
    (["prune", "smallcnn", "--sparsity", "0.5", "-o", "{d}/p.pt2", "--report", "{d}/missing/r.json"],
     "unsparse_tvm.compress.prune.load_model"),
])
def test_missing_output_folder_is_found_before_any_work(argv, patch, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(patch, lambda *a, **k: pytest.fail("work started before the output was checked"))
    assert_one_line_error([a.format(d=tmp_path) for a in argv], capsys, "does not exist")


def test_run_into_a_missing_folder_is_one_line_before_running(small, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 8, 8), np.float32))
    proc = cli("run", small / "s.so", "--input", tmp_path / "x.npy", "-o", tmp_path / "missing" / "y.npy", check=False)
    assert_proc_one_line_error(proc, "does not exist")


# ---- tune and bench refuse what prune refuses --------------------------------------------------------
@pytest.mark.parametrize("cmd", ["bench", "tune"])
def test_bench_and_tune_refuse_sparsity_one_at_parse_time_like_prune(cmd, tmp_path, capsys):
    extra = ["--trials", "1", "--log-dir", str(tmp_path / "l")] if cmd == "tune" else []
    assert_one_line_error([cmd, "smallcnn", "--sparsity", "1.0", *extra], capsys, "must be in [0, 0.99]")


def test_failed_tune_leaves_no_log_directory(tmp_path, capsys):
    assert_one_line_error(["tune", str(tmp_path / "nosuch.pt2"), "--trials", "1", "--log-dir", tmp_path / "log"],
                          capsys, "no such file")
    assert not (tmp_path / "log").exists()


# ---- untrained built-in models -----------------------------------------------------------------------
def test_pruning_an_untrained_builtin_says_so_and_points_to_train(tmp_path, capsys):
    assert main(["prune", "smallcnn", "--sparsity", "0.5", "--dataset", "digits", "-o", str(tmp_path / "p.pt2")]) == 0
    out = capsys.readouterr().out
    accuracy = next(i for i, l in enumerate(out.splitlines()) if "accuracy on digits" in l)
    note = out.splitlines()[accuracy + 1]  # right under the accuracy line
    assert "untrained" in note and "unsparse-tvm train smallcnn --dataset digits" in note


# ---- float16 programs --------------------------------------------------------------------------------
def test_fp16_program_is_refused_up_front(tmp_path, capsys):
    _save(nn.Conv2d(1, 4, 3).half(), tmp_path / "h.pt2", torch.randn(1, 1, 8, 8).half())
    assert_one_line_error(["compile", tmp_path / "h.pt2", "-o", tmp_path / "h.so"], capsys, "uses float16")


# ---- the layer report --------------------------------------------------------------------------------
def test_report_shows_whole_names_and_distinct_reasons(llvm):
    from unsparse_tvm.single_layer import LayerSpec
    from unsparse_tvm.build import format_decisions
    from unsparse_tvm.relay_passes.layers import LayerDecision

    names = [f"features.denseblock4.denselayer{i}.conv2" for i in (14, 15, 16)]
    table = format_decisions([LayerDecision(n, "conv2d", [8, 8, 3, 3], 0.9, "sparse") for n in names], 0.7)
    assert all(f"{n} " in table for n in names)
    rng = np.random.default_rng(0)
    spec = LayerSpec("conv2d", (1, 8, 7, 7), sparse_weight((8, 4, 3, 3), 0.9, rng), None, False,
                     {"strides": [1, 1], "padding": [1, 1, 1, 1], "dilation": [1, 1], "groups": 2})
    _, report = run_layer(spec, llvm, threshold=0.5, x=rng.standard_normal((1, 8, 7, 7)).astype(np.float32))
    assert report[0].label == "dense (grouped conv, groups=2)"
    assert format_decisions(report, 0.5).splitlines()[1].split("  ")  # printed whole
    assert "dense (grouped conv, groups=2)" in format_decisions(report, 0.5)


def test_module_for_a_cpu_this_one_lacks_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    """A .so built for AVX-512 (UNSPARSE_MCPU=skylake-avx512), run on an AVX2-only CPU: one line naming the
    missing extensions and what to do, never SIGILL (tests/test_isa.py runs the same under qemu)."""
    from unsparse_tvm import hostcpu

    monkeypatch.setenv("UNSPARSE_MCPU", "skylake-avx512")
    assert main(["compile", "smallcnn", "-o", str(tmp_path / "s.so")]) == 0
    assert "avx512f" in json.dumps(__import__("unsparse_tvm.runtime").runtime.read_metadata(str(tmp_path / "s.so")))
    monkeypatch.setattr(hostcpu, "host_features", lambda: frozenset({"sse4.1", "sse4.2", "avx", "avx2", "fma", "f16c"}))
    capsys.readouterr()
    assert_one_line_error(["run", tmp_path / "s.so", "--print-time"], capsys,
                          "was compiled for CPU skylake-avx512, whose code needs avx512bw, avx512cd, avx512dq, avx512f")


# ---- operators we do not verify, input dtypes and batches a program cannot take ----------------------
def _argv(cmd: str, model, d) -> list:
    """A valid command line for `cmd` on `model` (outputs in d), but for the model itself."""
    return {"prune": ["prune", model, "--sparsity", "0.5", "-o", d / "p.pt2"],
            "quantize": ["quantize", model, "--scheme", "int8", "-o", d / "q.pt2"],
            "compile": ["compile", model, "-o", d / "c.so"],
            "bench": ["bench", model, "--no-layers", "--repeat", "1"],
            "tune": ["tune", model, "--trials", "1", "--log-dir", d / "log"],
            "inspect": ["inspect", model]}[cmd]


class LastStep(nn.Module):
    """A recurrent layer and a linear head on its last time step, as sequence classifiers are written."""

    def __init__(self, layer):
        super().__init__()
        self.rnn, self.head = layer(8, 16, batch_first=True), nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("layer,op", [(nn.LSTM, "aten.lstm (nn.LSTM)"), (nn.GRU, "aten.gru (nn.GRU)"),
                                      (nn.RNN, "aten.rnn_tanh (nn.RNN)")])
def test_recurrent_layers_are_refused_by_name(layer, op, tmp_path, capsys):
    _save(LastStep(layer), tmp_path / "r.pt2", torch.randn(1, 5, 8))
    assert_one_line_error(["compile", tmp_path / "r.pt2", "-o", tmp_path / "r.so"], capsys,
                          f"the model uses {op}, which unsparse-tvm does not verify")
    assert not (tmp_path / "r.so").exists()


@pytest.mark.parametrize("cmd", ["prune", "quantize", "compile", "bench", "tune", "inspect"])
def test_unverified_operator_is_refused_by_every_command(cmd, tmp_path, capsys):
    _save(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Tanh()), tmp_path / "t.pt2", torch.randn(1, 1, 8, 8))
    assert_one_line_error(_argv(cmd, tmp_path / "t.pt2", tmp_path), capsys, "the model uses aten.tanh, which")
    assert sorted(os.listdir(tmp_path)) == ["t.pt2"]


def test_negative_index_select_matches_pytorch(llvm):
    """x[:, -1] (a sequence classifier's last step) matches PyTorch: TVM writes it as take(x, -1), which
    unchecked reads memory before the tensor (a different garbage on every run)."""
    import tvm
    from tvm import relax

    from unsparse_tvm.build import compile_program

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(20, 10)

        def forward(self, x):
            return self.fc(x[:, -1]) + self.fc(x[:, -3])

    x = torch.randn(1, 7, 20)
    ep = torch.export.export(Head().eval(), (x,))
    vm = relax.VirtualMachine(compile_program(ep, llvm).executable, tvm.cpu())
    for _ in range(3):  # garbage differed between runs
        y = vm["main"](tvm.runtime.tensor(x.numpy()))
        np.testing.assert_allclose((y[0] if not hasattr(y, "numpy") else y).numpy(),
                                   ep.module()(x).detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_layer_matches_pytorch(norm_first, llvm):
    """The operators a transformer encoder layer adds to the verified list (attention, layer norm, select)."""
    import tvm
    from tvm import relax

    from unsparse_tvm.build import compile_program

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, norm_first=norm_first).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        ep = torch.export.export(layer, (x,))
        ref = layer(x).numpy()
    y = relax.VirtualMachine(compile_program(ep, llvm).executable, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))
    np.testing.assert_allclose((y[0] if not hasattr(y, "numpy") else y).numpy(), ref, rtol=1e-4, atol=1e-5)


def test_softmax_head_matches_pytorch(llvm):
    """A classifier ending in softmax (the one operator on the verified list for its decomposition alone)."""
    import tvm
    from tvm import relax

    from unsparse_tvm.build import compile_program
    from unsparse_tvm.operators import unverified_operators

    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10), nn.Softmax(dim=1)).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        ep = torch.export.export(net, (x,))
        ref = net(x).numpy()
    assert "aten.softmax.int" in {str(n.target) for n in ep.graph.nodes} and not unverified_operators(ep)
    y = relax.VirtualMachine(compile_program(ep, llvm).executable, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))
    np.testing.assert_allclose((y[0] if not hasattr(y, "numpy") else y).numpy(), ref, rtol=1e-5, atol=1e-7)


class Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(10, 4), nn.Linear(4, 2)

    def forward(self, ids):
        return self.fc(self.emb(ids))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
@pytest.mark.parametrize("cmd", ["prune", "quantize", "compile", "bench", "tune", "inspect"])
def test_integer_input_is_refused_by_every_command(cmd, dtype, tmp_path, capsys):
    if dtype in (torch.int64, torch.int32):
        _save(Embed(), tmp_path / "i.pt2", torch.zeros(1, 5, dtype=dtype))
    else:  # an image as bytes, or a mask, converted inside the model
        _save(_Cast(), tmp_path / "i.pt2", torch.zeros(1, 64, dtype=dtype))
    name = str(dtype).removeprefix("torch.")
    assert_one_line_error(_argv(cmd, tmp_path / "i.pt2", tmp_path), capsys, f"input ids is {name}" if
                          dtype in (torch.int64, torch.int32) else f"input x is {name}")
    assert sorted(os.listdir(tmp_path)) == ["i.pt2"]


class _Cast(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 2)

    def forward(self, x):
        return self.fc(x.float())


def test_batch_a_program_cannot_take_is_refused(tmp_path, capsys):
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))
    _save(net, tmp_path / "static.pt2", torch.randn(2, 1, 8, 8))
    _save(net, tmp_path / "upto64.pt2", torch.randn(2, 1, 8, 8), ({0: torch.export.Dim("batch", max=64)},))
    assert_one_line_error(["compile", tmp_path / "static.pt2", "--batch", "4", "-o", tmp_path / "a.so"], capsys,
                          "was exported with a static batch of 2")
    assert_one_line_error(["compile", tmp_path / "upto64.pt2", "--batch", "100", "-o", tmp_path / "a.so"], capsys,
                          "outside the batch range")
    assert not (tmp_path / "a.so").exists()


def test_module_damaged_in_the_middle_is_refused_by_its_checksum(small, tmp_path, capsys):
    data = bytearray((small / "s.so").read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4000] = os.urandom(4000)
    (tmp_path / "d.so").write_bytes(bytes(data))
    assert_one_line_error(["run", tmp_path / "d.so", "--print-time"], capsys, "checksum mismatch")
    assert main(["inspect", str(tmp_path / "d.so")]) == 0
    assert "library:      DAMAGED" in capsys.readouterr().out
    assert main(["inspect", str(small / "s.so")]) == 0
    assert "library:      whole, checksum matches" in capsys.readouterr().out


@pytest.mark.parametrize("cut", [100, 20, 1])
def test_module_cut_short_says_truncated(small, tmp_path, capsys, cut):
    data = (small / "s.so").read_bytes()
    (tmp_path / "t.so").write_bytes(data[:-cut])
    for argv in (["run", tmp_path / "t.so", "--print-time"], ["inspect", tmp_path / "t.so"]):
        assert_one_line_error(argv, capsys, "is truncated")


@pytest.mark.parametrize("trailer", [b'{"model": 1}', b"\xff\xfe not utf-8", b"[1, 2]", b'{"model": "m", "target": "llvm"'])
def test_module_with_damaged_metadata_is_one_line(small, tmp_path, capsys, trailer):
    from unsparse_tvm.module_file import _MAGIC, trailer_size

    data = (small / "s.so").read_bytes()
    body = data[:-trailer_size(str(small / "s.so"))]
    (tmp_path / "m.so").write_bytes(body + _MAGIC + trailer + len(trailer).to_bytes(8, "little") + _MAGIC)
    for argv in (["run", tmp_path / "m.so", "--print-time"], ["inspect", tmp_path / "m.so"]):
        assert_one_line_error(argv, capsys, "damaged metadata" if trailer.startswith(b"{\"model\": 1") or
                              trailer.startswith(b"[") else "damaged metadata trailer")


@pytest.mark.parametrize("cmd", ["run", "inspect"])
def test_directory_or_empty_file_is_one_line(cmd, tmp_path, capsys):
    (tmp_path / "d.so").mkdir()
    (tmp_path / "empty.so").write_bytes(b"")
    extra = ["--print-time"] if cmd == "run" else []
    assert_one_line_error([cmd, tmp_path / "d.so", *extra], capsys, "is a directory")
    assert_one_line_error([cmd, tmp_path, *extra], capsys, "is a directory")
    assert_one_line_error([cmd, tmp_path / "empty.so", *extra], capsys, "is empty")


def test_module_records_the_threshold_it_was_compiled_with(tmp_path, llvm):
    """The metadata says how the layers were chosen: by predicted time (no threshold) or by the threshold
    given, never a threshold that was not used (as examples/compile_and_run.py's module could say)."""
    from conftest import pruned_program
    from unsparse_tvm.build import compile_program, write_module
    from unsparse_tvm.runtime import describe_module

    ep = pruned_program("smallcnn")
    for threshold, said in ((None, "chosen by predicted time"), (0.7, "threshold 0.7")):
        path = str(tmp_path / f"m{threshold}.so")
        meta = write_module(compile_program(ep, llvm, threshold=threshold), path, model="smallcnn")
        assert meta["threshold"] == threshold and said in describe_module(path)


@needs_nvcc
def test_arch_specific_cuda_module_lists_each_image_once(tmp_path, capsys):
    assert main(["compile", "smallcnn", "--target", "cuda", "--arch", "sm_90a", "-o", str(tmp_path / "a.so")]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "a.so")]) == 0
    found = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("device code:"))
    images = found.split("found in file: ")[1].split(", ")
    assert len(images) == len(set(images)) and "cubin sm_90a" in images and "ptx compute_90a" in images, found


@pytest.mark.parametrize("argv,patch", [
    (["compile", "smallcnn", "-o", "{bad}/a.so"], "unsparse_tvm.build.compile_program"),
    (["prune", "smallcnn", "--sparsity", "0.5", "-o", "{bad}/p.pt2"], "unsparse_tvm.compress.prune.load_model"),
    (["bench", "smallcnn", "--json", "{bad}/b.json"], "unsparse_tvm.bench.bench"),
    (["run", "{so}", "--print-time", "-o", "{bad}/y.npy"], "unsparse_tvm.runtime.load"),
])
@pytest.mark.parametrize("bad", ["/proc", "/sys", "{d}/file.txt"])
def test_unwritable_output_folder_is_found_before_any_work(argv, patch, bad, small, tmp_path, capsys, monkeypatch):
    """Root passes every permission check (os.access): the folder is probed by writing to it."""
    (tmp_path / "file.txt").write_text("a file, not a folder")
    monkeypatch.setattr(patch, lambda *a, **k: pytest.fail("work started before the output was checked"))
    bad = bad.format(d=tmp_path)
    assert_one_line_error([a.format(bad=bad, so=small / "s.so") for a in argv], capsys,
                          "is a file, not a folder" if bad.endswith("file.txt") else "is not writable")


def test_bench_json_must_end_in_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("unsparse_tvm.bench.bench", lambda *a, **k: pytest.fail("timed before the output was checked"))
    assert_one_line_error(["bench", "smallcnn", "--json", tmp_path / "out.txt"], capsys, "must end in .json")


@pytest.mark.parametrize("argv,expect", [
    (["bench", "smallcnn", "--repeat", "0"], "--repeat must be at least 1"),
    (["run", "m.so", "--print-time", "--repeat", "0"], "--repeat must be at least 1"),
    (["run", "m.so", "--print-time", "--number", "-1"], "--number must be at least 1"),
    (["train", "smallcnn", "--dataset", "digits", "--epochs", "1", "--lr", "-1", "-o", "t.pt2"], "--lr must be a positive"),
    (["train", "smallcnn", "--dataset", "digits", "--epochs", "1", "--lr", "nan", "-o", "t.pt2"], "--lr must be a positive"),
    (["train", "smallcnn", "--dataset", "digits", "--epochs", "1", "--batch-size", "0", "-o", "t.pt2"],
     "--batch-size must be at least 1"),
    (["prune", "smallcnn", "--sparsity", "0.5", "--seed", "-1", "-o", "p.pt2"], "--seed must be at least 0"),
    (["train", "smallcnn", "--dataset", "digits", "--epochs", "1", "--batch-size", "99999999999999999999", "-o", "t.pt2"],
     "--batch-size must be at most 2147483647"),  # not islice's ValueError and a traceback
])
def test_counts_and_rates_out_of_range_are_refused_at_parse_time(argv, expect, capsys):
    assert_one_line_error(argv, capsys, expect)


def test_batch_too_big_for_memory_is_one_line(tmp_path, capsys):
    start = time.perf_counter()
    assert_one_line_error(["compile", "smallcnn", "--batch", "1000000000", "-o", tmp_path / "a.so"], capsys,
                          "more than this machine's")
    assert time.perf_counter() - start < 30 and not (tmp_path / "a.so").exists()


def _reader_gone(*args) -> subprocess.CompletedProcess:
    """`unsparse-tvm ARGS | head -0`: the reading end of stdout is closed before the command writes."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([sys.executable, "-m", "unsparse_tvm.cli", *map(str, args)], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write)


def test_closed_pipe_ends_quietly(small, tmp_path):
    from test_tuning import copy_log

    for args in (["inspect", small / "s.so"], ["logs", "show", copy_log(tmp_path)]):
        proc = _reader_gone(*args)
        assert proc.returncode == 141 and proc.stderr == "", (args, proc.stderr)


def test_int8_layers_show_their_precision_and_bytes(tmp_path, capsys):
    from unsparse_tvm.runtime import read_metadata

    assert main(["quantize", "smallcnn", "--activations", "int8", "--dataset", "random", "-o", str(tmp_path / "q.pt2")]) == 0
    assert main(["compile", str(tmp_path / "q.pt2"), "-o", str(tmp_path / "q.so")]) == 0
    int8 = [l for l in read_metadata(str(tmp_path / "q.so"))["layers"] if l["format"] in ("int8q4", "int8g4")]
    kinds = ("int8/16-bit off", "int8/32-bit off")  # conv offsets as uint16 where a layer's fit
    assert int8 and all(l["precision"] in kinds and l["weight_bytes"] > 0 for l in int8)
    assert all(l["precision"] == "int8/16-bit off" for l in int8 if l["op"] == "conv2d")
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "q.so")]) == 0
    out = capsys.readouterr().out
    assert sum(out.count(f"[{k}, ") for k in kinds) == len(int8) and "[fp32, 0 B]" not in out
    stored = next(l for l in out.splitlines() if l.startswith("weights:"))
    assert not stored.startswith("weights:      0.00 MB"), stored


@pytest.mark.parametrize("log_name", ["log", "my logs"])
def test_tune_hint_compiles_the_program_that_was_tuned(log_name, tmp_path, capsys, monkeypatch):
    """tiny_log() tuned smallcnn pruned to 0.9; the hint `tune smallcnn --sparsity 0.9` prints must apply
    its records (not compile the unpruned model, 0 of 3 layers from the log)."""
    import shlex

    from test_tuning import TINY_TRIALS, copy_log
    from unsparse_tvm.tuning.command import TuneRequest, compile_hint

    log = copy_log(tmp_path, log_name)
    monkeypatch.chdir(tmp_path)
    hint = compile_hint(TuneRequest("smallcnn", TINY_TRIALS, log, sparsity=0.9))
    for step in hint.split(" && "):
        argv = shlex.split(step)
        assert argv[0] == "unsparse-tvm" and main(argv[1:]) == 0, step
    assert f"{TINY_TRIALS} of 5 tunable layers" in capsys.readouterr().out and (tmp_path / "model.so").exists()


def test_tune_of_an_int8_model_says_int8_kernels_are_not_tuned(tmp_path, capsys, monkeypatch):
    import unsparse_tvm.tuning.command as command

    assert main(["quantize", "smallcnn", "--activations", "int8", "--dataset", "random", "-o", str(tmp_path / "q.pt2")]) == 0
    capsys.readouterr()

    def stop(*a, **k):
        raise command.UnsparseError("stopped after the notes")

    monkeypatch.setattr(command, "load_model_program", stop)
    rc = main(["tune", str(tmp_path / "q.pt2"), "--trials", "1", "--log-dir", str(tmp_path / "l")])
    cap = capsys.readouterr()
    assert rc == 2 and "stopped" in cap.err and "int8 kernels are not tuned" in cap.out


def test_failed_merge_leaves_no_output_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(["logs", "merge", tmp_path / "empty", "-o", tmp_path / "out"], capsys,
                          "holds no tuning records")
    assert not (tmp_path / "out").exists()


def test_sparsity_above_the_per_layer_limit_names_the_limit(tmp_path, capsys):
    err = assert_one_line_error(["prune", "smallcnn", "--sparsity", "0.999", "-o", tmp_path / "p.pt2"], capsys,
                                "[0, 0.99]")
    assert "first-layer" not in err  # options the user never gave are not blamed
    err = assert_one_line_error(["prune", "smallcnn", "--sparsity", "0.99", "--first-layer-sparsity", "0", "-o",
                                 tmp_path / "p.pt2"], capsys, "above the 0.99 a layer can be pruned to")
    assert "--last-layer-sparsity" not in err


def test_npz_input_with_one_array_is_taken(small, tmp_path):
    from unsparse_tvm.runtime import read_input

    x = np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "one.npz", image=x)
    np.testing.assert_array_equal(read_input(str(tmp_path / "one.npz")), x)
    np.savez(tmp_path / "two.npz", a=x, b=x)
    proc = cli("run", small / "s.so", "--input", tmp_path / "two.npz", "-o", tmp_path / "y.npy", check=False)
    assert_proc_one_line_error(proc, "holds 2 arrays (a, b)")
    cli("run", small / "s.so", "--input", tmp_path / "one.npz", "-o", tmp_path / "y.npy")
    assert np.load(tmp_path / "y.npy").shape == (1, 10)


@pytest.mark.parametrize("argv,expect", [
    (["prune", "smallcnn", "--sparsity", "0.5", "--vector-size", "8"], "--vector-size is for --method vector or mixed"),
    (["prune", "smallcnn", "--sparsity", "0.5", "--method", "vector", "--block-size", "4"], "--block-size is for"),
    (["prune", "smallcnn", "--sparsity", "0.5", "--block-share", "0.3"], "--block-share is for --method mixed"),
    (["prune", "smallcnn", "--sparsity", "0.5", "--lr", "0.1"], "--lr is for fine-tuning"),
    (["quantize", "smallcnn", "--scheme", "int8", "--batch-size", "8"], "--batch-size is for fine-tuning"),
    (["run", "m.so", "--number", "5", "-o", "y.npy"], "add --print-time"),
    (["bench", "smallcnn", "--force"], "--force overwrites the --json file"),
])
def test_options_that_would_be_ignored_are_refused(argv, expect, tmp_path, capsys):
    assert_one_line_error([a if not a.endswith((".pt2", ".npy")) else tmp_path / a for a in argv]
                          + (["-o", tmp_path / "o.pt2"] if argv[0] in ("prune", "quantize") else []), capsys, expect)


def test_pruning_a_sparser_model_says_its_zeros_stayed(tmp_path, capsys):
    assert main(["prune", "smallcnn", "--sparsity", "0.9", "-o", str(tmp_path / "p9.pt2")]) == 0
    capsys.readouterr()
    assert main(["prune", str(tmp_path / "p9.pt2"), "--sparsity", "0.5", "-o", str(tmp_path / "p5.pt2")]) == 0
    assert "was already 0.900 sparse, above --sparsity 0.5" in capsys.readouterr().out


def test_detection_model_is_said_to_be_unsupported_not_missing(tmp_path, capsys):
    from unsparse_tvm.errors import UnsparseError
    from unsparse_tvm.zoo import import_torchvision

    try:
        import_torchvision()
    except UnsparseError:
        pytest.skip("torchvision is not installed")
    assert_one_line_error(["prune", "tv:fasterrcnn_resnet50_fpn", "--sparsity", "0.5", "-o", tmp_path / "p.pt2"],
                          capsys, "tv:fasterrcnn_resnet50_fpn is a torchvision detection model")


# Every option of every command, with a malformed value and what the one-line refusal says. A new option
# without an entry here fails test_every_option_has_a_malformed_example: add one.
BASE = {  # a valid command line per command: (positionals, options)
    ("train",): (["smallcnn"], {"--dataset": "digits", "--epochs": "1", "--output": "{d}/t.pt2"}),
    ("prune",): (["smallcnn"], {"--sparsity": "0.5", "--output": "{d}/p.pt2"}),
    ("quantize",): (["smallcnn"], {"--scheme": "int8", "--output": "{d}/q.pt2"}),
    ("compile",): (["smallcnn"], {"--output": "{d}/c.so"}),
    ("run",): (["{so}"], {"--output": "{d}/y.npy"}),
    ("inspect",): (["{so}"], {}),
    ("bench",): (["smallcnn"], {"--no-layers": None, "--repeat": "1"}),
    ("tune",): (["smallcnn"], {"--trials": "1", "--log-dir": "{d}/log"}),
    ("logs", "show"): (["{log}"], {}),
    ("logs", "merge"): (["{log}"], {"--output": "{d}/merged"}),
    ("calibrate",): ([], {"--dry-run": None}),
}
_DATA = {"--dataset": ("imagenet", "unknown data set"), "--epochs": ("-1", "--epochs must be at least 0"),
         "--lr": ("0", "--lr must be a positive number"), "--batch-size": ("0", "--batch-size must be at least 1"),
         "--seed": ("x", "--seed must be a whole number"), "--weights": ("{d}/none.pt", "no such weights file"),
         "--batch": ("0", "batch must be at least 1"), "--force": ("=yes", "ignored explicit argument")}
_TARGET = {"--target": ("opencl", "unknown target 'opencl'"), "--arch": ("sm90", "--arch is for --target cuda"),
           "--threshold": ("1.5", "threshold must be in [0, 1]"), "--batch": ("-2", "batch must be at least 1"),
           "--no-calibrate": ("=yes", "ignored explicit argument")}
_SPARSITY = {"--sparsity": ("0.995", "must be in [0, 0.99]")}
MALFORMED = {
    ("train",): {"model": ("{d}/none.pt2", "no such file"), **_DATA, "--epochs": ("0", "epochs must be >= 1"),
                 "--output": ("{d}/t.txt", "must end in .pt2")},
    ("prune",): {"model": ("nosuchmodel", "unknown model 'nosuchmodel'"), **_DATA,
                 "--sparsity": ("1", "sparsity must be in [0, 0.99]"), "--method": ("channel", "unknown pruning method"),
                 "--scope": ("model", "unknown scope"), "--vector-size": ("3", "--vector-size is for"),
                 "--block-size": ("zero", "--block-size must be a whole number"),
                 "--block-share": ("1.5", "--block-share must be in [0, 1]"),
                 "--first-layer-sparsity": ("1", "--first-layer-sparsity must be in [0, 0.99]"),
                 "--last-layer-sparsity": ("-1", "--last-layer-sparsity must be in [0, 0.99]"),
                 "--sensitivity": ("=yes", "ignored explicit argument"),
                 "--output": ("{d}/p.so", "must end in .pt2"), "--report": ("{d}/r.txt", "must end in .json"),
                 "--speedup": ("fast", "--speedup must be a number"), "--latency-ms": ("-3", "must be a positive number"),
                 "--pattern": ("diagonal", "--pattern must be one of"), "--threads": ("2", "--threads is for --speedup")},
    ("quantize",): {"model": ("{d}/none.pt2", "no such file"), **_DATA,
                    "--activations": ("int4", "invalid choice: 'int4'"),
                    "--scheme": ("fp8", "unknown quantisation scheme 'fp8'"),
                    "--output": ("{d}/q", "must end in .pt2"), "--report": ("{d}", "must end in .json")},
    ("compile",): {"model": ("{d}/none.pt2", "no such file"), **_TARGET, "--output": ("{d}/c.txt", "must end in .so"),
                   "--force": ("=yes", "ignored explicit argument"), "--tuning-log": ("{d}/none", "does not exist")},
    ("run",): {"module": ("{d}", "is a directory"), "--input": ("{d}/x.txt", "no such input file"),
               "--output": ("{d}/y.txt", "must end in .npy or .npz"), "--force": ("=yes", "ignored explicit argument"),
               "--device": ("tpu", "--device must be one of cpu, cuda"),
               "--print-time": ("=yes", "ignored explicit argument"), "--number": ("0", "--number must be at least 1"),
               "--repeat": ("many", "--repeat must be a whole number")},
    ("inspect",): {"file": ("{d}/none.so", "no such file")},
    ("bench",): {"model": ("tv:", "write tv:ARCH"), **_TARGET, **_SPARSITY, "--json": ("{d}/b.txt", "must end in .json"),
                 "--no-layers": ("=yes", "ignored explicit argument"), "--repeat": ("0", "--repeat must be at least 1"),
                 "--tuning-log": ("{d}/none", "does not exist"), "--force": ("=yes", "ignored explicit argument"),
                 "--threads": ("0", "--threads takes positive thread counts"), "--peers": ("tensorrt", "unknown peer"),
                 "--peer-isa": ("sse", "invalid choice")},
    ("tune",): {"model": ("{so}", "not a .pt2 file"), **_TARGET, **_SPARSITY, "--trials": ("0", "--trials must be at least 1"),
                "--log-dir": ("{so}", "is a file, not a directory"),
                "--include-dense": ("=yes", "ignored explicit argument"),
                "--rpc-tracker": ("nohostport", "--rpc-tracker must be HOST:PORT"),
                "--rpc-key": ("k", "--rpc-key needs --rpc-tracker"), "--seed": ("-1", "--seed must be at least 0"),
                "--no-progress": ("=yes", "ignored explicit argument")},
    ("logs", "show"): {"dir": ("{d}/none", "does not exist")},
    ("logs", "merge"): {"dirs": ("{so}", "is not a directory"), "--output": ("{so}", "is a file, not a directory"),
                        "--force": ("=yes", "ignored explicit argument")},
    ("calibrate",): {"--threads": ("0", "--threads must be at least 1"),
                     "--dry-run": ("=yes", "ignored explicit argument")},
}


def _commands(parser, path=()):
    """(command path, its parser) of every (sub)command of the CLI."""
    import argparse

    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from _commands(sub, path + (name,))


def _options(parser) -> dict:
    """Every option and positional of a command parser: its name (long form, or dest) -> its action."""
    import argparse

    return {(max(a.option_strings, key=len) if a.option_strings else a.dest): a
            for a in parser._actions if not isinstance(a, argparse._HelpAction)}


def test_every_option_has_a_malformed_example():
    from unsparse_tvm.cli import build_parser

    found = {path: set(_options(p)) for path, p in _commands(build_parser())}
    assert set(found) == set(MALFORMED) == set(BASE)
    for path, names in found.items():
        assert names == set(MALFORMED[path]), (path, names ^ set(MALFORMED[path]))


def _malformed_cases():
    return [(path, name) for path, options in MALFORMED.items() for name in options]


@pytest.mark.parametrize("path,name", _malformed_cases(), ids=[" ".join(p) + " " + n for p, n in _malformed_cases()])
def test_every_option_refuses_a_malformed_value_in_one_line(path, name, small, tmp_path, capsys):
    from test_tuning import copy_log
    from unsparse_tvm.cli import build_parser

    parser = dict(_commands(build_parser()))[path]
    options = _options(parser)
    positionals, values = BASE[path][0][:], dict(BASE[path][1])
    value, expect = MALFORMED[path][name]
    if not options[name].option_strings:
        index = [n for n, a in options.items() if not a.option_strings].index(name)
        positionals[index] = value
    else:
        values[name] = value
    argv = [*path, *positionals]
    for option, v in values.items():
        argv += [option + v] if v and v.startswith("=") else [option] + ([v] if v is not None else [])
    fill = {"d": tmp_path, "so": small / "s.so"}
    if "{log}" in " ".join(argv):
        fill["log"] = copy_log(tmp_path)
    start = time.perf_counter()
    assert_one_line_error([a.format(**fill) for a in argv], capsys, expect)
    assert time.perf_counter() - start < 20, "refused only after real work"


# ---- full disks, special files, damaged files --------------------------------------------------------
def test_full_disk_is_found_before_llvm_writes(tmp_path, capsys, monkeypatch):
    """LLVM aborts the whole process (then segfaults) when an object file meets a full disk."""
    import collections

    import unsparse_tvm.build as build

    monkeypatch.setattr(build.shutil, "disk_usage", lambda _: collections.namedtuple("U", "total used free")(1, 1, 100_000))
    monkeypatch.setattr(build, "export_library", lambda *a: pytest.fail("object files written to a full disk"))
    assert_one_line_error(["compile", "smallcnn", "-o", tmp_path / "a.so"], capsys, "not enough free space")
    assert os.listdir(tmp_path) == []


def test_disk_full_while_writing_is_one_line(small, tmp_path, capsys, monkeypatch):
    import errno

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "save", full)
    assert_one_line_error(["run", small / "s.so", "-o", tmp_path / "y.npy"], capsys, "No space left on device")
    assert os.listdir(tmp_path) == []


def test_output_that_is_not_a_regular_file_is_refused(small, tmp_path, capsys):
    os.mkfifo(tmp_path / "y.npy")
    assert_one_line_error(["run", small / "s.so", "-o", tmp_path / "y.npy", "--force"], capsys, "is not a regular file")
    assert os.path.exists(tmp_path / "y.npy") and not os.path.isfile(tmp_path / "y.npy")


@pytest.mark.parametrize("member,payload,expect", [
    ("unsparse_model.json", b"\xff\xfe{not json", "could not be read"),   # torch itself decodes extra files
    ("unsparse_model.json", b"[1, 2, 3]", "unsparse_model.json is damaged"),
    ("unsparse_quant.json", b'{"scheme": 3}', "unsparse_quant.json is damaged"),
])
def test_pt2_with_damaged_metadata_is_one_line(member, payload, expect, tmp_path, capsys):
    import zipfile

    assert main(["quantize", "smallcnn", "--scheme", "int8", "-o", str(tmp_path / "q.pt2")]) == 0
    with zipfile.ZipFile(tmp_path / "q.pt2") as zin, zipfile.ZipFile(tmp_path / "d.pt2", "w") as zout:
        for item in zin.infolist():
            zout.writestr(item, payload if item.filename.endswith("/extra/" + member) else zin.read(item.filename))
    for argv in (["inspect", tmp_path / "d.pt2"], ["prune", tmp_path / "d.pt2", "--sparsity", "0.5", "-o",
                                                   tmp_path / "p.pt2"]):
        if member == "unsparse_quant.json" and argv[0] == "prune":
            argv = ["compile", tmp_path / "d.pt2", "-o", tmp_path / "c.so"]  # prune drops the quantisation anyway
        assert_one_line_error(argv, capsys, expect)


@pytest.mark.parametrize("cut", ["half", "empty"])
def test_truncated_or_empty_pt2_is_one_line(cut, tmp_path, capsys):
    _save(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()), tmp_path / "m.pt2", torch.randn(1, 1, 8, 8))
    data = (tmp_path / "m.pt2").read_bytes()
    (tmp_path / "m.pt2").write_bytes(data[: len(data) // 2] if cut == "half" else b"")
    for cmd in ("inspect", "compile", "prune"):
        assert_one_line_error(_argv(cmd, tmp_path / "m.pt2", tmp_path), capsys,
                              "could not be read as a torch.export program" if cut == "half" else "is empty")


def test_log_file_that_is_a_directory_is_one_line(tmp_path, capsys):
    (tmp_path / "log" / "database_workload.json").mkdir(parents=True)
    assert_one_line_error(["logs", "show", tmp_path / "log"], capsys, "is not a file")


@needs_nvcc
def test_cuda_modules_compiled_in_one_process_each_get_their_arch(tmp_path, capsys):
    """Once nvcc's callback is registered, TVM calls it while building every later cuda module too: each
    module is still compiled for its own arch (not the previous one's: sm_90 code in an sm_90a module)."""
    from unsparse_tvm.runtime import device_code_summary

    for arch in ("sm_90", "sm_80", "sm_90a"):
        assert main(["compile", "smallcnn", "--target", "cuda", "--arch", arch, "-o", str(tmp_path / f"{arch}.so")]) == 0
        assert f"cubin {arch}" in device_code_summary(str(tmp_path / f"{arch}.so")).split(", ")


def test_running_in_process_leaves_the_environment_for_children(small, tmp_path, capsys, monkeypatch):
    """`run` in-process does not leave TVM_USE_RUNTIME_LIB=1 set: a `compile` started afterwards from the
    same process would load TVM without its compiler and die in a traceback."""
    monkeypatch.delenv("TVM_USE_RUNTIME_LIB", raising=False)
    import unsparse_tvm.runtime as runtime

    runtime._import_runtime_only()
    assert "TVM_USE_RUNTIME_LIB" not in os.environ
    assert main(["run", str(small / "s.so"), "-o", str(tmp_path / "y.npy")]) == 0
    assert "TVM_USE_RUNTIME_LIB" not in os.environ
    cli("compile", "smallcnn", "-o", tmp_path / "c.so")  # a fresh process: TVM's compiler is there
