"""x86 schedule for the phase-plane copy of a strided depthwise conv (ops.phase_planes): the flat axis split
back into (plane, row, column), parallel over the planes, a row's columns unrolled where they are few, so
that LLVM folds the bounds tests of a plane's interior columns."""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.target import Target

from unsparse_tvm.ops import names

from ._common import PAD_UNROLL, ScheduleRule, fork_join

OP = names.PHASE_PLANES

# A copy of fewer elements than this runs without a parallel loop (its fork and join cost more than it
# gains; the sparse conv rule's SERIAL_FMAS, per copied element)
SERIAL_ELEMENTS = 200_000


@dataclass
class Config:
    unroll: int = PAD_UNROLL  # a plane row's columns unrolled up to this many (schedules/_common.PAD_UNROLL)


def _plane_shape(func: tirx.PrimFunc) -> tuple[int, int, int]:
    """(planes, rows, columns) of the copy (its unsparse.planes attribute, relay_passes/sparsify_conv2d)."""
    planes, rows, cols = (int(v) for v in func.attrs["unsparse.planes"])
    return planes, rows, cols


def schedule(sch: s_tir.Schedule, func: tirx.PrimFunc, target: Target, cfg: Config) -> None:
    planes, rows, cols = _plane_shape(func)
    n, i = sch.get_loops(sch.get_sblock("phase_planes"))
    p, row, col = sch.split(i, [planes, rows, cols])
    fork_join(sch, sch.fuse(n, p), planes * rows * cols >= SERIAL_ELEMENTS)
    if cols <= cfg.unroll:
        sch.unroll(col)


def space(sch: s_tir.Schedule) -> list[s_tir.Schedule]:
    """No knob worth a trial: the default schedule alone (tuning does not extract this operator)."""
    schedule(sch, sch.mod["main"], None, Config())
    return [sch]


RULE = ScheduleRule((OP,), "llvm", Config, schedule, space)
