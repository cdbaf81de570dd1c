"""The search: MetaSchedule's evolutionary search with its XGBoost cost model over our schedules' knobs.

Each rule in `schedules/` has a `space(sch)`: the same schedule as its `apply()`, with the knobs drawn by
`sample_perfect_tile` / `sample_categorical`. The tuning loop is ours (not tune_tir) so that it can (a)
give the runner each task's arrays, (b) append records after every measured batch, (c) resume: records
already in the log count toward the budget and are never measured again, (d) show a progress bar.

TVM and MetaSchedule are imported inside the functions (deliberately: only a tuning run needs them).
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from dataclasses import dataclass

from ..errors import UnsparseError
from ..outputs import check_output_dir
from ..reference import usable_cores
from ..schedules import rule_for
from .batches import measure_defaults, search_batch, seed_database, transfer_batch
from .database import replay, skip_warning
from .log import (WORKLOAD_FILE, LogContents, Workload, append_lines,
                  read_log, target_dict, target_identity)
from .measure import Builder, Runner
from .state import PROFILE, STOP, TaskState, TuneResult, allocate, progress_bar, sibling_key, timed, trace_key
from .tasks import Task, extract_tasks

DEFAULT_BATCH = 8          # candidates measured per batch (one log append each)


def _categorical_mutator():
    """Re-draws one sample_categorical knob (MetaSchedule's own mutators only touch tile sizes and
    categoricals that feed unroll pragmas or thread bindings, so vector width etc. would never move)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.mutator import PyMutator

    @derived_object
    class MutateCategorical(PyMutator):
        def __init__(self, seed: int = 1):
            self.rng = random.Random(seed)

        def _initialize_with_tune_context(self, context) -> None:
            pass

        def apply(self, trace, _):
            insts = [i for i in trace.insts if i.kind.name == "SampleCategorical" and len(i.attrs[0]) > 1]
            if not insts:
                return None
            inst = self.rng.choice(insts)
            old = int(trace.decisions[inst])
            new = self.rng.choice([k for k in range(len(inst.attrs[0])) if k != old])
            return trace.with_decision(inst, new, remove_postproc=True)

        def clone(self):
            return MutateCategorical(self.rng.randrange(1, 2**30))

    return MutateCategorical


def _with_gpu_limits(target):
    """The cuda target with the limits VerifyGPUCode checks (common to sm_50 and later), where unset."""
    from tvm.target import Target


    d = target_dict(target)
    limits = {"max_shared_memory_per_block": 49152, "max_threads_per_block": 1024, "thread_warp_size": 32,
              "registers_per_block": 65536}
    return Target({**limits, **{k: v for k, v in d.items() if k not in ("tag", "keys")}})


def _make_context(task: Task, target, seed: int, workers: int, population: int):
    from tvm.s_tir import meta_schedule as ms


    rule = rule_for(task.op, target.kind.name)
    postprocs = []
    if target.kind.name == "cuda":  # reject launches no GPU accepts before they are built and timed
        postprocs = [ms.postproc.VerifyGPUCode()]
        target = _with_gpu_limits(target)
    space = ms.space_generator.ScheduleFn(
        rule.space, sch_rules=[], postprocs=postprocs,
        mutator_probs={ms.mutator.MutateTileSize(): 0.5, _categorical_mutator()(seed): 0.5})
    strategy = ms.search_strategy.EvolutionarySearch(
        population_size=population, init_measured_ratio=0.2, init_min_unmeasured=min(population // 2, 32),
        max_fail_count=5, genetic_num_iters=3, genetic_mutate_prob=0.85, genetic_max_fail_count=10,
        eps_greedy=0.1)
    # TuneContext.__init__ imports tvm.s_tir.tensor_intrin first (TVMScript-parses every tensor intrinsic:
    # ~50 s on 2 cores, the same import the default builder makes, see measure.py), which only tensorizing
    # schedule rules need: build the object as __init__ does, without that import.
    from tvm.s_tir.meta_schedule import _ffi_api
    from tvm.s_tir.meta_schedule.logging import get_logger, get_logging_func

    ctx = ms.TuneContext.__new__(ms.TuneContext)
    ctx.__init_handle_by_constructor__(_ffi_api.TuneContext, task.mod, target, space, strategy, task.name,
                                       workers, seed, get_logging_func(get_logger("unsparse_tvm.tuning")))
    _ffi_api.TuneContextInitialize(ctx)
    return ctx


@dataclass(frozen=True)
class SearchOptions:
    """How the search runs (not what it tunes)."""

    batch: int = DEFAULT_BATCH      # candidates measured per batch (one log append each)
    seed: int = 1
    progress: bool = True
    population: int = 64            # the evolutionary search's population per task


def tune(ep, target, log_dir: str, trials: int, *, threshold: float | None = None, include_dense: bool = False,
         rpc: tuple[str, int, str] | None = None, rates=None, options: SearchOptions = SearchOptions(),
         out=None) -> TuneResult:
    """Tune the model's sparse workloads for `target`, appending records to `log_dir` (the layers chosen
    sparse at the cost model's `rates`, as `compile` chooses them; rpc: measure on a tracker's devices)."""
    out = out or sys.stderr
    if trials < 1:
        raise UnsparseError(f"--trials must be at least 1, got {trials}")
    start = time.perf_counter()
    check_output_dir(log_dir)
    _check_device(target, rpc)
    runner = Runner(target.kind.name, rpc)  # checks the tracker first: fail before the slow extraction
    builder = None
    try:
        with timed("extract"):
            tasks = extract_tasks(ep, target, threshold=threshold, include_dense=include_dense, rates=rates)
        if not tasks:
            rule = f"threshold {threshold}" if threshold is not None else "by predicted time"
            raise UnsparseError(f"no layer to tune: no conv/linear runs sparse ({rule})"
                                + ("" if include_dense else " (pass --sparsity S to prune first, or --include-dense)"))
        log, states, skipped = _states(log_dir, tasks, target)
        allocate(states, trials)  # one default-knob trial per task first; the rest by measured default time
        workers = max(1, min(usable_cores(), 8))
        builder = Builder(workers)
        new, interrupted = _search(states, target, trials, builder, runner, log_dir, workers, options, out)
        if os.environ.get("UNSPARSE_TUNE_PROFILE"):
            print("tuning phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in PROFILE.items()), file=out)
        return TuneResult(log_dir, states, new, time.perf_counter() - start, interrupted, skipped, log.corrupt)
    finally:
        if builder is not None:
            builder.close()
        runner.close()


def _check_device(target, rpc) -> None:
    if rpc is None and target.kind.name == "cuda":
        import tvm

        if not tvm.cuda(0).exist:
            raise UnsparseError("tune --target cuda measures on a GPU and this machine has none visible to TVM; "
                                "pass --rpc-tracker HOST:PORT --rpc-key KEY to measure on GPU machines registered "
                                "with a TVM RPC tracker")


def _states(log_dir: str, tasks: list[Task], target) -> tuple[LogContents, list[TaskState], int]:
    """The log, one TaskState per task with its records of this target attached, how many were of another."""
    log = read_log(log_dir)
    ident = target_identity(target)
    states = [TaskState(t) for t in tasks]
    skipped = _load_existing(log, states, ident)
    if log.corrupt or skipped:
        print(skip_warning(log_dir, log.corrupt, skipped, ident), file=sys.stderr)
    _register_workloads(log_dir, log, states)
    return log, states, skipped


def _search(states, target, trials, builder, runner, log_dir, workers, options, out) -> tuple[int, bool]:
    """(new trials, interrupted): the default knobs of every task, then the search rounds; Ctrl-C or kill
    ends it with every measured batch in the log."""
    from tvm.s_tir import meta_schedule as ms

    # XGBoost ranks candidates once a few measurements exist (upstream waits for 100: more than this whole
    # budget); short early stopping keeps each retraining well under a second
    cost_model = ms.cost_model.XGBModel(num_tuning_cores=workers, adaptive_training=True,
                                        num_warmup_samples=min(16, max(4, trials // 4)),
                                        early_stopping_rounds=10, verbose_eval=10**6)
    bar = progress_bar(sum(max(0, s.budget - s.trials) for s in states), options.progress, out)
    new, interrupted = 0, False
    try:
        # 1. the default knobs (a record like any other: the best record is never worse than the default)
        pending = [s for s in states if s.budget > 0 and "default" not in s.measured]
        for i in range(0, len(pending), options.batch):
            with timed("defaults"):
                new += measure_defaults(pending[i:i + options.batch], target, builder, runner, log_dir, bar)
        allocate(states, trials)  # now by measured default time
        bar.total = new + sum(max(0, s.budget - s.trials) for s in states)
        bar.refresh()
        new += _rounds(states, target, builder, runner, cost_model, log_dir, bar, workers, options)
    except (KeyboardInterrupt, RuntimeError) as err:
        # Ctrl-C / kill while C++ called back into Python (runner, cost model) arrives as a RuntimeError
        if not (isinstance(err, KeyboardInterrupt) or STOP["requested"]):
            raise
        interrupted = True
    finally:
        bar.close()
        for s in states:
            if s.ctx is not None:
                try:
                    s.ctx.post_tuning()
                except Exception:  # a half-finished batch: nothing to clean up that matters
                    pass
    return new, interrupted


def _rounds(states, target, builder, runner, cost_model, log_dir, bar, workers, options) -> int:
    """Rounds over the tasks, heaviest first: each round times the best schedules of a task's siblings
    (near-identical layers) on it, then a batch of the evolutionary search; the first round's batch is half
    the task's budget, so that siblings have something to share."""
    from tvm.s_tir.meta_schedule.database import MemoryDatabase

    groups: dict[tuple, list[TaskState]] = {}
    for s in states:
        groups.setdefault(sibling_key(s.task), []).append(s)
    for s in states:
        s.siblings = [t for t in groups[sibling_key(s.task)] if t is not s]
    dbs, new, batch = {}, 0, options.batch
    active = [s for s in states if s.budget > s.trials]
    while active:
        for s in active:
            if s.ctx is None:
                db = dbs[s.task.shash] = MemoryDatabase()
                seed_database(db, s, target)
                s.ctx = _make_context(s.task, target, options.seed + states.index(s), workers, options.population)
                with timed("pre_tuning"):
                    s.ctx.pre_tuning(max_trials=4 * (s.budget - s.trials) + batch, num_trials_per_iter=batch,
                                     design_spaces=s.ctx.generate_design_space(), database=db,
                                     cost_model=cost_model)
            db = dbs[s.task.shash]
            if s.rounds:
                new += transfer_batch(s, target, builder, runner, cost_model, db, log_dir, bar)
            size = batch if s.rounds else min(batch, max(2, (s.budget - s.trials) // 2))
            if s.budget > s.trials:
                new += search_batch(s, target, size, builder, runner, cost_model, db, log_dir, bar)
            s.rounds += 1
        active = [s for s in active if not s.done and s.budget > s.trials]
    return new


def _load_existing(log: LogContents, states: list[TaskState], ident: tuple) -> int:
    """Attach the log's records of this target to their tasks; returns how many were of another target."""
    by_hash: dict[str, list[int]] = {}
    for i, w in enumerate(log.workloads):
        if w is not None:
            by_hash.setdefault(w.shash, []).append(i)
    index_of: dict[int, TaskState] = {}
    for s in states:
        for i in by_hash.get(s.task.shash, []):
            index_of[i] = s
            if s.workload_index < 0:
                s.workload_index = i
    other = broken = 0
    for r in log.records:
        s = index_of.get(r.workload)
        if r.identity != ident:
            other += 1
            continue
        if s is None:
            continue
        if replay(r, s.task.mod) is None:
            broken += 1
            continue
        key = "default" if not r.trace[1] else trace_key(r.trace)
        s.measured[key] = min(s.measured.get(key, math.inf), r.seconds)
        s.seed_records.append(r)
        if key != "default" and r.ok and (s.best_trace is None or r.seconds < s.best_trace[1]):
            s.best_trace = (r.trace, r.seconds)
    log.corrupt += broken
    return other


def _register_workloads(log_dir: str, log: LogContents, states: list[TaskState]) -> None:
    """Give every task a line in the workload file (appended once; records refer to it by number)."""
    lines = []
    n = len(log.workloads)
    for s in states:
        if s.workload_index < 0:
            from tvm.s_tir.meta_schedule.database import Workload as TVMWorkload

            shash, mod_json = TVMWorkload(s.task.mod).as_json()
            s.task.shash = str(shash)
            s.workload_index = n + len(lines)
            lines.append(Workload(str(shash), mod_json).line())
    if lines:
        append_lines(os.path.join(log_dir, WORKLOAD_FILE), lines)
