"""Build the GPU kit: every CUDA kernel the GPU measurements need, compiled here (no GPU) for sm_90, packed
with the TVM runtime into one folder of at most 64 MiB that runs on a GPU machine without TVM or network.

    python benchmarks/gpu_kit.py build DIR            # the full kit (see --help for subsets)
    python DIR/run.py OUTDIR                          # on the GPU machine: checks and times everything
    python DIR/run.py --dry-run OUTDIR                # here: every code path except the GPU launches

What goes in (benchmarks/gpu_kit/README.md has the details):
- per layer (each conv/linear of each model), per sparsity and batch: the sparse kernel at the default
  knobs, and at a grid of knob points on each distinct layer geometry at the grid sparsities. Kernels
  take the sparse arrays (data, off [, ovf_data, ovf_off, ovf_slot], bias) as arguments, so no weights
  travel: the runner regenerates the seeded model, prunes, folds and packs it (copies of unsparse_tvm's
  models.py, reference.py, ops/formats.py and ops/geometry.py travel instead, in kitlib/). Many kernels per
  module, one nvcc call per module.
- whole models, sparse (per sparsity, default threshold) and TVM dense, per batch: Relax VM modules whose
  weight constants were lifted into parameters; the manifest says which layer array each parameter is.
- the TVM runtime: libtvm_runtime(.so, _cuda.so), the python `tvm` package without the compiler, and the
  apache-tvm-ffi wheel for the GPU machine's Python 3.12.
The knob names come from the CUDA rules' Config dataclasses at build time; each variant's knob values are in
the manifest (for MetaSchedule tuning records later).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
import multiprocessing as mp

import numpy as np

from unsparse_tvm.reference import usable_cores

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # gpu_kit_build/, next to this file
from gpu_kit_build import log  # noqa: E402
from gpu_kit_build.kernels import TIMES, build_layer_group, build_model_group  # noqa: E402
from gpu_kit_build.knobs import RULE_MODULES, config_class, knob_grid, knob_values  # noqa: E402,F401 (tests)
from gpu_kit_build.scaffold import write_runner_files, write_runtime  # noqa: E402

MiB = 1024 * 1024

DEFAULTS = dict(models="vgg16,resnet50", sparsities="0.5,0.7,0.8,0.9,0.95,0.98", batches="1,8",
                grid_sparsities="0.9,0.98", grid_points=12, threshold=0.7, seed=0, arch="sm_90")


def load_runner(kit: str):
    """The kit's own run.py (so the builder regenerates weights with exactly the runner's code)."""
    spec = importlib.util.spec_from_file_location("gpukit_run", os.path.join(kit, "run.py"))
    mod = importlib.util.module_from_spec(spec)
    was, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # run.py imports its sibling modules:
    try:                                                            # no __pycache__ inside the kit
        spec.loader.exec_module(mod)
    finally:
        sys.dont_write_bytecode = was
    return mod


# ------------------------------------------------------------------------------------------- plan

def plan_model(kit: str, model: str, sparsity: float, seed: int) -> dict:
    """The model's layer table (extract_layers order) and, for each layer, the torch module (and batch
    norm) it comes from, checked by regenerating and folding the weights with the runner's own code."""
    import unsparse_tvm.models as pm
    from unsparse_tvm.bench import extract_layers

    import torch

    run = load_runner(kit)
    shape = pm.BUILTIN_MODELS[model].input_shape
    net = run.regen_model(model, sparsity, seed)
    specs, _ = extract_layers(pm.export_program(net, (1, *shape)))
    named = dict(net.named_modules())
    order = list(named)
    layers, used = [], set()
    for i, spec in enumerate(specs):
        mask = spec.weight != 0
        found = None
        for name, m in named.items():
            if name in used or not isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                continue
            w = m.weight.detach().numpy()
            if w.shape != spec.weight.shape or not np.array_equal(w != 0, mask):
                continue
            after = order[order.index(name) + 1:]
            bns = [None] + [n for n in after if isinstance(named[n], torch.nn.BatchNorm2d)
                            and named[n].num_features == w.shape[0]][:1]
            for bn in bns:
                entry = {"module": name, "bn": bn}
                fw, fb = run.folded_layer(net, entry)
                ok_b = (fb is None and spec.bias is None) or (fb is not None and spec.bias is not None and
                                                             np.allclose(fb, spec.bias.reshape(-1), rtol=1e-5, atol=1e-6))
                if np.allclose(fw, spec.weight, rtol=1e-5, atol=1e-7) and ok_b:
                    found = entry
                    break
            if found:
                break
        if found is None:
            raise SystemExit(f"{model}: layer {i} ({spec.op} {spec.weight.shape}) matches no module of the "
                             "regenerated model: the runner's weights would differ from the compiled ones")
        used.add(found["module"])
        layers.append({"index": i, "name": found["module"], **found, "op": spec.op,
                       "input_shape": list(spec.input_shape), "weight_shape": list(spec.weight.shape),
                       "attrs": spec.attrs, "relu": bool(spec.relu), "bias": spec.bias is not None})
    # layers with the same geometry (grid points are compiled for the first of each)
    seen = {}
    for l in layers:
        key = json.dumps([l["op"], l["input_shape"], l["weight_shape"], l["attrs"], l["relu"], l["bias"]])
        l["geometry_of"] = seen.setdefault(key, l["index"])
    return {"input_shape": [1, *shape], "layers": layers}


def task(kit: str, opts: dict, model: str, sparsity: float, plan: dict, what: dict) -> list[dict]:
    """One worker task: everything of (model, sparsity): layer kernels, grids, whole models."""
    os.environ.setdefault("TVM_NUM_THREADS", "1")
    from unsparse_tvm.target import make_target

    run = load_runner(kit)
    target = make_target("cuda", opts["arch"])
    arch = opts["arch"]
    net = run.regen_model(model, sparsity, opts["seed"])
    folded = [run.folded_layer(net, l) for l in plan["layers"]]
    groups = []
    tag = f"{model}_s{sparsity:g}"
    t0 = time.time()
    for batch in opts["batches"]:
        if what.get("layers"):
            ids = [l["index"] for l in plan["layers"] if opts["layer_filter"](l)]
            groups.append(build_layer_group(run, target, arch, model, plan, folded, sparsity, batch, ids, None,
                                            kit, f"{tag}_b{batch}_default"))
        if what.get("grid"):
            ids = [l["index"] for l in plan["layers"] if opts["layer_filter"](l)
                   and (opts["grid_layers"] == "all" or l["geometry_of"] == l["index"])]
            grid = {"points": opts["grid_points"], "seed": opts["seed"]}
            groups.append(build_layer_group(run, target, arch, model, plan, folded, sparsity, batch, ids, grid,
                                            kit, f"{tag}_b{batch}_grid"))
        if what.get("model"):
            sparse = what["model"] == "unsparse"
            name = f"{model}_{'s' + format(sparsity, 'g') if sparse else 'dense'}_b{batch}_model"
            groups.append(build_model_group(run, target, arch, model, plan, net, sparsity, batch, sparse,
                                            opts["threshold"], kit, name))
    log(f"  built {tag} {sorted(k for k, v in what.items() if v)} in {time.time() - t0:.0f} s "
        f"(kernel modules: lowering {TIMES['lower']:.0f} s, nvcc {TIMES['nvcc']:.0f} s)")
    TIMES.update(lower=0.0, nvcc=0.0)
    return groups


def _task_entry(args):
    kit, opts, model, sparsity, plan, what = args
    opts = dict(opts)
    pattern = opts.get("layers_regex")
    max_layers = opts.get("max_layers")
    opts["layer_filter"] = lambda l: (pattern is None or re.search(pattern, l["name"]) is not None) and \
        (max_layers is None or l["index"] < max_layers)
    return task(kit, opts, model, sparsity, plan, what)


def _plan_entry(args):
    return plan_model(*args)


# ---------------------------------------------------------------------------------------------- build

def build(kit: str, a) -> dict:
    t_start = time.time()
    if os.path.exists(kit):
        if not a.force:
            raise SystemExit(f"{kit} exists; pass --force to replace it")
        shutil.rmtree(kit)
    os.makedirs(os.path.join(kit, "kernels"))
    cache = os.path.expanduser(a.cache)
    write_runner_files(kit)
    runtime = write_runtime(kit, cache)
    models = [m for m in a.models.split(",") if m]
    sparsities = [float(s) for s in a.sparsities.split(",") if s]
    grid_s = [float(s) for s in a.grid_sparsities.split(",") if s] if a.grid_points > 0 else []
    whole_s = [float(s) for s in a.model_sparsities.split(",")] if a.model_sparsities else \
        [s for s in sparsities if s >= a.threshold]  # below the threshold the "sparse" model is TVM dense
    opts = {"arch": a.arch, "seed": a.seed, "batches": [int(b) for b in a.batches.split(",")],
            "grid_points": a.grid_points, "grid_layers": a.grid_layers, "threshold": a.threshold,
            "layers_regex": a.layers, "max_layers": a.max_layers}
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=a.jobs, mp_context=ctx) as pool:
        log(f"planning {models}")
        plans = dict(zip(models, pool.map(_plan_entry, [(kit, m, max(sparsities), a.seed) for m in models])))
        jobs = []
        for m in models:
            for s in sorted(set(sparsities) | set(whole_s)):
                what = {"layers": s in sparsities, "model": "unsparse" if (a.whole and s in whole_s) else None}
                jobs.append((kit, opts, m, s, plans[m], what))
            for s in grid_s:  # grids are their own tasks: the longest ones, started first
                jobs.append((kit, opts, m, s, plans[m], {"grid": True}))
            if a.whole:
                jobs.append((kit, opts, m, 0.0, plans[m], {"model": "tvm_dense"}))

        def cost(job):  # rough seconds on one core, measured: longest first keeps both workers busy
            layers = len(job[4]["layers"])
            distinct = sum(l["geometry_of"] == l["index"] for l in job[4]["layers"])
            w = job[5]
            return (w.get("grid", False) * distinct * len(opts["batches"]) * a.grid_points * 0.5
                    + bool(w.get("layers")) * layers * len(opts["batches"]) * 1.0 + bool(w.get("model")) * 30)

        jobs.sort(key=cost, reverse=True)
        log(f"building {len(jobs)} tasks on {a.jobs} processes")
        groups = []
        futures = [pool.submit(_task_entry, j) for j in jobs]
        for fut in as_completed(futures):
            groups += fut.result()
    groups.sort(key=lambda g: g["name"])
    counts = {"layer_kernels": sum(len(g["kernels"]) for g in groups if g["kind"] == "layers"),
              "grid_variants": sum(len(g["kernels"]) for g in groups if g["kind"] == "grid"),
              "grid_compiled": sum(1 for g in groups if g["kind"] == "grid" for k in g["kernels"] if "same_as" not in k),
              "models": sum(1 for g in groups if g["kind"] == "model"), "modules": sum(1 for g in groups if g.get("file"))}
    manifest = {"format": 1, "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "target": "cuda", "arch": a.arch, "seed": a.seed, "threshold": a.threshold,
                "options": {k: v for k, v in vars(a).items() if k not in ("dir", "force", "cache")},
                "knob_fields": {op: [f.name for f in dataclasses.fields(config_class(op))]
                                for op in sorted(set(RULE_MODULES) | {k["op"] for g in groups for k in g.get("kernels", [])})},
                "runtime": runtime, "models": plans, "groups": groups, "counts": counts}
    files, sha256 = {}, load_runner(kit).sha256  # the runner checks the files with this same digest
    for root, _, names in os.walk(kit):
        if "__pycache__" in root:
            continue
        for n in names:
            p = os.path.join(root, n)
            rel = os.path.relpath(p, kit)
            files[rel] = {"bytes": os.path.getsize(p), "sha256": sha256(p)}
    manifest["files"] = files
    manifest["build_seconds"] = round(time.time() - t_start, 1)
    with open(os.path.join(kit, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    total = sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(kit) for n in ns)
    log(f"kit {kit}: {total / MiB:.1f} MiB, {counts}, built in {time.time() - t_start:.0f} s")
    if total > a.max_mib * MiB:
        raise SystemExit(f"the kit is {total / MiB:.1f} MiB, over the {a.max_mib} MiB limit")
    return manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Build the GPU kit (see this file's docstring).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the kit into DIR")
    b.add_argument("dir")
    b.add_argument("--models", default=DEFAULTS["models"], help="built-in model names, comma-separated")
    b.add_argument("--sparsities", default=DEFAULTS["sparsities"], help="per-layer kernels at these sparsities")
    b.add_argument("--batches", default=DEFAULTS["batches"])
    b.add_argument("--grid-sparsities", default=DEFAULTS["grid_sparsities"], help="knob grids at these sparsities")
    b.add_argument("--grid-points", type=int, default=DEFAULTS["grid_points"], help="knob points per layer (0: no grid)")
    b.add_argument("--grid-layers", choices=["distinct", "all"], default="distinct",
                   help="grids on the first layer of each distinct geometry, or on every layer")
    b.add_argument("--model-sparsities", default=None,
                   help="whole sparse models at these sparsities (default: the per-layer ones >= --threshold)")
    b.add_argument("--no-whole", dest="whole", action="store_false", help="no whole-model modules")
    b.add_argument("--threshold", type=float, default=DEFAULTS["threshold"], help="whole models' sparse threshold")
    b.add_argument("--layers", default=None, help="regex over layer (module) names to include")
    b.add_argument("--max-layers", type=int, default=None, help="only the first N layers of each model")
    b.add_argument("--arch", default=DEFAULTS["arch"])
    b.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    b.add_argument("--jobs", type=int, default=max(1, min(usable_cores(), 4)))
    b.add_argument("--max-mib", type=float, default=64.0)
    b.add_argument("--cache", default="~/.cache/unsparse-gpukit")
    b.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    build(a.dir, a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
