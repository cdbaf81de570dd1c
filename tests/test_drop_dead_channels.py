"""relay_passes/drop_dead_channels.py: inverted residual blocks whose depthwise filters are partly all zero
shrink to their live channels, and the compiled model still equals PyTorch on a fresh input; blocks where
that would not be exact are left alone."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import rel_err


class Inverted(nn.Module):
    """expand 1x1 + BN + act, depthwise 3x3 + BN + act, project 1x1 [+ BN] (+ identity); `se`: the depthwise
    output also scales itself by its channel means (a squeeze-excitation's second use)."""

    def __init__(self, c=8, hidden=24, stride=1, act=nn.ReLU6, project_bn=True, se=False, k=3):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(c, hidden, 1, bias=False), nn.BatchNorm2d(hidden), act())
        self.dw = nn.Sequential(nn.Conv2d(hidden, hidden, k, stride, k // 2, groups=hidden, bias=False),
                                nn.BatchNorm2d(hidden), act())
        self.project = nn.Sequential(nn.Conv2d(hidden, c, 1, bias=False), nn.BatchNorm2d(c) if project_bn else nn.Identity())
        self.residual, self.se = stride == 1, se

    def forward(self, x):
        d = self.dw(self.expand(x))
        if self.se:
            d = d * torch.sigmoid(d.mean((2, 3), keepdim=True))
        y = self.project(d)
        return y + x if self.residual else y


def _program(model, dead, shape=(2, 8, 13, 13), seed=0):
    """model with the depthwise filters of channels `dead` zeroed and random BN statistics (nonzero biases, so a
    dead channel's constant is not zero), exported on a fresh input."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-1, 1)
    with torch.no_grad():
        model.dw[0].weight[dead] = 0
    x = torch.randn(*shape)
    return torch.export.export(model.eval(), (x,)), x


def _compiled(ep, target, threshold=0.0, **options):
    from unsparse_tvm.build import compile_relax
    from unsparse_tvm.frontend import import_program, program_input_shape, program_outputs

    mod, names = import_program(ep)
    compiled = compile_relax(mod, names, target, program_input_shape(ep), program_outputs(ep), threshold=threshold,
                             **options)
    return compiled, names


def _run(compiled, x):
    import tvm
    from tvm import relax

    y = relax.VirtualMachine(compiled.executable, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))
    return (y[0] if not hasattr(y, "numpy") else y).numpy()


CASES = [  # stride, activation, project BN, dead channels of 24
    (1, nn.ReLU6, True, [0, 5, 6, 23]),        # first and last channel, residual
    (2, nn.ReLU6, True, list(range(0, 24, 2))),  # stride 2: half the channels
    (1, nn.SiLU, False, [3, 4, 17]),           # SiLU's constant; a project without bias gets one
    (1, nn.ReLU, True, list(range(23))),       # one channel left
]


@pytest.mark.parametrize("case", CASES, ids=[f"s{c[0]}-{c[1].__name__}-bn{int(c[2])}-d{len(c[3])}" for c in CASES])
def test_dead_channels_leave_the_block_and_outputs_match_torch(case, llvm):
    stride, act, project_bn, dead = case
    ep, x = _program(Inverted(stride=stride, act=act, project_bn=project_bn), dead)
    compiled, names = _compiled(ep, llvm)
    shapes = {r.name: r.shape for r in compiled.report}
    live = 24 - len(dead)
    assert shapes["expand.0"][0] == live and shapes["dw.0"][0] == live and shapes["project.0"][1] == live
    assert names.dropped == {"dw.0": (len(dead), 24)}
    assert rel_err(_run(compiled, x), ep.module()(x).detach().numpy()) < 1e-5


@pytest.mark.parametrize("what", ["no dead filter", "all dead", "dense baseline"])
def test_blocks_left_alone(what, llvm):
    """Negative controls: nothing to drop, nothing left, and TVM's dense baseline (sparse=False)."""
    dead = {"no dead filter": [], "all dead": list(range(24))}.get(what, [1, 2, 9])
    ep, x = _program(Inverted(), dead)
    compiled, names = _compiled(ep, llvm, sparse=what != "dense baseline")
    assert names.dropped == {} and names.gathered == {}
    assert all(24 in r.shape for r in compiled.report)
    assert rel_err(_run(compiled, x), ep.module()(x).detach().numpy()) < 1e-5


GATHER_CASES = [  # threshold (0.99: all dense), depthwise kernel, stride, act, input shape
    (0.0, 3, 1, nn.ReLU6, (2, 8, 13, 13)),
    (0.99, 3, 1, nn.ReLU6, (2, 8, 13, 13)),
    (0.0, 5, 2, nn.SiLU, (1, 8, 17, 15)),  # efficientnet's 5x5/2, odd sizes
    (0.0, 3, 2, nn.SiLU, (3, 8, 16, 16)),  # batch 3
]


@pytest.mark.parametrize("case", GATHER_CASES, ids=[f"t{c[0]}-k{c[1]}s{c[2]}-{c[3].__name__}-n{c[4][0]}" for c in GATHER_CASES])
def test_second_use_of_the_depthwise_output_drops_from_the_expand_only(case, llvm):
    """A squeeze-excitation-like second use of the depthwise output: the dead channel reaches the project conv
    scaled per image, so only the expand conv loses it, the depthwise conv reading the live channels through
    a gather. Sparse, the kernel reads them in place (no take is left); dense, the take copies them out."""
    import tvm

    from unsparse_tvm.frontend import import_program
    from unsparse_tvm.relay_passes import build_pipeline

    threshold, k, stride, act, shape = case
    ep, x = _program(Inverted(se=True, k=k, stride=stride, act=act), [1, 2, 9, 23], shape)
    compiled, names = _compiled(ep, llvm, threshold=threshold)
    assert names.dropped == {} and names.gathered == {"dw.0": (4, 24)}
    shapes = {r.name: r.shape for r in compiled.report}
    assert shapes["expand.0"][0] == 20 and shapes["dw.0"][0] == 24 and shapes["project.0"][1] == 24
    assert rel_err(_run(compiled, x), ep.module()(x).detach().numpy()) < 1e-5
    mod, names = import_program(ep)
    with llvm:
        sparsified = build_pipeline(llvm, names=names, threshold=threshold, stop_after="sparsify")(mod)
    assert ("R.take" in sparsified.script()) == (threshold > 0.9)


@pytest.mark.parametrize("activations", [None, "int8"])
def test_quantised_models_gather_too(activations):
    """A quantised model (int8 weights; with int8 activations too) drops a squeeze-excitation block's dead channels
    from its expand conv as the fp32 one does: its depthwise conv runs the fp32 kernel on the weights' values,
    which reads the gather (efficientnet_b0@224 90% int8: its 16->96 expand on 112x112, kept whole, went dense,
    0.79 ms against 0.16). Matches PyTorch within int8's error."""
    import unsparse_tvm

    net = Inverted(se=True, act=nn.SiLU)
    _, x = _program(net, [1, 2, 9, 23], (1, 8, 16, 16))  # (in place: its dead filters and BN statistics)
    unsparse_tvm.quantize(net, "int8", activations=activations, calibration_data="random", example_input=x)
    model = unsparse_tvm.compile(net, example_input=x, threshold=0.0)
    shapes = {r["name"]: r["shape"] for r in model.report}
    assert shapes["expand.0"][0] == 20 and shapes["dw.0"][0] == 24, shapes
    with torch.no_grad():
        ref = net(x)
    assert float((model(x) - ref).abs().max() / ref.abs().max()) < 0.05


def test_no_gather_where_the_depthwise_conv_cannot_read_one(cuda):
    """On CUDA the depthwise conv stays dense, so the gather would be a copy: the block is left alone there."""
    ep, _ = _program(Inverted(se=True), [1, 2, 9])
    _, names = _compiled(ep, cuda)
    assert names.dropped == {} and names.gathered == {}


def test_mobilenet_v2_block_chain_shrinks(llvm):
    """Two blocks in a row, as torchvision builds them: each block's own dead channels, no more."""
    torch.manual_seed(1)
    model = nn.Sequential(Inverted(hidden=16), Inverted(hidden=32)).eval()
    for block, dead in zip(model, ([2, 3], [0, 31, 7])):
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.bias.data.uniform_(-1, 1)
        with torch.no_grad():
            block.dw[0].weight[dead] = 0
    x = torch.randn(1, 8, 9, 9)
    ep = torch.export.export(model, (x,))
    compiled, names = _compiled(ep, llvm)
    assert names.dropped == {"0.dw.0": (2, 16), "1.dw.0": (3, 32)}
    y = _run(compiled, x)
    assert rel_err(y, model(x).detach().numpy()) < 1e-5
    assert np.isfinite(y).all()
