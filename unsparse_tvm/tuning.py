"""Tuning the knobs of our hand-written schedules with MetaSchedule, and applying the records.

MetaSchedule (`tvm.s_tir.meta_schedule`) is TVM's successor to AutoTVM. Each rule in `schedules/` has a
`space(sch)`: the same schedule as its `apply()`, with the knobs drawn by `sample_perfect_tile` /
`sample_categorical`. That function is the design space; MetaSchedule's evolutionary search, guided by
its XGBoost cost model, proposes knob settings, which are built and timed with the layer's *real* sparse
index arrays (MetaSchedule's own runners fill int32 buffers with random values, and a gather through
random offsets reads out of bounds).

One task per distinct workload: the pipeline runs up to FuseTIR (what MetaScheduleApplyDatabase sees
at compile time), every PrimFunc carrying `unsparse.op` is normalised like MetaSchedule does
(global_symbol "main", `tirx.noalias`), deduplicated by structural hash, and keeps the constant
arguments of its first call site. The tuning loop is ours (not tune_tir) so that it can (a) give the
runner each task's arrays, (b) append records to the log after every measured batch, (c) resume: records
already in the log count toward the budget and are never measured again, (d) show a progress bar.

Logs are directories in JSONDatabase format (unsparse_tvm.logs). `open_database(dir, target)` keeps
only the records of the compile target (TVM's own lookup ignores the target: apache/tvm#15549), the best
valid one per workload, in an in-memory database for `build_pipeline(database=...)`.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from .errors import UnsparseError
from .logs import (FAILED_SECS, RECORD_FILE, WORKLOAD_FILE, LogContents, Record, append_lines, check_writable_dir,
                   describe_identity, read_log, read_nonempty_log, target_identity)

TUNED_OPS = ("sparse_conv2d", "sparse_dense")
DENSE_OPS = ("dense_conv2d",)
DEFAULT_BATCH = 8          # candidates measured per batch (one log append each)


PROFILE: dict[str, float] = {}
_STOP = {"requested": False}  # set by the CLI's SIGINT/SIGTERM handler


@contextmanager
def _timed(name: str):
    """Wall time per tuning phase (UNSPARSE_TUNE_PROFILE=1 prints them at the end)."""
    t = time.perf_counter()
    try:
        yield
    finally:
        PROFILE[name] = PROFILE.get(name, 0.0) + time.perf_counter() - t


# ---- tasks ---------------------------------------------------------------------------------------
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


def normalize(func):
    """The IRModule MetaSchedule keys a PrimFunc by (tune_context._normalize_mod: noalias, "main")."""
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    return _normalize_mod(func)


def structural_hash(mod) -> str:
    import tvm_ffi

    return str(tvm_ffi.structural_hash(mod))


def _call_sites(mod) -> list[tuple[object, list]]:
    """(GlobalVar, argument expressions) of every call_tir in the module's Relax functions."""
    from tvm import relax
    from tvm.ir import Op

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


def tuned_ops(target_kind: str, include_dense: bool = False) -> tuple[str, ...]:
    from .schedules import rule_for

    ops = TUNED_OPS + (DENSE_OPS if include_dense else ())
    return tuple(op for op in ops if rule_for(op, target_kind) is not None and hasattr(rule_for(op, target_kind), "space"))


def extract_tasks(ep, target, *, threshold: float = 0.7, include_dense: bool = False,
                  fmt: str | None = None) -> list[Task]:
    """The distinct tunable workloads of an ExportedProgram for `target`, heaviest first."""
    import tvm_ffi
    from tvm import tirx
    from tvm.ir import GenericConst
    from tvm.s_tir.analysis import estimate_tir_flops

    from .compiler import import_program
    from .relay_passes import build_pipeline
    from .schedules._common import op_of

    mod, names = import_program(ep)
    mod = build_pipeline(target, threshold=threshold, names=names, fmt=fmt, stop_after="legalize")(mod)
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
            task = tasks[key] = Task(gv.name_hint, op_of(func), wl, [], 0, float(estimate_tir_flops(wl)),
                                     structural_hash(wl))
        by_gv[gv.name_hint] = task
    for gv, args in _call_sites(mod):
        task = by_gv.get(gv.name_hint)
        if task is None:
            continue
        task.calls += 1
        if not task.args:  # the first call site supplies the real index arrays
            consts = [a.value.numpy() if isinstance(a, GenericConst) else None for a in args]
            task.args = consts + [None] * (len(task.mod["main"].params) - len(consts))
    return sorted((t for t in tasks.values() if t.calls), key=lambda t: -t.weight)


def load_model_program(model: str, sparsity: float | None, batch: int = 1):
    if sparsity is not None:
        from .prune import prune_to_program

        return prune_to_program(model, sparsity, batch=batch)
    from .models import load_program

    return load_program(model, batch=batch)


# ---- measuring with the real index arrays --------------------------------------------------------
class RealArguments:
    """f_alloc_argument for MetaSchedule's runners: the task's constants (sparse values, index arrays,
    bias) as they are in the model; random data for the activations and the output. Picklable: it
    travels to the runner's worker process with every candidate."""

    def __init__(self, arrays: list, rpc: bool = False):
        self.arrays = arrays
        self.rpc = rpc

    def __call__(self, *call_args):
        import tvm

        if self.rpc:
            _session, device, args_info, alloc_repeat = call_args  # the RPC runner passes its session first
        else:
            device, args_info, alloc_repeat = call_args
        rng = np.random.default_rng(0)
        repeated = []
        for _ in range(alloc_repeat):
            args = []
            for i, info in enumerate(args_info):
                _, dtype, shape = info
                shape = tuple(int(s) for s in shape)
                arr = self.arrays[i] if i < len(self.arrays) else None
                if arr is not None:
                    if tuple(arr.shape) != shape or str(arr.dtype) != dtype:
                        raise ValueError(f"argument {i}: real array {arr.dtype}{arr.shape} does not fit {dtype}{shape}")
                else:
                    arr = (rng.standard_normal(shape).astype(dtype) if "float" in dtype
                           else np.zeros(shape, dtype))
                args.append(tvm.runtime.tensor(arr, device))
            repeated.append(args)
        return repeated


def _build_one(mod, target) -> str:
    """Build one candidate and export it as a tar (the runner or the RPC server links it)."""
    import tempfile

    import tvm
    from tvm.support.tar import tar

    rt_mod = tvm.tirx.build(mod, target=target)
    path = os.path.join(tempfile.mkdtemp(prefix="unsparse-cand-"), "mod." + tar.output_format)
    rt_mod.export_library(path, fcompile=tar)
    return path


class Builder:
    """Builds candidates in a persistent pool of worker processes (MetaSchedule's LocalBuilder starts a
    fresh pool per batch, and its default build function imports tensor intrinsics for ~50 s)."""

    def __init__(self, workers: int, timeout_sec: float = 120.0):
        from tvm.support.popen_pool import PopenPoolExecutor

        self.workers, self.timeout = workers, timeout_sec
        self.pool = PopenPoolExecutor(max_workers=workers, timeout=timeout_sec)
        self.batches = 0

    def build(self, mods: list, target) -> list[tuple[str | None, str | None]]:
        from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

        self.batches += 1
        if self.batches % 25 == 0:  # popen workers leak memory over many builds: recycle them
            self.pool.shutdown()
            self.pool = PopenPoolExecutor(max_workers=self.workers, timeout=self.timeout)
        out = []
        for res in self.pool.map_with_error_catching(lambda m: _build_one(m, target), mods):
            if res.status == StatusKind.COMPLETE:
                out.append((res.value, None))
            elif res.status == StatusKind.TIMEOUT:
                out.append((None, f"build timed out after {self.timeout:.0f} s"))
            else:
                out.append((None, f"build failed: {_last_line(res.value)}"))
        return out

    def close(self):
        self.pool.shutdown(wait=False)


def _last_line(err) -> str:
    """The informative line of a worker's error (TVM puts the cause last)."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else type(err).__name__


def _evaluator(target_kind: str):
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig

    # 5 timed repeats, each at least 20 ms of back-to-back calls; the record keeps all five
    return EvaluatorConfig(number=1, repeat=5, min_repeat_ms=20, enable_cpu_cache_flush=False)


def parse_tracker(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UnsparseError(f"--rpc-tracker must be HOST:PORT, got '{text}'")
    return host, int(port)


def check_tracker(host: str, port: int, key: str, timeout: float = 10.0) -> int:
    """How many servers the tracker has free or busy under `key`; one clear error if none or unreachable."""
    import socket
    import threading

    from tvm import rpc

    try:  # a plain connect first: TVM's own client retries for a minute, logging each attempt
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        raise UnsparseError(f"cannot reach the RPC tracker at {host}:{port} ({err.strerror or err}); start one with "
                            f"`python -m tvm.exec.rpc_tracker --host {host} --port {port}`") from None
    result: dict = {}

    def query():
        try:
            result["summary"] = rpc.connect_tracker(host, port).summary()
        except Exception as err:  # connection refused, bad handshake, ...
            result["error"] = err

    t = threading.Thread(target=query, daemon=True)
    t.start()
    t.join(timeout)
    if "summary" not in result:
        why = result.get("error", f"no answer within {timeout:.0f} s")
        why = str(why).strip().splitlines()[0] if str(why).strip() else type(why).__name__
        raise UnsparseError(f"cannot reach the RPC tracker at {host}:{port} ({why[:200]}); start one with "
                            f"`python -m tvm.exec.rpc_tracker --host {host} --port {port}`")
    servers = sum(1 for s in result["summary"].get("server_info", []) if str(s.get("key", "")).split(":")[-1] == key)
    queue = result["summary"].get("queue_info", {}).get(key, {})
    servers = max(servers, int(queue.get("free", 0)) + int(queue.get("pending", 0)))
    if servers == 0:
        raise UnsparseError(f"the RPC tracker at {host}:{port} has no server registered under key '{key}'; start one "
                            f"with `python -m tvm.exec.rpc_server --tracker {host}:{port} --key {key}`")
    return servers


class Runner:
    """Times built candidates locally (one worker process) or on the servers of an RPC tracker
    (MetaSchedule's RPCRunner, one connection per server), with each task's real arrays."""

    def __init__(self, target_kind: str, rpc: tuple[str, int, str] | None = None, timeout_sec: float = 60.0):
        from tvm.s_tir.meta_schedule.runner import LocalRunner, RPCConfig, RPCRunner

        self.device_type = "cuda" if target_kind == "cuda" else "cpu"
        self.rpc = rpc
        if rpc is None:
            self.runner = LocalRunner(timeout_sec=timeout_sec, evaluator_config=_evaluator(target_kind))
            self.servers = 1
        else:
            host, port, key = rpc
            self.servers = check_tracker(host, port, key)
            cfg = RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key,
                            session_timeout_sec=int(timeout_sec))
            self.runner = RPCRunner(rpc_config=cfg, evaluator_config=_evaluator(target_kind),
                                    max_workers=self.servers)

    def run(self, task: Task, artifacts: list[str], args_info: list) -> list[tuple[list[float] | None, str | None]]:
        from tvm.s_tir.meta_schedule.runner import RunnerInput

        self.runner.f_alloc_argument = RealArguments(task.args, rpc=self.rpc is not None)
        inputs = [RunnerInput(path, self.device_type, info) for path, info in zip(artifacts, args_info)]
        futures = self.runner._inst.run(inputs)  # the Python runner itself, not through the FFI object
        out = []
        for fut in futures:
            res = fut.result()
            if res.error_msg is not None:
                out.append((None, _last_line(res.error_msg)))
            else:
                out.append(([float(s) for s in res.run_secs], None))
        return out

    def close(self):
        pool = getattr(self.runner, "pool", None)
        if pool is not None:
            pool.shutdown(wait=False)


def _remove_artifact(path: str | None) -> None:
    import shutil

    if path:
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)


# ---- the search ----------------------------------------------------------------------------------
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


def trace_key(trace_json) -> str:
    """Identity of a point of the design space: the instruction count and the sampled decisions."""
    insts, decisions = trace_json
    return json.dumps([len(insts), sorted([int(i), d] for i, d in decisions)], separators=(",", ":"))


@dataclass
class TaskState:
    task: Task
    budget: int = 0                  # trials this task may have in total (existing ones included)
    measured: dict = field(default_factory=dict)   # trace_key -> seconds (inf: failed)
    workload_index: int = -1
    ctx: object = None
    done: bool = False
    new_trials: int = 0
    stale: int = 0                   # batches in a row that proposed nothing new
    rounds: int = 0
    best_trace: tuple | None = None  # (trace JSON, seconds) of the best measured non-default schedule
    siblings: list = field(default_factory=list)
    seed_records: list = field(default_factory=list)  # this target's earlier records (resume)

    @property
    def trials(self) -> int:
        return len(self.measured)

    @property
    def best(self) -> float:
        return min(self.measured.values(), default=math.inf)


def allocate(states: list[TaskState], total: int) -> None:
    """Split `total` trials over the tasks: first one trial each (the default knobs), heaviest first,
    then the rest in proportion to calls x time of the default knobs (calls x FLOPs before it is known),
    largest remainder; at least 2 more per task where the budget allows."""
    for s in states:
        s.budget = 0
    order = sorted(states, key=lambda s: -s.task.weight)
    for s in order[:total]:
        s.budget = 1
    left = total - sum(s.budget for s in states)
    if left <= 0:
        return

    def weight(s):  # the default knobs' time, not the best: a resumed run splits the budget the same way
        t = s.measured.get("default", math.inf)
        return s.task.calls * (t if math.isfinite(t) else s.task.flops * 1e-11)
    floor = min(2, left // len(states))
    for s in states:
        s.budget += floor
    left -= floor * len(states)
    weights = [weight(s) for s in states]
    total_w = sum(weights) or 1.0
    shares = [left * w / total_w for w in weights]
    for s, share in zip(states, shares):
        s.budget += int(share)
    rest = left - sum(int(x) for x in shares)
    for i in sorted(range(len(states)), key=lambda i: -(shares[i] - int(shares[i])))[:rest]:
        states[i].budget += 1


def _with_gpu_limits(target):
    """The cuda target with the limits VerifyGPUCode checks (common to sm_50 and later), where unset."""
    from tvm.target import Target

    from .logs import target_dict

    d = target_dict(target)
    limits = {"max_shared_memory_per_block": 49152, "max_threads_per_block": 1024, "thread_warp_size": 32,
              "registers_per_block": 65536}
    return Target({**limits, **{k: v for k, v in d.items() if k not in ("tag", "keys")}})


def _make_context(task: Task, target, seed: int, workers: int, population: int):
    from tvm.s_tir import meta_schedule as ms

    from .schedules import rule_for

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
    # ~30 s on 2 cores), which only tensorizing schedule rules need: build the object as __init__ does,
    # without that import.
    from tvm.s_tir.meta_schedule import _ffi_api
    from tvm.s_tir.meta_schedule.logging import get_logger, get_logging_func

    ctx = ms.TuneContext.__new__(ms.TuneContext)
    ctx.__init_handle_by_constructor__(_ffi_api.TuneContext, task.mod, target, space, strategy, task.name,
                                       workers, seed, get_logging_func(get_logger("unsparse_tvm.tuning")))
    _ffi_api.TuneContextInitialize(ctx)
    return ctx


@dataclass
class TuneResult:
    log_dir: str
    tasks: list[TaskState]
    new_trials: int
    seconds: float
    interrupted: bool = False
    skipped_other_target: int = 0
    corrupt: int = 0

    def table(self) -> str:
        rows = [f"{'task':22s} {'op':14s} {'calls':>5s} {'trials':>6s} {'default ms':>10s} {'best ms':>9s} {'speedup':>7s}"]
        for s in self.tasks:
            default = s.measured.get("default", math.inf)
            best = s.best
            fmt = lambda v: f"{v * 1e3:.4f}" if math.isfinite(v) else "-"
            speed = f"{default / best:.2f}x" if math.isfinite(default) and math.isfinite(best) else "-"
            rows.append(f"{s.task.name[:22]:22s} {s.task.op:14s} {s.task.calls:5d} {s.trials:6d} {fmt(default):>10s} "
                        f"{fmt(best):>9s} {speed:>7s}")
        return "\n".join(rows)


def _default_trace_json(task: Task, target):
    """The hand-written schedule with its default knobs, as a trace (a record like any other)."""
    from .schedules import rule_for

    sch = rule_for(task.op, target.kind.name).apply(task.mod["main"], target)
    return sch.trace.as_json(remove_postproc=True), sch


def tune(ep, target, log_dir: str, trials: int, *, threshold: float = 0.7, include_dense: bool = False,
         rpc: tuple[str, int, str] | None = None, batch: int = DEFAULT_BATCH, seed: int = 1,
         progress: bool = True, population: int = 64, out=None) -> TuneResult:
    """Tune the model's sparse workloads for `target`, appending records to `log_dir`."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.database import MemoryDatabase

    out = out or sys.stderr
    if trials < 1:
        raise UnsparseError(f"--trials must be at least 1, got {trials}")
    start = time.perf_counter()
    check_writable_dir(log_dir)
    kind = target.kind.name
    if rpc is None and kind == "cuda":
        import tvm

        if not tvm.cuda(0).exist:
            raise UnsparseError("tune --target cuda measures on a GPU and this machine has none visible to TVM; "
                                "pass --rpc-tracker HOST:PORT --rpc-key KEY to measure on GPU machines registered "
                                "with a TVM RPC tracker")
    runner = Runner(kind, rpc)  # checks the tracker first: fail before the slow extraction
    builder = None
    try:
        with _timed("extract"):
            tasks = extract_tasks(ep, target, threshold=threshold, include_dense=include_dense)
        if not tasks:
            raise UnsparseError(f"no layer to tune: no conv/linear reaches the sparsity threshold {threshold}"
                                + ("" if include_dense else " (pass --sparsity S to prune first, or --include-dense)"))
        log = read_log(log_dir)
        ident = target_identity(target)
        states = [TaskState(t) for t in tasks]
        skipped = _load_existing(log, states, ident)
        if log.corrupt or skipped:
            print(_skip_warning(log_dir, log.corrupt, skipped, ident), file=sys.stderr)
        _register_workloads(log_dir, log, states)
        # budget: one default-knob trial per task first; the rest by measured default time once known
        allocate(states, trials)
        todo = sum(max(0, s.budget - s.trials) for s in states)
        workers = max(1, min(os.cpu_count() or 1, 8))
        # XGBoost ranks candidates once a few measurements exist (upstream waits for 100: more than
        # this whole budget); short early stopping keeps each retraining well under a second
        cost_model = ms.cost_model.XGBModel(num_tuning_cores=workers, adaptive_training=True,
                                            num_warmup_samples=min(16, max(4, trials // 4)),
                                            early_stopping_rounds=10, verbose_eval=10**6)
        bar = _progress(todo, progress, out)
        builder = Builder(workers)
        new = 0
        interrupted = False
        try:
            # 1. the default knobs (a record like any other: the best record is never worse than the default)
            pending = [s for s in states if s.budget > 0 and "default" not in s.measured]
            for i in range(0, len(pending), batch):
                group = pending[i:i + batch]
                with _timed("defaults"):
                    new += _measure_defaults(group, target, builder, runner, log_dir, bar)
            allocate(states, trials)  # now by measured default time
            bar.total = new + sum(max(0, s.budget - s.trials) for s in states)
            bar.refresh()
            # 2. rounds over the tasks, heaviest first: each round times the best schedules of a task's
            # siblings (near-identical layers) on it, then a batch of the evolutionary search; the first
            # round's batch is half the task's budget, so that siblings have something to share
            groups: dict[tuple, list[TaskState]] = {}
            for s in states:
                groups.setdefault(sibling_key(s.task), []).append(s)
            for s in states:
                s.siblings = [t for t in groups[sibling_key(s.task)] if t is not s]
            dbs = {}
            active = [s for s in states if s.budget > s.trials]
            while active:
                for s in active:
                    if s.ctx is None:
                        db = dbs[s.task.shash] = MemoryDatabase()
                        _seed_database(db, s, target)
                        s.ctx = _make_context(s.task, target, seed + states.index(s), workers, population)
                        with _timed("pre_tuning"):
                            s.ctx.pre_tuning(max_trials=4 * (s.budget - s.trials) + batch,
                                             num_trials_per_iter=batch, design_spaces=s.ctx.generate_design_space(),
                                             database=db, cost_model=cost_model)
                    db = dbs[s.task.shash]
                    if s.rounds:
                        new += _transfer_batch(s, target, builder, runner, cost_model, db, log_dir, bar)
                    size = batch if s.rounds else min(batch, max(2, (s.budget - s.trials) // 2))
                    if s.budget > s.trials:
                        new += _search_batch(s, target, size, builder, runner, cost_model, db, log_dir, bar)
                    s.rounds += 1
                active = [s for s in active if not s.done and s.budget > s.trials]
        except (KeyboardInterrupt, RuntimeError) as err:
            # Ctrl-C / kill while C++ called back into Python (runner, cost model) arrives as a RuntimeError
            if not (isinstance(err, KeyboardInterrupt) or _STOP["requested"]):
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
        if os.environ.get("UNSPARSE_TUNE_PROFILE"):
            print("tuning phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in PROFILE.items()), file=out)
        return TuneResult(log_dir, states, new, time.perf_counter() - start, interrupted, skipped, log.corrupt)
    finally:
        if builder is not None:
            builder.close()
        runner.close()


def _skip_warning(path: str, corrupt: int, other: int, ident: tuple) -> str:
    parts = []
    if corrupt:
        parts.append(f"{corrupt} unreadable line{'s' if corrupt > 1 else ''} (corrupt or truncated)")
    if other:
        parts.append(f"{other} record{'s' if other > 1 else ''} of another target")
    return f"warning: tuning log {path}: skipped {' and '.join(parts)}; using only records for {describe_identity(ident)}"


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
        if _replay(r, s.task.mod) is None:
            broken += 1
            continue
        key = "default" if not r.trace[1] else trace_key(r.trace)
        s.measured[key] = min(s.measured.get(key, math.inf), r.seconds)
        s.seed_records.append(r)
        if key != "default" and r.ok and (s.best_trace is None or r.seconds < s.best_trace[1]):
            s.best_trace = (r.trace, r.seconds)
    log.corrupt += broken
    return other


def _replay(r: Record, mod, workload=None):
    """The record as a TVM TuningRecord if its trace replays on the workload, else None: a damaged line
    that still parses is never applied (nor counted as a trial)."""
    from tvm import s_tir
    from tvm.s_tir.meta_schedule.database import TuningRecord, Workload

    try:
        rec = TuningRecord.from_json([r.trace, r.run_secs, r.target, r.args_info], workload or Workload(mod))
        rec.trace.apply_to_schedule(s_tir.Schedule(mod), remove_postproc=False)
        return rec
    except Exception:  # TVM raises assorted errors for a trace that does not fit
        return None


def _register_workloads(log_dir: str, log: LogContents, states: list[TaskState]) -> None:
    """Give every task a line in the workload file (appended once; records refer to it by number)."""
    from .logs import Workload

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


def _record_line(s: TaskState, trace_json, run_secs, target, args_info) -> str:
    from .logs import target_dict

    return Record(s.workload_index, trace_json, run_secs, target_dict(target), args_info).line()


def _args_info_json(task: Task):
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    return [a.as_json() for a in ArgInfo.from_prim_func(task.mod["main"])]


def _to_py(v):
    """FFI containers (from as_json) -> plain JSON values."""
    from .logs import plain

    return plain(v)


def _measure_defaults(group: list[TaskState], target, builder, runner, log_dir, bar) -> int:
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    traces, mods = [], []
    for s in group:
        tj, sch = _default_trace_json(s.task, target)
        traces.append(_to_py(tj))
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
            _show(bar, s, 1)
    finally:
        for path, _ in built:
            _remove_artifact(path)
    return new


def _seed_database(db, s: TaskState, target) -> None:
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


def _search_batch(s: TaskState, target, batch: int, builder, runner, cost_model, db, log_dir, bar) -> int:
    """One batch of the evolutionary search for one task: at most `batch` new points are timed."""
    try:
        with _timed("search"):
            cands = s.ctx.generate_measure_candidates()
    except RuntimeError as err:  # e.g. a design space whose traces do not replay under other decisions
        if _STOP["requested"]:
            raise
        why = str(err).strip().splitlines()[-1][:200] if str(err).strip() else type(err).__name__
        print(f"\nwarning: {s.task.name}: the search failed ({why}); its records so far are kept", file=sys.stderr)
        s.done = True
        return 0
    if not cands:
        s.done = True
        return 0
    room = min(batch, s.budget - s.trials)
    keys = [trace_key(_to_py(c.sch.trace.as_json(remove_postproc=True))) for c in cands]
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
    with _timed("cost_model"):
        s.ctx.notify_runner_results([cands[i] for i in used], results)
        cost_model.update(s.ctx, [cands[i] for i in used], results)
    s.stale = 0 if fresh else s.stale + 1
    if s.stale >= 3:  # the search keeps proposing measured points: the space is exhausted
        s.done = True
    if n:
        _show(bar, s, n)
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
    with _timed("build"):
        built = builder.build([sch.mod for sch in schedules], target)
    ok = [(i, path) for i, (path, _) in enumerate(built) if path]
    args_info = ArgInfo.from_prim_func(s.task.mod["main"])
    try:
        with _timed("run"):
            runs = runner.run(s.task, [p for _, p in ok], [args_info] * len(ok)) if ok else []
    finally:
        for _, path in ok:
            _remove_artifact(path)
    secs_of = {i: r[0] for (i, _), r in zip(ok, runs)}
    wl = db.commit_workload(s.task.mod)
    lines, args_json = [], _args_info_json(s.task)
    for i, sch in enumerate(schedules):
        secs = secs_of.get(i)
        run_secs = secs if secs else [FAILED_SECS]
        tj = _to_py(sch.trace.as_json(remove_postproc=True))
        k = trace_key(tj)
        s.measured[k] = float(np.mean(secs)) if secs else math.inf
        if secs and (s.best_trace is None or s.measured[k] < s.best_trace[1]):
            s.best_trace = (tj, s.measured[k])
        lines.append(_record_line(s, tj, run_secs, target, args_json))
        db.commit_tuning_record(TuningRecord(sch.trace, wl, run_secs, target, args_info))
    append_lines(os.path.join(log_dir, RECORD_FILE), lines)
    s.new_trials += len(schedules)
    return len(schedules)


def _transfer_batch(s: TaskState, target, builder, runner, cost_model, db, log_dir, bar) -> int:
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
        results = [_result(s.measured[trace_key(_to_py(sch.trace.as_json(remove_postproc=True)))]) for sch in picks]
        with _timed("cost_model"):
            cost_model.update(s.ctx, cands, results)
        _show(bar, s, n)
    return n


def sibling_key(task: Task) -> tuple:
    """Tasks with equal keys differ only in their nonzero count (the reduction extent): their design
    spaces draw from the same candidate lists, so one's schedule replays on the other."""
    func = task.mod["main"]
    attrs = {k: str(func.attrs[k]) for k in ("unsparse.op", "unsparse.fmt", "unsparse.pad_shape")
             if func.attrs is not None and k in func.attrs}
    shapes = [tuple(a.shape) if a is not None else None for a in task.args]
    first_out = [str(getattr(p.ty, "shape", "")) for p in (func.params[0], func.params[-1])]
    rows = [s[0] for s in shapes if s is not None and len(s) == 2][:1]
    return (task.op, tuple(sorted(attrs.items())), tuple(first_out), tuple(rows))


def _progress(total: int, enabled: bool, out):
    from tqdm import tqdm

    return tqdm(total=total, desc="extracting tasks", unit="trial", disable=not enabled, file=out,
                bar_format="{desc} {percentage:3.0f}%|{bar:16}| {n_fmt}/{total_fmt} trials [{elapsed}<{remaining}]")


def _show(bar, s: TaskState, n: int) -> None:
    """Progress: the task, its trials so far and its best time (default knobs' time in brackets)."""
    best = f"{s.best * 1e3:.4f} ms" if math.isfinite(s.best) else "failed"
    default = s.measured.get("default", math.inf)
    ref = f" (default {default * 1e3:.4f})" if math.isfinite(default) and default != s.best else ""
    bar.set_description_str(f"{s.task.name[:16]:16s} {s.trials:3d}/{s.budget:<3d} best {best}{ref}", refresh=False)
    bar.update(n)


# ---- applying records ----------------------------------------------------------------------------
def _tuning_database_class():
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.database import MemoryDatabase, PyDatabase

    @derived_object
    class TuningDatabase(PyDatabase):
        """The best record per workload for one target, in memory; counts what the compile used."""

        def __init__(self, path: str, ident: tuple | None):
            super().__init__()
            self.inner = MemoryDatabase()
            self.path, self.ident = path, ident
            self.stats: dict = {}

        def has_workload(self, mod):
            return self.inner.has_workload(mod)

        def commit_workload(self, mod):
            return self.inner.commit_workload(mod)

        def commit_tuning_record(self, record):
            self.inner.commit_tuning_record(record)

        def get_top_k(self, workload, top_k):
            return self.inner.get_top_k(workload, top_k)

        def get_all_tuning_records(self):
            return self.inner.get_all_tuning_records()

        def query_tuning_record(self, mod, target, workload_name):
            return self.inner.query_tuning_record(mod, target, workload_name)

        def query_schedule(self, mod, target, workload_name):
            return self.inner.query_schedule(mod, target, workload_name)

        def query_ir_module(self, mod, target, workload_name):
            return self.inner.query_ir_module(mod, target, workload_name)

        def __len__(self):
            return len(self.inner)

        def summary(self) -> str:
            st = self.stats
            if not st:
                return f"tuning log {self.path}: not used"
            return (f"tuning log {self.path}: {st['layers_applied']} of {st['layers']} tunable layers "
                    f"({st['kernels_applied']} of {st['kernels']} kernels) scheduled from its records"
                    + ("" if st["layers_applied"] == st["layers"] else "; the others use the default knobs"))

    return TuningDatabase


def open_database(path: str, target=None, *, quiet: bool = False):
    """The records of `path` usable for `target`: corrupt lines and records of another target are
    skipped (one warning line), and per workload the best record whose trace still replays is kept.
    target=None: the current target scope (`with target:`), else every record (no filtering)."""
    from tvm.target import Target

    log = read_nonempty_log(path).check_fit()  # a record under the wrong workload is never applied
    target = target if target is not None else Target.current(allow_none=True)
    ident = target_identity(target) if target is not None else None
    db = _tuning_database_class()(path, ident)
    other, broken = 0, 0
    groups: dict[int, list[Record]] = {}
    for r in log.records:
        if ident is not None and r.identity != ident:
            other += 1
            continue
        if r.ok:
            groups.setdefault(r.workload, []).append(r)
    for wl_index, recs in groups.items():
        try:
            mod = log.workloads[wl_index].module()
        except Exception:
            broken += 1
            continue
        wl = db.commit_workload(mod)
        for r in sorted(recs, key=lambda r: r.seconds):
            rec = _replay(r, wl.mod, wl)  # the best record whose trace replays: never a broken schedule
            if rec is None:
                broken += 1
                continue
            db.commit_tuning_record(rec)
            break
    corrupt = log.corrupt + broken + log.misfit
    if (corrupt or other) and not quiet:
        print(_skip_warning(path, corrupt, other, ident or ("?",)), file=sys.stderr)
    db.stats = {}
    db.skipped = {"corrupt": corrupt, "other_target": other}
    return db


def ApplyTuningRecords(database):  # noqa: N802 (a pass, named like TVM's)
    """MetaScheduleApplyDatabase, counting which of our operators (kernels, call sites) it scheduled
    into `database.stats` when the database is ours (open_database)."""
    import tvm
    from tvm import relax

    from .schedules._common import is_scheduled, op_of

    @tvm.transform.module_pass(opt_level=0, name="ApplyTuningRecords")
    def _apply(mod, _ctx):
        ours = {gv.name_hint for gv, f in mod.functions_items() if op_of(f) is not None and not is_scheduled(f)}
        mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
        applied = {gv.name_hint for gv, f in mod.functions_items() if gv.name_hint in ours and is_scheduled(f)}
        calls: dict[str, int] = {}
        for gv, _ in _call_sites(mod):
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


def write_record(log_dir: str, workload_mod, trace, run_secs: list[float], target) -> None:
    """Append one record (a schedule trace for a workload, e.g. a hand-picked point of a design space)
    to a log directory, registering the workload if it is new."""
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.database import Workload as TVMWorkload

    from .logs import Workload, target_dict

    check_writable_dir(log_dir)
    log = read_log(log_dir)
    shash, mod_json = TVMWorkload(workload_mod).as_json()
    index = next((i for i, w in enumerate(log.workloads) if w is not None and w.shash == str(shash)), None)
    if index is None:
        index = len(log.workloads)
        append_lines(os.path.join(log_dir, WORKLOAD_FILE), [Workload(str(shash), mod_json).line()])
    args_info = [a.as_json() for a in ArgInfo.from_prim_func(workload_mod["main"])]
    line = Record(index, _to_py(trace.as_json(remove_postproc=True)), [float(x) for x in run_secs],
                  target_dict(target), _to_py(args_info)).line()
    append_lines(os.path.join(log_dir, RECORD_FILE), [line])


# ---- the `tune` command --------------------------------------------------------------------------
def tune_command(args) -> int:
    """`unsparse-tvm tune`: extract, search, append records; Ctrl-C or kill keeps every finished batch."""
    from .target import make_target

    if args.rpc_tracker and not args.rpc_key:
        raise UnsparseError("--rpc-tracker needs --rpc-key (the key the RPC servers registered with)")
    if args.rpc_key and not args.rpc_tracker:
        raise UnsparseError("--rpc-key needs --rpc-tracker HOST:PORT")
    if args.trials < 1:
        raise UnsparseError(f"--trials must be at least 1, got {args.trials}")
    target = make_target(args.target, args.arch)
    rpc = (*parse_tracker(args.rpc_tracker), args.rpc_key) if args.rpc_tracker else None
    created = not os.path.exists(args.log_dir)
    check_writable_dir(args.log_dir)
    try:
        return _tune_in(args, target, rpc)
    finally:  # a tune that failed before writing anything leaves no empty log directory behind
        if created and os.path.isdir(args.log_dir) and not os.listdir(args.log_dir):
            os.rmdir(args.log_dir)


def _tune_in(args, target, rpc) -> int:
    import signal

    if rpc is not None:
        check_tracker(*rpc)  # before the model is loaded

    _STOP["requested"] = False

    def on_stop(_sig, _frame):  # Ctrl-C or `kill`: stop after closing the worker pools; the log is complete
        _STOP["requested"] = True
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, on_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        ep = load_model_program(args.model, args.sparsity, batch=args.batch)
        res = tune(ep, target, args.log_dir, args.trials, threshold=args.threshold, include_dense=args.include_dense,
                   rpc=rpc, progress=not args.no_progress, seed=args.seed, out=sys.stdout)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(res.table())
    where = f"on {rpc[0]}:{rpc[1]} key {rpc[2]}" if rpc else "locally"
    print(f"{res.new_trials} new trials measured {where} in {res.seconds:.0f} s; "
          f"{sum(s.trials for s in res.tasks)} trials in {args.log_dir} for these {len(res.tasks)} workloads")
    if res.interrupted:
        print(f"interrupted: every measured batch is in {args.log_dir}; run the same command again to resume",
              file=sys.stderr)
        return 130
    print(f"use them with: unsparse-tvm compile {args.model} --target {args.target} "
          f"--tuning-log {args.log_dir} -o model.so")
    return 0
