"""The int8 quads kernel's register tile fits the target's registers: AVX2 has 16, AVX-512 32 (design.md item 59).

Assembly checks only: the AVX2 code is built, not run, so they hold on any host."""

from __future__ import annotations

import re

import pytest

from conftest import cpu_target, executable_asm
from unsparse_tvm.schedules._common import largest_divisor
from unsparse_tvm.schedules.sparse_conv2d_int8_cpu import _clamp, _tile_registers, interleave_tile

# an accumulator kept on the stack: read back from it into a ymm/zmm register, or added to from it
SPILL = re.compile(r"vmov\w+\s+-?\w*\(%rsp\),\s*%[yz]mm\d+|vpaddd\s+-?\w*\(%rsp\)")


def _spills(monkeypatch, registers: int | None = None) -> int:
    """Accumulator spills in the AVX2 build of a two-layer 64-channel 8x8 3x3 net pruned in channel quads
    (vgg16-cifar's 8x8 layers: 8 vectors of 8 positions), compiled by the int8 pipeline; registers: what
    _tile_registers says instead (29 for AVX2: the AVX-512 budget it took before)."""
    import torch
    import torch.nn as nn

    from unsparse_tvm.build import compile_program
    from unsparse_tvm.compress.calibrate import calibrate, calibration_batches
    from unsparse_tvm.compress.channel_quads import channel_quad_mask
    from unsparse_tvm.models import export_program

    if registers is not None:
        monkeypatch.setattr("unsparse_tvm.schedules.sparse_conv2d_int8_cpu._tile_registers", lambda lanes: registers)
    torch.manual_seed(59)
    model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU())
    with torch.no_grad():
        for conv in (model[0], model[2]):  # 90% of the 4-channel quads zero, as prune --method channel4 does
            conv.weight *= channel_quad_mask(conv.weight, 0.9)
    ranges = calibrate(model, calibration_batches((1, 64, 8, 8), None, 2, 4))["layers"]
    compiled = compile_program(export_program(model, (1, 64, 8, 8)), cpu_target("haswell"), threshold=0.5,
                               activations=ranges)
    assert [r.format for r in compiled.report] == ["int8q4", "int8q4"]
    asm = executable_asm(compiled.executable)
    assert "vpmaddubsw" in asm and "zmm" not in asm
    return len(SPILL.findall(asm))


def test_avx2_int8_tile_keeps_its_accumulators_in_registers(monkeypatch):
    """AVX2 code at the default knobs: 8 vectors x 1 row, no accumulator on the stack. Negative control: the
    AVX-512 budget (2 rows, 16 accumulators in 16 ymm registers) does spill."""
    assert _spills(monkeypatch) == 0
    assert _spills(monkeypatch, 29) > 0


@pytest.mark.parametrize("unroll", range(1, 9))
def test_default_rows_fit_the_registers_and_avx512_is_unchanged(unroll):
    """rows x vectors within the registers left (13 on AVX2, 29 on AVX-512); AVX-512 takes what it took before
    (enough rows for 16 accumulators, at most 8)."""
    q = 8 * unroll * 16  # a map of whole steps of `unroll` vectors, 16 lanes or 8
    for lanes, regs in ((8, 13), (16, 29)):
        assert _tile_registers(lanes) == regs
        _, u, rows = _clamp(64, q, lanes, 16, unroll, 0, regs)
        assert u == unroll and rows * unroll <= regs
    assert _clamp(64, q, 16, 16, unroll, 0, 29)[2] == largest_divisor(16, min(8, -(-16 // unroll)))
    assert interleave_tile(64, 8 * 16 * 8, 8) == 1 and interleave_tile(64, 8 * 16 * 16, 16) == 2


def _write_back_lane_moves(map_hw: int) -> int:
    """Lane-by-lane moves (vpextrd, vpinsrd) in the AVX2 build of a 1x1 int8 conv on a map_hw x map_hw map
    pruned in channel quads, its requantising write-back inlined into the register tile."""
    import torch
    import torch.nn as nn

    from unsparse_tvm.build import compile_program
    from unsparse_tvm.compress.calibrate import calibrate, calibration_batches
    from unsparse_tvm.compress.channel_quads import channel_quad_mask
    from unsparse_tvm.models import export_program

    torch.manual_seed(61)
    model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 128, 1), nn.ReLU())
    with torch.no_grad():
        for conv in (model[0], model[2]):  # 90% of the 4-channel quads zero, as prune --method channel4 does
            conv.weight *= channel_quad_mask(conv.weight, 0.9)
    shape = (1, 64, map_hw, map_hw)
    ranges = calibrate(model, calibration_batches(shape, None, 2, 4))["layers"]
    compiled = compile_program(export_program(model, shape), cpu_target("haswell"), threshold=0.5, activations=ranges)
    assert [r.format for r in compiled.report] == ["int8q4", "int8q4"]
    asm = executable_asm(compiled.executable)
    return len(re.findall(r"\bvp(?:extr|insr)d\b", asm))


def test_avx2_write_back_of_seven_vectors_stays_in_registers(monkeypatch):
    """28x28, 14x14 and 7x7 maps run 7 vectors a step on AVX2: their write-back as one int32x56 vector LLVM
    took apart lane by lane through the stack (~84 vpextrd/vpinsrd a kernel, resnet50 95% channel4 1.31x slower
    on Zen 3); a register at a time it has none. Negative control: the whole-width write-back."""
    assert _write_back_lane_moves(14) == 0
    monkeypatch.setattr("unsparse_tvm.schedules.sparse_conv2d_int8_cpu._whole_write_back", lambda lanes, width: True)
    assert _write_back_lane_moves(14) >= 100  # 672 measured
