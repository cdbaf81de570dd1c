"""Applying records: `open_database(dir, target)` keeps only the records of the compile target (TVM's own
lookup ignores the target: apache/tvm#15549), the best one per workload whose trace still replays, in
an in-memory database for `build_pipeline(database=...)`; `write_record` appends a hand-made record.

MetaSchedule is imported inside the functions (deliberately: `compile` imports this module, and
only a compile with --tuning-log needs it).
"""

from __future__ import annotations

import json
import os
import sys

from ..outputs import check_output_dir
from .log import (RECORD_FILE, WORKLOAD_FILE, Record, Workload, append_lines, describe_identity, isa_family,
                  plain, read_log, read_nonempty_log, target_dict, target_identity)


def skip_warning(path: str, corrupt: int, other: int, ident: tuple) -> str:
    parts = []
    if corrupt:
        parts.append(f"{corrupt} unreadable line{'s' if corrupt > 1 else ''} (corrupt or truncated)")
    if other:
        parts.append(f"{other} record{'s' if other > 1 else ''} of another target")
    return f"warning: tuning log {path}: skipped {' and '.join(parts)}; using only records for {describe_identity(ident)}"


def replay(r: Record, mod, workload=None):
    """The record as a TVM TuningRecord if its trace replays on the workload, else None: a damaged line
    that still parses is never applied (nor counted as a trial)."""
    from tvm import s_tir
    from tvm.s_tir.meta_schedule.database import TuningRecord, Workload

    from unsparse_tvm.schedules.x86_row_lanes import register_named

    register_named(json.dumps(r.trace))  # tensor intrinsics it names, registered on first use
    try:
        rec = TuningRecord.from_json([r.trace, r.run_secs, r.target, r.args_info], workload or Workload(mod))
        rec.trace.apply_to_schedule(s_tir.Schedule(mod), remove_postproc=False)
        return rec
    except Exception:  # TVM raises assorted errors for a trace that does not fit
        return None


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
            borrowed = getattr(self, "borrowed", [])
            return (f"tuning log {self.path}: {st['layers_applied']} of {st['layers']} tunable layers "
                    f"({st['kernels_applied']} of {st['kernels']} kernels) scheduled from its records"
                    + (f" (where this CPU model has none: records of {', '.join(borrowed)}, the same vector ISA)"
                       if borrowed else "")
                    + ("" if st["layers_applied"] == st["layers"] else "; the others use the default knobs"))

    return TuningDatabase


def open_database(path: str, target=None, *, quiet: bool = False):
    """The records of `path` (a log directory, or a folder of them such as `tuning_logs/`) usable for
    `target`: per workload the best record of the target's own identity whose trace still replays, else,
    as a starting point, the best of another CPU model with the same vector ISA (isa_family: AVX-512 or
    AVX2); corrupt lines and records of other targets are skipped (one warning line).
    target=None: the current target scope (`with target:`), else every record (no filtering)."""
    from tvm.target import Target

    log = read_nonempty_log(path).check_fit()  # a record under the wrong workload is never applied
    target = target if target is not None else Target.current(allow_none=True)
    ident = target_identity(target) if target is not None else None
    db = _tuning_database_class()(path, ident)
    family = isa_family(ident) if ident is not None else None
    other, broken = 0, 0
    groups: dict[int, list[Record]] = {}
    kin: dict[int, list[Record]] = {}  # same ISA family, another CPU model
    for r in log.records:
        if ident is not None and r.identity != ident:
            if family is not None and r.ok and isa_family(r.identity) == family:
                kin.setdefault(r.workload, []).append(r)
            else:
                other += 1
            continue
        if r.ok:
            groups.setdefault(r.workload, []).append(r)
    # a workload's records of the same family count only where the target's own have nothing for it
    by_shash = {log.workloads[i].shash for i in groups if log.workloads[i] is not None}
    borrowed = {i: recs for i, recs in kin.items()
                if log.workloads[i] is not None and log.workloads[i].shash not in by_shash}
    other += sum(len(recs) for i, recs in kin.items() if i not in borrowed)
    db.borrowed = sorted({r.target.get("mcpu", "?") for recs in borrowed.values() for r in recs})
    for wl_index, recs in {**groups, **borrowed}.items():
        try:
            mod = log.workloads[wl_index].module()
        except Exception:
            broken += 1
            continue
        wl = db.commit_workload(mod)
        for r in sorted(recs, key=lambda r: r.seconds):
            rec = replay(r, wl.mod, wl)  # the best record whose trace replays: never a broken schedule
            if rec is None:
                broken += 1
                continue
            db.commit_tuning_record(rec)
            break
    corrupt = log.corrupt + broken + log.misfit
    if (corrupt or other) and not quiet:
        print(skip_warning(path, corrupt, other, ident or ("?",)), file=sys.stderr)
    db.stats = {}
    db.skipped = {"corrupt": corrupt, "other_target": other}
    return db


def write_record(log_dir: str, workload_mod, trace, run_secs: list[float], target) -> None:
    """Append one record (a schedule trace for a workload, e.g. a hand-picked point of a design space)
    to a log directory, registering the workload if it is new."""
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.database import Workload as TVMWorkload


    check_output_dir(log_dir)
    log = read_log(log_dir)
    shash, mod_json = TVMWorkload(workload_mod).as_json()
    index = next((i for i, w in enumerate(log.workloads) if w is not None and w.shash == str(shash)), None)
    if index is None:
        index = len(log.workloads)
        append_lines(os.path.join(log_dir, WORKLOAD_FILE), [Workload(str(shash), mod_json).line()])
    args_info = [a.as_json() for a in ArgInfo.from_prim_func(workload_mod["main"])]
    line = Record(index, plain(trace.as_json(remove_postproc=True)), [float(x) for x in run_secs],
                  target_dict(target), plain(args_info)).line()
    append_lines(os.path.join(log_dir, RECORD_FILE), [line])
