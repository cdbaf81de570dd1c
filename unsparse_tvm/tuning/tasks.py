"""Task extraction: one task per distinct tunable workload of a model, with the real constant arguments
(sparse values, index arrays, bias) of its first call site.

The pipeline runs up to FuseTIR (what MetaScheduleApplyDatabase sees at compile time); every PrimFunc
carrying `unsparse.op` is normalised like MetaSchedule does (global_symbol "main", `tirx.noalias`) and
deduplicated by structural hash. TVM is imported inside the functions: `unsparse-tvm run` and
`logs` import this package without needing TVM's compiler.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..frontend import import_program
from ..relay_passes import build_pipeline
from ..relay_passes.apply_tuning_records import call_sites
from ..schedules import rule_for
from ..ops import names
from ..ops.names import op_of


@dataclass
class Task:
    """One distinct workload to tune."""

    name: str                # the PrimFunc's name at its first call site
    op: str                  # unsparse.op
    mod: object              # normalised IRModule {"main": PrimFunc}: the workload
    args: list               # per PrimFunc parameter: the first call site's constant (np.ndarray) or None
    calls: int               # call sites sharing this workload (layers)
    flops: float
    shash: str               # structural hash, as MetaSchedule writes it in the workload file

    @property
    def weight(self) -> float:
        return self.calls * self.flops

    def describe(self) -> str:
        return f"{self.name} ({self.op}, {self.calls} call{'s' if self.calls > 1 else ''}, {self.flops / 1e6:.1f} MFLOP)"


def _estimate_flops(wl) -> float:
    """TVM's FLOP estimate of a workload, or 0 where it has no rule for an expression in it: Let, which the
    fast sigmoid and SiLU epilogues bind their terms with (efficientnet's layers; `tune` failed on them)."""
    import tvm
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        return float(estimate_tir_flops(wl))
    except tvm.error.InternalError:  # "Do not have a default for prim.Let"
        return 0.0


def _flops_from_weights(task: Task) -> float:
    """2 x the nonzero weights x the output positions per channel: the multiply-adds of a sparse layer, from
    its first call site's arrays (the largest constant is its weights), where TVM gave no estimate."""
    arrays = [a for a in task.args if a is not None and a.dtype.kind in "fi"]
    out = [int(d) for d in task.mod["main"].params[-1].shape]  # the output buffer (params are buffers here)
    if not arrays or len(out) < 2:
        return 0.0
    weights = max(arrays, key=lambda a: a.size)
    return 2.0 * float(np.count_nonzero(weights)) * float(np.prod(out)) / out[1]


def normalize(func):
    """The IRModule MetaSchedule keys a PrimFunc by (tune_context._normalize_mod: noalias, "main")."""
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    return _normalize_mod(func)


def structural_hash(mod) -> str:
    import tvm_ffi

    return str(tvm_ffi.structural_hash(mod))


def tuned_ops(target_kind: str, include_dense: bool = False) -> tuple[str, ...]:
    ops = names.TUNED_OPS + (names.DENSE_TUNED_OPS if include_dense else ())
    return tuple(op for op in ops if rule_for(op, target_kind) is not None and hasattr(rule_for(op, target_kind), "space"))


def extract_tasks(ep, target, *, threshold: float | None = None, include_dense: bool = False,
                  fmt: str | None = None, rates=None) -> list[Task]:
    """The distinct tunable workloads of an ExportedProgram for `target`, heaviest first."""
    import tvm_ffi
    from tvm import tirx
    from tvm.ir import GenericConst

    mod, names = import_program(ep)
    mod = build_pipeline(target, threshold=threshold, names=names, fmt=fmt, rates=rates, stop_after="legalize")(mod)
    ops = tuned_ops(target.kind.name, include_dense)
    tasks: dict[str, Task] = {}
    by_gv: dict[str, Task] = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or op_of(func) not in ops:
            continue
        wl = normalize(func)
        key = structural_hash(wl)
        task = tasks.get(key)
        if task is None or not tvm_ffi.structural_equal(task.mod, wl):
            key = key if task is None else f"{key}:{gv.name_hint}"  # a hash collision: keep both apart
            task = tasks[key] = Task(gv.name_hint, op_of(func), wl, [], 0, _estimate_flops(wl), structural_hash(wl))
        by_gv[gv.name_hint] = task
    for gv, args in call_sites(mod):
        task = by_gv.get(gv.name_hint)
        if task is None:
            continue
        task.calls += 1
        if not task.args:  # the first call site supplies the real index arrays
            consts = [a.value.numpy() if isinstance(a, GenericConst) else None for a in args]
            task.args = consts + [None] * (len(task.mod["main"].params) - len(consts))
            if not task.flops:
                task.flops = _flops_from_weights(task)
    return sorted((t for t in tasks.values() if t.calls), key=lambda t: -t.weight)
