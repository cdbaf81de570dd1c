"""Pruned (vector / mixed) and quantised (int8, kmeans4, pow2) .pt2 files go through the ordinary
compile -> run flow and match PyTorch; vector groups survive into the sparse operator's rows."""

import numpy as np
import pytest

from conftest import cli, cli_here, rel_err


@pytest.mark.parametrize("method,scheme", [("vector", "int8"), ("mixed", "kmeans4"), ("unstructured", "pow2")])
def test_pruned_quantised_pt2_compiles_runs_and_matches(method, scheme, tmp_path):
    import torch

    pruned, quant = tmp_path / "p.pt2", tmp_path / "q.pt2"
    # prune/quantize/compile in this process (cli_here: the same main(), without ~5 s of imports per
    # fresh interpreter); `run` stays a process of its own, the runtime-only one a user gets
    cli_here("prune", "vgg16-cifar", "--method", method, "--sparsity", 0.8, "-o", pruned)
    cli_here("quantize", pruned, "--scheme", scheme, "-o", quant)
    out = cli_here("compile", quant, "--target", "llvm", "--threshold", 0.5, "-o", tmp_path / "q.so")
    assert "sparse" in out
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    cli("run", tmp_path / "q.so", "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npy")
    with torch.no_grad():
        ref = torch.export.load(str(quant)).module()(torch.from_numpy(x)).numpy()
    assert rel_err(np.load(tmp_path / "y.npy"), ref) < 1e-4
