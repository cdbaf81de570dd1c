"""Building and timing candidates: a persistent pool of build workers, and a runner (local, or the
servers of an RPC tracker) that gives every candidate the layer's *real* sparse index arrays
(MetaSchedule's own runners fill int32 buffers with random values, and a gather through random offsets
reads out of bounds).

TVM is imported inside the functions (deliberately: build and run workers unpickle this module's
objects and import what they use).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import TYPE_CHECKING

import numpy as np

from .rpc import check_tracker

if TYPE_CHECKING:  # only for annotations: tasks imports the compiler, workers import this module
    from .tasks import Task


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


def _build_one(mod, target, workdir: str) -> str:
    """Build one candidate and export it as a tar (the runner or the RPC server links it), in a folder of
    its own under the run's `workdir`."""
    import tvm
    from tvm.support.tar import tar

    from unsparse_tvm.schedules.row_extents import TrimRowLoops
    from unsparse_tvm.schedules.small_loops import SerialSmallLoops
    from unsparse_tvm.target import kernel_target
    from unsparse_tvm.tir_pipeline import pipeline

    # as compile builds it: int8 loops at the rows' lengths, small parallel loops serial, for kernel_target,
    # small buffers on the stack
    mod = SerialSmallLoops()(TrimRowLoops()(mod))
    rt_mod = tvm.tirx.build(mod, target=kernel_target(target, mod), pipeline=pipeline())
    path = os.path.join(tempfile.mkdtemp(dir=workdir), "mod." + tar.output_format)
    try:
        rt_mod.export_library(path, fcompile=tar)
    except BaseException:  # the caller gets no path to remove: the folder goes here
        remove_artifact(path)
        raise
    return path


class Builder:
    """Builds candidates in a persistent pool of worker processes (MetaSchedule's LocalBuilder starts a
    fresh pool per batch, and its default build function imports tensor intrinsics for ~50 s)."""

    def __init__(self, workers: int, timeout_sec: float = 120.0):
        from tvm.support.popen_pool import PopenPoolExecutor

        self.workers, self.timeout = workers, timeout_sec
        # every candidate of the run lies under one folder that close() removes: a build worker killed at
        # its timeout, or a run ended by Ctrl-C, leaves no tar behind in the system's temp folder
        self.workdir = tempfile.mkdtemp(prefix="unsparse-cand-")
        self.pool = PopenPoolExecutor(max_workers=workers, timeout=timeout_sec)
        self.batches = 0

    def build(self, mods: list, target) -> list[tuple[str | None, str | None]]:
        from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

        self.batches += 1
        if self.batches % 25 == 0:  # popen workers leak memory over many builds: recycle them
            self.pool.shutdown()
            self.pool = PopenPoolExecutor(max_workers=self.workers, timeout=self.timeout)
        out, workdir = [], self.workdir  # the lambda is pickled for the workers: a str, not self and its pool
        for res in self.pool.map_with_error_catching(lambda m: _build_one(m, target, workdir), mods):
            if res.status == StatusKind.COMPLETE:
                out.append((res.value, None))
            elif res.status == StatusKind.TIMEOUT:
                out.append((None, f"build timed out after {self.timeout:.0f} s"))
            else:
                out.append((None, f"build failed: {last_line(res.value)}"))
        return out

    def close(self):
        self.pool.shutdown(wait=False)
        shutil.rmtree(self.workdir, ignore_errors=True)


def last_line(err) -> str:
    """The informative line of a worker's error (TVM puts the cause last)."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else type(err).__name__


def _evaluator(target_kind: str):
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig

    # 5 timed repeats, each at least 20 ms of back-to-back calls; the record keeps all five
    return EvaluatorConfig(number=1, repeat=5, min_repeat_ms=20, enable_cpu_cache_flush=False)


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
                out.append((None, last_line(res.error_msg)))
            else:
                out.append(([float(s) for s in res.run_secs], None))
        return out

    def close(self):
        pool = getattr(self.runner, "pool", None)
        if pool is not None:
            pool.shutdown(wait=False)


def remove_artifact(path: str | None) -> None:
    if path:
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)
