"""int8 residual blocks: a block output that only int8 convs and their residual adds read travels as
uint8 (relay_passes/quantize_int8.py, _uint8_residuals)."""

import numpy as np
import pytest
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


class DownBlock(nn.Module):
    """resnet's first block of a stage: conv3's output and the downsample's meet at the residual add."""

    def __init__(self, stride: int):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.c1, self.c2 = nn.Conv2d(16, 8, 1), nn.Conv2d(8, 8, 3, stride=stride, padding=1)
        self.c3, self.ds = nn.Conv2d(8, 32, 1), nn.Conv2d(16, 32, 1, stride=stride)
        self.head = nn.Conv2d(32, 12, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = torch.relu(self.c3(torch.relu(self.c2(torch.relu(self.c1(x))))) + self.ds(x))
        return torch.relu(self.head(y)).mean(dim=(2, 3))


@pytest.mark.parametrize("stride,size,batch", [(1, 16, 1), (2, 32, 2), (1, 16, 2)])
def test_residual_conv_paired_with_the_conv_adding_it(stride, size, batch, llvm, monkeypatch):
    """conv3 and the downsample, pointwise on one output map, run as one kernel (relay_passes/_paired_int8): both
    inputs relayed into one buffer, both sums added in the epilogue. The same bits as the two kernels (PAIRED off,
    the negative control: no pair in its report), and within int8 tolerance of float32 PyTorch."""
    monkeypatch.setattr("unsparse_tvm.relay_passes.quantize_int8.GATHERED", False)  # pairs of quads (AVX2 gathers 1x1s)
    torch.manual_seed(stride * 10 + batch)
    model = DownBlock(stride).eval()
    shape = (batch, 3, size, size)
    ranges = int8_ready(model, shape, 0.6)
    report, run = compile_int8(model, shape, ranges, llvm)
    fused = {r.name: r.fused for r in report}
    pair = {fused["c3"], fused["ds"]}  # whichever conv's chain took the add
    assert pair in ({"bias (paired with ds)", "bias+residual(paired)+relu+requant"},
                    {"bias (paired with c3)", "bias+residual(paired)+relu+requant"}), fused
    monkeypatch.setattr("unsparse_tvm.relay_passes._paired_int8.PAIRED", False)
    plain_report, plain = compile_int8(model, shape, ranges, llvm)
    assert not any("paired" in r.fused for r in plain_report)
    x = torch.randn(*shape)
    y, ref = run(x), model(x).detach().numpy()
    np.testing.assert_array_equal(y, plain(x))
    assert np.abs(y - ref).max() < 0.1 * np.abs(ref).max()
    # a planned pair whose kernel cannot be built (an input not relayed) emits the residual conv on its own
    monkeypatch.setattr("unsparse_tvm.relay_passes._paired_int8.PAIRED", True)
    monkeypatch.setattr("unsparse_tvm.relay_passes._paired_int8.emit", lambda *a: None)
    apart_report, apart = compile_int8(model, shape, ranges, llvm)
    assert not any("paired" in r.fused for r in apart_report) and {r.name for r in apart_report} >= {"c3", "ds"}
    np.testing.assert_array_equal(apart(x), y)
