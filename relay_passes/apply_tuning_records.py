"""ApplyTuningRecords: TVM's MetaScheduleApplyDatabase, counting which of our kernels (and how many layers)
it scheduled from the tuning records, so `compile --tuning-log` can say how much of the log applied."""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.ir import Op

from unsparse_tvm.ops.names import DENSE_TUNED_OPS, TUNED_OPS, is_scheduled, op_of

TUNABLE = TUNED_OPS + DENSE_TUNED_OPS  # a copy (phase_planes) or TVM's depthwise conv has no records to apply


def call_sites(mod) -> list[tuple[object, list]]:
    """(GlobalVar, argument expressions) of every call_tir in the module's Relax functions."""
    call_tir = Op.get("relax.call_tir")
    sites = []

    def visit(expr):
        if isinstance(expr, relax.Call) and expr.op.same_as(call_tir):
            args = expr.args[1]
            sites.append((expr.args[0], list(args.fields) if isinstance(args, relax.Tuple) else [args]))

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, visit)
    return sites


def ApplyTuningRecords(database):  # noqa: N802 (a pass, named like TVM's)
    """MetaScheduleApplyDatabase, counting which of our tunable operators (kernels, call sites) it scheduled
    into `database.stats` when the database is ours (open_database)."""
    @tvm.transform.module_pass(opt_level=0, name="ApplyTuningRecords")
    def _apply(mod, _ctx):
        ours = {gv.name_hint for gv, f in mod.functions_items() if op_of(f) in TUNABLE and not is_scheduled(f)}
        mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
        applied = {gv.name_hint for gv, f in mod.functions_items() if gv.name_hint in ours and is_scheduled(f)}
        calls: dict[str, int] = {}
        for gv, _ in call_sites(mod):
            calls[gv.name_hint] = calls.get(gv.name_hint, 0) + 1
        stats = {"kernels": len(ours), "kernels_applied": len(applied),
                 "layers": sum(calls.get(n, 0) for n in ours), "layers_applied": sum(calls.get(n, 0) for n in applied),
                 "applied": sorted(applied)}
        try:
            database.stats = stats
        except AttributeError:  # not one of ours
            pass
        return mod

    return _apply
