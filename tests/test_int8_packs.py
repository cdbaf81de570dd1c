"""Requantisation by vcvtps2dq and saturating packs on x86 without VNNI (ActQuant.packs, design.md item 67): the
same bytes as the rounding-bias path, with fewer vector instructions.

The kernels are built for Haswell (AVX2); the runs need a host that executes AVX2, the assembly checks do not."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from conftest import cpu_target, executable_asm
from unsparse_tvm.hostcpu import host_features

needs_avx2 = pytest.mark.skipif("avx2" not in host_features(), reason="this CPU does not execute AVX2 code")


def _quantize_kernel(act, relu: bool):
    """A Haswell build of sparse_int8.quantize over a float vector of 4096, 64 lanes a vector op (as a write-back
    of 8 registers), and its assembly."""
    import tvm
    from tvm import te

    from unsparse_tvm.ops.sparse_int8 import quantize

    x = te.placeholder((4096,), "float32", name="x")
    y = te.compute((4096,), lambda i: quantize(x[i], act, relu), name="q")
    sch = tvm.s_tir.Schedule(te.create_prim_func([x, y]))
    (i,) = sch.get_loops(sch.get_sblock("q"))
    sch.vectorize(sch.split(i, [None, 64])[1])
    lib = tvm.compile(sch.mod, target=cpu_target("haswell"))
    return lib, lib.mod.inspect_source("asm")


def _edge_values(rng: np.random.Generator, scale: float) -> np.ndarray:
    """Random values and the ones rounding and clamping can get wrong: ties (k + 1/2 of the scale, both
    parities), around qmax and 0, past int32 once scaled, infinities."""
    x = (rng.standard_normal(4096) * 60 * scale).astype(np.float32)
    ties = ((np.arange(-40, 300) + 0.5) * scale).astype(np.float32)
    specials = np.array([0.0, -0.0, 126.4 * scale, 126.5 * scale, 127.5 * scale, 128 * scale, -0.5 * scale,
                         -0.49 * scale, 3e9 * scale, -3e9 * scale, 1e30, -1e30, np.inf, -np.inf], np.float32)
    x[:len(ties)] = ties
    x[len(ties):len(ties) + len(specials)] = specials
    return x


@needs_avx2
@pytest.mark.parametrize("relu", [False, True])
def test_packed_requantisation_is_the_same_bytes(relu):
    """zp 0, qmax 127 (AVX2's): the packs path's bytes equal the rounding-bias path's and PyTorch's (round half to
    even, clamped) on ties, huge and infinite values; its assembly converts (vcvtps2dq) where the other path
    compares and masks (vcmpltps with a ReLU, vandps), and the other path never converts."""
    import tvm

    from unsparse_tvm.ops.int8_formats import ActQuant, torch_quantize

    act = ActQuant(0.0371, 0, 127)
    x = _edge_values(np.random.default_rng(67), act.scale)
    outs, asm = {}, {}
    for packs in (False, True):
        lib, asm[packs] = _quantize_kernel(ActQuant(act.scale, 0, 127, packs=packs), relu)
        out = tvm.runtime.tensor(np.zeros(4096, np.uint8))
        lib(tvm.runtime.tensor(x), out)
        outs[packs] = out.numpy()
    ref = torch_quantize(torch.from_numpy(np.maximum(x, 0) if relu else x), act).numpy().astype(np.uint8)
    np.testing.assert_array_equal(outs[False], ref)
    np.testing.assert_array_equal(outs[True], outs[False])
    assert "vcvtps2dq" in asm[True] and "vcvtps2dq" not in asm[False]
    for op in ("vandps", "vcmpltps") if relu else ("vandps",):
        assert op in asm[False] and op not in asm[True], op


def _net_asm_and_outputs(monkeypatch, packs: bool, x: np.ndarray):
    """A Haswell build of a small ReLU net (a channel4-pruned 3x3 and 1x1 with a residual, then a 1x1 pruned
    unstructured, which AVX2 runs gathered) with relay_passes.quantize_int8.PACKS as given: (its int8 formats,
    its assembly, its outputs on x)."""
    import tvm
    from tvm import relax

    from unsparse_tvm.build import compile_program
    from unsparse_tvm.compress.calibrate import calibrate, calibration_batches
    from unsparse_tvm.compress.channel_quads import channel_quad_mask
    from unsparse_tvm.models import export_program

    monkeypatch.setattr("unsparse_tvm.relay_passes.quantize_int8.PACKS", packs)
    torch.manual_seed(67)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(64, 64, 3, padding=1)
            self.b = torch.nn.Conv2d(64, 64, 1)
            self.c = torch.nn.Conv2d(64, 64, 1)

        def forward(self, x):
            y = torch.relu(self.a(x))
            y = torch.relu(self.b(y) + y)
            return torch.relu(self.c(y))

    model = Net().eval()
    with torch.no_grad():
        for conv in (model.a, model.b):  # 90% of the channel quads zero, as prune --method channel4 does
            conv.weight *= channel_quad_mask(conv.weight, 0.9)
        model.c.weight *= (torch.rand(model.c.weight.shape) < 0.1).float()  # unstructured: quads of one
    shape = (2, 64, 16, 16)
    ranges = calibrate(model, calibration_batches(shape, None, 2, 4))["layers"]
    compiled = compile_program(export_program(model, shape), cpu_target("haswell"), threshold=0.5, activations=ranges)
    asm = executable_asm(compiled.executable)
    out = None
    if "avx2" in host_features():
        vm = relax.VirtualMachine(compiled.executable, tvm.cpu())
        out = vm["main"](tvm.runtime.tensor(x))
        out = (out if hasattr(out, "numpy") else out[0]).numpy()
    return {r.name: r.format for r in compiled.report}, asm, out


def test_a_net_requantised_by_packs_is_bit_for_bit(monkeypatch):
    """The whole int8 pipeline on AVX2 code, quads and gathered kernels, batch 2: with PACKS the same outputs bit
    for bit as without, and fewer compares and masks (the clamp at 0 and the byte mask gone from every ReLU's
    requantisation); without PACKS no vcvtps2dq at all (the negative control)."""
    x = np.random.default_rng(670).standard_normal((2, 64, 16, 16)).astype(np.float32)
    formats, asm_on, out_on = _net_asm_and_outputs(monkeypatch, True, x)
    assert set(formats.values()) == {"int8q4", "int8g4"}, formats
    _, asm_off, out_off = _net_asm_and_outputs(monkeypatch, False, x)
    if out_on is not None:
        np.testing.assert_array_equal(out_on, out_off)

    def count(asm: str, op: str) -> int:
        return len(re.findall(rf"\b{op}\b", asm))

    assert count(asm_on, "vcvtps2dq") > 0 and count(asm_off, "vcvtps2dq") == 0
    assert count(asm_on, "vcmpltps") + count(asm_on, "vandps") < count(asm_off, "vcmpltps") + count(asm_off, "vandps")
