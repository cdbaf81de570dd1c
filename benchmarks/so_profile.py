"""Compiled modules side by side: end-to-end time in alternating rounds (and each module's per-round ratio to the
first), and with --layers each kernel call's time (the Relax VM's instrument hook), labelled with the layer it runs.

    python benchmarks/so_profile.py before.so after.so --threads 1 --rounds 13
    python benchmarks/so_profile.py model.so --layers

Every module gets the same seeded input and must give the same output as the first (max relative
difference printed). Per kernel: the median of --runs inferences; a kernel's time includes the VM's call
overhead (a few us), so the sum exceeds the end-to-end median slightly.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

MIN_MS = 0.005  # kernels faster than this are left out of the --layers listing
PHASE_PLANES = "phase_planes"  # unsparse_tvm.ops.names.PHASE_PLANES: the kernel's name prefix


def _input(meta: dict) -> np.ndarray:
    spec = meta["inputs"][0]
    return np.random.default_rng(0).standard_normal(spec["shape"]).astype(spec["dtype"])


def end_to_end(paths: list[str], rounds: int, threads: int = 1) -> None:
    """Each module's median ms over `rounds` alternating rounds (as `bench` times: a pause before each batch, longer
    where thread pools run), and each later module's per-round ratio to the first (timing.paired_ratio: > 1, faster
    than the first; quartiles in brackets), which the VM's drift between rounds does not move."""
    import tvm

    from unsparse_tvm.runtime import load
    from unsparse_tvm.timing import (MULTI_THREAD_PAUSE_S, SINGLE_THREAD_PAUSE_S, paired_ratio, round_robin_samples,
                                     vm_timer)

    timers, outs, x = {}, {}, None
    for p in paths:
        _, _, meta = load(p)  # checks the file and this CPU
        x = _input(meta) if x is None else x
        timers[p], outs[p] = vm_timer(tvm.runtime.load_module(p), tvm.cpu(), x)
    ref = outs[paths[0]]
    for p in paths:
        print(f"{p}: max relative difference to {paths[0]}: {float(np.abs(outs[p] - ref).max() / np.abs(ref).max()):.1e}")
    samples = round_robin_samples(timers, rounds, pause=MULTI_THREAD_PAUSE_S if threads > 1 else SINGLE_THREAD_PAUSE_S)
    for p, ms in samples.items():
        line = f"{float(np.median(ms)):9.3f} ms  {p}"
        if p != paths[0]:
            r = paired_ratio(samples[paths[0]], ms)
            line += f"  ({paths[0]} / this, per round: {r['median']:.3f} [{r['q1']:.3f}, {r['q3']:.3f}])"
        print(line)


def _instrumented(path: str):
    """(meta, run): run() is one inference of the module at `path`, returning each kernel call's
    (name, seconds) as the Relax VM's instrument hook saw it."""
    import tvm
    from tvm import relax

    from unsparse_tvm.runtime import load

    _, _, meta = load(path)
    vm = relax.VirtualMachine(tvm.runtime.load_module(path), tvm.cpu())
    x = tvm.runtime.tensor(_input(meta))
    calls: list[tuple[str, float]] = []
    started: dict[str, float] = {}

    def instrument(func, name, before, ret, *args):
        if before:
            started[name] = time.perf_counter()
        else:
            calls.append((name, time.perf_counter() - started[name]))
        return 0

    vm["main"](x)
    vm.set_instrument(instrument)

    def run() -> list[tuple[str, float]]:
        calls.clear()
        vm["main"](x)
        return list(calls)

    return meta, run


def layers(paths: list[str], runs: int) -> None:
    """Each kernel call's median time over `runs` inferences per module, the modules taking turns run by run
    (alternating, as the end-to-end rounds: this VM's speed drifts), then, for several modules, their sparse
    layers side by side."""
    modules = [_instrumented(p) for p in paths]
    per_run: list[list] = [[] for _ in paths]
    for _ in range(runs):
        for i, (_, run) in enumerate(modules):
            per_run[i].append(run())
    table = []
    for path, (meta, _), module_runs in zip(paths, modules, per_run):
        names = [n for n, _ in module_runs[0]]
        median = [sorted(run[i][1] for run in module_runs)[runs // 2] * 1e3 for i in range(len(names))]
        ours = iter(layer for layer in meta.get("layers", []) if layer["decision"] == "sparse")
        print(f"{path}: {sum(median):.3f} ms in {len(names)} calls (median of {runs} runs)")
        rows, copy_ms = [], 0.0
        for name, ms in zip(names, median):
            label = ""
            if name.startswith(PHASE_PLANES):  # a strided depthwise conv's plane copy: counted with its layer
                label, copy_ms = "(its phase planes, for the next layer)", copy_ms + ms
            elif name.startswith(("sparse_conv2d", "sparse_dense")):
                layer = next(ours, None)
                paired = ""  # a residual conv paired with the next layer runs in that layer's kernel
                if layer is not None and "(paired with" in layer.get("fused", ""):
                    paired, layer = f" + {layer['name']}", next(ours, None)
                label = "" if layer is None else \
                    f"{layer['name']}{paired} {layer['shape']} in {layer['input_shape']} {layer['format']}"
                rows.append((label or name, ms + copy_ms))
                copy_ms = 0.0
            if ms >= MIN_MS:
                print(f"{ms:8.3f} ms  {name:24s} {label}")
        table.append(rows)
    if len(paths) > 1 and all(len(t) == len(table[0]) for t in table):
        print("sparse layers side by side (ms, modules in the order given; a phase-plane copy counted with its layer):")
        for i, (label, _) in enumerate(table[0]):
            print("  " + "  ".join(f"{t[i][1]:7.3f}" for t in table) + f"  {label}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("modules", nargs="+", help=".so files written by unsparse-tvm compile")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=11, help="alternating rounds of the end-to-end timing")
    ap.add_argument("--layers", action="store_true", help="also time every kernel call of each module")
    ap.add_argument("--runs", type=int, default=7, help="inferences per module for --layers")
    args = ap.parse_args()
    from unsparse_tvm.timing import set_threads

    set_threads(args.threads)
    end_to_end(args.modules, args.rounds, args.threads)
    if args.layers:
        layers(args.modules, args.runs)


if __name__ == "__main__":
    main()
