"""relay_passes/fast_sigmoid.py: sigmoid and SiLU on the polynomial exp, over float32's whole range
(saturation included), against PyTorch; the pipeline uses it on llvm only."""

import numpy as np
import torch


class SigmoidSiLU(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.silu(x) + torch.sigmoid(x * 2) - torch.nn.functional.hardsigmoid(x)


def test_fast_sigmoid_and_silu_match_torch_over_the_range(llvm):
    import tvm
    from tvm import relax

    from unsparse_tvm.frontend import import_program
    from unsparse_tvm.relay_passes.fast_sigmoid import FastSigmoid

    rng = np.random.default_rng(0)
    x = np.concatenate([np.linspace(-120, 120, 4001), rng.standard_normal(4000) * 4,
                        [0.0, -0.0, 1e-30, -1e-30, 88.5, -88.5, 3e38, -3e38]]).astype(np.float32)
    x = torch.from_numpy(x).reshape(1, 1, 1, -1)
    ep = torch.export.export(SigmoidSiLU(), (x,))
    mod, _ = import_program(ep)
    fast = FastSigmoid()(mod)
    names = [gv.name_hint for gv in fast.functions]
    assert "fast_sigmoid" in names  # torch's SiLU arrives as x * sigmoid(x) (R.nn.silu is rewritten too)
    assert "R.sigmoid" not in fast.script() and "R.nn.silu" not in fast.script()
    y = relax.VirtualMachine(tvm.compile(fast, target=llvm), tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))
    y = (y if hasattr(y, "numpy") else y[0]).numpy()
    ref = SigmoidSiLU()(x).numpy()
    assert np.isfinite(y).all()
    scale = np.maximum(np.abs(ref), 1.0)
    assert (np.abs(y - ref) / scale).max() < 1e-6


def test_pipeline_uses_it_on_llvm_only(llvm, cuda):
    from unsparse_tvm.relay_passes.pipeline import pipeline_phases

    assert "FastSigmoid" in str(pipeline_phases(llvm))
    assert "FastSigmoid" not in str(pipeline_phases(cuda))
