"""ScheduleUnsparseOps: after FuseTIR, give every unsparse operator its hand-written schedule
(schedules/<op>_<target>.py) and mark it scheduled so dlight / the fallback leave it alone."""

from __future__ import annotations

import tvm
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
