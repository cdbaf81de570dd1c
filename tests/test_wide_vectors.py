"""int8 kernels built with 512-bit vectors on AVX-512 (target.kernel_target): LLVM's prefer-256-bit tuning
splits their requantising write-back in 8-lane halves; without it the same code runs in whole registers and
computes the same bytes."""

import numpy as np
import pytest
import torch

from conftest import compile_int8, cpu_target, int8_ready
from unsparse_tvm.ops import names


def _module(op):
    import tvm
    from tvm import te

    a = te.placeholder((16,), "float32", name="a")
    func = te.create_prim_func([a, te.compute((16,), lambda i: a[i] * 2.0, name="b")])
    return tvm.IRModule({"main": func.with_attr(names.OP_ATTR, op) if op else func})


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 32, 1)
        self.c, self.fc = torch.nn.Conv2d(32, 32, 3, stride=2, padding=1), torch.nn.Linear(32, 10)

    def forward(self, x):
        y = torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x))))))
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("mcpu,op,wide", [
    ("cascadelake", names.SPARSE_CONV2D_INT8, True),
    ("cascadelake", names.SPARSE_DENSE_INT8, True),
    ("cascadelake", names.SPARSE_CONV2D, False),   # fp32 kernels keep LLVM's preference
    ("cascadelake", None, False),                  # anything else (pools, the VM's helpers) too
    ("haswell", names.SPARSE_CONV2D_INT8, False),  # no 512-bit registers to prefer
])
def test_kernel_target_widens_int8_kernels_on_avx512_only(mcpu, op, wide, monkeypatch):
    import tvm

    from unsparse_tvm import target as tg

    base = cpu_target(mcpu)
    got = tg.kernel_target(base, _module(op))
    assert ("-prefer-256-bit" in [str(a) for a in got.attrs.get("mattr", [])]) == wide
    assert str(got.attrs["mcpu"]) == mcpu and tg.target_cpu_features(got) == tg.target_cpu_features(base)
    both = tvm.IRModule({"f": _module(op)["main"], "g": _module(None)["main"]})
    assert tg.kernel_target(base, both) is base  # a module mixing kinds keeps the target
    monkeypatch.setattr(tg, "WIDE_VECTORS", False)
    assert tg.kernel_target(base, _module(op)) is base


@pytest.mark.parametrize("wide", [True, False])
def test_int8_write_back_runs_in_whole_registers(wide, monkeypatch):
    """A small int8 network compiled for an AVX-512 VNNI CPU: its int8 kernels' requantising write-backs convert
    in zmm registers. They did so only with the widening on (LLVM's prefer-256-bit split them into ymm halves)
    while TVM left their loops scalar (nearbyint not vectorisable) for LLVM's vectoriser to redo; now TVM emits
    them as 16-lane vectors and they stay whole either way (the widening still pays elsewhere: resnet50 95%
    int8 6.32 -> 6.24 ms, design.md item 33). Assembly only: it runs anywhere."""
    import re

    from unsparse_tvm import target as tg
    from unsparse_tvm.build import compile_program
    from unsparse_tvm.models import export_program

    monkeypatch.setattr(tg, "WIDE_VECTORS", wide)
    monkeypatch.setattr("unsparse_tvm.relay_passes.quantize_int8.GATHERED", False)  # the quads, on any host
    torch.manual_seed(0)
    net = _Net().eval()
    ranges = int8_ready(net, (1, 3, 16, 16), 0.7)
    compiled = compile_program(export_program(net, (1, 3, 16, 16)), cpu_target("cascadelake"), threshold=0.5,
                               activations=ranges)
    widths = []
    for lib in compiled.executable.mod._collect_dso_modules():
        asm = lib.inspect_source("asm")
        if "vpdpbusd" in asm:
            widths += re.findall(r"vcvtdq2ps\s+\S*%([xyz]mm)", asm)
    # 19 zmm conversions and no narrower ones (before design.md items 50-51: 32 zmm and 8 ymm, the stem's
    # epilogue pass and its tails among them)
    assert widths.count("zmm") >= 16 and widths.count("zmm") >= 4 * widths.count("ymm")


def test_widened_int8_module_computes_the_same_bytes(llvm, monkeypatch):
    """A whole int8 module (convs, a strided conv, the linear layer) built with and without the widening (on an
    AVX-512 host; elsewhere both are the same build): the same outputs bit for bit."""
    from unsparse_tvm import target as tg

    monkeypatch.setattr("unsparse_tvm.relay_passes.quantize_int8.GATHERED", False)  # the quads, on any host
    torch.manual_seed(0)
    net = _Net().eval()
    ranges = int8_ready(net, (1, 3, 16, 16), 0.7)
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    outs = []
    for wide in (True, False):
        monkeypatch.setattr(tg, "WIDE_VECTORS", wide)
        report, run = compile_int8(net, (1, 3, 16, 16), ranges, llvm)
        assert all(r.format == "int8q4" for r in report)
        outs.append(run(x))
    np.testing.assert_array_equal(outs[0], outs[1])
