"""A mobile block's expand conv computed on the phase planes its strided depthwise conv reads (llvm,
relay_passes/_expand_planes.py): checked against PyTorch over 3x3/2, 5x5/2 and 4x4/2 filters, odd and even maps,
batch > 1, SiLU / ReLU6 / no activation, a bias, and channels DropDeadChannels gathers; the expand's input is
what gets copied (as planes), and where the expand's output has another reader, or the map is small, the block
runs as before."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import rel_err


class Block(nn.Module):
    """expand 1x1 + BN + act -> depthwise KxK/2 + BN + act -> project 1x1 (mobilenet_v2 / efficientnet)."""

    def __init__(self, cin: int, c: int, k: int, act, bias: bool, tap: bool):
        super().__init__()
        self.expand, self.bn1 = nn.Conv2d(cin, c, 1, bias=bias), nn.BatchNorm2d(c)
        self.dw = nn.Conv2d(c, c, k, 2, (k - 1) // 2, groups=c, bias=False)
        self.bn2, self.act, self.project = nn.BatchNorm2d(c), act, nn.Conv2d(c, 8, 1)
        self.tap = tap  # the expand's output read a second time (a negative control)

    def forward(self, x):
        e = self.act(self.bn1(self.expand(x)))  # [N, C, H, W]
        y = self.project(self.act(self.bn2(self.dw(e))))  # [N, 8, OH, OW]
        return (y, e) if self.tap else y


def _block(cin, c, k, act, bias=False, dead=0, tap=False, seed=0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    m = Block(cin, c, k, act, bias, tap).eval()
    with torch.no_grad():
        for bn in (m.bn1, m.bn2):  # biases far from 0: a padding position that missed its mask would show
            bn.running_mean.uniform_(-1, 1, generator=g)
            bn.running_var.uniform_(0.5, 2, generator=g)
            bn.bias.uniform_(-1, 1, generator=g)
        for conv in (m.expand, m.dw, m.project):
            conv.weight.mul_((torch.rand(conv.weight.shape, generator=g) >= 0.9).float())
        m.expand.weight[0].zero_()  # an empty expand row: its planes are act(bias) inside, 0 in the padding
        m.dw.weight[:dead].zero_()  # dead channels: DropDeadChannels gathers the rest before the depthwise
        m.dw.weight[dead, 0, 0, 0] = 1.0  # a channel reading the top-left phase (its padding row and column)
    return m


def _run(model: nn.Module, x: torch.Tensor, target, copies: bool = True):
    """(outputs, report by layer name, planes of each phase-plane copy) through our pipeline, every layer sparse.
    copies=False leaves the count out (None): it takes a second pass of the pipeline, up to the schedules."""
    import tvm
    from tvm import relax

    from unsparse_tvm.frontend import import_program
    from unsparse_tvm.ops.names import PHASE_PLANES, op_of
    from unsparse_tvm.relay_passes import build_pipeline

    ep = torch.export.export(model, (x,))
    planes = None
    if copies:
        mod, names = import_program(ep)
        scheduled = build_pipeline(target, threshold=0.0, names=names, stop_after="schedule")(mod)
        planes = [int(f.attrs["unsparse.planes"][0]) for f in scheduled.functions.values()
                  if op_of(f) == PHASE_PLANES]
    mod, names = import_program(ep)
    report: list = []
    ex = tvm.compile(mod, target=target, relax_pipeline=build_pipeline(target, threshold=0.0, names=names,
                                                                       report=report))
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))
    outs = [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]
    return outs, {d.name: d for d in report}, planes


CASES = [  # input channels, channels, kernel, activation, bias, dead channels, input shape
    (16, 54, 3, nn.SiLU(), False, 0, (1, 16, 57, 57)),     # odd map: the last plane row and column are padding
    (12, 40, 5, nn.SiLU(), False, 0, (2, 12, 31, 29)),     # 5x5/2, batch 2, a non-square map
    (16, 48, 3, nn.ReLU6(), True, 10, (1, 16, 30, 30)),    # a bias, 10 dead channels gathered out
    (8, 48, 4, nn.Identity(), False, 0, (1, 8, 40, 44)),   # an even filter (padding 1 before, 2 after), no act
]


@pytest.mark.parametrize("case", CASES, ids=[f"k{c[2]}-{type(c[3]).__name__}-{'x'.join(map(str, c[6]))}" for c in CASES])
def test_expand_computes_the_planes_its_depthwise_reads(case, llvm):
    """The expand runs on its input's phase planes (the one copy is of those: at most cin x 4 planes and a zero
    one, where the depthwise's own copy would be of its wider input), its report says so, and the block matches
    PyTorch, the planes' padding positions 0 whatever the bias and activation."""
    cin, c, k, act, bias, dead, shape = case
    model = _block(cin, c, k, act, bias, dead, seed=int(np.random.default_rng().integers(1 << 30)))
    x = torch.randn(*shape)
    (y,), report, copies = _run(model, x, llvm)
    assert report["expand"].decision == "sparse" and report["expand"].fused.endswith("planes"), report["expand"]
    assert report["dw"].decision == "sparse"
    assert len(copies) == 1 and copies[0] <= cin * 4 + 1, copies
    with torch.no_grad():
        assert rel_err(y, model(x).numpy()) < 1e-5


@pytest.mark.parametrize("tap, size", [(True, 56), (False, 20)], ids=["read-twice", "small-map"])
def test_expand_stays_as_written(tap, size, llvm):
    """Negative controls: an expand whose output something else reads too, or on a map under 28x28 (there the
    planes' epilogue pass outweighed the saving), keeps its own kernel, and the depthwise copies its planes."""
    model = _block(16, 48, 3, nn.SiLU(), tap=tap, seed=1)
    x = torch.randn(1, 16, size, size)
    outs, report, copies = _run(model, x, llvm)
    assert report["expand"].decision == "sparse" and "planes" not in report["expand"].fused
    c, r, s = torch.nonzero(model.dw.weight[:, 0]).T
    read = len({(int(a), int(b) % 2, int(d) % 2) for a, b, d in zip(c, r, s)})  # the depthwise's (channel, phase)
    assert len(copies) == 1 and read <= copies[0] <= read + 1, (copies, read)  # its planes, not the expand input's
    with torch.no_grad():
        ref = model(x)
        ref = ref if tap else (ref,)
        assert all(rel_err(o, r.numpy()) < 1e-5 for o, r in zip(outs, ref))


@pytest.mark.parametrize("seed", range(4))
def test_plane_bounds_are_the_positions_inside_the_map(seed):
    """Each plane's row and column bounds (the epilogue's mask) are exactly the plane positions whose source
    position lies inside the map, for random maps, strides, filters and paddings."""
    from unsparse_tvm.ops.geometry import ConvGeometry
    from unsparse_tvm.ops.phase_planes import PhaseSplit

    from unsparse_tvm.relay_passes._expand_planes import planes_expand

    rng = np.random.default_rng(seed)
    h, w, s, r = (int(v) for v in rng.integers([5, 5, 2, 2], [30, 30, 4, 6]))
    pad = tuple(int(v) for v in rng.integers(0, r, 4))
    src = ConvGeometry(1, 6, h, w, 6, r, r, (s, s), pad, (1, 1))
    codes = np.sort(rng.choice(6 * s * s, 9, replace=False)).astype(np.int32)
    split = PhaseSplit(src, np.append(codes, 6 * s * s))  # and a zero plane
    plan = planes_expand(rng.standard_normal((6, 4, 1, 1)).astype(np.float32), None,
                         ConvGeometry(1, 4, h, w, 6, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1)), split)
    i, j = np.arange(src.hq)[:, None], np.arange(src.wq)[None, :]
    for p, code in enumerate(split.planes):
        a, b = code % (s * s) // s, code % s
        inside = (code < 6 * s * s) & (i * s + a - pad[0] >= 0) & (i * s + a - pad[0] < h) \
            & (j * s + b - pad[1] >= 0) & (j * s + b - pad[1] < w)
        r0, r1, c0, c1 = plan.bounds[p]
        assert np.array_equal(inside, (i >= r0) & (i < r1) & (j >= c0) & (j < c1)), (p, code, plan.bounds[p])


class _Strided(nn.Module):
    """expand 1x1 (+ bias) + act -> depthwise R x S at any stride and padding (+ act): the property test's block."""

    def __init__(self, cin, c, r, s, stride, pad, act, bias):
        super().__init__()
        self.expand, self.act = nn.Conv2d(cin, c, 1, bias=bias), act
        self.dw = nn.Conv2d(c, c, (r, s), stride, pad, groups=c, bias=False)

    def forward(self, x):
        return self.act(self.dw(self.act(self.expand(x))))  # [N, C, OH, OW]


@st.composite
def _block_configs(draw):
    """Random blocks: odd and even filters, one or both axes strided, padding per axis, batch up to 3."""
    r, s = draw(st.integers(2, 5)), draw(st.integers(1, 5))
    stride = draw(st.sampled_from([(2, 2), (3, 3), (2, 1), (1, 3)]))
    pad = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    h, w = draw(st.integers(1, 20)), draw(st.integers(1, 20))
    assume(h + 2 * pad[0] >= r and w + 2 * pad[1] >= s)
    return dict(n=draw(st.integers(1, 3)), cin=draw(st.integers(1, 8)), c=draw(st.integers(4, 16)), r=r, s=s,
                stride=stride, pad=pad, h=h, w=w, bias=draw(st.booleans()),
                act=draw(st.sampled_from(["relu", "relu6", "silu", "none"])), seed=draw(st.integers(0, 2**16)))


@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(cfg=_block_configs())
def test_random_expand_on_planes_matches_torch(cfg, llvm):
    """Property test of the planes kernel: every block the rewrite can take (any map size, any predicted gain,
    any share of the depthwise's planes read: the three bars lifted) matches PyTorch."""
    from unsparse_tvm.ops import phase_planes
    from unsparse_tvm.relay_passes import sparsify_conv2d

    acts = {"relu": nn.ReLU(), "relu6": nn.ReLU6(), "silu": nn.SiLU(), "none": nn.Identity()}
    torch.manual_seed(cfg["seed"])
    model = _Strided(cfg["cin"], cfg["c"], cfg["r"], cfg["s"], cfg["stride"], cfg["pad"], acts[cfg["act"]],
                     cfg["bias"]).eval()
    with torch.no_grad():
        for conv in (model.expand, model.dw):
            conv.weight.mul_((torch.rand(conv.weight.shape) >= 0.85).float())
        model.dw.weight[0, 0, 0, 0] = 1.0  # at least one tap, so the depthwise conv is not all dead
    x = torch.randn(cfg["n"], cfg["cin"], cfg["h"], cfg["w"])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sparsify_conv2d, "PLANES_MIN_POSITIONS", 1)
        patch.setattr(sparsify_conv2d, "planes_pay", lambda *args: (0.0, 1.0))
        patch.setattr(phase_planes, "PHASE_SPLIT_MAX_SHARE", 1.0)
        (y,), _, _ = _run(model, x, llvm, copies=False)  # the outputs are what this test checks
    with torch.no_grad():
        ref = model(x).numpy()
    assert rel_err(y, ref) < 1e-5 or np.abs(y - ref).max() < 1e-5
