"""Shared helpers: single-layer Relax modules compiled through our pipeline, PyTorch references,
random sparsity patterns with empty and fully dense rows, and a per-session cache of pruned models."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import secrets
import shutil
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F


# The suite predicts with the built-in x86 rates: which layers go sparse must not depend on the machine
# (or measure it first); tests/test_calibration.py switches calibration on where it is the subject.
os.environ.setdefault("UNSPARSE_CALIBRATION", "off")
# the int8 tests compile scattered random weights on purpose, to check the int8 kernels and chains: on a CPU
# without VNNI the pass would leave such layers fp32 (quantize_int8.SCATTERED_FP32, checked on its own)
os.environ.setdefault("UNSPARSE_INT8_EVERY_LAYER", "1")

# Random sparsity patterns differ from run to run (fresh patterns find more bugs), yet a failure can be
# replayed: the run's seed is printed at the end (-q too), and UNSPARSE_TEST_SEED=N runs with seed N again.
os.environ.setdefault("UNSPARSE_TEST_SEED", str(secrets.randbelow(2**31)))  # one value however often imported
SESSION_SEED = int(os.environ["UNSPARSE_TEST_SEED"])


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"unsparse test seed: {SESSION_SEED} (replay: UNSPARSE_TEST_SEED={SESSION_SEED})")


def case_rng(*key) -> np.random.Generator:
    """A generator for one parametrised case: the case's key mixed with the session seed."""
    return np.random.default_rng([zlib.crc32(repr(key).encode()), SESSION_SEED])


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="no CUDA GPU on this machine"))


@pytest.fixture(scope="session", autouse=True)
def isa_guard():
    """No test runs code for CPU extensions this CPU lacks (unsparse_tvm.testing.isa): such a test fails
    by name instead of killing the whole run with SIGILL."""
    from unsparse_tvm.testing.isa import ISAGuard

    guard = ISAGuard().install()
    yield guard
    guard.uninstall()


needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")


@pytest.fixture(scope="session")
def llvm():
    from unsparse_tvm.target import make_target

    return make_target("llvm")


def cpu_target(mcpu: str | None = None):
    """The llvm target for LLVM CPU model `mcpu` (default this machine's), as compile makes it."""
    import tvm

    from unsparse_tvm.target import llvm_target_dict

    return tvm.target.Target(llvm_target_dict(mcpu))


def executable_asm(executable) -> str:
    """The assembly of every llvm module of a Relax executable, imports of imports too (a parallel build links
    several modules: the first level alone misses kernels)."""
    libs, todo = [], [executable.mod]
    while todo:
        libs.append(todo.pop())
        todo += list(libs[-1].imports)
    return "".join(m.inspect_source("asm") for m in libs if m.kind == "llvm")


@pytest.fixture(scope="session")
def cuda():
    from unsparse_tvm.target import make_target

    return make_target("cuda", "sm_90")


@pytest.fixture(scope="module")
def pocl():
    """PoCL's OpenCL device, on which CUDA-scheduled TIR runs without a GPU (one per test module)."""
    from unsparse_tvm.testing.opencl import PoCL

    return PoCL()


def sparse_weight(shape, sparsity: float, rng: np.random.Generator, empty_rows: int = 0,
                  dense_rows: int = 0) -> np.ndarray:
    """Random weight with ~sparsity zeros, some all-zero rows and some fully dense rows."""
    w = rng.standard_normal(shape).astype(np.float32)
    w[rng.random(shape) < sparsity] = 0.0
    rows = w.reshape(shape[0], -1)
    order = rng.permutation(shape[0])
    rows[order[:empty_rows]] = 0.0
    for r in order[empty_rows:empty_rows + dense_rows]:
        rows[r] = rng.standard_normal(rows.shape[1]).astype(np.float32) + 0.1  # no exact zeros
    return rows.reshape(shape)


def run_layer(spec, target, threshold=0.7, fmt=None, sparse=True, x=None, configs=None):
    """Compile one LayerSpec through the pipeline (configs: op -> schedule Config), run it on llvm, return
    (output, report)."""
    import tvm
    from tvm import relax

    from unsparse_tvm.single_layer import layer_module
    from unsparse_tvm.relay_passes import build_pipeline

    from unsparse_tvm.testing.isa import skip_unless_runs_here

    report = []
    pipeline = build_pipeline(target, threshold=threshold, fmt=fmt, sparse=sparse, report=report, configs=configs)
    ex = tvm.compile(layer_module(spec), target=target, relax_pipeline=pipeline)
    skip_unless_runs_here(target)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x))
    return out.numpy(), report


def torch_conv(x, w, b, stride, padding, dilation, groups=1, relu=False):
    t, l, bt, r = padding
    y = F.conv2d(F.pad(torch.from_numpy(x), (l, r, t, bt)), torch.from_numpy(w),
                 None if b is None else torch.from_numpy(b), stride, 0, dilation, groups)
    return (F.relu(y) if relu else y).numpy()


def rel_err(a, b) -> float:
    from unsparse_tvm.reference import rel_error

    return rel_error(a, b)


@functools.lru_cache(maxsize=None)
def pruned_program(model: str, sparsity: float = 0.9):
    """One pruned ExportedProgram per model and session (pruning VGG-16 takes a while)."""
    from unsparse_tvm.compress.prune import prune_to_program

    return prune_to_program(model, sparsity)


def int8_ready(model, shape, zero_share: float) -> dict:
    """Zero `zero_share` of each conv's weights of `model` (in place, drawn from torch's global generator:
    seed it before building the model) and return its calibrated layer input ranges (random batches): what
    `--activations int8` compiles with."""
    from unsparse_tvm.compress.calibrate import calibrate, calibration_batches

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight[torch.rand_like(m.weight) < zero_share] = 0
    return calibrate(model, calibration_batches(shape, None, 2, 16))["layers"]


def compile_int8(model, shape, ranges, target):
    """(report, run) of `model` compiled with int8 activations at `ranges`; run(x) -> its first output (numpy)."""
    import tvm
    from tvm import relax

    from unsparse_tvm.build import compile_program
    from unsparse_tvm.models import export_program

    compiled = compile_program(export_program(model, shape), target, threshold=0.5, activations=ranges)
    vms: list = []  # loaded on the first run: a test may compile for a CPU other than the host's and only look

    def run(x):
        if not vms:
            vms.append(relax.VirtualMachine(compiled.executable, tvm.cpu()))
        return vms[0]["main"](tvm.runtime.tensor(np.asarray(x, np.float32)))[0].numpy()

    return compiled.report, run


def residual_block_matches_torch(shape: tuple, seed_key: str, sparsity: float, **prune) -> list[dict]:
    """A whole model through the public API on an input of `shape`: two 3x3 convs (the second without bias) with
    batch-norm folded into it, a residual add and ReLUs in their epilogues, pruned to `sparsity` with `prune`'s
    keywords and checked against eager within 1e-5 on a seeded input; returns the compiled model's report."""
    import torch.nn as nn

    import unsparse_tvm

    channels = shape[1]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(channels, channels, 3, padding=1)
            self.b = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(channels)

        def forward(self, x):
            return torch.relu(self.bn(self.b(torch.relu(self.a(x)))) + x)

    torch.manual_seed(case_rng(seed_key).integers(1 << 30))
    model = unsparse_tvm.prune(Block(), sparsity, **prune)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(*shape)
    compiled = unsparse_tvm.compile(model.eval(), example_input=x, threshold=0.0)
    with torch.no_grad():
        ref = model(x)
    assert float((compiled(x) - ref).abs().max() / ref.abs().max()) < 1e-5
    return compiled.report


def cli(*args, check=True):
    """Run `unsparse-tvm ARGS` in a fresh process (what a user runs); fail with its output."""
    proc = subprocess.run([sys.executable, "-m", "unsparse_tvm.cli"] + [str(a) for a in args],
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"unsparse-tvm {args} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def cli_here(*args) -> str:
    """`unsparse-tvm ARGS` through the same main() as cli(), but in this process; returns its stdout.

    A fresh interpreter spends ~5 s importing torch and TVM on a 2-core machine, per call. Use this for
    the steps that only make a test's inputs (prune, quantize, compile); the commands whose own process
    is what a test checks (`run` in runtime-only mode, exit statuses, stderr) keep cli()."""
    from unsparse_tvm.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    if rc != 0:
        raise AssertionError(f"unsparse-tvm {args} failed ({rc}):\n{out.getvalue()}\n{err.getvalue()}")
    return out.getvalue()


def _assert_one_line_error(what: str, status, err: str, expected, ignore: tuple = ()) -> str:
    lines = [line for line in err.splitlines() if not line.startswith(ignore)] if ignore else err.splitlines()
    assert status == 2, f"{what}: exit status {status}, not 2; stderr:\n{err}"
    assert len(lines) == 1 and err.endswith("\n") and "Traceback" not in err, f"{what}: not one line:\n{err}"
    assert " error: " in lines[0], f"{what}: not an error line:\n{err}"
    for text in expected:
        assert text in lines[0], f"{what}: {text!r} not in:\n{err}"
    return lines[0]


def assert_one_line_error(argv, capsys, *expected: str) -> str:
    """`unsparse-tvm ARGV` through main() in this process is refused the way every bad input must be: exit
    status 2 (parse-time refusals too) and exactly one line on stderr, `unsparse-tvm CMD: error: ...`,
    holding every `expected` text, no traceback. Returns that line."""
    from unsparse_tvm.cli import main

    argv = [str(a) for a in argv]
    try:
        status = main(argv)
    except SystemExit as exc:  # refused by argparse
        status = exc.code
    return _assert_one_line_error("unsparse-tvm " + " ".join(argv), status, capsys.readouterr().err, expected)


def assert_proc_one_line_error(proc: subprocess.CompletedProcess, *expected: str, ignore: tuple = ()) -> str:
    """The same for a finished `unsparse-tvm` process (cli(..., check=False)): exit status 2 and one line
    on stderr holding every `expected` text. `ignore`: prefixes of lines that are not ours (an emulator's
    own warnings). Returns that line."""
    return _assert_one_line_error(" ".join(map(str, proc.args)), proc.returncode, proc.stderr, expected, ignore)


@pytest.fixture(scope="session")
def vgg16_cifar_flow(tmp_path_factory):
    """`unsparse-tvm prune vgg16-cifar --sparsity 0.9` -> `compile --target llvm`, in fresh processes as a
    user runs them, once per session: test_cli's flow and test_quant_cli's fp32 baseline are this same
    model (~17 s of prune + compile each). Returns (folder with v.pt2 and v.so, compile's stdout);
    copy the files out (see copy_vgg16_cifar_flow) rather than writing next to them."""
    d = tmp_path_factory.mktemp("vgg16-cifar-0.9")
    cli("prune", "vgg16-cifar", "--sparsity", 0.9, "-o", d / "v.pt2")
    out = cli("compile", d / "v.pt2", "--target", "llvm", "-o", d / "v.so").stdout
    return d, out


def copy_vgg16_cifar_flow(flow, dst):
    """Copy v.pt2 and v.so of the session's vgg16_cifar_flow into dst (a folder of the test module's own)."""
    src, _ = flow
    for name in ("v.pt2", "v.so"):
        shutil.copy2(src / name, dst / name)
    return dst
