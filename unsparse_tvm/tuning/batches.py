"""Measured batches: the default knobs, a batch of the evolutionary search, and the best schedules of a
task's siblings; each batch is appended to the log as soon as it is timed (Ctrl-C loses nothing).

MetaSchedule is imported inside the functions (deliberately: only a tuning run needs it).
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np

from ..schedules import rule_for
from .log import FAILED_SECS, RECORD_FILE, Record, append_lines, plain, target_dict
from .measure import remove_artifact
from .tasks import Task
from .state import STOP, TaskState, show_progress, timed, trace_key


def _default_trace_json(task: Task, target):
    """The hand-written schedule with its default knobs, as a trace (a record like any other)."""
    sch = rule_for(task.op, target.kind.name).apply(task.mod["main"], target)
    return sch.trace.as_json(remove_postproc=True), sch


def _record_line(s: TaskState, trace_json, run_secs, target, args_info) -> str:
    return Record(s.workload_index, trace_json, run_secs, target_dict(target), args_info).line()


def _args_info_json(task: Task):
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    return [a.as_json() for a in ArgInfo.from_prim_func(task.mod["main"])]


def measure_defaults(group: list[TaskState], target, builder, runner, log_dir, bar) -> int:
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    traces, mods = [], []
    for s in group:
        tj, sch = _default_trace_json(s.task, target)
        traces.append(plain(tj))
        mods.append(sch.mod)
    built = builder.build(mods, target)
    new = 0
    try:
        for s, tj, (path, err) in zip(group, traces, built):
            args_info = ArgInfo.from_prim_func(s.task.mod["main"])
            res = runner.run(s.task, [path], [args_info])[0] if path else (None, err)
            secs = res[0]
            s.measured["default"] = float(np.mean(secs)) if secs else math.inf
            line = _record_line(s, tj, secs if secs else [FAILED_SECS], target, _args_info_json(s.task))
            append_lines(os.path.join(log_dir, RECORD_FILE), [line])  # each one a measured batch of its own
            if not secs:
                print(f"\nwarning: {s.task.name}: the default schedule failed to {'build' if not path else 'run'}: "
                      f"{res[1] or err}", file=sys.stderr)
            new += 1
            s.new_trials += 1
            show_progress(bar, s, 1)
    finally:
        for path, _ in built:
            remove_artifact(path)
    return new


def seed_database(db, s: TaskState, target) -> None:
    """Put the task's previous records (this target) into the search's database: the evolutionary
    search starts from the best of them."""
    from tvm.s_tir.meta_schedule.database import TuningRecord

    wl = db.commit_workload(s.task.mod)
    for r in sorted(s.seed_records, key=lambda r: r.seconds)[:64]:
        if not r.ok or not r.trace[1]:
            continue  # failed, or the default knobs (no decisions to mutate)
        try:
            db.commit_tuning_record(TuningRecord.from_json([r.trace, r.run_secs, r.target, r.args_info], wl))
        except Exception:  # a record that no longer fits the space
            continue


def search_batch(s: TaskState, target, batch: int, builder, runner, cost_model, db, log_dir, bar) -> int:
    """One batch of the evolutionary search for one task: at most `batch` new points are timed."""
    try:
        with timed("search"):
            cands = s.ctx.generate_measure_candidates()
    except RuntimeError as err:  # e.g. a design space whose traces do not replay under other decisions
        if STOP["requested"]:
            raise
        why = str(err).strip().splitlines()[-1][:200] if str(err).strip() else type(err).__name__
        print(f"\nwarning: {s.task.name}: the search failed ({why}); its records so far are kept", file=sys.stderr)
        s.done = True
        return 0
    if not cands:
        s.done = True
        return 0
    room = min(batch, s.budget - s.trials)
    keys = [trace_key(plain(c.sch.trace.as_json(remove_postproc=True))) for c in cands]
    fresh, known, seen = [], [], set()
    for i, k in enumerate(keys):
        if k in s.measured:
            known.append(i)        # measured before (this run or an earlier one): its time, not a new trial
        elif k not in seen and len(fresh) < room:
            fresh.append(i)
            seen.add(k)
    n = _measure(s, [cands[i].sch for i in fresh], target, builder, runner, db, log_dir)
    used = sorted(fresh + known)   # candidates beyond the budget are neither timed nor reported
    results = [_result(s.measured[keys[i]]) for i in used]
    with timed("cost_model"):
        s.ctx.notify_runner_results([cands[i] for i in used], results)
        cost_model.update(s.ctx, [cands[i] for i in used], results)
    s.stale = 0 if fresh else s.stale + 1
    if s.stale >= 3:  # the search keeps proposing measured points: the space is exhausted
        s.done = True
    if n:
        show_progress(bar, s, n)
    return n


def _result(seconds: float):
    from tvm.s_tir.meta_schedule.runner import RunnerResult

    return RunnerResult(run_secs=[seconds] if math.isfinite(seconds) else [FAILED_SECS], error_msg=None)


def _measure(s: TaskState, schedules: list, target, builder, runner, db, log_dir) -> int:
    """Build and time schedules of one task; append their records to the log (one batch) and to the
    search's database; update s.measured / s.best_trace."""
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.database import TuningRecord

    if not schedules:
        return 0
    with timed("build"):
        built = builder.build([sch.mod for sch in schedules], target)
    ok = [(i, path) for i, (path, _) in enumerate(built) if path]
    args_info = ArgInfo.from_prim_func(s.task.mod["main"])
    try:
        with timed("run"):
            runs = runner.run(s.task, [p for _, p in ok], [args_info] * len(ok)) if ok else []
    finally:
        for _, path in ok:
            remove_artifact(path)
    secs_of = {i: r[0] for (i, _), r in zip(ok, runs)}
    wl = db.commit_workload(s.task.mod)
    lines, args_json = [], _args_info_json(s.task)
    for i, sch in enumerate(schedules):
        secs = secs_of.get(i)
        run_secs = secs if secs else [FAILED_SECS]
        tj = plain(sch.trace.as_json(remove_postproc=True))
        k = trace_key(tj)
        s.measured[k] = float(np.mean(secs)) if secs else math.inf
        if secs and (s.best_trace is None or s.measured[k] < s.best_trace[1]):
            s.best_trace = (tj, s.measured[k])
        lines.append(_record_line(s, tj, run_secs, target, args_json))
        db.commit_tuning_record(TuningRecord(sch.trace, wl, run_secs, target, args_info))
    append_lines(os.path.join(log_dir, RECORD_FILE), lines)
    s.new_trials += len(schedules)
    return len(schedules)


def transfer_batch(s: TaskState, target, builder, runner, cost_model, db, log_dir, bar) -> int:
    """Time on this task the best schedules its siblings found so far (same op and geometry: only the
    nonzero count differs, e.g. VGG's three 2x2 layers), where it has not been timed yet. Near-identical
    layers share what each learned; the search then starts from whichever is better."""
    from tvm import s_tir
    from tvm.s_tir.meta_schedule import MeasureCandidate
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    room = s.budget - s.trials
    picks, keys = [], set()
    for sib in sorted(s.siblings, key=lambda t: t.best_trace[1] if t.best_trace else math.inf):
        if len(picks) >= room or sib.best_trace is None:
            continue
        k = trace_key(sib.best_trace[0])
        if k in s.measured or k in keys:
            continue
        sch = s_tir.Schedule(s.task.mod)
        try:
            s_tir.Trace.apply_json_to_schedule(sib.best_trace[0], sch)
        except Exception:  # does not fit this workload after all
            continue
        picks.append(sch)
        keys.add(k)
    n = _measure(s, picks, target, builder, runner, db, log_dir)
    if n:
        args_info = ArgInfo.from_prim_func(s.task.mod["main"])
        cands = [MeasureCandidate(sch, args_info) for sch in picks]
        results = [_result(s.measured[trace_key(plain(sch.trace.as_json(remove_postproc=True)))]) for sch in picks]
        with timed("cost_model"):
            cost_model.update(s.ctx, cands, results)
        show_progress(bar, s, n)
    return n
