"""`unsparse-tvm bench`: the sparse-compiled model vs the same model compiled by TVM without the sparse
pass vs PyTorch eager, end to end and per layer, on the same inputs, in one process.

Timings are medians over rounds that visit every contender in turn (round-robin), so a noisy
machine slows all of them alike; ratios from one run are what to compare.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
import tvm
from tvm import relax

from .build import activation_ranges, compile_program
from .cost.calibration import rates_for
from .compress.prune import load_model_program
from .cuda_package import building_for, embed_device_code
from .single_layer import LayerSpec, extract_layers, layer_flops, layer_module
from .errors import UnsparseError
from .reference import rel_error, usable_cores
from .frontend import program_input_shape, read_quantization
from .models import example_input
from .outputs import check_output, write_text
from .peers import INT8_PEERS, INT8_TOLERANCE, PEERS, peer_callables
from .peers_deepsparse import ready as deepsparse_ready
from .relay_passes import build_pipeline
from .target import make_target, require_runnable
from .tuning.database import open_database


def torch_layer(spec: LayerSpec, device: str):
    """The same layer as PyTorch eager would run it (dense weights)."""
    w = torch.from_numpy(spec.weight).to(device)
    b = torch.from_numpy(spec.bias).to(device) if spec.bias is not None else None

    def run(x):
        if spec.op == "conv2d":
            t, l, bt, r = spec.attrs["padding"]
            if (t, l) != (bt, r):
                x = F.pad(x, (l, r, t, bt))
                t = l = 0
            y = F.conv2d(x, w, b, spec.attrs["strides"], (t, l), spec.attrs["dilation"], spec.attrs["groups"])
        else:
            y = F.linear(x, w, b)
        return F.relu(y) if spec.relu else y

    return run


def warn_if_busy() -> float:
    """Other processes on the cores distort every figure, PyTorch's OpenMP threads most of all
    (measured here: 5-50x slower eager inference while another process used one of two cores)."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1  # the load average counts the whole machine
    if load > 0.5 * cores:
        print(f"warning: the machine is busy (1-minute load {load:.1f} on {cores} cores); "
              "timings, PyTorch's above all, are unreliable: re-run on an idle machine")
    return load


def _timer(fn, sync=None):
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


def round_robin(contenders: dict, repeat: int, min_batch_ms: float = 20.0) -> dict[str, float]:
    """Median ms per call of each contender, measured in alternating rounds after a warm-up."""
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
            time.sleep(0.01)
            measure(1)
            samples[name].append(measure(numbers[name]))
    return {name: statistics.median(v) for name, v in samples.items()}


def _vm_timer(executable, dev, x_np, gpu: bool = False, arch: str | None = None):
    if gpu:  # in-memory CUDA modules carry source: compile it with nvcc, as `compile` does
        embed_device_code(executable, arch)
    vm = relax.VirtualMachine(executable, dev)
    x = tvm.runtime.tensor(x_np, dev)
    fn = vm["main"]
    out = fn(x)
    out = out if hasattr(out, "numpy") else out[0]
    sync = dev.sync if gpu else None
    return _timer(lambda: fn(x), sync), out.numpy()


def set_threads(n: int) -> None:
    """n threads for TVM's pool and PyTorch's (the peers take theirs when built)."""
    torch.set_num_threads(n)
    tvm.get_global_func("runtime.config_threadpool")(1, n)  # 1: TVM's "big cores" mode, i.e. all of them


def bench(model: str, target_name: str = "llvm", arch: str | None = None, *, sparsity: float | None = None,
          threshold: float | None = None, batch: int | None = None, repeat: int = 20, layers: bool = True,
          tuning_log: str | None = None, seed: int = 0, threads: list[int] | None = None,
          peers: list[str] | None = None, calibrate: bool = True) -> dict:
    """End to end (and per layer) in one process, alternating rounds: unsparse vs TVM dense vs PyTorch eager
    (and tuned records, and the `peers` runtimes), once per thread count in `threads` (default: all cores)."""
    if repeat < 1:
        raise UnsparseError(f"--repeat must be at least 1, got {repeat}")
    target = make_target(target_name, arch)
    require_runnable(target, "bench")
    # before the model is even loaded: a bad log is found in a second, not after two compiles
    database = open_database(tuning_log, target) if tuning_log is not None else None
    arch = str(target.attrs["arch"]) if target_name == "cuda" else None
    dev = tvm.cuda(0) if target_name == "cuda" else tvm.cpu(0)
    if target_name == "cuda" and (not dev.exist or not torch.cuda.is_available()):
        raise UnsparseError("bench --target cuda needs a CUDA GPU visible to both TVM and PyTorch")
    torch_dev = "cuda" if target_name == "cuda" else "cpu"
    torch.set_num_threads(usable_cores())  # PyTorch and TVM both get every core
    ep = load_model_program(model, sparsity, batch=batch)
    shape = program_input_shape(ep)
    x = example_input(shape, seed)
    x_np = x.numpy()

    quant = read_quantization(model) if model.endswith(".pt2") else None  # quantised kernels where it says
    rates = rates_for(target, calibrate=calibrate) if threshold is None else None  # as `compile` chooses
    print(f"compiling {model} for {target_name}: sparse, then dense (TVM without the sparse pass)")
    sparse = compile_program(ep, target, threshold=threshold, sparse=True, quant=quant, rates=rates)
    dense = compile_program(ep, target, threshold=threshold, sparse=False)
    contenders, outputs = {}, {}
    contenders["unsparse"], outputs["unsparse"] = _vm_timer(sparse.executable, dev, x_np, target_name == "cuda", arch)
    weight_bytes = {"unsparse": _weight_bytes(sparse.report), "tvm_dense": _weight_bytes(sparse.report, dense=True)}
    if quant is not None:  # the same sparse model on fp32 weights, timed alongside: what quantisation buys
        fp32 = compile_program(ep, target, threshold=threshold, sparse=True, rates=rates)
        contenders["unsparse_fp32"], outputs["unsparse_fp32"] = _vm_timer(fp32.executable, dev, x_np,
                                                                           target_name == "cuda", arch)
        weight_bytes["unsparse_fp32"] = _weight_bytes(fp32.report)
    contenders["tvm_dense"], outputs["tvm_dense"] = _vm_timer(dense.executable, dev, x_np, target_name == "cuda", arch)
    ranges = activation_ranges(quant) if target_name == "llvm" else None
    if ranges:  # a .pt2 from `quantize --activations int8`: its int8 execution too, next to fp32 sparse
        int8 = compile_program(ep, target, threshold=threshold, sparse=True, activations=ranges, rates=rates)
        contenders["unsparse_int8"], outputs["unsparse_int8"] = _vm_timer(int8.executable, dev, x_np)
    if database is not None:  # only records of this target
        tuned = compile_program(ep, target, threshold=threshold, sparse=True, database=database, rates=rates)
        print(database.summary())
        contenders["unsparse_tuned"], outputs["unsparse_tuned"] = _vm_timer(tuned.executable, dev, x_np, target_name == "cuda", arch)
    net = ep.module().to(torch_dev)
    xt = x.to(torch_dev)
    sync = torch.cuda.synchronize if torch_dev == "cuda" else None

    def torch_call():
        with torch.no_grad():
            return net(xt)

    ref = torch_call()
    ref = (ref[0] if isinstance(ref, (tuple, list)) else ref).cpu().numpy()
    contenders["torch"] = _timer(torch_call, sync)
    errors = {k: rel_error(v, ref) for k, v in outputs.items()}
    for name, err in errors.items():
        if name == "unsparse_int8":  # quantisation error on a random input, not a wrong kernel: tests check
            print(f"int8 execution: max relative error vs fp32 PyTorch {err:.2e} (bench's input is random, "
                  "not the calibration data)")  # exactness against the integer reference
            continue
        if err > 1e-3:
            raise UnsparseError(f"{name} output differs from PyTorch (max relative error {err:.2e}); not timing it")
    if peers is None and ranges and target_name == "llvm":  # int8 execution meets int8 runtimes by default
        peers = [p for p in INT8_PEERS if p != "deepsparse_int8" or deepsparse_ready()]
    calibration = _calibration_samples(quant, shape) if ranges else None
    by_threads = {}
    threads = threads or [usable_cores()]
    with tempfile.TemporaryDirectory(prefix="unsparse-peers-") as onnx_dir:  # one ONNX export for every count
        for n in threads:
            set_threads(n)
            timed = dict(contenders)
            if peers and target_name == "llvm":
                print(f"building the peers for {n} thread(s): {', '.join(peers)}")
                for name, call in peer_callables(ep, x, n, peers, onnx_dir, calibration).items():
                    errors[name] = rel_error(call(), ref)
                    limit = INT8_TOLERANCE if name.endswith("_int8") else 1e-3
                    if errors[name] > limit:  # one line, and the other peers still run
                        print(f"skipping {name}: its output differs from PyTorch (max relative error "
                              f"{errors[name]:.2e}, more than {limit:g})")
                        continue
                    timed[name] = call.measure if hasattr(call, "measure") else _timer(call)
            warn_if_busy()
            print(f"timing end to end with {n} thread(s) ({repeat} rounds)")
            by_threads[str(n)] = {f"{k}_ms": v for k, v in round_robin(timed, repeat).items()}

    specs, _ = extract_layers(ep)
    dense_flops, useful_flops = (sum(f) for f in zip(*(layer_flops(sp) for sp in specs))) if specs else (0.0, 0.0)
    result = {
        "flops": {"dense_gflop": dense_flops / 1e9, "useful_gflop": useful_flops / 1e9},
        "model": model, "target": target_name, "arch": arch, "sparsity": sparsity, "threshold": threshold,
        "batch": shape[0], "input_shape": list(shape),
        "end_to_end": by_threads[str(threads[-1])],  # the last thread count
        "by_threads": by_threads,
        "max_rel_error_vs_torch": errors,
        "quantization": quant.get("scheme") if quant else None,
        "cost_model": (rates.source if rates is not None else "threshold") if target_name == "llvm" else "perf_model",
        # conv/linear weight bytes each variant stores; PyTorch and the peers run the dense fp32 weights
        "weight_bytes": {**{k[:-3]: weight_bytes["tvm_dense"] for k in by_threads[str(threads[-1])]}, **weight_bytes},
        "layers": [],
        "machine": {**_machine(target_name), "load_before_timing": os.getloadavg()[0]},
    }
    if layers:
        # one thread for the per-layer table: with two, TVM's and PyTorch's pools spin against each other
        # between these short calls (PyTorch's layers measured 5-50x slower, whatever their size)
        set_threads(1)
        result["layers_threads"] = 1
        result["layers"] = bench_layers(ep, target, dev, torch_dev, threshold, repeat, quant, rates)
    return result


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


def bench_layers(ep, target, dev, torch_dev, threshold, repeat, quant: dict | None = None, rates=None) -> list[dict]:
    """Per layer: the kernel the compile chose, TVM's dense kernel and PyTorch, and, where the compile
    chose dense, the sparse kernel it passed over, so that every row says whether the choice was right
    (`other_ms`: the kernel not chosen; `choice_regret`: chosen / the faster of the two)."""
    specs, names = extract_layers(ep)
    rows = []
    print(f"timing {len(specs)} layers one by one (one thread)")
    gpu = torch_dev == "cuda"
    arch = str(target.attrs["arch"]) if gpu else None
    for spec in specs:
        mod = layer_module(spec)
        x_np = np.random.default_rng(0).standard_normal(spec.input_shape).astype(np.float32)
        layer_report: list = []  # this layer's own decision (same weights and threshold as in the model)
        sparse = _compile_layer(mod, target, threshold, True, names, layer_report, quant, rates)
        decision = layer_report[0]
        chose_sparse = decision.decision == "sparse"
        dense = _compile_layer(mod, target, threshold, False)
        contenders = {}
        contenders["unsparse"], y = _vm_timer(sparse, dev, x_np, gpu, arch)
        contenders["tvm_dense"], _ = _vm_timer(dense, dev, x_np, gpu, arch)
        if not chose_sparse and decision.dense_us:  # costed and chosen dense: the sparse kernel it passed over
            forced = _compile_layer(mod, target, 0.0, True, names, [], quant)
            contenders["sparse_not_chosen"], _ = _vm_timer(forced, dev, x_np, gpu, arch)
        run = torch_layer(spec, torch_dev)
        xt = torch.from_numpy(x_np).to(torch_dev)
        sync = torch.cuda.synchronize if torch_dev == "cuda" else None
        with torch.no_grad():
            ref = run(xt).cpu().numpy()
        contenders["torch"] = _timer(lambda: run(xt), sync)
        with torch.no_grad():
            t = round_robin(contenders, max(5, repeat // 2), min_batch_ms=5.0)
        other = t["tvm_dense"] if chose_sparse else t.get("sparse_not_chosen")
        dense_flops, useful_flops = layer_flops(spec)
        best_dense = min(t["tvm_dense"], t["torch"])  # the faster dense kernel on this layer
        rows.append({
            "name": decision.name, "op": spec.op, "shape": list(spec.weight.shape), "input_shape": list(spec.input_shape),
            "sparsity": decision.sparsity, "format": decision.format if chose_sparse else "dense",
            "precision": decision.precision, "weight_bytes": decision.weight_bytes,
            "unsparse_ms": t["unsparse"], "tvm_dense_ms": t["tvm_dense"], "torch_ms": t["torch"],
            "other_ms": other, "choice_regret": t["unsparse"] / min(t["unsparse"], other) if other else None,
            "predicted_us": {"sparse": decision.sparse_us, "dense": decision.dense_us, "format": decision.format}
            if decision.dense_us else None,
            "max_rel_error": rel_error(y, ref),
            # the gap to the limit: useful GFLOP/s (nonzero FMAs x 2 / our time) against the dense rate
            "useful_gflops": useful_flops / t["unsparse"] / 1e6, "dense_gflops": dense_flops / best_dense / 1e6,
        })
    return rows


CHOICE_TOLERANCE = 1.10  # a chosen kernel within 10% of the other one counts as a right choice (timing noise)


def choice_summary(layers: list[dict]) -> str | None:
    """One line: on how many costed layers the compile chose the slower kernel by more than 10%, the worst."""
    costed = [l for l in layers if l.get("choice_regret") is not None]
    if not costed:
        return None
    wrong = sorted((l for l in costed if l["choice_regret"] > CHOICE_TOLERANCE), key=lambda l: -l["choice_regret"])
    text = f"kernel choice: {len(costed) - len(wrong)} of {len(costed)} layers within 10% of the faster kernel"
    if wrong:
        text += "; slower by more: " + ", ".join(f"{l['name']} ({l['format']}, {l['choice_regret']:.2f}x)" for l in wrong[:5])
    return text


def _compile_layer(mod, target, threshold, sparse, names=None, report=None, quant=None, rates=None):
    pipeline = build_pipeline(target, threshold=threshold, sparse=sparse, names=names, report=report, quant=quant,
                              rates=rates)
    with building_for(target):
        return tvm.compile(mod, target=target, relax_pipeline=pipeline)


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
                peers = {k: v for k, v in e.items() if k[:-3] in PEERS and k.endswith("_int8_ms") == (kind == "int8")}
                if peers and mine in e:
                    best = min(peers, key=peers.get)
                    print(f"  {mine[:-3]} vs the fastest {kind} peer ({best[:-3]}): {peers[best] / e[mine]:.2f}x")
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
