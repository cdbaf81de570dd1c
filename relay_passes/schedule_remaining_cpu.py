"""ScheduleRemainingCPU (llvm): after our rules, schedule every PrimFunc nothing else scheduled (pooling,
dense matmul, elementwise) with the parallel/vectorised CPU fallback rule, so nothing runs as a naive
serial loop nest."""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.ir import IRModule
from tvm.target import Target

from unsparse_tvm.schedules import fallback_cpu
from unsparse_tvm.schedules._common import is_scheduled


@tvm.transform.module_pass(opt_level=0, name="ScheduleRemainingCPU")
class ScheduleRemainingCPU:
    """llvm: schedule every PrimFunc nothing else scheduled with the CPU fallback rule."""

    def __init__(self, target: Target):
        self.target = target

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or is_scheduled(func):
                continue
            sch = fallback_cpu.apply(func, self.target)
            if sch is not None:
                updates[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        for gv, func in updates.items():
            mod[gv] = func
        return mod
