"""Build the GPU kit: every CUDA kernel the GPU measurements need, compiled here (no GPU) for sm_90, packed
with the TVM runtime into one folder of at most 64 MiB that runs on a GPU machine without TVM or network.

    python benchmarks/gpu_kit.py build DIR            # the full kit (see --help for subsets)
    python DIR/run.py OUTDIR                          # on the GPU machine: checks and times everything
    python DIR/run.py --dry-run OUTDIR                # here: every code path except the GPU launches

What goes in (benchmarks/gpu_kit/README.md has the details):
- per layer (each conv/linear of each model), per sparsity and batch: the sparse kernel at the default
  knobs, and at a grid of knob points on each distinct layer geometry at the grid sparsities. Kernels
  take the sparse arrays (data, off [, ovf_data, ovf_off, ovf_slot], bias) as arguments, so no weights
  travel: the runner regenerates the seeded model, prunes and packs it (copies of unsparse_tvm's
  models.py and formats.py travel instead). Many kernels per module, one nvcc call per module.
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
import glob
import importlib.util
import itertools
import json
import lzma
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
import multiprocessing as mp

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RUNNER_DIR = os.path.join(HERE, "gpu_kit")
MiB = 1024 * 1024

DEFAULTS = dict(models="vgg16,resnet50", sparsities="0.5,0.7,0.8,0.9,0.95,0.98", batches="1,8",
                grid_sparsities="0.9,0.98", grid_points=12, threshold=0.7, seed=0, arch="sm_90")
# candidate values of the knobs we know (the rules' space()); a knob added later gets {d/2, d, 2d}
KNOWN_KNOB_VALUES = {"threads_q": [32, 64, 128, 256], "threads_k": [1, 2, 4, 8], "per_thread": [1, 2, 4],
                     "lanes": [8, 16, 32], "rows_per_block": [1, 2, 4, 8]}
SHIP_CONST_MAX_BYTES = 64 * 1024  # unrecognised whole-model constants up to this size travel in an .npz
TIMES = {"lower": 0.0, "nvcc": 0.0}  # per worker process: where a task's time went
RULE_MODULES = {"sparse_conv2d": "unsparse_tvm.schedules.sparse_conv2d_cuda",
                "sparse_dense": "unsparse_tvm.schedules.sparse_dense_cuda"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_runner(kit: str):
    """The kit's own run.py (so the builder regenerates weights with exactly the runner's code)."""
    spec = importlib.util.spec_from_file_location("gpukit_run", os.path.join(kit, "run.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.load_kitlib(kit)
    return mod


# ------------------------------------------------------------------------------------------- knobs

def rule_module(op: str):
    """The CUDA schedule rule of an operator (the project's rule table; grouped rows share a rule)."""
    import importlib

    try:
        from unsparse_tvm.schedules import rule_for

        rule = rule_for(op, "cuda")
    except ImportError:
        rule = None
    if rule is None:
        if op not in RULE_MODULES:
            raise RuntimeError(f"no CUDA schedule rule for operator {op}")
        rule = importlib.import_module(RULE_MODULES[op])
    return rule


def config_class(op: str):
    return rule_module(op).Config


def knob_values(field: dataclasses.Field, default) -> list:
    if field.name in KNOWN_KNOB_VALUES:
        vals = list(KNOWN_KNOB_VALUES[field.name])
    elif isinstance(default, bool):
        vals = [False, True]
    elif isinstance(default, int):
        vals = sorted({max(1, default // 2), default, default * 2})
    else:
        vals = []
    if default not in vals:
        vals.append(default)
    return vals


def knob_grid(op: str, points: int, seed: int = 0) -> list[dict]:
    """The default first, then each knob varied alone, then a seeded sample of the rest of the factorial."""
    cls = config_class(op)
    fields = dataclasses.fields(cls)
    default = dataclasses.asdict(cls())
    values = {f.name: knob_values(f, default[f.name]) for f in fields}
    grid = [default]
    for name, vals in values.items():
        for v in vals:
            if v != default[name]:
                grid.append({**default, name: v})
    rest = [dict(zip(values, combo)) for combo in itertools.product(*values.values())]
    rest = [c for c in rest if c not in grid]
    random.Random(seed).shuffle(rest)
    grid += rest
    return grid[:max(points, 1)]


# ----------------------------------------------------------------------------------- kit scaffolding

def write_runner_files(kit: str) -> None:
    """run.py, README.md and kitlib/ (the project's models.py and formats.py, made importable alone)."""
    import unsparse_tvm.formats
    import unsparse_tvm.models

    os.makedirs(os.path.join(kit, "kitlib"), exist_ok=True)
    shutil.copy(os.path.join(RUNNER_DIR, "run.py"), os.path.join(kit, "run.py"))
    shutil.copy(os.path.join(RUNNER_DIR, "README.md"), os.path.join(kit, "README.md"))
    for mod in (unsparse_tvm.formats, unsparse_tvm.models):
        src = open(mod.__file__).read()
        # the only package-relative import these files have is the error class
        src = re.sub(r"^from \.errors import .*$", "class UnsparseError(Exception):\n    pass\n", src, flags=re.M)
        if re.search(r"^\s*from \.|^\s*import unsparse_tvm|^\s*from unsparse_tvm", src, flags=re.M):
            raise SystemExit(f"{mod.__file__} now imports other project modules: the kit cannot ship it alone")
        with open(os.path.join(kit, "kitlib", os.path.basename(mod.__file__)), "w") as f:
            f.write(src)


def ffi_wheel(cache: str) -> str:
    """apache-tvm-ffi (this environment's version) as a cp312 manylinux wheel, downloaded once."""
    import importlib.metadata as md

    version = md.version("apache-tvm-ffi")
    found = glob.glob(os.path.join(cache, f"apache_tvm_ffi-{version}-cp312-*.whl"))
    shared = glob.glob(os.path.expanduser(f"~/.cache/unsparse-devbundle/*/wheels/apache_tvm_ffi-{version}-cp312-*.whl"))
    if found or shared:
        return (found or shared)[0]
    os.makedirs(cache, exist_ok=True)
    log(f"downloading apache-tvm-ffi {version} for Python 3.12 (once)")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp",
                    "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_24_x86_64",
                    "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
                    "-d", cache, f"apache-tvm-ffi=={version}"], check=True)
    found = glob.glob(os.path.join(cache, f"apache_tvm_ffi-{version}-cp312-*.whl"))
    if not found:
        raise SystemExit("could not get the apache-tvm-ffi wheel for Python 3.12")
    return found[0]


def _runtime_filter(ti: tarfile.TarInfo):
    name = ti.name
    if "__pycache__" in name or name.startswith(("tvm/3rdparty", "tvm/src", "tvm/web")):
        return None
    if name.startswith("tvm/lib/") and os.path.basename(name) not in ("libtvm_runtime.so", "libtvm_runtime_cuda.so"):
        return None
    return ti


def write_runtime(kit: str, cache: str) -> dict:
    """The TVM runtime pieces: python `tvm` without the compiler library, the ffi wheel, libcudart.13."""
    import importlib.metadata as md

    import tvm

    from unsparse_tvm.cuda_package import find_nvcc

    rdir = os.path.join(kit, "runtime")
    os.makedirs(rdir, exist_ok=True)
    version = md.version("apache-tvm")
    cached = os.path.join(cache, f"tvm-runtime-{version}.tar.xz")
    if not os.path.exists(cached):
        log("packing the TVM runtime (python package + libtvm_runtime*.so, no compiler)")
        site = os.path.dirname(os.path.dirname(tvm.__file__))
        tmp = cached + f".{os.getpid()}"
        os.makedirs(cache, exist_ok=True)
        with tarfile.open(tmp, "w:xz", preset=9) as t:
            t.add(os.path.join(site, "tvm"), arcname="tvm", filter=_runtime_filter)
        os.replace(tmp, cached)
    shutil.copy(cached, os.path.join(rdir, "tvm-runtime.tar.xz"))
    wheel = ffi_wheel(cache)
    shutil.copy(wheel, os.path.join(rdir, os.path.basename(wheel)))
    info = {"tvm_tar": "runtime/tvm-runtime.tar.xz", "ffi_wheel": f"runtime/{os.path.basename(wheel)}",
            "python": "cp312", "tvm_version": version, "ffi_version": md.version("apache-tvm-ffi")}
    root = os.path.dirname(os.path.dirname(os.path.realpath(find_nvcc())))
    cudart = []
    for base in (root, "/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-13*"))):
        cudart += sorted(glob.glob(os.path.join(base, "lib*", "libcudart.so.13*")))
        cudart += sorted(glob.glob(os.path.join(base, "targets", "*", "lib", "libcudart.so.13*")))
    if cudart:  # a fallback only: the runner prefers the GPU machine's own (PyTorch's or the toolkit's)
        real = os.path.realpath(cudart[0])
        with open(real, "rb") as fin, lzma.open(os.path.join(rdir, "libcudart.so.13.xz"), "wb", preset=9) as fout:
            shutil.copyfileobj(fin, fout)
        info["cudart"] = "runtime/libcudart.so.13.xz"
    return info


def write_xz(src: str, dst: str) -> None:
    with open(src, "rb") as fin, lzma.open(dst, "wb", preset=9 | lzma.PRESET_EXTREME) as fout:
        shutil.copyfileobj(fin, fout)


# ------------------------------------------------------------------------------------------- planning

def plan_model(kit: str, model: str, sparsity: float, seed: int) -> dict:
    """The model's layer table (extract_layers order) and, for each layer, the torch module (and batch
    norm) it comes from, checked by regenerating and folding the weights with the runner's own code."""
    import unsparse_tvm.models as pm
    from unsparse_tvm.bench import extract_layers

    import torch

    run = load_runner(kit)
    shape = pm.BUILTIN_MODELS[model].input_shape
    net = run.regen_model(model, sparsity, seed)
    specs, _ = extract_layers(pm.export(net, (1, *shape)))
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


# ------------------------------------------------------------------------------------ kernel building

def _call_tir(main):
    from tvm import relax

    calls = []

    def visit(e):
        if isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.call_tir":
            calls.append(e)

    relax.analysis.post_order_visit(main, visit)
    return calls


def layer_primfunc(spec, target):
    """(unscheduled PrimFunc of the layer's sparse operator, operand roles, out shape) via build_pipeline."""
    import tvm

    from unsparse_tvm.bench import layer_module
    from unsparse_tvm.relay_passes import build_pipeline

    mod = build_pipeline(target, threshold=0.0, stop_after="legalize")(layer_module(spec))
    funcs = [(gv, f) for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)
             and f.attrs is not None and "unsparse.op" in f.attrs]
    calls = _call_tir(mod["main"])
    if len(funcs) != 1 or len(calls) != 1:
        raise RuntimeError(f"expected one sparse operator in the layer module, got {len(funcs)} / {len(calls)} calls")
    consts = []
    for a in calls[0].args[1]:
        consts.append(a.value.numpy() if isinstance(a, tvm.ir.GenericConst) else None)
    out_shape = [int(v) for v in calls[0].ty.shape.values]
    return funcs[0][1], consts, out_shape


def schedule_variant(func, op: str, target, knobs: dict):
    rule = rule_module(op)
    sch = rule.apply(func, target, rule.Config(**knobs))
    if sch is None:
        raise RuntimeError(f"the {op} CUDA rule did not apply")
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def compile_kernels(funcs: dict, target, arch: str, path_xz: str) -> int:
    """Many scheduled PrimFuncs -> one module (one nvcc call), device code embedded, exported, xz'd."""
    import tvm

    from unsparse_tvm.cuda_package import embed_device_code

    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    t0 = time.time()
    ex = tvm.compile(mod, target=target)
    t1 = time.time()
    embed_device_code(ex, arch)
    TIMES["lower"] += t1 - t0
    TIMES["nvcc"] += time.time() - t1
    with tempfile.TemporaryDirectory() as tmp:
        so = os.path.join(tmp, "k.so")
        ex.export_library(so)
        size = os.path.getsize(so)
        write_xz(so, path_xz)
    return size


def build_layer_group(run, target, arch, model, mm, net_folded, sparsity, batch, layer_ids, grid: dict | None,
                      kit, name) -> dict:
    """One module: the default-knob kernels of `layer_ids` (grid None) or their knob grids."""
    import tvm_ffi

    from unsparse_tvm.bench import LayerSpec

    funcs, kernels = {}, []
    for li in layer_ids:
        layer = mm["layers"][li]
        w, b = net_folded[li]
        in_shape = [batch] + layer["input_shape"][1:]
        spec = LayerSpec(layer["op"], tuple(in_shape), w, b, layer["relu"], layer["attrs"])
        base, consts, out_shape = layer_primfunc(spec, target)
        packed = run.pack_layer(layer, w, b, batch)
        roles = ["x"]
        for c in consts[1:]:
            role = next((r for r, a in packed["arrays"].items() if c is not None and a.shape == c.shape
                         and a.dtype == c.dtype and np.array_equal(a, c)), None)
            if role is None:
                raise RuntimeError(f"{name} layer {li}: an operand of the compiled kernel is none of the runner's arrays")
            roles.append(role)
        op = str(base.attrs["unsparse.op"])
        points = knob_grid(op, grid["points"], grid["seed"]) if grid else [dataclasses.asdict(config_class(op)())]
        hashes = {}
        for vi, knobs in enumerate(points):
            fname = f"{name}_l{li}_v{vi}".replace(".", "p").replace("-", "_")
            entry = {"layer": li, "op": op, "fmt": packed["fmt"], "variant": vi, "config": knobs, "func": fname,
                     "args": roles, "shapes": {r: list(packed["arrays"][r].shape) for r in roles[1:]},
                     "out_shape": out_shape, "structure": run.structure_hash(packed["arrays"])}
            try:
                f = schedule_variant(base, op, target, knobs)
            except Exception as err:
                entry["build_error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}"
                entry["same_as"] = None
                kernels.append(entry)
                continue
            h = tvm_ffi.structural_hash(f)
            if h in hashes:  # the rule clamped these knobs to an earlier variant's schedule
                entry["same_as"] = hashes[h]
            else:
                hashes[h] = fname
                funcs[fname] = f
            kernels.append(entry)
    rel = f"kernels/{name}.so.xz"
    raw = compile_kernels(funcs, target, arch, os.path.join(kit, rel)) if funcs else 0
    return {"kind": "grid" if grid else "layers", "name": name, "model": model, "sparsity": sparsity, "batch": batch,
            "file": rel if funcs else None, "so_bytes": raw, "kernels": kernels}


class _Lift:
    """Replace the Relax main's large constants by parameters (after scheduling, before lowering)."""

    @staticmethod
    def run(mod, min_bytes: int = 0):
        import tvm
        from tvm import relax

        arrays, params = [], []

        @relax.expr_functor.mutator
        class M(relax.PyExprMutator):
            def visit_generic_const_(self, c):
                arr = c.value.numpy()
                if arr.nbytes < min_bytes:
                    return c
                v = relax.Var(f"p{len(params)}", c.ty)
                params.append(v)
                arrays.append(arr)
                return v

        main = mod["main"]
        body = M(mod).visit_expr(main.body)
        attrs = {k: main.attrs[k] for k in main.attrs.keys()} if main.attrs is not None else {}
        attrs.pop("num_input", None)
        new = relax.Function(list(main.params) + params, body, main.ret_ty, main.is_pure, tvm.ir.make_node("ir.DictAttrs", **attrs) if attrs else None)
        mod = tvm.IRModule({gv: (new if gv.name_hint == "main" else f) for gv, f in mod.functions_items()})
        return mod, arrays


def match_params(run, arrays, cands: dict) -> tuple[list[dict], dict]:
    """Each lifted constant as (layer, role) of the runner's regenerated arrays, or shipped if small."""
    buckets = {}
    for key, a in cands.items():
        buckets.setdefault((tuple(a.shape), str(a.dtype)), []).append((key, a))
    out, ship = [], {}
    for i, arr in enumerate(arrays):
        hit = None
        for key, a in buckets.get((tuple(arr.shape), str(arr.dtype)), []):
            if arr.dtype.kind in "iu":
                if np.array_equal(arr, a):
                    hit = key
                    break
            elif np.allclose(arr, a, rtol=1e-5, atol=1e-6 * max(float(np.abs(a).max(initial=0)), 1e-30)):
                hit = key
                break
        if hit is not None:
            out.append({"layer": hit[0], "role": hit[1], "fp": run.fingerprint(cands[hit])})
        elif arr.nbytes <= SHIP_CONST_MAX_BYTES:
            ship[f"c{i}"] = arr
            out.append({"npz": f"c{i}", "fp": run.fingerprint(arr)})
        else:
            raise RuntimeError(f"a {arr.shape} {arr.dtype} constant of the model is none of the regenerated arrays")
    return out, ship


def build_model_group(run, target, arch, model, mm, net, sparsity, batch, sparse, threshold, kit, name) -> dict:
    import tvm
    from tvm.relax.backend.cuda import pipeline as cuda_backend
    from tvm.relax.frontend.torch import from_exported_program

    import unsparse_tvm.models as pm
    from unsparse_tvm.cuda_package import embed_device_code
    from unsparse_tvm.relay_passes import build_pipeline

    ep = pm.export(net, (batch, *mm["input_shape"][1:]))
    mod = from_exported_program(ep)
    report: list = []
    mod = build_pipeline(target, threshold=threshold, sparse=sparse, report=report, stop_after="schedule")(mod)
    mod, arrays = _Lift.run(mod)
    lower = tvm.transform.Sequential(cuda_backend.dataflow_lower_passes(target) + cuda_backend.finalize_passes(target))
    with target:
        ex = tvm.compile(mod, target=target, relax_pipeline=lower)
    embed_device_code(ex, arch)
    params, ship = match_params(run, arrays, run.model_param_candidates(mm, net, batch, packed=sparse))
    rel = f"kernels/{name}.so.xz"
    with tempfile.TemporaryDirectory() as tmp:
        so = os.path.join(tmp, "m.so")
        ex.export_library(so)
        raw = os.path.getsize(so)
        write_xz(so, os.path.join(kit, rel))
    g = {"kind": "model", "name": name, "model": model, "variant": "unsparse" if sparse else "tvm_dense",
         "sparsity": sparsity, "batch": batch, "threshold": threshold if sparse else None, "file": rel, "so_bytes": raw,
         "params": params, "sparse_layers": sum(getattr(r, "decision", "") == "sparse" for r in report)}
    if ship:
        g["npz"] = f"kernels/{name}.npz"
        np.savez_compressed(os.path.join(kit, g["npz"]), **ship)
    return g


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
    b.add_argument("--jobs", type=int, default=max(1, min(os.cpu_count() or 1, 4)))
    b.add_argument("--max-mib", type=float, default=64.0)
    b.add_argument("--cache", default="~/.cache/unsparse-gpukit")
    b.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    build(a.dir, a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
