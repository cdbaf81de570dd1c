"""uint8 inputs into quads by a byte shuffle (int8_ops.quad_relay), and outputs that several int8 convs read
travelling as uint8 (relay_passes/quantize_int8.py, CHAIN_SHARED): the same bytes, so the same result."""

import numpy as np
import pytest
import torch
import torch.nn as nn


@pytest.mark.parametrize("n,c,h,w,s", [
    (1, 8, 16, 16, 1),    # one 16-position step per row
    (2, 12, 9, 18, 1),    # batch 2, rows of 18: the second step shifted back to overlap the first
    (1, 8, 33, 34, 2),    # a strided 1x1's input: every other row and column, rows of 17
])
def test_quad_relay_is_the_quad_layout(n, c, h, w, s, llvm):
    import tvm

    from unsparse_tvm.ops.sparse_int8 import quad_relay

    oh, ow = -(-h // s), -(-w // s)
    func = quad_relay(n, c, h, w, oh, ow, s, s).with_attr("global_symbol", "main")  # a module of its own
    lib = tvm.compile(tvm.IRModule({"main": func}), target=llvm)
    x = np.random.default_rng(c + w).integers(0, 256, (n, c, h, w)).astype(np.uint8)
    out = tvm.runtime.tensor(np.zeros((n, c // 4 * oh * ow, 4), np.uint8))
    lib["main"](tvm.runtime.tensor(x), out)
    want = x[:, :, ::s, ::s].reshape(n, c // 4, 4, oh * ow).transpose(0, 1, 3, 2).reshape(n, -1, 4)
    np.testing.assert_array_equal(out.numpy(), want)


class Fork(nn.Module):
    """The stem's output read by two int8 convs (a strided 1x1 and a strided 3x3, as resnet's downsample and
    conv2), their sum read by one 1x1: both are uint8 between layers, the 1x1s take the relay."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.down, self.conv = nn.Conv2d(16, 16, 1, stride=2), nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.last = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        y = torch.relu(self.conv(y) + self.down(y))
        return self.fc(torch.relu(self.last(y)).mean(dim=(2, 3)))


def test_shared_uint8_outputs_and_the_relay_change_nothing(llvm, monkeypatch):
    import tvm
    from tvm import relax

    import unsparse_tvm.ops.sparse_int8 as int8_ops
    from unsparse_tvm.build import compile_program
    from unsparse_tvm.compress.calibrate import calibrate, calibration_batches
    from unsparse_tvm.models import export_program

    torch.manual_seed(1)
    model = Fork().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight[torch.rand_like(m.weight) < 0.7] = 0
    shape = (2, 3, 32, 32)
    ranges = calibrate(model, calibration_batches(shape, None, 2, 16))["layers"]
    relays = []
    real_relay = int8_ops.quad_relay
    monkeypatch.setattr(int8_ops, "quad_relay", lambda *a: relays.append(a) or real_relay(*a))

    def build():
        compiled = compile_program(export_program(model, shape), llvm, threshold=0.5, activations=ranges)
        vm = relax.VirtualMachine(compiled.executable, tvm.cpu())
        return {r.name: r.fused for r in compiled.report}, lambda x: vm["main"](tvm.runtime.tensor(x))[0].numpy()

    fused, run = build()
    assert fused["stem"] == "bias+relu+requant"  # read by `down` and `conv` only: uint8 for both
    assert fused["conv"].endswith("+requant")  # read by `last` only
    assert sorted((a[3], a[6]) for a in relays) == [(16, 1), (32, 2)]  # `last` (16 wide), `down` (every 2nd of 32)
    monkeypatch.setattr("unsparse_tvm.relay_passes.quantize_int8.CHAIN_SHARED", False)
    monkeypatch.setattr("unsparse_tvm.relay_passes.quantize_int8._takes_quad_relay", lambda *a: False)
    fused_plain, plain = build()
    assert fused_plain["stem"] == "bias+relu"
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(run(x), plain(x))  # the same integers: requantising = the consumer's quantising
    ref = model(torch.from_numpy(x)).detach().numpy()
    assert np.abs(run(x) - ref).max() < 0.1 * np.abs(ref).max()
