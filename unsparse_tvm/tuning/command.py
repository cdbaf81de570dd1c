"""The `tune` and `logs` commands: parsed arguments in, one call each."""

from __future__ import annotations

import os
import signal
import sys

from ..errors import UnsparseError
from ..compress.prune import load_model_program
from ..target import make_target
from .log import check_writable_dir, merge, show
from .rpc import check_tracker, parse_tracker
from .search import tune
from .state import STOP


def tune_command(args) -> int:
    """`unsparse-tvm tune`: extract, search, append records; Ctrl-C or kill keeps every finished batch."""
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
    if rpc is not None:
        check_tracker(*rpc)  # before the model is loaded

    STOP["requested"] = False

    def on_stop(_sig, _frame):  # Ctrl-C or `kill`: stop after closing the worker pools; the log is complete
        STOP["requested"] = True
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


def logs_command(args) -> int:
    """`unsparse-tvm logs show DIR` / `unsparse-tvm logs merge DIR... -o OUT [--force]`."""
    if args.logs_command == "show":
        print(show(args.dir))
        return 0
    res = merge(args.dirs, args.output, overwrite=args.force)
    print(f"merged {res['records_in']} records from {res['inputs']} log{'s' if res['inputs'] > 1 else ''} into "
          f"{args.output}: the best of each workload and target, {res['records_out']} records"
          + (f" ({res['corrupt']} unreadable lines skipped)" if res["corrupt"] else ""))
    if res["misfit"]:
        print(f"warning: {res['misfit']} record{'s' if res['misfit'] > 1 else ''} skipped: their argument shapes do not "
              "fit the workload they point at (a mismatched log)", file=sys.stderr)
    return 0
