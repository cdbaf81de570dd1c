"""Every built-in model, pruned to 90%, compiled for llvm through the sparse pipeline, against PyTorch."""

import numpy as np
import pytest
import torch

from conftest import pruned_program, rel_err


# vgg16 (224): vgg16-cifar's layers on 224x224 maps, 42 s; resnet50 covers 224 inputs and 32-bit offsets,
# and benchmarks/door_matrix.py checks vgg16 whole
@pytest.mark.parametrize("model", ["smallcnn", "vgg16-cifar",
                                   pytest.param("resnet18", marks=pytest.mark.slow),
                                   pytest.param("resnet50", marks=pytest.mark.slow)])
def test_builtin_model_at_90_percent_matches_torch(model, llvm):
    import tvm
    from tvm import relax

    from unsparse_tvm.build import compile_program
    from unsparse_tvm.frontend import program_input_shape

    ep = pruned_program(model, 0.9)
    compiled = compile_program(ep, llvm, threshold=0.7)
    from unsparse_tvm.compress.masks import layer_sparsity

    # every conv/linear layer got a decision (none silently left dense), and every one is sparse
    assert sorted(r.name for r in compiled.report) == sorted(n.removesuffix(".weight") for n, _, _ in layer_sparsity(ep))
    assert all(r.decision == "sparse" for r in compiled.report)
    x = torch.randn(*program_input_shape(ep), generator=torch.Generator().manual_seed(1))
    vm = relax.VirtualMachine(compiled.executable, tvm.cpu())
    y = vm["main"](tvm.runtime.tensor(x.numpy()))[0].numpy()
    with torch.no_grad():
        ref = ep.module()(x).numpy()
    assert y.shape == ref.shape
    assert rel_err(y, ref) < 1e-4


def test_batch_of_eight(llvm):
    import tvm
    from tvm import relax

    from unsparse_tvm.build import compile_program
    from unsparse_tvm.compress.prune import prune_to_program

    ep = prune_to_program("smallcnn", 0.9, batch=8)
    compiled = compile_program(ep, llvm)
    x = np.random.default_rng(0).standard_normal((8, 1, 8, 8)).astype(np.float32)
    y = relax.VirtualMachine(compiled.executable, tvm.cpu())["main"](tvm.runtime.tensor(x))[0].numpy()
    with torch.no_grad():
        ref = ep.module()(torch.from_numpy(x)).numpy()
    assert rel_err(y, ref) < 1e-5
