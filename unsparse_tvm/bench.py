"""`unsparse-tvm bench`: the sparse-compiled model vs the same model compiled by TVM without the sparse
pass vs PyTorch eager, end to end and per layer, on the same inputs, in one process.

Timings are medians over rounds that visit every contender in turn (round-robin), so a noisy
machine slows all of them alike; ratios from one run are what to compare.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
import platform
import statistics
import tempfile

import numpy as np
import torch
import tvm

from . import cpuid_avx2
from .build import activation_ranges, compile_program
from .cost.calibration import rates_for
from .compress.prune import load_model_program
from .single_layer import extract_layers, layer_flops
from .errors import UnsparseError
from .reference import rel_error, usable_cores
from .frontend import program_input_shape, read_quantization
from .models import example_input
from .outputs import check_output, write_text
from .hostcpu import host_features
from .peers import INT8_PEERS, INT8_TOLERANCE, OURS, fastest_peer, hold_to_avx2, peer_callables, plain_module
from .peers_deepsparse import ready as deepsparse_ready
from .target import make_target, require_runnable, target_cpu_features
from .bench_layers import bench_layers, choice_summary
from .timing import (MULTI_THREAD_PAUSE_S, SINGLE_THREAD_PAUSE_S, call_timer, paired_ratio, round_robin_samples,
                     set_threads, vm_timer, warn_if_busy)
from .tuning.database import open_database


@dataclass
class _Run:
    """One bench run's fixed parts: the target and device, the program and its input, the quantisation."""

    target: object
    dev: object
    gpu: bool
    arch: str | None
    ep: object
    x: object                 # torch tensor (the seeded input)
    quant: dict | None
    threshold: float | None
    rates: object

    def timer(self, compiled):
        return vm_timer(compiled.executable, self.dev, self.x.numpy(), self.gpu, self.arch)

    def compile(self, **options):
        return compile_program(self.ep, self.target, threshold=self.threshold, **options)


def bench(model: str, target_name: str = "llvm", arch: str | None = None, *, sparsity: float | None = None,
          threshold: float | None = None, batch: int | None = None, repeat: int = 20, layers: bool = True,
          tuning_log: str | None = None, seed: int = 0, threads: list[int] | None = None,
          peers: list[str] | None = None, calibrate: bool = True, peer_isa: str = "auto") -> dict:
    """End to end (and per layer) in one process, alternating rounds: unsparse vs TVM dense vs PyTorch eager
    (and tuned records, and the `peers` runtimes), once per thread count in `threads` (default: all cores).
    peer_isa: "auto" holds the peers to AVX2 where our code is AVX2 on an AVX-512 host (peers.hold_to_avx2)."""
    if repeat < 1:
        raise UnsparseError(f"--repeat must be at least 1, got {repeat}")
    target = make_target(target_name, arch)
    require_runnable(target, "bench")
    # before any oneDNN primitive of this process (PyTorch's convs included) reads the cap
    held = None if target_name == "cuda" else hold_to_avx2(peer_isa, "avx512f" in target_cpu_features(target),
                                                          "avx512f" in host_features())
    if held:
        print(held)
    # before the model is even loaded: a bad log is found in a second, not after two compiles
    database = open_database(tuning_log, target) if tuning_log is not None else None
    gpu = target_name == "cuda"
    dev = tvm.cuda(0) if gpu else tvm.cpu(0)
    if gpu and (not dev.exist or not torch.cuda.is_available()):
        raise UnsparseError("bench --target cuda needs a CUDA GPU visible to both TVM and PyTorch")
    torch.set_num_threads(usable_cores())  # PyTorch and TVM both get every core
    ep = load_model_program(model, sparsity, batch=batch)
    run = _Run(target, dev, gpu, str(target.attrs["arch"]) if gpu else None, ep,
               example_input(program_input_shape(ep), seed),
               read_quantization(model) if model.endswith(".pt2") else None,  # quantised kernels where it says
               threshold, rates_for(target, calibrate=calibrate) if threshold is None else None)  # as compile
    print(f"compiling {model} for {target_name}: sparse, then dense (TVM without the sparse pass)")
    contenders, outputs, weight_bytes = _variants(run, database)
    ref = _torch_contender(run, contenders)
    errors = _check(outputs, ref)
    ranges = activation_ranges(run.quant) if not gpu else None
    if peers is None and ranges:  # int8 execution meets int8 runtimes by default
        peers = [p for p in INT8_PEERS if p != "deepsparse_int8" or deepsparse_ready()]
    threads = threads or [usable_cores()]
    calibration = _calibration_samples(run.quant, run.x.shape) if ranges else None
    by_threads, kernels, rounds = _time_threads(run, contenders, peers if not gpu else None, threads, repeat, ref,
                                                errors, calibration, hold=bool(held))
    result = _result(run, model, sparsity, by_threads, threads, errors, weight_bytes)
    result.update(peers_held_to_avx2=bool(held), peer_kernels=kernels, rounds=rounds,
                  peers_cpuid_avx2=bool(held and peers and cpuid_avx2.unavailable() is None),
                  paired={n: paired_to_peers(by_threads[n], rounds[n]) for n in by_threads})
    if layers:
        # one thread for the per-layer table: with two, TVM's and PyTorch's pools spin against each other
        # between these short calls (PyTorch's layers measured 5-50x slower, whatever their size)
        set_threads(1)
        result["layers_threads"] = 1
        result["layers"] = bench_layers(ep, target, dev, "cuda" if gpu else "cpu", threshold, repeat, run.quant,
                                        run.rates)
    return result


def _variants(run: _Run, database) -> tuple[dict, dict, dict]:
    """(timers, outputs, weight bytes) of every compiled variant: sparse, dense, and where they apply the
    same sparse model on fp32 weights, its int8 execution, and the tuned records."""
    sparse = run.compile(sparse=True, quant=run.quant, rates=run.rates)
    dense = run.compile(sparse=False)
    contenders, outputs = {}, {}
    contenders["unsparse"], outputs["unsparse"] = run.timer(sparse)
    weight_bytes = {"unsparse": _weight_bytes(sparse.report), "tvm_dense": _weight_bytes(sparse.report, dense=True)}
    if run.quant is not None:  # the same sparse model on fp32 weights, timed alongside: what quantisation buys
        fp32 = run.compile(sparse=True, rates=run.rates)
        contenders["unsparse_fp32"], outputs["unsparse_fp32"] = run.timer(fp32)
        weight_bytes["unsparse_fp32"] = _weight_bytes(fp32.report)
    contenders["tvm_dense"], outputs["tvm_dense"] = run.timer(dense)
    ranges = activation_ranges(run.quant) if not run.gpu else None
    if ranges:  # a .pt2 from `quantize --activations int8`: its int8 execution too, next to fp32 sparse
        int8 = run.compile(sparse=True, activations=ranges, rates=run.rates)
        if not any(r.format.startswith("int8") for r in int8.report):  # every layer left fp32 (compile's note)
            print("int8 execution: no layer runs int8 on this code (compile says why), so its row is the fp32 "
                  "sparse model again")
        contenders["unsparse_int8"], outputs["unsparse_int8"] = run.timer(int8)
    if database is not None:  # only records of this target
        tuned = run.compile(sparse=True, database=database, rates=run.rates)
        print(database.summary())
        contenders["unsparse_tuned"], outputs["unsparse_tuned"] = run.timer(tuned)
    return contenders, outputs, weight_bytes


def _torch_contender(run: _Run, contenders: dict):
    """PyTorch eager on the same program and input, added to the contenders; its output (the reference)."""
    device = "cuda" if run.gpu else "cpu"
    net, xt = plain_module(run.ep).to(device), run.x.to(device)

    def torch_call():
        with torch.no_grad():
            return net(xt)

    ref = torch_call()
    contenders["torch"] = call_timer(torch_call, torch.cuda.synchronize if run.gpu else None)
    return (ref[0] if isinstance(ref, (tuple, list)) else ref).cpu().numpy()


def _check(outputs: dict, ref) -> dict:
    """Every variant's error against PyTorch; a wrong one is refused before anything is timed."""
    errors = {k: rel_error(v, ref) for k, v in outputs.items()}
    for name, err in errors.items():
        if name == "unsparse_int8":  # quantisation error on a random input, not a wrong kernel: tests check
            print(f"int8 execution: max relative error vs fp32 PyTorch {err:.2e} (bench's input is random, "
                  "not the calibration data)")  # exactness against the integer reference
            continue
        if err > 1e-3:
            raise UnsparseError(f"{name} output differs from PyTorch (max relative error {err:.2e}); not timing it")
    return errors


def _time_threads(run: _Run, contenders, peers, threads, repeat, ref, errors, calibration,
                  hold: bool = False) -> dict:
    """Per thread count: the peers built (each checked against PyTorch; hold: while CPUID says AVX2, so that the
    runtimes choosing their code by it run AVX2 too, cpuid_avx2), then every contender timed in alternating
    rounds; (median ms by contender by thread count, {peer: the kernels it reports running}, every round's ms by
    contender by thread count)."""
    by_threads, kernels, rounds = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="unsparse-peers-") as onnx_dir:  # one ONNX export for every count
        for n in threads:
            set_threads(n)
            timed = dict(contenders)
            if peers:
                timed.update(_built_peers(run, peers, n, onnx_dir, calibration, ref, errors, kernels, hold))
            warn_if_busy()
            print(f"timing end to end with {n} thread(s) ({repeat} rounds)")
            pause = MULTI_THREAD_PAUSE_S if n > 1 else SINGLE_THREAD_PAUSE_S  # until the other pools' workers sleep
            rounds[str(n)] = {f"{k}_ms": v for k, v in round_robin_samples(timed, repeat, pause=pause).items()}
            by_threads[str(n)] = {k: statistics.median(v) for k, v in rounds[str(n)].items()}
    return by_threads, kernels, rounds


def _built_peers(run: _Run, peers, n: int, onnx_dir: str, calibration, ref, errors: dict, kernels: dict,
                 hold: bool) -> dict:
    """The peers for n threads, each built and run once (checked against PyTorch), the runtimes under the CPUID
    mask where `hold` (each picks its kernels as it starts; our own rows and torch.compile's are built outside
    it): {peer: timer}; errors and kernels filled in."""
    print(f"building the peers for {n} thread(s): {', '.join(peers)}")
    timed = {}
    free = OURS + ("torch_compile",)  # not held: ours, and Inductor's kernels (its compiler would read CPUID)
    for masked, group in ((False, [p for p in peers if p in free]), (hold, [p for p in peers if p not in free])):
        if not group:
            continue
        with cpuid_avx2.held(masked) as why:
            if masked:
                print("  ONNX Runtime and DeepSparse run what CPUID and /proc/cpuinfo report, " + (
                    f"which stays this CPU's: {why}" if why else "held to AVX2 (CPUID without AVX-512: cpuid_avx2)"))
            for name, call in peer_callables(run.ep, run.x, n, group, onnx_dir, calibration).items():
                errors[name] = rel_error(call(), ref)
                limit = INT8_TOLERANCE if name.endswith("_int8") else 1e-3
                if errors[name] > limit:  # one line, and the other peers still run
                    print(f"skipping {name}: its output differs from PyTorch (max relative error "
                          f"{errors[name]:.2e}, more than {limit:g})")
                    continue
                timed[name] = call.measure if hasattr(call, "measure") else call_timer(call)
                if getattr(call, "kernels", "") and name not in kernels:  # which code it runs (AMX, AVX2...)
                    kernels[name] = call.kernels
                    print(f"  {name} runs its convolutions with {call.kernels}")
    return timed


def paired_to_peers(medians: dict[str, float], rounds: dict[str, list[float]]) -> dict[str, dict]:
    """Ours against the fastest peer of the same precision (by median, as print_result names it), and the API
    call against torch.compile of the same model, and int8 execution against the fp32 sparse model, round by round
    (timing.paired_ratio): {"A_vs_B": {"median", "q1", "q3", "rounds"}}, how many times faster A ran than B, e.g.
    "unsparse_vs_openvino"."""
    pairs = [(mine, found[0]) for mine, kind in (("unsparse_ms", "fp32"), ("unsparse_int8_ms", "int8"))
             if mine in rounds and (found := fastest_peer(medians, kind))]
    pairs.append(("unsparse_api_ms", "unsparse_torch_compile_ms"))  # Dynamo's cost per call
    pairs.append(("unsparse_int8_ms", "unsparse_fp32_ms"))  # what int8 execution buys over our fp32 kernels
    return {f"{a[:-3]}_vs_{b[:-3]}": paired_ratio(rounds[b], rounds[a])
            for a, b in pairs if a in rounds and b in rounds}


def _by_round(r: dict, n: str, a: str, b: str) -> str:
    """" (round by round: ...)" for the pair a_vs_b of thread count n, where the run kept its rounds."""
    p = r.get("paired", {}).get(n, {}).get(f"{a}_vs_{b}")
    return (f" (round by round: median {p['median']:.2f}x, middle half {p['q1']:.2f}-{p['q3']:.2f}x of {p['rounds']})"
            if p else "")


def _result(run: _Run, model, sparsity, by_threads, threads, errors, weight_bytes) -> dict:
    specs, _ = extract_layers(run.ep)
    dense_flops, useful_flops = (sum(f) for f in zip(*(layer_flops(sp) for sp in specs))) if specs else (0.0, 0.0)
    last = by_threads[str(threads[-1])]
    kind = run.target.kind.name
    return {
        "flops": {"dense_gflop": dense_flops / 1e9, "useful_gflop": useful_flops / 1e9},
        "model": model, "target": kind, "arch": run.arch, "sparsity": sparsity, "threshold": run.threshold,
        "batch": int(run.x.shape[0]), "input_shape": list(run.x.shape),
        "end_to_end": last,  # the last thread count
        "by_threads": by_threads,
        "max_rel_error_vs_torch": errors,
        "quantization": run.quant.get("scheme") if run.quant else None,
        "cost_model": (run.rates.source if run.rates is not None else "threshold") if kind == "llvm" else "perf_model",
        # conv/linear weight bytes each variant stores; PyTorch and the peers run the dense fp32 weights
        "weight_bytes": {**{k[:-3]: weight_bytes["tvm_dense"] for k in last}, **weight_bytes},
        "layers": [],
        "machine": {**_machine(kind), "load_before_timing": os.getloadavg()[0]},
    }


def _calibration_samples(quant: dict, shape) -> list[np.ndarray]:
    """The samples `quantize --activations int8` calibrated on (its data set, or seeded normal inputs), cut
    to the model's batch size: the int8 peers calibrate on the same data."""
    from .compress.calibrate import RANDOM, calibration_batches
    from .compress.data import load_dataset

    name = quant["activations"].get("dataset", RANDOM)
    data = None if name == RANDOM else load_dataset(name)
    samples = torch.cat(calibration_batches(tuple(shape), data)).numpy()
    return [samples[i:i + shape[0]] for i in range(0, len(samples) - shape[0] + 1, shape[0])]


def _weight_bytes(report: list, dense: bool = False) -> int:
    """Bytes of the conv/linear weights a compiled variant stores (dense: every layer of the report as fp32;
    a compile without the sparse pass reports no layers)."""
    return int(sum(int(np.prod(r.shape)) * 4 if dense else r.weight_bytes for r in report))


def _machine(target_name: str) -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "cores": usable_cores(), "tvm": tvm.__version__,
            "torch": torch.__version__, "python": platform.python_version()}
    try:
        info["cpu_model"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if target_name == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


DENSE_CONTENDERS = ("tvm_dense", "torch", "onnxruntime", "openvino", "torch_compile", "deepsparse")


def efficiency_line(r: dict, e: dict) -> str:
    """End to end, the gap to the limit as numbers: our useful GFLOP/s (nonzero FMAs x 2 / time) and the
    fastest dense fp32 runtime's GFLOP/s (all FMAs x 2 / its time)."""
    flops = r.get("flops") or {}
    dense = {k[:-3]: v for k, v in e.items() if k[:-3] in DENSE_CONTENDERS}
    if not flops.get("useful_gflop") or not dense:
        return ""
    best = min(dense, key=dense.get)
    ours = flops["useful_gflop"] / (e["unsparse_ms"] / 1e3)
    theirs = flops["dense_gflop"] / (dense[best] / 1e3)
    return (f"  useful GFLOP/s: unsparse {ours:.1f} ({flops['useful_gflop']:.3f} GFLOP of nonzeros), fastest dense "
            f"{best} {theirs:.1f} ({flops['dense_gflop']:.3f} GFLOP): {ours / theirs:.0%} of its rate")


def print_result(r: dict) -> None:
    for n, e in r.get("by_threads", {}).items():
        if len(e) > 3 or len(r["by_threads"]) > 1:  # peers or several thread counts: one line per contender
            ours = e["unsparse_ms"]
            print(f"\n{n} thread(s), median ms (and how much slower than unsparse):")
            for name, ms in sorted(e.items(), key=lambda kv: kv[1]):
                print(f"  {name[:-3]:22s} {ms:9.3f}  {ms / ours:6.2f}x")
            for mine, kind in (("unsparse_ms", "fp32"), ("unsparse_int8_ms", "int8")):  # like with like
                found = fastest_peer(e, kind)
                if found and mine in e:
                    print(f"  {mine[:-3]} vs the fastest {kind} peer ({found[0][:-3]}): "
                          f"{found[1] / e[mine]:.2f}x{_by_round(r, n, mine[:-3], found[0][:-3])}")
            if "unsparse_int8_ms" in e and "unsparse_fp32_ms" in e:  # the same sparse model, fp32 weights
                print(f"  unsparse_int8 vs our fp32 sparse kernels: {e['unsparse_fp32_ms'] / e['unsparse_int8_ms']:.2f}x"
                      f"{_by_round(r, n, 'unsparse_int8', 'unsparse_fp32')}")
            if "unsparse_torch_compile_ms" in e and "unsparse_api_ms" in e:  # Dynamo's cost per call
                print(f"  torch.compile(backend=\"unsparse\") vs the same model through unsparse_tvm.compile: "
                      f"{e['unsparse_torch_compile_ms'] / e['unsparse_api_ms']:.2f}x"
                      f"{_by_round(r, n, 'unsparse_api', 'unsparse_torch_compile')}")
            print(efficiency_line(r, e))
    e = r["end_to_end"]
    if r["layers"]:
        print(f"\n{'layer':26s} {'op':6s} {'weight':18s} {'sparsity':>8s} {'format':6s} {'unsparse':>9s} "
              f"{'tvm dense':>9s} {'torch':>9s} {'vs torch':>8s} {'other':>9s} {'GFLOP/s':>8s} {'dense':>7s} {'eff':>5s}")
        for l in r["layers"]:  # other: the kernel the compile did not choose; GFLOP/s: useful, ours vs dense
            other = f"{l['other_ms']:9.3f}" if l.get("other_ms") else f"{'-':>9s}"
            print(f"{l['name'][:26]:26s} {l['op']:6s} {str(l['shape']):18s} {l['sparsity']:8.3f} {l['format']:6s} "
                  f"{l['unsparse_ms']:9.3f} {l['tvm_dense_ms']:9.3f} {l['torch_ms']:9.3f} "
                  f"{l['torch_ms'] / l['unsparse_ms']:7.2f}x {other} {l['useful_gflops']:8.1f} {l['dense_gflops']:7.1f} "
                  f"{l['useful_gflops'] / l['dense_gflops']:5.0%}")
        summary = choice_summary(r["layers"])
        if summary:
            print(summary)
    print(f"\nend to end, {r['model']} on {r['target']} (batch {r['batch']}, sparsity "
          f"{r['sparsity'] if r['sparsity'] is not None else 'as given'}), median ms:")
    wb = r.get("weight_bytes", {})
    mb = {k: f"   weights {v / 1e6:7.2f} MB" if k in wb else "" for k, v in wb.items()}
    if r.get("quantization"):
        print(f"  unsparse, {r['quantization'] + ' weights':17s} {e['unsparse_ms']:9.3f}{mb.get('unsparse', '')}")
        print(f"  unsparse, fp32 weights      {e['unsparse_fp32_ms']:9.3f}{mb.get('unsparse_fp32', '')}")
    else:
        print(f"  unsparse (sparse kernels)   {e['unsparse_ms']:9.3f}{mb.get('unsparse', '')}")
    if "unsparse_tuned_ms" in e:
        print(f"  unsparse, tuned             {e['unsparse_tuned_ms']:9.3f}   "
              f"{e['unsparse_ms'] / e['unsparse_tuned_ms']:.2f}x faster than default knobs")
    if "unsparse_int8_ms" in e:  # against fp32 weights: a quantised .pt2's "unsparse" reads quantised ones
        base = e.get("unsparse_fp32_ms", e["unsparse_ms"])
        print(f"  unsparse, int8 execution    {e['unsparse_int8_ms']:9.3f}   "
              f"speedup over fp32 sparse {base / e['unsparse_int8_ms']:.2f}x")
    print(f"  TVM dense (no sparse pass)  {e['tvm_dense_ms']:9.3f}{mb.get('tvm_dense', '')}")
    print(f"  PyTorch eager               {e['torch_ms']:9.3f}{mb.get('torch', '')}")
    print(f"speedup of unsparse: {e['torch_ms'] / e['unsparse_ms']:.2f}x vs PyTorch, "
          f"{e['tvm_dense_ms'] / e['unsparse_ms']:.2f}x vs TVM dense")


def bench_command(model: str, target: str = "llvm", arch: str | None = None, *, json_path: str | None = None,
                  overwrite: bool = False, **options) -> None:
    """`unsparse-tvm bench`: `bench(...)` (options: its keyword arguments), printed, and saved as JSON."""
    if json_path:
        check_output(json_path, overwrite=overwrite, suffixes=(".json",), what="--json file")
    r = bench(model, target, arch, **options)
    print_result(r)
    if json_path:
        write_text(json_path, json.dumps(r, indent=2))
        print(f"wrote {json_path}")
