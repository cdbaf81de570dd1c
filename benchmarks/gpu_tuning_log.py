"""MetaSchedule tuning records for a GPU from the GPU kit's knob grid: per measured workload (a layer of the
seeded built-in model at one sparsity and batch), the fastest knob point as a record `compile --tuning-log`
applies.

    python benchmarks/gpu_tuning_log.py benchmarks/results/2026-12-04-h200 -o tuning_logs/h200-sm_90 [--force]

The grid measured the first layer of each distinct layer geometry (benchmarks/gpu_kit_build/knobs.py) on
the GPU; here each such layer's workload is re-derived the way `compile` derives it (the model pruned as the
kit prunes it, exported at that batch, the pipeline up to the tuning point: unsparse_tvm.tuning's
extract_tasks), found by its index array, scheduled by the CUDA rule at the best point's knobs, and written
with the measured time. A record applies only to the same workload (the same weights' sparsity pattern):
the logs of tuning_logs/ fit the models they came from.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np

from gpu_report import load  # next to this file: the kit runs' rows, each kept once, and the layer table


def best_and_default(row: dict) -> tuple[dict, dict]:
    """(fastest measured kernel, default-knob kernel, variant 0) of a grid row; clamped duplicates
    (same_as) take their twin's figure."""
    by_func = {k["func"]: k for k in row["kernels"]}
    timed = []
    for k in row["kernels"]:
        src = by_func.get(k.get("same_as"), k)
        if "median_ms" in src:
            timed.append({**k, "median_ms": src["median_ms"]})
    default = next(k for k in timed if k["variant"] == 0)
    return min(timed, key=lambda k: k["median_ms"]), default


def packed_arrays(net, row: dict) -> dict:
    """The layer's operand arrays as the CUDA pass packs them (shapes and index arrays: batch norm folding
    changes values only)."""
    from unsparse_tvm.reference import pack_layer

    w = dict(net.named_modules())[row["module"]].weight.detach().numpy()
    _, arrays = pack_layer(row["op"], w, row["input_shape"], row["attrs"], "cuda")
    return arrays


def param_shapes(task) -> list[tuple]:
    func = task.mod["main"]
    return [tuple(int(d) for d in p.ty.shape) for p in func.params]  # tirx params carry their buffer type


def fits(task, row: dict, arrays: dict) -> bool:
    """Whether the layer compiles to this workload: a workload is its PrimFunc (shapes, not the index
    values), so layers of one geometry and row width share it (the first call site's arrays are the task's)."""
    shapes = param_shapes(task)
    x = tuple(row["input_shape"])
    return (("dense" in task.op) == (row["op"] == "dense") and shapes[0] in (x, (x[0], int(np.prod(x[1:]))))
            and all(tuple(a.shape) in shapes for a in arrays.values()))


def records_for(model: str, sparsity: float, batch: int, rows: list, target, layers: dict) -> list[tuple]:
    """(task, best kernel, default kernel, row) for the grid rows of one (model, sparsity, batch)."""
    from unsparse_tvm.models import BUILTIN_MODELS, build_model, export_program
    from unsparse_tvm.reference import magnitude_prune
    from unsparse_tvm.tuning import extract_tasks

    net = build_model(model, 0)
    magnitude_prune(net, sparsity)
    tasks = extract_tasks(export_program(net, (batch, *BUILTIN_MODELS[model].input_shape)), target)
    out = []
    for row in rows:
        spec = layers[model]["layers"][row["layer"]]
        row = {**row, "attrs": spec["attrs"] if row["op"] == "conv2d" else None, "module": spec["name"]}
        arrays = packed_arrays(net, row)
        task = next((t for t in tasks if fits(t, row, arrays)), None)
        if task is None:  # e.g. compiled dense in the whole model (the kit forced every layer sparse)
            print(f"  {model} {sparsity} b{batch} layer {row['layer']}: no sparse workload of its shapes; skipped")
            continue
        best, default = best_and_default(row)
        out.append((task, best, default, row))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="a GPU kit results folder (kit-run*.json with grid rows, layers.json)")
    ap.add_argument("-o", "--output", required=True, help="the log directory to write")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--force", action="store_true", help="replace an existing log directory")
    args = ap.parse_args(argv)
    if os.path.exists(args.output) and not args.force:
        print(f"error: {args.output} exists: pass --force to replace it", file=sys.stderr)
        return 2
    from tvm import s_tir

    from unsparse_tvm.schedules import rule_for
    from unsparse_tvm.target import make_target
    from unsparse_tvm.tuning import write_record

    target = make_target("cuda", args.arch)
    _, rows, _, layers = load(args.folder)
    tmp = tempfile.mkdtemp(prefix=".gpu_tuning_log.", dir=os.path.dirname(os.path.abspath(args.output)))
    summary = []
    try:
        for key in sorted({(r["model"], r["sparsity"], r["batch"]) for r in rows}):
            group = [r for r in rows if (r["model"], r["sparsity"], r["batch"]) == key]
            for task, best, default, row in records_for(*key, group, target, layers):
                rule = rule_for(task.op, "cuda")
                sch = s_tir.Schedule(task.mod)
                rule.schedule(sch, sch.mod["main"], target, rule.Config(**best["config"]))
                write_record(tmp, task.mod, sch.trace, [best["median_ms"] / 1e3], target)
                summary.append({"model": key[0], "sparsity": key[1], "batch": key[2], "layer": row["layer"],
                                "name": row["name"], "config": best["config"], "best_ms": best["median_ms"],
                                "default_ms": default["median_ms"]})
                print(f"  {key[0]} {key[1]:g} b{key[2]} layer {row['layer']:2d}: {best['config']} "
                      f"{default['median_ms'] * 1e3:.1f} -> {best['median_ms'] * 1e3:.1f} us")
        with open(os.path.join(tmp, "grid_best.json"), "w") as f:
            json.dump({"source": os.path.normpath(args.folder), "arch": args.arch, "records": summary}, f, indent=1)
        os.chmod(tmp, 0o755)  # mkdtemp made it private
        if os.path.exists(args.output):
            shutil.rmtree(args.output)
        os.replace(tmp, args.output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratios = [s["default_ms"] / s["best_ms"] for s in summary]
    print(f"{len(summary)} records in {args.output}; best over default: geomean "
          f"{float(np.exp(np.mean(np.log(ratios)))):.3f}x, max {max(ratios):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
