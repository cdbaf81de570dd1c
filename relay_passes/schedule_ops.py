"""ScheduleUnsparseOps: after FuseTIR, give every unsparse operator its hand-written schedule
(schedules/<op>_<target>.py) and mark it scheduled so dlight / the fallback leave it alone."""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.ir import IRModule
from tvm.target import Target

from unsparse_tvm.schedules import rule_for
from unsparse_tvm.schedules._common import is_scheduled, op_of


@tvm.transform.module_pass(opt_level=0, name="ScheduleUnsparseOps")
class ScheduleUnsparseOps:
    """Apply the hand-written schedule (default or given knobs) to each sparse/dense unsparse operator."""

    def __init__(self, target: Target, configs: dict | None = None):
        self.target = target
        self.configs = configs or {}  # op name -> Config, to override the defaults

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        updates = {}
        for gv, func in mod.functions_items():
            op = op_of(func)
            if op is None or is_scheduled(func):
                continue
            rule = rule_for(op, self.target.kind.name)
            if rule is None:
                continue
            sch = rule.apply(func, self.target, self.configs.get(op))
            if sch is not None:
                updates[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        for gv, func in updates.items():
            mod[gv] = func
        return mod


@tvm.transform.module_pass(opt_level=0, name="ScheduleRemainingCPU")
class ScheduleRemainingCPU:
    """llvm: schedule every PrimFunc nothing else scheduled with the CPU fallback rule."""

    def __init__(self, target: Target):
        self.target = target

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        from unsparse_tvm.schedules import fallback_cpu

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
