"""Tuning the knobs of our hand-written schedules with MetaSchedule, and the tuning logs.

tasks (what to tune) -> measure (build and time with the real index arrays; rpc for remote devices) ->
search (the evolutionary search, in measured batches, with its state) -> log (the records on disk) ->
database (the best record per workload for the compile target). command: `tune` and `logs`.
"""

from .database import open_database, write_record
from .log import read_log, target_identity
from .measure import Builder, Runner
from .rpc import check_tracker
from .search import tune
from .state import TaskState, TuneResult, allocate
from .tasks import Task, extract_tasks

__all__ = ["Builder", "Runner", "Task", "TaskState", "TuneResult", "allocate", "check_tracker", "extract_tasks",
           "open_database", "read_log", "target_identity", "tune", "write_record"]
