"""TagGroupedConv (llvm): mark the PrimFuncs where TVM legalised a depthwise or grouped conv2d (NCHW, with
whatever FuseOps fused after it) as `depthwise_conv2d`, so the schedule phase gives them
schedules/depthwise_conv2d_cpu.py instead of the generic fallback. Runs after FuseTIR, before scheduling."""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.ir import IRModule

from unsparse_tvm.schedules import depthwise_conv2d_cpu as rule
from unsparse_tvm.ops.names import OP_ATTR, is_scheduled, op_of


def _is_grouped_conv(func: tirx.PrimFunc) -> bool:
    sch = s_tir.Schedule(func)
    name = rule.conv_block(sch)
    if name is None:
        return False
    block = sch.get_sblock(name)
    kinds = [iv.iter_type for iv in sch.get(block).iter_vars]
    # NCHW: n, f, y, x spatial then rc, ry, rx reduction
    if kinds != [0, 0, 0, 0, 2, 2, 2] or len(sch.get_loops(block)) != 7:
        return False
    # stride 1, or stride 2 where the padded input splits into two column-phase planes; the rest: the fallback
    return rule.supports(sch)


@tvm.transform.module_pass(opt_level=0, name="TagGroupedConv")
class TagGroupedConv:
    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or is_scheduled(func) or op_of(func) is not None:
                continue
            if _is_grouped_conv(func):
                updates[gv] = func.with_attr(OP_ATTR, rule.OP)
        for gv, func in updates.items():
            mod[gv] = func
        return mod
