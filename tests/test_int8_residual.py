"""int8 residual blocks: a block output that only int8 convs and their residual adds read travels as
uint8 (relay_passes/quantize_int8.py, _uint8_residuals)."""

import numpy as np
import torch
import torch.nn as nn

from conftest import compile_int8, int8_ready


class Bottleneck(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(c, 8, 1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, c, 1)

    def forward(self, x):
        y = torch.relu(self.c2(torch.relu(self.c1(x))))
        return torch.relu(self.c3(y) + x)


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.b1, self.b2 = nn.Conv2d(3, 16, 3, padding=1), Bottleneck(16), Bottleneck(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = self.b2(self.b1(torch.relu(self.stem(x))))
        return self.fc(y.mean(dim=(2, 3)))


def test_block_outputs_travel_as_uint8_between_int8_convs(llvm, monkeypatch):
    """b1's output is read by b2's first conv and added as b2's residual: it is written uint8 (requant) and
    b2's last conv dequantises it (the stem's output, for b1, likewise); the result moves by the residual's quantisation only (not bit-exact, unlike
    conv -> conv chaining), and stays within int8 tolerance of float32 PyTorch."""
    torch.manual_seed(0)
    model = TinyResNet().eval()
    shape = (2, 3, 16, 16)
    ranges = int8_ready(model, shape, 0.7)
    report, run = compile_int8(model, shape, ranges, llvm)
    fused = {r.name: r.fused for r in report}
    assert fused["stem"] == "bias+relu+requant"  # read by b1.c1 and added by b1.c3: uint8
    assert fused["b1.c3"] == "bias+residual(uint8)+relu+requant"  # b1's output, uint8 for b2
    assert fused["b2.c3"] == "bias+residual(uint8)+relu"  # b2's output feeds the mean: float32
    monkeypatch.setattr("unsparse_tvm.relay_passes.quantize_int8.CHAIN_RESIDUALS", False)
    plain_report, plain = compile_int8(model, shape, ranges, llvm)
    assert not any("uint8" in r.fused for r in plain_report)
    x = torch.randn(*shape)
    y, y_plain, ref = run(x), plain(x), model(x).detach().numpy()
    scale = np.abs(ref).max()
    assert not np.array_equal(y, y_plain)  # the residual really was quantised
    assert np.abs(y - y_plain).max() < 0.05 * scale
    assert np.abs(y - ref).max() < 0.1 * scale and np.abs(y_plain - ref).max() < 0.1 * scale
