"""Quantised models end to end: prune vgg16-cifar to 90% -> quantize int8 / kmeans4 -> compile -> run (in
a fresh process) against PyTorch on the dequantised model, the .so sizes against the fp32 one, and what
inspect says per layer.

Sizes: the first targets (int8 / 4-bit at most 50% / 40% of the fp32 .so) were met against fp32 files
with 32-bit offsets (41-45% / 35-39.5%). fp32 sparse now stores 16-bit offsets where they fit
(ops.formats.compact_offsets), as the quantised formats already did, so only the value bytes differ:
weights int8 (1 + 2 B per entry) / fp32 (4 + 2 B) = 0.5, 4-bit 0.42; files (code included) measured
0.54-0.57 and 0.46-0.50 on vgg16-cifar and resnet18."""

import json

import numpy as np
import pytest
import torch

from conftest import cli, cli_here, copy_vgg16_cifar_flow, rel_err
from unsparse_tvm.runtime import read_metadata


@pytest.fixture(scope="module")
def quant_flow(vgg16_cifar_flow, tmp_path_factory):
    # the pruned v.pt2 and its fp32 v.so: the same CLI prune + compile as test_cli's flow, made once per
    # session (conftest); quantize and compile run in this process (cli_here: no ~5 s interpreter start
    # each); `run` below stays a fresh runtime-only process
    _, out = vgg16_cifar_flow
    assert "wrote" in out
    d = copy_vgg16_cifar_flow(vgg16_cifar_flow, tmp_path_factory.mktemp("qflow"))
    for scheme in ("int8", "kmeans4"):
        cli_here("quantize", d / "v.pt2", "--scheme", scheme, "-o", d / f"v-{scheme}.pt2")
    for name in ("v-int8", "v-kmeans4"):
        out = cli_here("compile", d / f"{name}.pt2", "--target", "llvm", "-o", d / f"{name}.so")
        assert "wrote" in out
    return d


@pytest.mark.parametrize("scheme, file_ratio, weight_ratio", [("int8", 0.58, 3 / 6 + 0.02), ("kmeans4", 0.52, 2.5 / 6 + 0.02)])
def test_quantised_so_is_small(quant_flow, scheme, file_ratio, weight_ratio):
    fp32, quant = quant_flow / "v.so", quant_flow / f"v-{scheme}.so"
    assert quant.stat().st_size <= file_ratio * fp32.stat().st_size
    layers = read_metadata(str(quant))["layers"]
    base = read_metadata(str(fp32))["layers"]
    sparse = [(q, b) for q, b in zip(layers, base) if q["decision"] == "sparse"]
    assert sparse and all(q["precision"] != "fp32" for q, _ in sparse)
    stored = sum(q["weight_bytes"] for q, _ in sparse)
    assert stored <= weight_ratio * sum(b["weight_bytes"] for _, b in sparse)


@pytest.mark.parametrize("scheme", ["int8", "kmeans4"])
def test_quantised_so_matches_the_dequantised_model(quant_flow, scheme):
    x = np.random.default_rng(4).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.save(quant_flow / "x.npy", x)
    cli("run", quant_flow / f"v-{scheme}.so", "--input", quant_flow / "x.npy", "-o", quant_flow / f"y-{scheme}.npy",
        "--force")
    ref = torch.export.load(str(quant_flow / f"v-{scheme}.pt2")).module()(torch.from_numpy(x)).detach().numpy()
    assert rel_err(np.load(quant_flow / f"y-{scheme}.npy"), ref) < 1e-4


def test_inspect_shows_stored_precision_and_bytes(quant_flow):
    out = cli("inspect", quant_flow / "v-kmeans4.so").stdout
    assert "[4-bit/16-bit off," in out and "weights:" in out and "of the dense fp32" in out
    fp32 = cli("inspect", quant_flow / "v.so").stdout
    assert "[fp32," in fp32


def test_bench_reports_weight_bytes_per_variant(tmp_path):
    cli_here("prune", "smallcnn", "--sparsity", 0.9, "-o", tmp_path / "s.pt2")
    cli_here("quantize", tmp_path / "s.pt2", "--scheme", "int4", "-o", tmp_path / "s4.pt2")
    out = tmp_path / "b.json"  # bench sets torch's thread count: a process of its own; one round: sizes, not times
    text = cli("bench", tmp_path / "s4.pt2", "--target", "llvm", "--repeat", 1, "--json", out).stdout
    r = json.loads(out.read_text())
    assert r["quantization"] == "int4" and "unsparse_fp32_ms" in r["end_to_end"]
    wb = r["weight_bytes"]
    assert wb["unsparse"] < 0.5 * wb["unsparse_fp32"] < wb["tvm_dense"] == wb["torch"]
    assert all(layer["precision"].startswith("4-bit") for layer in r["layers"] if layer["format"] != "dense")
    assert r["max_rel_error_vs_torch"]["unsparse"] < 1e-4
    assert "int4 weights" in text and "MB" in text


@pytest.mark.slow
def test_resnet18_quantised_so_sizes(tmp_path):
    """ResNet-18 at 90%: the int8 .so at most 58% of the fp32 sparse one (measured 56.5%; see the module
    docstring for why not 50% any more; 4-bit's 52%, measured 49.9% here, is checked on vgg16-cifar above). The
    same CLI commands, in this process (cli_here): the sizes are the point, not the process."""
    cli_here("prune", "resnet18", "--sparsity", 0.9, "-o", tmp_path / "r.pt2")
    cli_here("compile", tmp_path / "r.pt2", "--target", "llvm", "-o", tmp_path / "r.so")
    fp32 = (tmp_path / "r.so").stat().st_size
    for scheme, ratio in (("int8", 0.58),):
        cli_here("quantize", tmp_path / "r.pt2", "--scheme", scheme, "-o", tmp_path / f"r-{scheme}.pt2")
        cli_here("compile", tmp_path / f"r-{scheme}.pt2", "--target", "llvm", "-o", tmp_path / f"r-{scheme}.so")
        assert (tmp_path / f"r-{scheme}.so").stat().st_size <= ratio * fp32, scheme
