"""Tuning the knobs of our hand-written schedules with MetaSchedule, and the tuning logs.

tasks (what to tune) -> measure (build and time with the real index arrays; rpc for remote devices) ->
search (the evolutionary search, in measured batches, with its state) -> log (the records on disk) ->
database (the best record per workload for the compile target). command: `tune` and `logs`.
"""

import importlib

# name -> submodule. Loaded on first use, deliberately: build and run workers unpickle functions of
# tuning.measure, and importing the whole package there would import torch and Relax in every worker.
_EXPORTS = {
    "open_database": "database", "write_record": "database", "read_log": "log", "target_identity": "log",
    "Builder": "measure", "Runner": "measure", "check_tracker": "rpc", "tune": "search", "TaskState": "state",
    "TuneResult": "state", "allocate": "state", "Task": "tasks", "extract_tasks": "tasks",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
