"""Every door into the compiler, on every built-in model and eight torchvision architectures (pruned to
90%): the .pt2 (torch.export) path, ONNX from both of torch's exporters, and torch.compile(backend=
"unsparse"). Each checked (ONNX against ONNX Runtime, torch.compile against eager, both at 1e-4 relative;
ONNX's per-layer decisions against the .pt2's) and, with --time, timed against the .pt2's module in
alternating rounds on one thread.

    python benchmarks/door_matrix.py -o benchmarks/results/door-matrix.json [--time] [--models M,...]

The test suite runs a few of these cases (tests/test_onnx.py, tests/test_dynamo.py); this is the whole
matrix, too slow for every CI run (about 25 minutes on 2 cores), run and committed with its date.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

from unsparse_tvm.reference import rel_error

BUILTINS = ["smallcnn", "vgg16-cifar", "resnet18", "vgg16", "resnet50"]
ARCHS = ["tv:mobilenet_v3_small@64", "tv:efficientnet_b0@64", "tv:shufflenet_v2_x0_5@64", "tv:regnet_x_400mf@64",
         "tv:googlenet@64", "tv:densenet121@64", "tv:squeezenet1_1@64", "tv:lraspp_mobilenet_v3_large@64"]
TOL = 1e-4


def _first(y):
    if isinstance(y, dict):
        y = y["out"]
    return y[0] if isinstance(y, (tuple, list)) else y


def check_model(model: str, folder: str, timing: bool = False, repeat: int = 9) -> dict:
    """One row of the matrix: every door of one model, checked (and timed against the .pt2 path)."""
    import tvm
    from tvm import relax

    from unsparse_tvm.timing import round_robin, set_threads, vm_timer
    from unsparse_tvm.build import compile_onnx, compile_program
    from unsparse_tvm.dynamo import UnsparseFallback
    from unsparse_tvm.target import make_target
    from unsparse_tvm.testing.onnx_models import EXPORTERS, export_onnx, ort_outputs, pruned_module

    target = make_target("llvm")
    module, shape = pruned_module(model, 0.9)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ep = torch.export.export(module, (x,))
        eager = _first(module(x)).numpy()
    pt2 = compile_program(ep, target)
    decisions = {r.name: (r.decision, r.format) for r in pt2.report}
    row = {"model": model, "layers": len(decisions), "sparse": sum(d == "sparse" for d, _ in decisions.values())}
    timers = {"pt2": vm_timer(pt2.executable, tvm.cpu(), x.numpy())[0]}
    for exporter in EXPORTERS:
        path = export_onnx(module, x, os.path.join(folder, f"{exporter}.onnx"), exporter)
        compiled = compile_onnx(path, target, log=lambda _: None)
        got = {r.name: (r.decision, r.format) for r in compiled.report}
        vm = relax.VirtualMachine(compiled.executable, tvm.cpu())
        out = vm["main"](tvm.runtime.tensor(x.numpy()))
        out = (out if hasattr(out, "numpy") else out[0]).numpy()
        row[f"onnx_{exporter}"] = {"decisions_equal": got == decisions,
                                   "error_vs_onnxruntime": rel_error(out, ort_outputs(path, x.numpy())[0])}
        timers[f"onnx_{exporter}"] = vm_timer(compiled.executable, tvm.cpu(), x.numpy())[0]
    torch._dynamo.reset()
    import warnings

    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        fn = torch.compile(module, backend="unsparse")
        y = _first(fn(x)).numpy()
    fallbacks = [str(w.message) for w in caught if issubclass(w.category, UnsparseFallback)]
    row["torch_compile"] = {"error_vs_eager": rel_error(y, eager), "fallbacks": fallbacks}

    def call_compiled():
        with torch.no_grad():
            fn(x)

    timers["torch_compile"] = lambda n: _loop(call_compiled, n)
    row["ok"] = (all(row[f"onnx_{e}"]["decisions_equal"] and row[f"onnx_{e}"]["error_vs_onnxruntime"] <= TOL
                     for e in EXPORTERS) and row["torch_compile"]["error_vs_eager"] <= TOL and not fallbacks)
    if timing:
        set_threads(1)
        t = round_robin(timers, repeat)
        row["ms_one_thread"] = t
        row["ratio_to_pt2"] = {k: v / t["pt2"] for k, v in t.items()}
    return row


def _loop(fn, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--time", action="store_true", help="also time every door against the .pt2 module")
    ap.add_argument("--models", default=",".join(BUILTINS + ARCHS))
    args = ap.parse_args()
    data = json.load(open(args.output)) if os.path.exists(args.output) else {"rows": []}
    done = {r["model"] for r in data["rows"]}
    for model in args.models.split(","):
        if model in done:
            continue
        with tempfile.TemporaryDirectory() as folder:
            row = check_model(model, folder, args.time)
        row["date"] = time.strftime("%Y-%m-%d %H:%M")
        data["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "ms_one_thread"}), flush=True)
        with open(args.output + ".tmp", "w") as f:
            json.dump(data, f, indent=1)
        os.replace(args.output + ".tmp", args.output)
    bad = [r["model"] for r in data["rows"] if not r["ok"]]
    print(f"{len(data['rows']) - len(bad)} of {len(data['rows'])} models pass every door" + (f"; not: {bad}" if bad else ""))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
