"""unsparse_tvm.parallel_build: kernels built in several LLVM modules on threads, object files written on
threads; the executable (in memory and exported) computes what PyTorch does, as with TVM's own path."""

import os

import numpy as np
import pytest
import torch

from conftest import pruned_program, rel_err


@pytest.mark.parametrize("jobs", ["1", "2", "3"])
def test_parallel_build_matches_torch_in_memory_and_exported(jobs, llvm, tmp_path, monkeypatch):
    import tvm
    from tvm import relax

    from unsparse_tvm import parallel_build
    from unsparse_tvm.build import compile_program

    monkeypatch.setenv("UNSPARSE_BUILD_JOBS", jobs)
    ep = pruned_program("smallcnn", 0.9)
    compiled = compile_program(ep, llvm)
    dso = compiled.executable.mod._collect_dso_modules()
    assert len(dso) == (1 if jobs == "1" else 2 * int(jobs))  # one LLVM module per part
    workspace = tmp_path / "ws"
    workspace.mkdir()
    parallel_build.export_library(compiled.executable, str(tmp_path / "m.so"), str(workspace))
    x = np.random.default_rng(int(jobs)).standard_normal((1, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        ref = ep.module()(torch.from_numpy(x)).numpy()
    for exe in (compiled.executable, tvm.runtime.load_module(str(tmp_path / "m.so"))):
        y = relax.VirtualMachine(exe, tvm.cpu())["main"](tvm.runtime.tensor(x))
        assert rel_err((y if hasattr(y, "numpy") else y[0]).numpy(), ref) < 1e-5


def test_jobs_reads_the_environment(monkeypatch):
    from unsparse_tvm.parallel_build import jobs

    monkeypatch.setenv("UNSPARSE_BUILD_JOBS", "3")
    assert jobs() == 3
    monkeypatch.setenv("UNSPARSE_BUILD_JOBS", "zero")  # not a count: the usable cores, capped at 8
    assert 1 <= jobs() <= min(8, os.cpu_count() or 1)
