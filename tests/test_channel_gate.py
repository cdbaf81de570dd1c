"""A squeeze-excitation gate folded into the sparse 1x1 conv after it (relay_passes/_conv_match.channel_gate,
ops.sparse.gate_stage): conv(x * sigmoid(g)) runs as the conv's weights scaled by sigmoid(g) per input
channel, with no multiply over the whole map left in the graph; checked against PyTorch."""

import numpy as np
import pytest
import torch
from torch import nn


class SEBlock(nn.Module):
    """depthwise conv + SiLU -> squeeze-excitation (mean, 1x1 fc, SiLU, 1x1 fc, gate) -> 1x1 project conv, as
    in efficientnet's MBConv; `gate`: "sigmoid" (torchvision's SE), "plain" (x * g, g a channel mean), or
    "silu_fc" (the fcs only: a SiLU on a 1x1 map, x * sigmoid(x), must stay the fc's epilogue)."""

    def __init__(self, c: int, o: int, gate: str, residual: bool):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.fc1, self.fc2 = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)
        self.proj = nn.Conv2d(c, o, 1)
        self.gate, self.residual = gate, residual

    def forward(self, x):
        y = nn.functional.silu(self.dw(x))  # [N, C, H, W]
        s = self.fc2(nn.functional.silu(self.fc1(y.mean((2, 3), keepdim=True))))  # [N, C, 1, 1]
        if self.gate == "sigmoid":
            y = torch.sigmoid(s) * y
        elif self.gate == "plain":
            y = y * y.mean((2, 3), keepdim=True)
        else:
            y = y + s
        out = self.proj(y)  # [N, O, H, W]
        return out + x if self.residual else out  # (residual: o == c)


def _sparse(model: nn.Module, sparsity: float, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and m.groups == 1:
                m.weight.mul_((torch.rand(m.weight.shape, generator=g) >= sparsity).float())
                m.weight[0].zero_()  # an empty row
    return model.eval()


def _compiled(model: nn.Module, x: torch.Tensor, llvm, fmt: str | None = None):
    """(outputs of the model compiled at threshold 0.5 in `fmt`, its LayerDecisions by name)."""
    import tvm
    from tvm import relax

    from unsparse_tvm.frontend import import_program
    from unsparse_tvm.relay_passes import build_pipeline

    mod, names = import_program(torch.export.export(model, (x,)))
    report: list = []
    ex = tvm.compile(mod, target=llvm, relax_pipeline=build_pipeline(llvm, threshold=0.5, names=names,
                                                                     report=report, fmt=fmt))
    y = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))
    return (y if hasattr(y, "numpy") else y[0]).numpy(), {d.name: d for d in report}


@pytest.mark.parametrize("n,c,o,hw,gate,fmt,residual", [
    (1, 32, 24, 16, "sigmoid", "ell", False),
    (2, 32, 32, 15, "sigmoid", "hyb", True),    # batch 2: one gate per image; 15x15: odd map
    (1, 48, 16, 7, "plain", "hyb", False),      # 7x7: the overlapped domain (ConvGeometry.with_overlap)
    (3, 16, 40, 9, "sigmoid", "ell", False),
])
def test_gate_is_folded_and_matches_torch(llvm, n, c, o, hw, gate, fmt, residual):
    torch.manual_seed(n * 100 + hw)
    model = _sparse(SEBlock(c, o, gate, residual), 0.8, seed=hw)
    x = torch.randn(n, c, hw, hw)
    got, report = _compiled(model, x, llvm, fmt)
    assert report["proj"].decision == "sparse" and report["proj"].fused.startswith("gate"), report["proj"]
    ref = model(x).detach().numpy()
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-5


def _map_multiplies(model: nn.Module, x: torch.Tensor, llvm, threshold: float) -> int:
    """Multiplies over the whole [1, 32, 16, 16] map left after the sparsify phase."""
    from unsparse_tvm.frontend import import_program
    from unsparse_tvm.relay_passes import build_pipeline

    mod, names = import_program(torch.export.export(model, (x,)))
    with llvm:
        text = build_pipeline(llvm, threshold=threshold, names=names, stop_after="sparsify")(mod)["main"].script()
    return sum("R.multiply" in line and "(1, 32, 16, 16)" in line for line in text.splitlines())


def test_no_multiply_over_the_map_is_left(llvm):
    """One multiply over the map is left: the depthwise conv's SiLU (x * sigmoid(x)). Negative control: with
    the project conv dense (threshold above its sparsity) the gate's multiply is there too."""
    x = torch.randn(1, 32, 16, 16)
    model = _sparse(SEBlock(32, 24, "sigmoid", False), 0.8, 0)
    assert _map_multiplies(model, x, llvm, threshold=0.5) == 1
    assert _map_multiplies(model, x, llvm, threshold=0.99) == 2


def test_a_silu_on_a_one_by_one_map_stays_the_fc_epilogue(llvm):
    """fc2's input is silu(fc1(...)) = v * sigmoid(v) on a 1x1 map: the same shape as a gate, but the end of
    fc1's fused chain; taken as a gate it computed fc1 a second time, dense (the first version did)."""
    model = _sparse(SEBlock(32, 24, "silu_fc", False), 0.8, 1)
    x = torch.randn(1, 32, 8, 8)
    got, report = _compiled(model, x, llvm)
    assert report["fc1"].fused == "bias+silu" and "gate" not in report["fc2"].fused
    ref = model(x).detach().numpy()
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-5
