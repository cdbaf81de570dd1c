"""Read a GPU kit run (benchmarks/results/<date>-h200/: kit-run*.json, layers.json) and write what the GPU
issue asks for: speedup plots over cuDNN FP32 / TF32 / FP16 against sparsity (one line per layer shape,
batch 1 and 8), the sparsity at which our kernels overtake each cuDNN mode (per layer type, and end to end
for vgg16 and resnet50), and the performance model's predictions beside the measurements.

    python benchmarks/gpu_report.py benchmarks/results/2026-12-04-h200 [--gpu built-in|fitted]

Writes DIR/report.md, DIR/summary.json and DIR/speedup-<model>.png. End to end is shown two ways: the sum
of the per-layer kernel times (convs and linears, each timed alone with the L2 flushed), and the whole
models (our Relax VM module against PyTorch eager on cuDNN, which at batch 1 is bound by its per-op launch
cost: the layer sums are the fairer comparison of the kernels).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
from collections import defaultdict
from dataclasses import asdict, replace

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt
import numpy as np

from unsparse_tvm.cost.gpu import H200, H200_FITTED, Knobs, predict_cudnn, predict_sparse
from unsparse_tvm.reference import conv_geometry

MEASURED_KNOBS = Knobs(threads_q=64)  # the CUDA rule's defaults when the kit ran (auto_threads_q came after)
MODES = {"fp32": "cudnn_fp32", "tf32": "cudnn_tf32", "fp16": "cudnn_fp16_channels_last"}


def load(folder: str) -> tuple[list, list, list, dict]:
    """(layer rows, grid rows, model rows, layer table) of every kit-run*.json in the folder; a row measured
    twice keeps its last figure."""
    layers, grid, models = {}, {}, {}
    for path in sorted(glob.glob(os.path.join(folder, "kit-run*.json"))):
        with open(path) as f:
            r = json.load(f)
        for row in r["layers"]:
            layers[(row["model"], row["layer"], row["sparsity"], row["batch"])] = row
        for row in r["grid"]:
            grid[(row["model"], row["layer"], row["sparsity"], row["batch"])] = row
        for row in r["models"]:
            models[(row["model"], row["variant"], row["sparsity"], row["batch"])] = row
    with open(os.path.join(folder, "layers.json")) as f:
        table = json.load(f)
    return list(layers.values()), list(grid.values()), list(models.values()), table


def ours_ms(row: dict) -> float | None:
    k = row["kernels"][0]  # the default knobs (variant 0)
    return k.get("median_ms")


def cudnn_ms(row: dict, mode: str) -> float | None:
    return row.get("torch", {}).get(MODES[mode], {}).get("median_ms")


def layer_type(row: dict, table: dict) -> str:
    if row["op"] == "dense":
        return "linear"
    spec = table[row["model"]]["layers"][row["layer"]]
    _, _, r, s = spec["weight_shape"]
    stride = spec["attrs"]["strides"][0]
    return f"{r}x{s}" + (f"/{stride}" if stride > 1 else "")


def shape_key(row: dict, table: dict) -> str:
    k, c = row["weight_shape"][:2]
    if row["op"] == "dense":
        return f"linear {c}->{k}"
    return f"{layer_type(row, table)} {c}->{k} @{row['input_shape'][2]}"


def overtakes(pairs: list[tuple[float, float]]) -> str:
    """Lowest sparsity from which ours is faster (ratio >= 1) at that and every higher sparsity measured;
    '-' where it never is, '< s' where it already is at the lowest."""
    pairs = sorted(pairs)
    for i, (sp, _) in enumerate(pairs):
        if all(ratio >= 1.0 for _, ratio in pairs[i:]):
            return f"<= {sp:g}" if i == 0 else f"{sp:g}"
    return "-"


def type_crossovers(layers: list, table: dict) -> dict:
    """{(model, type, batch, mode): (crossover, {sparsity: summed cuDNN / summed ours})} over each type's
    layers taken together (time-weighted), and type 'all layers' for the whole model's layers."""
    sums = defaultdict(lambda: defaultdict(lambda: [0.0, 0.0]))
    for row in layers:
        t = ours_ms(row)
        for mode in MODES:
            c = cudnn_ms(row, mode)
            if t is None or c is None:
                continue
            for typ in (layer_type(row, table), "all layers"):
                acc = sums[(row["model"], typ, row["batch"], mode)][row["sparsity"]]
                acc[0] += c
                acc[1] += t
    out = {}
    for key, by_sp in sums.items():
        ratios = {sp: c / t for sp, (c, t) in by_sp.items()}
        out[key] = (overtakes(list(ratios.items())), ratios)
    return out


def predicted_crossovers(preds: list) -> dict:
    """type_crossovers of the performance model's predictions (conv layers; it has no linear layers)."""
    sums = defaultdict(lambda: defaultdict(lambda: [0.0, 0.0]))
    for p in preds:
        for mode in MODES:
            for typ in (p["shape"].split()[0], "all convs"):
                acc = sums[(p["model"], typ, p["batch"], mode)][p["sparsity"]]
                acc[0] += p[f"{mode}_pred_ms"]
                acc[1] += p["ours_pred_ms"]
    return {key: (overtakes([(sp, c / t) for sp, (c, t) in by.items()]), {sp: c / t for sp, (c, t) in by.items()})
            for key, by in sums.items()}


def model_crossovers(models: list) -> dict:
    """{(model, batch, mode): (crossover, {sparsity: PyTorch whole model / our whole model})}."""
    out = {}
    for model in sorted({r["model"] for r in models}):
        for batch in sorted({r["batch"] for r in models}):
            rows = [r for r in models if r["model"] == model and r["batch"] == batch and r["variant"] == "unsparse"
                    and "unsparse" in r]
            for mode in MODES:
                ratios = {r["sparsity"]: r["torch"][MODES[mode]]["median_ms"] / r["unsparse"]["median_ms"]
                          for r in rows if "median_ms" in r.get("torch", {}).get(MODES[mode], {})}
                out[(model, batch, mode)] = (overtakes(list(ratios.items())), ratios)
    return out


def plot(layers: list, table: dict, model: str, path: str) -> None:
    fig, axes = plt.subplots(2, 3, figsize=(16, 9), sharex=True)
    shapes = sorted({shape_key(r, table) for r in layers if r["model"] == model})
    colours = plt.cm.tab20(np.linspace(0, 1, max(len(shapes), 2)))
    for bi, batch in enumerate((1, 8)):
        for mi, mode in enumerate(MODES):
            ax = axes[bi][mi]
            for shape, colour in zip(shapes, colours):
                pts = defaultdict(list)
                for r in layers:
                    if r["model"] == model and r["batch"] == batch and shape_key(r, table) == shape:
                        t, c = ours_ms(r), cudnn_ms(r, mode)
                        if t and c:
                            pts[r["sparsity"]].append(c / t)
                xs = sorted(pts)
                ax.plot(xs, [np.exp(np.mean(np.log(pts[x]))) for x in xs], marker="o", ms=3, color=colour,
                        label=shape if bi == 0 and mi == 0 else None)
            ax.axhline(1.0, color="black", lw=0.8)
            ax.set_yscale("log")
            ax.set_title(f"{model}, batch {batch}: vs cuDNN {mode.upper()}")
            ax.set_xlabel("sparsity")
            ax.set_ylabel("speedup (cuDNN time / ours)")
    fig.legend(loc="center right", fontsize=7)
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def row_nnz_of(model: str, sparsity: float, cache: dict) -> dict:
    """{module name: nonzeros per output row} of every conv/linear of the built-in model pruned as the kit
    prunes it (the kit's layer index is graph order, not module order: look layers up by name)."""
    if (model, sparsity) not in cache:
        from unsparse_tvm.models import build_model
        from unsparse_tvm.reference import magnitude_prune, prunable_layers

        net = build_model(model, 0)
        if sparsity:
            magnitude_prune(net, sparsity)
        cache.clear()  # one model's weights at a time (vgg16's are 0.5 GB)
        cache[(model, sparsity)] = {name.removesuffix(".weight"): (getattr(o, p).detach() != 0).reshape(
            getattr(o, p).shape[0], -1).sum(1).numpy() for name, o, p in prunable_layers(net)}
    return cache[(model, sparsity)]


def cases(layers: list, table: dict) -> list[tuple[dict, object, np.ndarray]]:
    """(measured row, ConvGeometry, nonzeros per row) of every measured conv row (default knobs)."""
    out, cache = [], {}
    for row in sorted(layers, key=lambda r: (r["model"], r["sparsity"], r["batch"], r["layer"])):
        if row["op"] != "conv2d" or ours_ms(row) is None:
            continue
        spec = table[row["model"]]["layers"][row["layer"]]
        geo = conv_geometry(row["input_shape"], row["weight_shape"], spec["attrs"])
        nnz = row_nnz_of(row["model"], row["sparsity"], cache)[spec["name"]]
        if len(nnz) != geo.k or int(nnz.sum()) != row["nnz"]:
            raise SystemExit(f"{row['model']} layer {row['layer']}: regenerated weights do not match the kit's row")
        out.append((row, geo, nnz))
    return out


def predictions(measured: list, table: dict, gpu) -> list[dict]:
    """The performance model's prediction beside each measured conv row."""
    out = []
    for row, geo, nnz in measured:
        p = predict_sparse(geo, nnz, MEASURED_KNOBS, gpu)
        entry = {"model": row["model"], "layer": row["layer"], "sparsity": row["sparsity"], "batch": row["batch"],
                 "shape": shape_key(row, table), "ours_ms": ours_ms(row), "ours_pred_ms": p.seconds * 1e3,
                 "ours_bound": p.bound}
        for mode in MODES:
            entry[f"{mode}_ms"] = cudnn_ms(row, mode)
            entry[f"{mode}_pred_ms"] = predict_cudnn(geo, mode, gpu).seconds * 1e3
        out.append(entry)
    return out


FIT_FIELDS = {"ours": ("launch_s", "l1_wavefronts_per_clk", "warps_to_hide_latency", "l2_bytes_s"),
              **{m: (f"cudnn_{m}_eff", f"cudnn_{m}_fixed_s") for m in MODES}}


def fit(measured: list, table: dict, gpu):
    """The model's constants re-fitted to the measurements: coordinate descent over each field's factor
    (x1/2 .. x2, then finer), minimising the summed squared log error of the predictions it moves."""
    def cost(g, key):
        total = 0.0
        for row, geo, nnz in measured:
            got = ours_ms(row) if key == "ours" else cudnn_ms(row, key)
            if got:
                pred = predict_sparse(geo, nnz, MEASURED_KNOBS, g) if key == "ours" else predict_cudnn(geo, key, g)
                total += math.log(pred.seconds * 1e3 / got) ** 2
        return total

    for key, fields in FIT_FIELDS.items():
        for step in (4.0, 2.0, 1.4, 1.15, 1.05):
            for name in fields:
                best = (cost(gpu, key), gpu)
                for factor in (1 / step, step):
                    trial = replace(gpu, **{name: type(getattr(gpu, name))(getattr(gpu, name) * factor)})
                    c = cost(trial, key)
                    if c < best[0]:
                        best = (c, trial)
                gpu = best[1]
    return gpu


def log_error(preds: list, key: str) -> dict:
    errs = [abs(math.log(p[f"{key}_pred_ms"] / p[f"{key}_ms"])) for p in preds if p.get(f"{key}_ms")]
    within = sum(e <= math.log(1.5) for e in errs)
    return {"median_factor": round(math.exp(float(np.median(errs))), 3), "within_1.5x": f"{within}/{len(errs)}"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--fit", action="store_true", help="also re-fit the model's constants and print them")
    args = ap.parse_args(argv)
    layers, grid, models, table = load(args.folder)
    for model in sorted({r["model"] for r in layers}):
        plot(layers, table, model, os.path.join(args.folder, f"speedup-{model}.png"))
    types, whole = type_crossovers(layers, table), model_crossovers(models)
    measured = cases(layers, table)
    gpus = {"built-in": H200, "fitted (cost.gpu.H200_FITTED)": H200_FITTED}
    if args.fit:
        gpus["fitted now"] = fit(measured, table, H200)
        print("fitted:", {k: v for k, v in asdict(gpus["fitted now"]).items() if asdict(H200)[k] != v})
    preds = {name: predictions(measured, table, gpu) for name, gpu in gpus.items()}
    fits = {name: {key: log_error(p, key) for key in ("ours", *MODES)} for name, p in preds.items()}
    predicted = predicted_crossovers(preds["fitted (cost.gpu.H200_FITTED)"])
    summary = {"types": {" ".join(map(str, k)): {"overtakes_at": v[0], "ratios": v[1]} for k, v in types.items()},
               "whole_models": {" ".join(map(str, k)): {"overtakes_at": v[0], "ratios": v[1]} for k, v in whole.items()},
               "predicted_types": {" ".join(map(str, k)): {"overtakes_at": v[0], "ratios": v[1]}
                                   for k, v in predicted.items()},
               "model_fit": fits, "predictions": preds}
    with open(os.path.join(args.folder, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(args.folder, "report.md"), "w") as f:
        f.write(report_md(types, whole, fits, layers, predicted))
    print(report_md(types, whole, fits, layers, predicted))
    return 0


def report_md(types: dict, whole: dict, fit: dict, layers: list, predicted: dict) -> str:
    lines = ["Sparsity from which our kernels are faster than cuDNN (FP32 / TF32 / FP16), each layer type's layers",
             "taken together (summed kernel times); '-': not at any sparsity measured (0.5-0.98).", "",
             "Predicted: the same from the performance model (fitted constants, conv layers only).", "",
             "| model | layers | batch | FP32 | TF32 | FP16 | predicted FP32 / TF32 / FP16 | at 90%: vs FP32 / TF32 / FP16 |",
             "|---|---|---|---|---|---|---|---|"]
    for (model, typ, batch, _), _ in sorted(((k, v) for k, v in types.items() if k[3] == "fp32"),
                                            key=lambda kv: (kv[0][0], kv[0][1] == "all layers", kv[0][1], kv[0][2])):
        cells = [types[(model, typ, batch, m)] for m in MODES]
        at90 = " / ".join(f"{c[1].get(0.9, float('nan')):.2f}x" for c in cells)
        ptyp = "all convs" if typ == "all layers" else typ
        pred = " / ".join(predicted.get((model, ptyp, batch, m), ("n/a",))[0] for m in MODES)
        lines.append(f"| {model} | {typ} | {batch} | " + " | ".join(c[0] for c in cells) + f" | {pred} | {at90} |")
    lines += ["", "Whole models: our Relax VM module against PyTorch eager (cuDNN) on the same GPU.", "",
              "| model | batch | FP32 | TF32 | FP16 | at 90%: vs FP32 / TF32 / FP16 |", "|---|---|---|---|---|---|"]
    for (model, batch, mode), _ in sorted(whole.items()):
        if mode != "fp32":
            continue
        cells = [whole[(model, batch, m)] for m in MODES]
        at90 = " / ".join(f"{c[1].get(0.9, float('nan')):.2f}x" for c in cells)
        lines.append(f"| {model} | {batch} | " + " | ".join(c[0] for c in cells) + f" | {at90} |")
    lines += ["", "Performance model against the measurements (conv layers, default knobs): median factor off, and",
              "how many predictions within 1.5x.", "", "| model constants | ours | cuDNN FP32 | TF32 | FP16 |",
              "|---|---|---|---|---|"]
    for name, per in fit.items():
        lines.append(f"| {name} | " + " | ".join(f"{per[k]['median_factor']}x, {per[k]['within_1.5x']}"
                                                  for k in ("ours", *MODES)) + " |")
    vgg = [r for r in layers if r["model"] == "vgg16" and r["op"] == "conv2d" and r["sparsity"] == 0.9 and r["batch"] == 1]
    wins = sum(ours_ms(r) < cudnn_ms(r, "fp32") for r in vgg if ours_ms(r) and cudnn_ms(r, "fp32"))
    lines += ["", f"VGG-16's 3x3 layers at 90%, batch 1: ours faster than cuDNN FP32 on {wins} of {len(vgg)}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
