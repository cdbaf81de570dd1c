"""The `tune` and `logs` commands, as typed calls (the CLI turns its parsed arguments into one each)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import sys
from dataclasses import dataclass

from ..errors import UnsparseError
from ..outputs import check_output_dir
from ..compress.prune import load_model_program
from ..cost.calibration import rates_for
from ..target import make_target, require_runnable
from .log import merge, show
from .rpc import check_tracker, parse_tracker
from .search import SearchOptions, tune
from .state import STOP


@dataclass
class TuneRequest:
    """What `unsparse-tvm tune` was asked to do."""

    model: str
    trials: int
    log_dir: str
    target: str = "llvm"
    arch: str | None = None
    sparsity: float | None = None
    threshold: float | None = None
    include_dense: bool = False
    rpc_tracker: str | None = None    # HOST:PORT
    rpc_key: str | None = None
    batch: int | None = None
    seed: int = 1
    progress: bool = True
    calibrate: bool = True            # this CPU's cost-model calibration picks the sparse layers, as in compile


def tune_command(req: TuneRequest) -> int:
    """`unsparse-tvm tune`: extract, search, append records; Ctrl-C or kill keeps every finished batch."""
    rpc_at = parse_tracker(req.rpc_tracker) if req.rpc_tracker else None  # HOST:PORT, before anything else
    if req.rpc_tracker and not req.rpc_key:
        raise UnsparseError("--rpc-tracker needs --rpc-key (the key the RPC servers registered with)")
    if req.rpc_key and not req.rpc_tracker:
        raise UnsparseError("--rpc-key needs --rpc-tracker HOST:PORT")
    target = make_target(req.target, req.arch)
    if not req.rpc_tracker:  # measured here: built for a CPU model this one runs (remote devices: theirs)
        require_runnable(target, "tune")
    rpc = (*rpc_at, req.rpc_key) if rpc_at else None
    # before any work: the trials go where the user expects, or it says so (--sparsity prunes to fp32 first)
    quant_note = untuned_note(req.model) if req.sparsity is None else None
    created = not os.path.exists(req.log_dir)
    check_output_dir(req.log_dir)
    if quant_note:
        print(f"note: {quant_note}")
    try:
        return _tune_in(req, target, rpc)
    finally:  # a tune that failed before writing anything leaves no empty log directory behind
        if created and os.path.isdir(req.log_dir) and not os.listdir(req.log_dir):
            os.rmdir(req.log_dir)


def _tune_in(req: TuneRequest, target, rpc) -> int:
    if rpc is not None:
        check_tracker(*rpc)  # before the model is loaded

    STOP["requested"] = False

    def on_stop(_sig, _frame):  # Ctrl-C or `kill`: stop after closing the worker pools; the log is complete
        STOP["requested"] = True
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, on_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        ep = load_model_program(req.model, req.sparsity, batch=req.batch)
        # measured on remote devices: this CPU's calibration says nothing about theirs
        rates = rates_for(target, calibrate=req.calibrate and rpc is None) if req.threshold is None else None
        res = tune(ep, target, req.log_dir, req.trials, threshold=req.threshold, include_dense=req.include_dense,
                   rpc=rpc, rates=rates, options=SearchOptions(seed=req.seed, progress=req.progress), out=sys.stdout)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(res.table())
    where = f"on {rpc[0]}:{rpc[1]} key {rpc[2]}" if rpc else "locally"
    print(f"{res.new_trials} new trials measured {where} in {res.seconds:.0f} s; "
          f"{sum(s.trials for s in res.tasks)} trials in {req.log_dir} for these {len(res.tasks)} workloads")
    if res.interrupted:
        print(f"interrupted: every measured batch is in {req.log_dir}; run the same command again to resume",
              file=sys.stderr)
        return 130
    print(f"use them with: {compile_hint(req)}")
    return 0


def compile_hint(req: TuneRequest) -> str:
    """The command(s) that compile the very program that was tuned, so the records apply: with --sparsity,
    the model was pruned first (one-shot, as `prune` does by default), so the hint prunes it the same way
    and compiles the pruned .pt2; --batch, --target, --arch and --threshold are kept (they shape the
    workloads). Every path is quoted for the shell."""
    q = shlex.quote
    model, steps, batch = req.model, [], f" --batch {req.batch}" if req.batch else ""
    if req.sparsity is not None:
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", os.path.basename(req.model).removesuffix(".pt2"))
        model = f"{stem}-pruned{req.sparsity}.pt2"
        steps.append(f"unsparse-tvm prune {q(req.model)} --sparsity {req.sparsity}{batch} -o {q(model)}")
        batch = ""  # baked into the pruned .pt2
    arch = f" --arch {q(req.arch)}" if req.arch else ""
    threshold = f" --threshold {req.threshold}" if req.threshold is not None else ""
    steps.append(f"unsparse-tvm compile {q(model)} --target {q(req.target)}{arch}{threshold}{batch} "
                 f"--tuning-log {q(req.log_dir)} -o model.so")
    return " && ".join(steps)


def untuned_note(model: str) -> str | None:
    """What `tune` leaves at default knobs for a quantised .pt2 (it times the fp32 sparse kernels only)."""
    if not model.endswith(".pt2") or not os.path.isfile(model):
        return None
    from ..frontend import read_quantization

    quant = read_quantization(model)
    if quant is None:
        return None
    if (quant.get("activations") or {}).get("layers"):
        return (f"{model} runs its calibrated layers int8 (quantize --activations int8), and int8 kernels are not "
                "tuned: tune times the fp32 sparse kernels, which only its other layers use")
    return (f"{model} is weight-quantised ({quant.get('scheme')}), and quantised kernels are not tuned: tune times "
            "the fp32 sparse kernels, while compile runs its sparse layers on quantised ones at their default knobs")


def logs_show(path: str) -> int:
    """`unsparse-tvm logs show DIR`."""
    print(show(path))
    return 0


def logs_merge(inputs: list[str], output: str, overwrite: bool = False) -> int:
    """`unsparse-tvm logs merge DIR... -o OUT [--force]`."""
    res = merge(inputs, output, overwrite=overwrite)
    print(f"merged {res['records_in']} records from {res['inputs']} log{'s' if res['inputs'] > 1 else ''} into "
          f"{output}: the best of each workload and target, {res['records_out']} records"
          + (f" ({res['corrupt']} unreadable lines skipped)" if res["corrupt"] else ""))
    if res["misfit"]:
        print(f"warning: {res['misfit']} record{'s' if res['misfit'] > 1 else ''} skipped: their argument shapes do not "
              "fit the workload they point at (a mismatched log)", file=sys.stderr)
    return 0
