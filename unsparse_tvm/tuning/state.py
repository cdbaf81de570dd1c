"""The state of a tuning run: per task, what was measured and its share of the trials; the result table
and the progress bar; the stop flag the command's signal handler sets."""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from tqdm import tqdm

from .tasks import Task

PROFILE: dict[str, float] = {}
STOP = {"requested": False}  # set by the CLI's SIGINT/SIGTERM handler


@contextmanager
def timed(name: str):
    """Wall time per tuning phase (UNSPARSE_TUNE_PROFILE=1 prints them at the end)."""
    t = time.perf_counter()
    try:
        yield
    finally:
        PROFILE[name] = PROFILE.get(name, 0.0) + time.perf_counter() - t


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


def progress_bar(total: int, enabled: bool, out):
    return tqdm(total=total, desc="extracting tasks", unit="trial", disable=not enabled, file=out,
                bar_format="{desc} {percentage:3.0f}%|{bar:16}| {n_fmt}/{total_fmt} trials [{elapsed}<{remaining}]")


def show_progress(bar, s: TaskState, n: int) -> None:
    """Progress: the task, its trials so far and its best time (default knobs' time in brackets)."""
    best = f"{s.best * 1e3:.4f} ms" if math.isfinite(s.best) else "failed"
    default = s.measured.get("default", math.inf)
    ref = f" (default {default * 1e3:.4f})" if math.isfinite(default) and default != s.best else ""
    bar.set_description_str(f"{s.task.name[:16]:16s} {s.trials:3d}/{s.budget:<3d} best {best}{ref}", refresh=False)
    bar.update(n)
