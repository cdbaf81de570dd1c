"""Is the per-layer choice right? Every conv/linear layer of a model compiled both ways (our dense kernel
and the sparse kernel in the format the pass would pack), both timed in alternating rounds at a thread
count, and the cost model's choice read against the two times.

    python benchmarks/choice_check.py vgg16-cifar --sparsities 0.8,0.9,0.95 --threads 1 -o out.json
    python benchmarks/choice_check.py --evaluate out.json [--rates built-in|calibrated|FILE.json] [--layers]

The measurements do not depend on the cost model, so one file evaluates any set of rates: `--evaluate`
prints, per (model, sparsity), how many layers each rate set chose within 10% of the faster kernel, the
worst misses, and the sum of the chosen kernels' times (what the choice costs end to end). Run under
UNSPARSE_MCPU=haswell for the AVX2 code path.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

CHOICE_TOLERANCE = 1.10


def _rows_stats(rows) -> dict:
    return {"fmt": rows.fmt, "padded": rows.padded_size, "nnz": rows.nnz, "group": rows.group}


def measure(model: str, sparsity: float, threads: int, repeat: int) -> list[dict]:
    import tvm

    from unsparse_tvm.bench_layers import compile_layer
    from unsparse_tvm.single_layer import extract_layers, layer_module
    from unsparse_tvm.timing import round_robin, set_threads, vm_timer
    from unsparse_tvm.compress.prune import load_model_program
    from unsparse_tvm.target import make_target

    target = make_target("llvm")
    ep = load_model_program(model, sparsity)
    specs, names = extract_layers(ep)
    set_threads(threads)
    out = []
    for i, spec in enumerate(specs):
        mod = layer_module(spec)
        x = np.random.default_rng(0).standard_normal(spec.input_shape).astype(np.float32)
        report: list = []
        sparse = compile_layer(mod, target, 0.0, True, names, report)  # forced sparse, the format the pass packs
        dense = compile_layer(mod, target, None, False)
        d = report[0]
        if d.decision != "sparse":  # grouped/depthwise convs: never sparse, nothing to choose
            continue
        timers = {"sparse": vm_timer(sparse, tvm.cpu(), x)[0], "dense": vm_timer(dense, tvm.cpu(), x)[0]}
        t = round_robin(timers, repeat, min_batch_ms=5.0)
        row = {"name": d.name, "op": spec.op, "weight": list(spec.weight.shape), "input": list(spec.input_shape),
               "attrs": spec.attrs, "sparsity": d.sparsity, "fmt": d.format, "padded": d.padded, "nnz": d.nnz,
               "fused": d.fused, "sparse_ms": t["sparse"], "dense_ms": t["dense"]}
        out.append(row)
        print(f"  [{i + 1}/{len(specs)}] {d.name:24s} {d.format:6s} sparse {t['sparse']:8.4f} ms  dense "
              f"{t['dense']:8.4f} ms", flush=True)
    return out


def predict(row: dict, rates, lanes: int = 16) -> tuple[float, float]:
    """(dense us, sparse us) of a measured row under `rates` (layer_cost, with the row's own packing), each
    kernel at its own domain as the pass costs it (relay_passes.sparsify_conv2d.kernel_geometry) for a target
    of `lanes` float32 lanes."""
    from types import SimpleNamespace

    from unsparse_tvm.cost.model import CostModel, linear_cost
    from unsparse_tvm.ops.geometry import ConvGeometry
    from unsparse_tvm.relay_passes.sparsify_conv2d import kernel_geometry

    n, c, h, w = row["input"] if row["op"] == "conv2d" else (*row["input"], 1, 1)
    a = row["attrs"]
    pad = a.get("padding", [0, 0, 0, 0])
    # the packing's sizes, for the weight-traffic floor: values, and offsets as the kernels store them (uint16
    # where every offset into the padded input fits, formats.compact_offsets)
    span = c * (h + pad[0] + pad[2]) * (w + pad[1] + pad[3])
    rows = SimpleNamespace(fmt=row["fmt"], padded_size=row["padded"], nnz=row["nnz"],
                           data=np.empty(row["padded"], np.float32),
                           off=np.empty(row["padded"], np.uint16 if span < 1 << 16 else np.int32), ovf_data=None,
                           ovf_off=None, ovf_slot=None, group=int(row["fmt"][4:]) if row["fmt"].startswith("vell") else 1)
    if row["op"] == "conv2d":
        k, _, r, s = row["weight"]
        geo = ConvGeometry(n, c, h, w, k, r, s, tuple(a["strides"]), tuple(a["padding"]), tuple(a["dilation"]))
        model = CostModel("llvm", rates, lanes)
        depthwise = a.get("groups", 1) > 1  # the pass takes depthwise convs only (depthwise_cost)
        cost = model.conv(kernel_geometry(geo, model, depthwise=depthwise), rows, depthwise, dense_geo=geo)
    else:
        cost = linear_cost(row["input"][0], tuple(row["weight"]), rows, "llvm", rates)
    return cost.dense_us, cost.sparse_us


def layer_table(run: dict, rates, lanes: int) -> list[str]:
    """One line per layer: measured sparse / dense us and their ratio, the prediction's, and MISS where the
    prediction picks the kernel that is more than 10% slower."""
    lines = []
    for row in run["layers"]:
        dense_us, sparse_us = predict(row, rates, lanes)
        sparse_ms, dense_ms = row["sparse_ms"], row["dense_ms"]
        chose_sparse, sparse_faster = sparse_us < dense_us, sparse_ms < dense_ms
        regret = max(sparse_ms, dense_ms) / min(sparse_ms, dense_ms)
        miss = chose_sparse != sparse_faster and regret > CHOICE_TOLERANCE
        lines.append(f"    {row['name']:24s} {row['fmt']:5s} measured {sparse_ms * 1e3:8.1f} / {dense_ms * 1e3:8.1f} us "
                     f"({sparse_ms / dense_ms:5.2f})  predicted {sparse_us:8.1f} / {dense_us:8.1f} us "
                     f"({sparse_us / dense_us:5.2f}){'  MISS' if miss else ''}")
    return lines


def evaluate(runs: list[dict], rates) -> list[dict]:
    """Per run: layers right (within 10% of the faster kernel), the misses, and the chosen kernels' total."""
    from tvm.target import Target

    from unsparse_tvm.schedules import cpu_vector_lanes

    summary = []
    for run in runs:
        chosen_total, best_total, misses = 0.0, 0.0, []
        lanes = cpu_vector_lanes(Target({"kind": "llvm", "mcpu": run["mcpu"]}))[0]
        for row in run["layers"]:
            dense_us, sparse_us = predict(row, rates, lanes)
            chose = "sparse" if sparse_us < dense_us else "dense"
            t = {"sparse": row["sparse_ms"], "dense": row["dense_ms"]}
            regret = t[chose] / min(t.values())
            chosen_total += t[chose]
            best_total += min(t.values())
            if regret > CHOICE_TOLERANCE:
                misses.append((row["name"], row["fmt"], chose, round(regret, 2)))
        summary.append({"model": run["model"], "sparsity": run["sparsity"], "mcpu": run["mcpu"],
                        "layers": len(run["layers"]), "right": len(run["layers"]) - len(misses),
                        "misses": sorted(misses, key=lambda m: -m[3]), "chosen_ms": chosen_total,
                        "best_ms": best_total, "table": layer_table(run, rates, lanes)})
    return summary


def _load_rates(spec: str):
    from unsparse_tvm.cost.model import BUILTIN

    if spec == "built-in":
        return BUILTIN
    from unsparse_tvm.cost import calibration
    from unsparse_tvm.target import make_target

    if spec == "calibrated":
        rates = calibration.cached_rates(make_target("llvm"))
        if rates is None:
            sys.exit("no calibration for this CPU and thread count yet: run `unsparse-tvm calibrate`")
        return rates
    return calibration.read_rates_file(spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*")
    ap.add_argument("--sparsities", default="0.8,0.9,0.95")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("-o", "--output", help="JSON file of the measurements (appended to, per model and sparsity)")
    ap.add_argument("--evaluate", help="a JSON file written by this script: evaluate rates against it")
    ap.add_argument("--layers", action="store_true",
                    help="with --evaluate: each layer's measured and predicted sparse / dense times (sparse first)")
    ap.add_argument("--rates", action="append", default=None,
                    help="built-in, calibrated (this CPU's cached calibration), or a calibration file; repeatable")
    args = ap.parse_args()
    if args.evaluate:
        runs = json.load(open(args.evaluate))["runs"]
        for spec in args.rates or ["built-in"]:
            rates = _load_rates(spec)
            print(f"\nrates: {spec} ({rates.source})")
            for s in evaluate(runs, rates):
                print(f"  {s['model']:12s} {s['sparsity']:<5} {s['mcpu']:16s} right {s['right']:2d}/{s['layers']:2d}  "
                      f"chosen {s['chosen_ms']:8.3f} ms (best {s['best_ms']:8.3f})  misses: {s['misses'][:4]}")
                if args.layers:
                    print("\n".join(s["table"]))
        return
    from unsparse_tvm.target import make_target

    mcpu = str(make_target("llvm").attrs["mcpu"])
    data = json.load(open(args.output)) if args.output and os.path.exists(args.output) else {"runs": []}
    for model in args.models:
        for sp in [float(s) for s in args.sparsities.split(",")]:
            if any(r["model"] == model and r["sparsity"] == sp and r["mcpu"] == mcpu and r["threads"] == args.threads
                   for r in data["runs"]):
                print(f"{model} {sp} {mcpu}: already measured")
                continue
            print(f"{model} at {sp} ({mcpu}, {args.threads} thread(s))", flush=True)
            layers = measure(model, sp, args.threads, args.repeat)
            data["runs"].append({"model": model, "sparsity": sp, "mcpu": mcpu, "threads": args.threads,
                                 "date": time.strftime("%Y-%m-%d %H:%M"), "layers": layers})
            if args.output:
                tmp = args.output + ".tmp"
                with open(tmp, "w") as f:
                    json.dump(data, f, indent=1)
                os.replace(tmp, args.output)


if __name__ == "__main__":
    main()
