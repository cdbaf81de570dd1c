"""Depthwise and grouped conv2d with the epilogues real networks fuse after them (BN, ReLU6, SiLU,
hardswish, residual add), through the llvm pipeline: scheduled by schedules/depthwise_conv2d_cpu.py (not
the fallback) as one kernel, and equal to PyTorch on a fresh random input."""

import pytest
import torch
import torch.nn as nn

from conftest import rel_err


class DWBlock(nn.Module):
    def __init__(self, c, k, stride, groups, act, residual=False):
        super().__init__()
        self.conv = nn.Conv2d(c, c, k, stride, k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.act = act
        self.residual = residual

    def forward(self, x):
        y = self.act(self.bn(self.conv(x)))
        return y + x if self.residual else y


CASES = [  # channels, kernel, stride, groups (None: depthwise), activation, residual, input size
    (8, 3, 1, None, nn.ReLU6(), False, 112),   # wider than 4 registers: the width is split
    (16, 3, 1, None, nn.SiLU(), False, 29),    # odd size
    (24, 5, 1, None, nn.Hardswish(), True, 7),  # 5x5 on a 7x7 map, residual
    (32, 3, 1, 4, nn.ReLU(), False, 14),       # grouped (8 input channels per group)
    (12, 7, 1, None, nn.Identity(), False, 9),  # convnext's 7x7, no activation
]


def _program(c, k, stride, groups, act, residual, size):
    torch.manual_seed(0)
    m = DWBlock(c, k, stride, groups or c, act, residual).eval()
    m.bn.running_mean.uniform_(-0.2, 0.2)
    m.bn.running_var.uniform_(0.5, 1.5)
    with torch.no_grad():
        return torch.export.export(m, (torch.randn(1, c, size, size),))


@pytest.mark.parametrize("case", CASES, ids=[f"c{c[0]}k{c[1]}s{c[2]}g{c[3]}n{c[6]}" for c in CASES])
def test_grouped_conv_uses_our_rule_and_matches_torch(case, llvm):
    import tvm
    from tvm import relax, tirx

    from unsparse_tvm.build import compile_program
    from unsparse_tvm.frontend import import_program
    from unsparse_tvm.ops.names import op_of
    from unsparse_tvm.relay_passes import build_pipeline

    ep = _program(*case)
    mod, names = import_program(ep)
    scheduled = build_pipeline(llvm, names=names, report=[], sparse=False, stop_after="schedule")(mod)
    ops = [op_of(f) for f in scheduled.functions.values() if isinstance(f, tirx.PrimFunc)]
    assert ops.count("depthwise_conv2d") == 1
    compiled = compile_program(ep, llvm, sparse=False)
    x = torch.randn(*ep.example_inputs[0][0].shape, generator=torch.Generator().manual_seed(3))
    y = relax.VirtualMachine(compiled.executable, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))
    y = (y if hasattr(y, "numpy") else y[0]).numpy()
    with torch.no_grad():
        ref = ep.module()(x).numpy()
    assert y.shape == ref.shape
    assert rel_err(y, ref) < 1e-5


def test_space_samples_the_register_tile(llvm):
    from tvm import s_tir, tirx

    from unsparse_tvm.frontend import import_program
    from unsparse_tvm.relay_passes import build_pipeline
    from unsparse_tvm.schedules import depthwise_conv2d_cpu

    ep = _program(*CASES[0])
    mod, names = import_program(ep)
    legal = build_pipeline(llvm, names=names, report=[], sparse=False, stop_after="legalize")(mod)
    func = next(f for f in legal.functions.values() if isinstance(f, tirx.PrimFunc)
                and depthwise_conv2d_cpu.conv_block(s_tir.Schedule(f)) is not None)
    spaces = depthwise_conv2d_cpu.space(s_tir.Schedule(func))
    decisions = [inst for inst in spaces[0].trace.insts if inst.kind.name == "SampleCategorical"]
    assert len(decisions) == 2  # vectors per row, rows
    choices = [int(c) for c in decisions[0].attrs[0]]
    assert len(spaces) == 2  # 16 and 8 lanes (both divide 112)
    assert all((112 // 16) % c == 0 for c in choices) and 7 in choices
    assert [int(c) for c in decisions[1].attrs[0]] == [1, 2, 4, 7, 8]  # divisors of the 112 rows, up to 8


@pytest.mark.parametrize("k,stride,size,ours", [
    (3, 2, 28, True),    # mobilenet's 3x3 (padded row 30: two phase planes of 15)
    (5, 2, 16, True),    # efficientnet's 5x5 (padded row 20)
    (3, 2, 16, None),    # a 3x3 on 16x16: ours on 8-lane code, the fallback on 16-lane (AVX-512) code
    (7, 2, 27, False),   # padded row 33 is odd: no phase split, the fallback
    (3, 3, 24, False),   # stride 3: the fallback
])
def test_strided_depthwise_matches_torch(k, stride, size, ours, llvm):
    import tvm
    from tvm import relax, s_tir, tirx

    from unsparse_tvm.build import compile_program
    from unsparse_tvm.frontend import import_program
    from unsparse_tvm.ops.names import op_of
    from unsparse_tvm.relay_passes import build_pipeline
    from unsparse_tvm.schedules import depthwise_conv2d_cpu
    from unsparse_tvm.schedules._common import cpu_vector_lanes

    ep = _program(16, k, stride, None, nn.SiLU(), False, size)
    mod, names = import_program(ep)
    legal = build_pipeline(llvm, names=names, report=[], sparse=False, stop_after="legalize")(mod)
    func = next(f for f in legal.functions.values() if isinstance(f, tirx.PrimFunc)
                and depthwise_conv2d_cpu.conv_block(s_tir.Schedule(f)) is not None)
    got_stride, padded = depthwise_conv2d_cpu.stride_of(s_tir.Schedule(func))
    assert got_stride == stride and (padded % 2 == 1) == (size == 27)
    scheduled = build_pipeline(llvm, names=names, report=[], sparse=False, stop_after="schedule")(mod)
    tagged = "depthwise_conv2d" in [op_of(f) for f in scheduled.functions.values() if isinstance(f, tirx.PrimFunc)]
    assert tagged == (ours if ours is not None else cpu_vector_lanes(llvm)[0] < 16)
    compiled = compile_program(ep, llvm, sparse=False)
    x = torch.randn(1, 16, size, size, generator=torch.Generator().manual_seed(5))
    y = relax.VirtualMachine(compiled.executable, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))
    with torch.no_grad():
        ref = ep.module()(x).numpy()
    assert rel_err((y if hasattr(y, "numpy") else y[0]).numpy(), ref) < 1e-5


@pytest.mark.parametrize("mcpu", ["haswell", "skylake-avx512"])
def test_stride2_phase_planes_are_built_with_shuffles(mcpu):
    """The stride-2 column-phase copy reads each padded row with contiguous vector loads and deinterleaves
    them with shuffles (LLVM, from the unrolled phase loop), for AVX2 and AVX-512 code alike: compiled and
    read, not run. Vectorised by TVM, each strided read was gathered lane by lane (a vinsertps per lane),
    which made the phase split lose to TVM's fallback on 3x3s (benchmarks/dw_layers.py --stride 2)."""
    import re

    import tvm

    from unsparse_tvm.build import compile_program
    from unsparse_tvm.target import TRIPLE

    target = tvm.target.Target({"kind": "llvm", "mtriple": TRIPLE, "mcpu": mcpu})
    ep = _program(16, 3, 2, None, nn.ReLU6(), False, 64)
    asm = compile_program(ep, target, sparse=False).executable.mod.imports[0].inspect_source("asm")
    ops = re.findall(r"^\s+(v[a-z0-9]+)\s", asm, re.M)
    assert "vinsertps" not in ops
    assert {"vshufps", "vpermps", "vpermt2ps", "vpermi2ps", "vunpcklps"} & set(ops)
    assert "vfmadd231ps" in ops  # the conv itself is in this module
