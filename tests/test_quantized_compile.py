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


def test_quantised_depthwise_convs_run_sparse_on_their_values():
    """There is no weight-quantised depthwise kernel: on llvm a quantised depthwise conv runs the sparse fp32 kernel
    on its (dequantised) values, where it ran dense; the expand conv keeps its quantised weights."""
    import torch
    import torch.nn as nn

    import unsparse_tvm

    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(8, 32, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU(),
                        nn.Conv2d(32, 16, 1)).eval()
    net = unsparse_tvm.prune(net, 0.8)
    x = torch.randn(1, 8, 12, 12)
    unsparse_tvm.quantize(net, "int8", example_input=x)
    model = unsparse_tvm.compile(net, example_input=x, threshold=0.5)
    rows = {r["name"]: r for r in model.report}
    assert rows["2"]["decision"] == "sparse" and rows["2"]["precision"] == "fp32", rows["2"]
    assert rows["0"]["precision"] != "fp32", rows["0"]
    with torch.no_grad():
        ref = net(x).numpy()
    assert rel_err(model(x.numpy()), ref) < 1e-4


def test_convs_a_relu6_follows_stay_fp32_on_their_values(monkeypatch, capsys):
    """With int8 activations, a conv followed by a ReLU6 (or a SiLU) stays fp32, on the fp32 kernel over its int8
    values (the int8 epilogue requantises after a plain ReLU only: the ReLU6 would be an op of its own), named in
    one note; the conv a plain ReLU follows runs int8. The suite's switch turns the rule off: on here."""
    import torch
    import torch.nn as nn

    import unsparse_tvm
    from unsparse_tvm.build import print_report

    monkeypatch.setattr("unsparse_tvm.relay_passes.quantize_int8.CAPPED_FP32", True)
    torch.manual_seed(6)
    net = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU6(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU()).eval()
    with torch.no_grad():  # whole quads (channel4-like): the int8 rules for scattered nonzeros stay out of the way
        for conv in (net[0], net[2]):
            c = conv.weight.shape[1]
            quads = (torch.rand(32, max(c // 4, 1), 1, 3, 3) < 0.3).expand(32, max(c // 4, 1), 4, 3, 3)
            conv.weight.mul_(quads.reshape(32, -1, 3, 3)[:, :c].float())
    x = torch.randn(1, 8, 16, 16)
    unsparse_tvm.quantize(net, "int8", activations="int8", calibration_data="random", example_input=x)
    from unsparse_tvm.build import compile_program
    from unsparse_tvm.models import export_program
    from unsparse_tvm.target import make_target

    compiled = compile_program(export_program(net, tuple(x.shape)), make_target("llvm"), threshold=0.5,
                               activations=net.unsparse_quant["activations"]["layers"], quant=net.unsparse_quant)
    rows = {r.name: r for r in compiled.report}
    assert not rows["0"].format.startswith("int8") and rows["0"].precision == "fp32", rows["0"]
    assert rows["2"].format.startswith("int8"), rows["2"]
    assert compiled.fp32_capped == {"0": "ReLU6"}
    print_report(compiled)
    notes = [line for line in capsys.readouterr().out.splitlines() if "ReLU6 follows" in line]
    assert len(notes) == 1 and "(0)" in notes[0]
