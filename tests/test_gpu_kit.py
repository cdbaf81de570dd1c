"""The GPU kit (benchmarks/gpu_kit.py): a tiny kit builds here, stays within the size limit, and its
runner's dry run (every code path but the GPU launches) passes."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILDER = os.path.join(ROOT, "benchmarks", "gpu_kit.py")
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")


def _builder():
    spec = importlib.util.spec_from_file_location("gpu_kit_builder", BUILDER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_knob_grid_reads_the_config_fields():
    from unsparse_tvm.schedules import sparse_conv2d_cuda, sparse_dense_cuda

    b = _builder()
    for op, rule in (("sparse_conv2d", sparse_conv2d_cuda), ("sparse_dense", sparse_dense_cuda)):
        default = dataclasses.asdict(rule.Config())
        grid = b.knob_grid(op, 10)
        assert grid[0] == default                                  # the defaults come first
        assert all(set(g) == set(default) for g in grid)           # every field, no invented knob
        assert len({json.dumps(g, sort_keys=True) for g in grid}) == len(grid)
        for g in grid:
            rule.Config(**g)                                       # each point is a valid Config


def test_a_knob_added_later_gets_a_grid_of_its_own():
    b = _builder()
    cfg = dataclasses.make_dataclass("Config", [("threads_q", int, 64), ("unroll_new", int, 4), ("flag", bool, False)])
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    assert b.knob_values(fields["unroll_new"], 4) == [2, 4, 8]
    assert b.knob_values(fields["flag"], False) == [False, True]
    assert 64 in b.knob_values(fields["threads_q"], 64)


@pytest.fixture(scope="module")
def tiny_kit(tmp_path_factory):
    kit = tmp_path_factory.mktemp("gpukit") / "kit"
    cmd = [sys.executable, BUILDER, "build", str(kit), "--models", "smallcnn", "--sparsities", "0.9",
           "--batches", "1,2", "--grid-sparsities", "0.9", "--grid-points", "2", "--jobs", "1"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if p.returncode != 0 and "could not get the apache-tvm-ffi wheel" in p.stderr + p.stdout:
        pytest.skip("no registry access to fetch the apache-tvm-ffi wheel for Python 3.12")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return kit


@needs_nvcc
def test_tiny_kit_builds_within_the_limit(tiny_kit):
    manifest = json.loads((tiny_kit / "manifest.json").read_text())
    total = sum(f.stat().st_size for f in tiny_kit.rglob("*") if f.is_file())
    assert total <= 64 * 1024 * 1024
    kinds = {g["kind"] for g in manifest["groups"]}
    assert kinds == {"layers", "grid", "model"}
    assert {g["variant"] for g in manifest["groups"] if g["kind"] == "model"} == {"unsparse", "tvm_dense"}
    from unsparse_tvm.schedules import sparse_conv2d_cuda

    assert manifest["knob_fields"]["sparse_conv2d"] == [f.name for f in dataclasses.fields(sparse_conv2d_cuda.Config)]
    for g in manifest["groups"]:
        for k in g.get("kernels", []):
            assert set(k["config"]) == set(manifest["knob_fields"][k["op"]])  # knob values recorded per variant
    for rel in manifest["files"]:
        assert (tiny_kit / rel).is_file()
    # the runtime travels inside: TVM's python package without the compiler, and the cp312 tvm-ffi wheel
    assert (tiny_kit / manifest["runtime"]["tvm_tar"]).is_file()
    assert "cp312" in manifest["runtime"]["ffi_wheel"]


@needs_nvcc
def test_tiny_kit_dry_run(tiny_kit, tmp_path):
    out, sys_tmp = tmp_path / "out", tmp_path / "tmp"
    sys_tmp.mkdir()
    p = subprocess.run([sys.executable, str(tiny_kit / "run.py"), "--dry-run", str(out), "--repeat", "3",
                        "--warmup", "1"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "TMPDIR": str(sys_tmp)})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert [f for f in os.listdir(sys_tmp) if not f.startswith("torchinductor_")] == []  # unpacked runtime removed
    files = os.listdir(out)
    assert files == ["gpu_kit_results.json"]          # written atomically: no temporary file left
    r = json.loads((out / "gpu_kit_results.json").read_text())
    assert r["dry_run"] is True and r["complete"] and not r["errors"]
    assert r["files"]["within_limit"] and not r["files"]["problems"]
    assert "tvm_site" in r["runtime"]["tvm_path"]      # the kit's own tvm package imported, compiler-less
    rows = r["layers"] + r["grid"]
    assert {row["batch"] for row in r["layers"]} == {1, 2}
    for row in rows:
        assert row["same_structure_as_build"]
        assert row["emulated_rel_err"] < 1e-5       # packed arrays + geometry reproduce the PyTorch layer
        if r["runtime"].get("driver"):
            assert all(k.get("loaded") for k in row["kernels"] if "same_as" not in k)
    for row in r["layers"]:
        assert "median_ms" in row["torch"]["cudnn_fp32"]  # the timing path ran (host timers)
    assert len(r["models"]) == 4                     # sparse and TVM dense, batch 1 and 2
    for m in r["models"]:
        assert m["params_match_build"]
        if r["runtime"].get("driver"):
            assert m["loaded"] and m["vm_inputs_bound"] is True

