"""Networks nobody on the project wrote (torchvision definitions, random weights), pruned as a new user
would (`torch.nn.utils.prune.l1_unstructured` at 90% on every conv/linear, `torch.export`), compiled for
llvm with the default per-layer cost choice, against PyTorch on a fresh random input. Small inputs keep
it to a few minutes on 2 cores; together they cover depthwise and grouped convs, squeeze-excitation,
SiLU/hardswish, concat, channel shuffle, adaptive and ceil-mode pooling and a segmentation head."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as tprune

from conftest import rel_err

from unsparse_tvm.errors import UnsparseError
from unsparse_tvm.zoo import import_torchvision

try:  # a test-only dependency (the `test` extra); plain `import torchvision` fails next to the CPU torch
    import_torchvision()
except UnsparseError:
    pytest.skip("torchvision is not installed", allow_module_level=True)

# (torchvision name, input size): what each adds; densenet121 (long concat chains, BN-ReLU before conv),
# 35 s here, is in benchmarks/door_matrix.py with the rest of the zoo
ARCHS = [
    ("mobilenet_v3_small", 64),      # depthwise, SE (pool, small linears, hardsigmoid), hardswish
    ("efficientnet_b0", 64),         # depthwise 3x3/5x5, SE with SiLU, stochastic depth (eval: identity)
    ("shufflenet_v2_x0_5", 64),      # channel shuffle, concat, split
    ("regnet_x_400mf", 64),          # grouped 3x3 convs
    ("googlenet", 64),               # inception concat, ceil-mode max pooling
    ("squeezenet1_1", 64),           # fire modules, conv classifier, adaptive pooling
    ("lraspp_mobilenet_v3_large", 64),  # segmentation head: atrous, bilinear upsampling
]


def _pruned_export(arch: str, size: int) -> torch.export.ExportedProgram:
    from unsparse_tvm.models import build_model  # seeded weights and non-trivial BN statistics

    model = build_model(f"tv:{arch}@{size}")
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            tprune.l1_unstructured(m, "weight", amount=0.9)
            tprune.remove(m, "weight")
    with torch.no_grad():
        return torch.export.export(model.eval(), (torch.randn(1, 3, size, size),))


@pytest.mark.slow
@pytest.mark.parametrize("arch,size", ARCHS, ids=[a for a, _ in ARCHS])
def test_torchvision_architecture_matches_torch(arch, size, llvm):
    import tvm
    from tvm import relax

    from unsparse_tvm.build import compile_program

    ep = _pruned_export(arch, size)
    compiled = compile_program(ep, llvm)
    assert compiled.report, "no conv/linear layer got a decision"
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(7))
    vm = relax.VirtualMachine(compiled.executable, tvm.cpu())
    y = vm["main"](tvm.runtime.tensor(x.numpy()))
    y = (y[0] if not hasattr(y, "numpy") else y).numpy()
    with torch.no_grad():
        ref = ep.module()(x).numpy()
    assert y.shape == ref.shape
    assert np.isfinite(y).all()
    assert rel_err(y, ref) < 1e-3


def test_zoo_names_parse_and_fail_cleanly():
    from unsparse_tvm import zoo
    from unsparse_tvm.errors import UnsparseError
    from unsparse_tvm.models import BUILTIN_MODELS

    assert zoo.parse("tv:resnet50") == ("tv", "resnet50", 224)
    assert zoo.parse("tv:inception_v3") == ("tv", "inception_v3", 299)
    assert zoo.parse("tv:mobilenet_v2@128") == ("tv", "mobilenet_v2", 128)
    assert "tv:mobilenet_v2@96" in BUILTIN_MODELS
    assert BUILTIN_MODELS["tv:mobilenet_v2@96"].input_shape == (3, 96, 96)
    assert "resnet50" in BUILTIN_MODELS and "nope" not in BUILTIN_MODELS
    for bad in ("tv:", "tv:resnet50@x", "tv:resnet50@4", "tv:no_such_net"):
        with pytest.raises(UnsparseError):
            BUILTIN_MODELS[bad]


def test_cli_prunes_a_torchvision_name(tmp_path):
    from conftest import assert_proc_one_line_error, cli

    out = tmp_path / "sq.pt2"
    cli("prune", "tv:squeezenet1_1@32", "--sparsity", "0.9", "-o", out)
    proc = cli("inspect", out)
    assert "features.0" in proc.stdout
    bad = cli("compile", "tv:no_such_net", "-o", tmp_path / "x.so", check=False)
    assert_proc_one_line_error(bad, "no_such_net")
