"""The kit's compiled modules: per layer, the sparse operator's PrimFunc scheduled at each knob point and
built for sm_90 (many kernels per module, one nvcc call); per model, the whole Relax VM module with its
weight constants lifted into parameters, each matched to the runner's regenerated arrays."""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time

import numpy as np

from .knobs import config_class, knob_grid, rule_module
from .scaffold import write_xz

SHIP_CONST_MAX_BYTES = 64 * 1024  # unrecognised whole-model constants up to this size travel in an .npz
TIMES = {"lower": 0.0, "nvcc": 0.0}  # per worker process: where a task's time went


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

    from unsparse_tvm.single_layer import layer_module
    from unsparse_tvm.relay_passes import build_pipeline

    mod = build_pipeline(target, threshold=0.0, stop_after="legalize")(layer_module(spec))
    funcs = [(gv, f) for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)
             and f.attrs is not None and "unsparse.op" in f.attrs]
    # the sparse operator's call (a pointwise conv's input view is a reshape call of its own before it)
    calls = [c for c in _call_tir(mod["main"]) if funcs and c.args[0].same_as(funcs[0][0])]
    if len(funcs) != 1 or len(calls) != 1:
        raise RuntimeError(f"expected one sparse operator in the layer module, got {len(funcs)} / {len(calls)} calls")
    consts = []
    for a in calls[0].args[1]:
        consts.append(a.value.numpy() if isinstance(a, tvm.ir.GenericConst) else None)
    out_shape = [int(v) for v in calls[0].ty.shape.values]
    return funcs[0][1], consts, out_shape


def schedule_variant(func, op: str, target, knobs: dict):
    rule = rule_module(op)
    sch = rule.with_config(rule.Config(**knobs)).apply(func, target)
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

    from unsparse_tvm.single_layer import LayerSpec

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
                     "args": roles, "x_shape": [int(d) for d in base.params[0].ty.shape],  # 2-D: a flat view
                     "shapes": {r: list(packed["arrays"][r].shape) for r in roles[1:]},
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

    ep = pm.export_program(net, (batch, *mm["input_shape"][1:]))
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
