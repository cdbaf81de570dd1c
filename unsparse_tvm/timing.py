"""Timing, as bench and every benchmark script do it: contenders measured in alternating rounds (medians),
so that a noisy machine slows all of them alike; TVM's and PyTorch's thread pools set together."""

from __future__ import annotations

import os
import statistics
import time

import tvm
from tvm import relax

from .cuda_package import embed_device_code


def warn_if_busy() -> float:
    """Other processes on the cores distort every figure, PyTorch's OpenMP threads most of all
    (measured here: 5-50x slower eager inference while another process used one of two cores)."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1  # the load average counts the whole machine
    if load > 0.5 * cores:
        print(f"warning: the machine is busy (1-minute load {load:.1f} on {cores} cores); "
              "timings, PyTorch's above all, are unreliable: re-run on an idle machine")
    return load


def call_timer(fn, sync=None):
    """A callable timing one batch of `number` calls, returning ms per call."""
    def measure(number: int) -> float:
        if sync:
            sync()
        start = time.perf_counter()
        for _ in range(number):
            fn()
        if sync:
            sync()
        return (time.perf_counter() - start) / number * 1e3
    return measure


# Seconds before each batch where contenders run several threads: TVM's pool workers spin (sched_yield,
# TVM_THREAD_POOL_SPIN_COUNT = 300000 by default) for a good part of that after each call, and on two
# cores one spinning worker halves the next contender's machine: ONNX Runtime on two threads measured 7.8
# ms right after our model, 2.4-2.9 ms with the workers asleep (benchmarks/thread_pools.py; docs/results.md).
MULTI_THREAD_PAUSE_S = 0.2
SINGLE_THREAD_PAUSE_S = 0.01  # one thread: only PyTorch's and TVM's last call to let settle


def round_robin(contenders: dict, repeat: int, min_batch_ms: float = 20.0,
                pause: float = SINGLE_THREAD_PAUSE_S) -> dict[str, float]:
    """Median ms per call of each contender, measured in alternating rounds after a warm-up, `pause` seconds
    of idle before each batch (MULTI_THREAD_PAUSE_S where the contenders run thread pools)."""
    samples = round_robin_samples(contenders, repeat, min_batch_ms, pause)
    return {name: statistics.median(v) for name, v in samples.items()}


def round_robin_samples(contenders: dict, repeat: int, min_batch_ms: float = 20.0,
                        pause: float = SINGLE_THREAD_PAUSE_S) -> dict[str, list[float]]:
    """round_robin's measurements, round by round: {contender: [ms per call in round 1, 2, ...]}, so that two
    contenders can be compared round by round (paired_ratio)."""
    numbers = {}
    for name, measure in contenders.items():
        measure(2)  # warm-up (first-call allocations, thread pool start)
        once = max(measure(1), 1e-3)
        numbers[name] = max(1, int(min_batch_ms / once))
    samples = {name: [] for name in contenders}
    for _ in range(repeat):
        for name, measure in contenders.items():
            # let the other runtime's worker threads go idle (TVM's pool and PyTorch's OpenMP threads
            # both spin after a call and would steal this contender's cores), then one untimed call
            time.sleep(pause)
            measure(1)
            samples[name].append(measure(numbers[name]))
    return samples


def paired_ratio(slower: list[float], faster: list[float]) -> dict[str, float]:
    """How many times faster `faster` ran than `slower`, round by round (their ms of the same rounds): the
    median and the middle half (quartiles) of the per-round ratios. Two contenders of one round ran seconds
    apart, so a drift of the machine's speed over the minutes of a run (this VM's speed moves by 10-30% from
    hour to hour) cancels in each round's ratio, where the ratio of the two medians mixes rounds."""
    ratios = sorted(s / f for s, f in zip(slower, faster))
    if not ratios:
        raise ValueError("paired_ratio needs at least one round")
    q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else [ratios[0]] * 3
    return {"median": statistics.median(ratios), "q1": q[0], "q3": q[2], "rounds": len(ratios)}


def vm_timer(executable, dev, x_np, gpu: bool = False, arch: str | None = None):
    if gpu:  # in-memory CUDA modules carry source: compile it with nvcc, as `compile` does
        embed_device_code(executable, arch)
    vm = relax.VirtualMachine(executable, dev)
    x = tvm.runtime.tensor(x_np, dev)
    fn = vm["main"]
    out = fn(x)
    out = out if hasattr(out, "numpy") else out[0]
    sync = dev.sync if gpu else None
    return call_timer(lambda: fn(x), sync), out.numpy()


def set_threads(n: int) -> None:
    """n threads for TVM's pool and PyTorch's (the peers take theirs when built)."""
    import torch  # deferred: timing TVM modules alone needs no torch

    torch.set_num_threads(n)
    tvm.get_global_func("runtime.config_threadpool")(1, n)  # 1: TVM's "big cores" mode, i.e. all of them
