"""Tuning logs: a directory of MetaSchedule JSON records, read tolerantly, keyed by target, shown and merged.

A log directory holds the two files of `tvm.s_tir.meta_schedule.database.JSONDatabase`, one JSON value
per line, so TVM's own JSONDatabase can open it too:
  database_workload.json        [structural hash, base64 IRModule JSON]           (one line per workload)
  database_tuning_record.json   [workload line number, [trace, run_secs, target, args_info]]
Records are only ever appended (one line each, flushed per measured batch), so an interrupted tuning run
loses at most the batch in flight, and a torn last line is skipped (and counted) on reading.

TVM's lookups ignore a record's target (apache/tvm#15549); here every record is keyed by
`target_identity` and only records of the compile target are used.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import UnsparseError
from ..outputs import check_output_dir, write_text

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
FAILED_SECS = 1e10  # the run time MetaSchedule gives a candidate that failed to build or run


# ---- target identity -----------------------------------------------------------------------------
def target_dict(target) -> dict:
    """A tvm Target, or a record's target JSON, as a plain dict."""
    if isinstance(target, dict):
        return target
    return plain(target.export())


def plain(v):
    """TVM FFI containers (Map, Array, String, IntImm) -> plain JSON values."""
    if isinstance(v, (str, bool, int, float)) or v is None:
        return v
    if hasattr(v, "items"):
        return {str(k): plain(x) for k, x in v.items()}
    if hasattr(v, "value") and isinstance(v.value, (int, float)):
        return v.value
    if hasattr(v, "__iter__"):
        return [plain(x) for x in v]
    return str(v)


def target_identity(target) -> tuple:
    """What a record's target must share with the compile target for the record to be applied.

    cuda: the kind and the arch (sm_XY): the schedule's thread/block shape is tuned to the GPU generation.
    llvm: the kind, the triple, mcpu (the CPU model LLVM tunes code for: ISA extensions such as AVX-512
    and the core microarchitecture) and mattr if given. num-cores is left out: a record stays valid and
    close to best on the same CPU model with another core count. A cuda target's host part is left out
    too (host code is not tuned). Anything else (e.g. a future kind): the kind and every attribute.
    """
    d = target_dict(target)
    kind = d.get("kind")
    if kind == "cuda":
        return ("cuda", str(d.get("arch", "")))
    if kind == "llvm":
        mattr = d.get("mattr") or []
        return ("llvm", str(d.get("mtriple", "")), str(d.get("mcpu", "")), ",".join(sorted(map(str, mattr))))
    rest = {k: v for k, v in d.items() if k not in ("host", "tag", "keys", "num-cores")}
    return (str(kind), json.dumps(rest, sort_keys=True, default=str))


def isa_family(ident: tuple) -> str | None:
    """The vector ISA an llvm identity's code uses ("avx512", "avx2", "sse"): records tuned on one CPU model
    are a starting point on another of the same family (tuning_logs/x86-avx512, x86-avx2); None for cuda."""
    if ident[0] != "llvm" or not ident[2]:
        return None
    from ..target import cpu_features  # deferred: LLVM (TVM's compiler)

    features = cpu_features(ident[2], tuple(a for a in ident[3].split(",") if a))
    return "avx512" if "avx512f" in features else "avx2" if "avx2" in features else "sse"


def describe_identity(ident: tuple) -> str:
    if ident[0] == "cuda":
        return f"cuda {ident[1]}"
    if ident[0] == "llvm":
        return f"llvm mcpu={ident[2] or '?'}" + (f" mattr={ident[3]}" if ident[3] else "")
    return " ".join(ident)


# ---- reading -------------------------------------------------------------------------------------
@dataclass
class Record:
    """One tuning record line, parsed but not turned into TVM objects."""

    workload: int                 # line number in the workload file
    trace: Any
    run_secs: list[float] | None
    target: dict
    args_info: Any

    @property
    def seconds(self) -> float:
        """Mean measured run time (MetaSchedule's ranking); inf for a failed candidate."""
        if not self.run_secs or any(s >= FAILED_SECS / 10 for s in self.run_secs):
            return math.inf
        return statistics.fmean(self.run_secs)

    @property
    def ok(self) -> bool:
        return math.isfinite(self.seconds)

    @property
    def identity(self) -> tuple:
        return target_identity(self.target)

    def line(self, workload: int | None = None) -> str:
        idx = self.workload if workload is None else workload
        return json.dumps([idx, [self.trace, self.run_secs, self.target, self.args_info]], separators=(",", ":"))


@dataclass
class Workload:
    shash: str
    mod_json: str

    def line(self) -> str:
        return json.dumps([self.shash, self.mod_json], separators=(",", ":"))

    def module(self):
        """The workload's IRModule (parsed on demand: the JSON is large)."""
        from tvm.s_tir.meta_schedule.database import Workload as TVMWorkload  # deferred: MetaSchedule

        return TVMWorkload.from_json([self.shash, self.mod_json]).mod

    def args_info(self):
        """The workload's arguments as a record stores them (kind, dtype, shape each); None if unparsable."""
        if not hasattr(self, "_args_info"):
            try:
                from tvm.s_tir.meta_schedule.arg_info import ArgInfo  # deferred: MetaSchedule

                self._args_info = plain([a.as_json() for a in ArgInfo.from_prim_func(self.module()["main"])])
            except Exception:  # an unparsable module
                self._args_info = None
        return self._args_info

    def fits(self, record: "Record") -> bool:
        """Does the record's argument list (dtypes and shapes) match this workload's? A record put under
        the wrong workload (a hand-edited or mismatched log) does not, and is never applied or merged."""
        expected = self.args_info()
        return expected is not None and plain(record.args_info) == expected


@dataclass
class LogContents:
    path: str
    workloads: list[Workload | None] = field(default_factory=list)   # None: a corrupt line (index kept)
    records: list[Record] = field(default_factory=list)
    corrupt: int = 0        # unreadable lines, and records pointing at a missing/corrupt workload
    misfit: int = 0         # records whose arguments do not match their workload's (dropped by check_fit)

    def check_fit(self) -> "LogContents":
        """Drop (and count) the records that do not fit the workload they point at."""
        kept = [r for r in self.records if self.workloads[r.workload].fits(r)]
        self.misfit += len(self.records) - len(kept)
        self.records = kept
        return self


def _json(line: str):
    """The line's JSON value, or None when it does not parse (a torn or corrupt line)."""
    try:
        return json.loads(line)
    except ValueError:
        return None


def _parse_workload(line: str) -> Workload | None:
    v = _json(line)
    if isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v) and v[0].isdigit():
        return Workload(v[0], v[1])
    return None


def _parse_record(line: str) -> Record | None:
    v = _json(line)
    if not (isinstance(v, list) and len(v) == 2 and isinstance(v[0], int) and isinstance(v[1], list)
            and len(v[1]) == 4):
        return None
    trace, run_secs, target, args_info = v[1]
    if not (isinstance(trace, list) and len(trace) == 2 and isinstance(target, dict) and "kind" in target):
        return None
    if run_secs is not None and not (isinstance(run_secs, list) and run_secs
                                     and all(isinstance(s, (int, float)) and s >= 0 for s in run_secs)):
        return None
    return Record(v[0], trace, run_secs, target, args_info)


def _lines(path: str) -> list[str]:
    if not os.path.exists(path):
        return []
    if not os.path.isfile(path):
        raise UnsparseError(f"tuning log file {path} is not a file (a directory?): not a log written by tune")
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        return f.read().split("\n")


def read_log(path: str) -> LogContents:
    """Every readable record of a log directory; unreadable lines are counted, never fatal."""
    if not os.path.isdir(path):
        raise UnsparseError(f"tuning log {path} does not exist (or is not a directory)")
    log = LogContents(path)
    for line in _lines(os.path.join(path, WORKLOAD_FILE)):
        if line.strip():
            w = _parse_workload(line)
            log.workloads.append(w)
            log.corrupt += w is None
    for line in _lines(os.path.join(path, RECORD_FILE)):
        if not line.strip():
            continue
        r = _parse_record(line)
        if r is None or not 0 <= r.workload < len(log.workloads) or log.workloads[r.workload] is None:
            log.corrupt += 1
            continue
        log.records.append(r)
    return log


def read_logs_under(path: str) -> LogContents:
    """A log directory, or a folder of them (`tuning_logs/`: one per ISA family), as one log: the
    workloads of each sub-log after the previous ones', their records re-pointed accordingly."""
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, WORKLOAD_FILE)):
        subs = sorted(os.path.join(path, d) for d in os.listdir(path)
                      if os.path.isfile(os.path.join(path, d, WORKLOAD_FILE)))
        if subs:
            log = LogContents(path)
            for sub in subs:
                part = read_log(sub)
                offset = len(log.workloads)
                log.workloads += part.workloads
                log.records += [dataclasses.replace(r, workload=r.workload + offset) for r in part.records]
                log.corrupt += part.corrupt
            return log
    return read_log(path)


def read_nonempty_log(path: str) -> LogContents:
    log = read_logs_under(path)
    if not log.records and not log.corrupt:
        raise UnsparseError(f"tuning log {path} holds no tuning records (expected {RECORD_FILE}, "
                            f"written by `unsparse-tvm tune ... --log-dir {path}`)")
    return log


# ---- writing -------------------------------------------------------------------------------------
def append_lines(path: str, lines: list[str]) -> None:
    """Append whole lines and flush; a torn last line (a killed writer) is closed off first so it
    stays one corrupt line instead of swallowing the next record."""
    if not lines:
        return
    with open(path, "ab+") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write(("\n".join(lines) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


# ---- show ----------------------------------------------------------------------------------------
@dataclass
class Summary:
    """One (workload, target) of a log."""

    workload: int
    op: str
    shape: str
    target: str
    best_ms: float
    trials: int
    failed: int


def _describe_workload(w: Workload) -> tuple[str, str]:
    """(op, shapes) of a workload: the unsparse operator and its argument shapes."""
    try:
        mod = w.module()
    except Exception:  # an unparsable module: still list its records
        return "?", "?"
    func = mod["main"] if "main" in [g.name_hint for g in mod.get_global_vars()] else next(iter(mod.functions.values()))
    op = str(func.attrs["unsparse.op"]) if func.attrs is not None and "unsparse.op" in func.attrs else "?"
    shapes = []
    for p in func.params:
        buf = getattr(p, "ty", None)
        shape = getattr(buf, "shape", None)
        try:
            shapes.append("x".join(str(int(s)) for s in shape))
        except TypeError:
            shapes.append("?")
    return op, " ".join(shapes)


def summarize(log: LogContents) -> list[Summary]:
    rows = []
    described: dict[int, tuple[str, str]] = {}
    groups: dict[tuple[int, tuple], list[Record]] = {}
    for r in log.records:
        groups.setdefault((r.workload, r.identity), []).append(r)
    for (wl, ident), recs in sorted(groups.items(), key=lambda kv: kv[0][0]):
        if wl not in described:
            described[wl] = _describe_workload(log.workloads[wl])
        op, shape = described[wl]
        best = min(r.seconds for r in recs)
        rows.append(Summary(wl, op, shape, describe_identity(ident), best * 1e3 if math.isfinite(best) else math.inf,
                            len(recs), sum(not r.ok for r in recs)))
    return rows


def _misfit_note(n: int) -> str:
    return (f", {n} record{'s' if n > 1 else ''} skipped that do not fit their workload (argument shapes differ)"
            if n else "")


def show(path: str) -> str:
    log = read_nonempty_log(path).check_fit()
    rows = summarize(log)
    out = [f"{path}: {len(log.records)} records, {len(rows)} workload/target pairs"
           + (f", {log.corrupt} unreadable lines skipped" if log.corrupt else "") + _misfit_note(log.misfit)]
    out.append(f"{'#':>3s} {'op':14s} {'best ms':>9s} {'trials':>6s} {'failed':>6s} {'target':24s} argument shapes")
    for s in rows:
        best = f"{s.best_ms:9.4f}" if math.isfinite(s.best_ms) else f"{'-':>9s}"
        out.append(f"{s.workload:3d} {s.op:14s} {best} {s.trials:6d} {s.failed:6d} {s.target:24s} {s.shape}")
    return "\n".join(out)


# ---- merge ---------------------------------------------------------------------------------------
def merge(inputs: list[str], output: str, overwrite: bool = False) -> dict:
    """Keep the best record per (workload, target) of all inputs; write them to `output`."""
    if not inputs:
        raise UnsparseError("logs merge needs at least one input log directory")
    # every input read (a missing or empty one refused) before the output directory is created
    logs = [read_nonempty_log(p).check_fit() for p in inputs]
    check_output_dir(output, overwrite=overwrite, holds=(WORKLOAD_FILE, RECORD_FILE), inputs=tuple(inputs),
                     what="merged log")
    workloads: dict[str, int] = {}      # structural hash -> output line
    wl_lines: list[str] = []
    best: dict[tuple[int, tuple], Record] = {}
    corrupt = 0
    for log in logs:
        corrupt += log.corrupt
        for r in log.records:
            w = log.workloads[r.workload]
            if w.shash not in workloads:
                workloads[w.shash] = len(wl_lines)
                wl_lines.append(w.line())
            key = (workloads[w.shash], r.identity)
            cur = best.get(key)
            if cur is None or r.seconds < cur.seconds:
                best[key] = Record(workloads[w.shash], r.trace, r.run_secs, r.target, r.args_info)
    used = sorted({k[0] for k in best})
    remap = {old: new for new, old in enumerate(used)}
    rec_lines = [r.line(remap[r.workload]) for _, r in sorted(best.items(), key=lambda kv: (kv[0][0], kv[0][1]))]
    for name, lines in ((WORKLOAD_FILE, [wl_lines[i] for i in used]), (RECORD_FILE, rec_lines)):
        write_text(os.path.join(output, name), "".join(line + "\n" for line in lines))
    return {"inputs": len(inputs), "records_in": sum(len(l.records) + l.misfit for l in logs),
            "records_out": len(rec_lines), "workloads": len(used), "corrupt": corrupt,
            "misfit": sum(l.misfit for l in logs)}
