"""The layers `calibrate` times, and the fit of layer_cost.X86Rates to their times.

Each layer is compiled exactly as `compile` would compile it (single_layer.layer_module through
relay_passes.build_pipeline: our dense direct-conv rule, or the sparse rules in the named format), with
seeded weights, and timed by TVM's time_evaluator at the calibrated thread count. The model the rates
feed (layer_cost.conv_cost) is linear in the inverse rates:

    t = FMAs / rate(kernel) + passes * outputs / output_rate      (floored at passes * 4 * outputs / DRAM)

so the fit is: the per-call cost from a layer of almost no work, taken off every layer; the output rate
from three ell layers of different FMA/output balance (least squares); then each kernel's rate from its
layer with the output term taken off (ell's and the dense conv's from a 3x3, the dense pointwise rate from a
1x1), DRAM from an output larger than any cache, the linear kernels from one GEMV each. (Until format 3 the
ell rate came out of that least squares too, where a 1x1 at 97% that runs twice the 3x3s' FMA rate pulled it
up, and the dense rate was the harmonic mean of a 3x3 and a small 1x1: on the Xeon ell looked faster per FMA
than the dense 3x3 (79 against 74 G/s, where vgg16-cifar's layers measure 40-60 against 110), and at 50%
every vgg16-cifar layer went sparse, 0.80x TVM dense end to end.)
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..ops.geometry import ConvGeometry
from .model import BUILTIN, X86Rates
from ..single_layer import LayerSpec, layer_module

# name: (kernel (dense or a sparse format), [N, C, H, W] or [N, in], weight shape, sparsity, padding, pattern)
LAYERS = {
    "dense_3x3":  ("dense", (1, 64, 16, 16), (64, 64, 3, 3), 0.0, 1, None),
    "dense_1x1":  ("dense", (1, 256, 28, 28), (128, 256, 1, 1), 0.0, 0, None),   # resnet50's middle: 0.8 MB in
    "ell_3x3":    ("ell", (1, 128, 16, 16), (128, 128, 3, 3), 0.9, 1, None),
    "ell_1x1":    ("ell", (1, 256, 32, 32), (64, 256, 1, 1), 0.97, 0, None),     # flat epilogue, output-heavy
    "ell_out":    ("ell", (1, 32, 30, 30), (64, 32, 3, 3), 0.97, 1, None),       # unfused epilogue (30 wide: no row
                                                                                  # domain), output-heavy
    "hyb_3x3":    ("hyb", (1, 128, 16, 16), (128, 128, 3, 3), 0.9, 1, "long_rows"),
    "vell_3x3":   ("vell4", (1, 128, 16, 16), (128, 128, 3, 3), 0.9, 1, "vector4"),
    "dram":       ("ell", (1, 3, 256, 256), (32, 3, 3, 3), 0.9, 1, None),        # 8 MB of output
    "call":       ("ell", (1, 8, 8, 8), (8, 8, 1, 1), 0.5, 0, None),             # almost no work: the per-call cost
    "dense_linear": ("dense", (1, 1024), (1024, 1024), 0.0, 0, None),
    "sparse_linear": ("ell", (1, 1024), (1024, 1024), 0.9, 0, None),
}


def _weight(shape, sparsity: float, pattern: str | None, rng: np.random.Generator) -> np.ndarray:
    w = rng.standard_normal(shape).astype(np.float32)
    if pattern == "vector4":  # 4 output channels share their zeros: what prune --method vector makes
        keep = rng.random((shape[0] // 4, 1, *shape[1:])) >= sparsity
        return w * np.repeat(keep, 4, axis=0).reshape(shape)
    w[rng.random(shape) < sparsity] = 0.0
    if pattern == "long_rows":  # a few rows five times as long: what makes the pass pick hyb
        w[: shape[0] // 16] = rng.standard_normal((shape[0] // 16, *shape[1:])) * (rng.random((shape[0] // 16, *shape[1:])) < 0.5)
    return w


def _spec(kind, x_shape, w_shape, sparsity, pad, pattern, rng) -> LayerSpec:
    w = _weight(w_shape, sparsity, pattern, rng)
    if len(w_shape) == 2:
        return LayerSpec("dense", x_shape, w, None, False, {})
    return LayerSpec("conv2d", x_shape, w, rng.standard_normal(w_shape[0]).astype(np.float32), True,
                     {"strides": [1, 1], "padding": [pad] * 4, "dilation": [1, 1], "groups": 1})


def measure_layers(target, threads: int, *, log=print) -> list[dict]:
    """Compile and time every LAYERS entry at `threads`; per layer its model terms and seconds."""
    import tvm
    from tvm import relax

    from ..parallel_build import compile_module
    from ..relay_passes import build_pipeline

    tvm.get_global_func("runtime.config_threadpool")(1, threads)
    rng = np.random.default_rng(20261203)
    out = []
    for i, (name, (kind, x_shape, w_shape, sparsity, pad, pattern)) in enumerate(LAYERS.items()):
        spec = _spec(kind, x_shape, w_shape, sparsity, pad, pattern, rng)
        report: list = []
        pipeline = build_pipeline(target, threshold=0.0, sparse=kind != "dense", fmt=None if kind == "dense" else kind,
                                  report=report)
        ex = compile_module(layer_module(spec), target, pipeline)
        vm = relax.VirtualMachine(ex, tvm.cpu())
        x = tvm.runtime.tensor(np.random.default_rng(0).standard_normal(x_shape).astype(np.float32))
        vm["main"](x)
        timer = vm.time_evaluator("main", tvm.cpu(), number=1, repeat=7, min_repeat_ms=40)
        seconds = float(np.median(timer(x).results))
        row = {"layer": name, "kernel": kind, **_terms(spec, report[0] if report else None, kind, target),
               "seconds": seconds}
        out.append(row)
        log(f"  [{i + 1}/{len(LAYERS)}] {name:14s} {seconds * 1e3:8.3f} ms")
    return out


def _terms(spec: LayerSpec, decision, kind: str, target) -> dict:
    """The model's work terms of one layer (cost.model.conv_cost's, per unit inverse rate): a sparse kernel at
    its own flat domain (relay_passes.sparsify_conv2d.kernel_geometry), the dense one at the padded plane."""
    from ..relay_passes.pipeline import cost_model
    from ..relay_passes.sparsify_conv2d import kernel_geometry
    from .model import output_passes

    if spec.op == "dense":
        entries = decision.padded if kind != "dense" else int(np.prod(spec.weight.shape))
        return {"fmas": spec.input_shape[0] * entries, "outputs": 0, "passes": 0}
    n, c, h, w = spec.input_shape
    k, _, r, s = spec.weight.shape
    geo = ConvGeometry(n, c, h, w, k, r, s, (1, 1), tuple(spec.attrs["padding"]), (1, 1))
    if kind != "dense":
        geo = kernel_geometry(geo, cost_model(target))
    entries = k * c * r * s if kind == "dense" else decision.padded
    fmt = "dense" if kind == "dense" else decision.format
    return {"fmas": entries * geo.batch * geo.q_extent, "outputs": geo.batch * k * geo.q_extent,
            "passes": output_passes(geo, fmt)}


def fit_rates(rows: list[dict]) -> tuple[X86Rates, list[dict]]:
    """X86Rates from measure_layers' rows (see the module docstring), and each row's fitted prediction."""
    # every call costs the VM's call and the thread pool's fork and join, whatever it computes (on the Xeon
    # 1.2-1.4 us on two threads, small there; more where a pool wakes slowly): the same for a layer's dense
    # and sparse kernels, so no choice depends on it, but left in, it counts as FMAs or outputs of the
    # smallest layers. Taken off every layer first.
    call = next(r["seconds"] for r in rows if r["layer"] == "call")
    work = [{**r, "seconds": max(r["seconds"] - call, 0.25 * r["seconds"])} for r in rows]
    by = {r["layer"]: r for r in work}
    out_work = lambda r: r["passes"] * r["outputs"]
    # the output rate: least squares over three ell layers of different FMA/output balance (rows [fmas,
    # passes*outputs] / t, so each counts by its relative error); the ell rate then from the 3x3 alone, like
    # every other kernel's (the 1x1 at 97%, whose 1024-position rows run twice the 3x3s' FMA rate, would
    # pull it above what the 3x3s run)
    ells = [by[n] for n in ("ell_3x3", "ell_1x1", "ell_out")]
    a = np.array([[r["fmas"], out_work(r)] for r in ells], float) / np.array([[r["seconds"]] for r in ells])
    inv_out = max(np.linalg.lstsq(a, np.ones(len(ells)), rcond=None)[0][1], 0.0)

    def kernel_rate(r: dict) -> float:
        """FMAs over the time left once the output passes are taken off (at least a quarter of it)."""
        left = max(r["seconds"] - out_work(r) * inv_out, 0.25 * r["seconds"])
        return r["fmas"] / left

    dram_row = by["dram"]
    rates = dataclasses.replace(
        BUILTIN, ell=kernel_rate(by["ell_3x3"]), output=1.0 / inv_out if inv_out > 0 else BUILTIN.output,
        hyb=kernel_rate(by["hyb_3x3"]), vell=kernel_rate(by["vell_3x3"]),
        dense_conv=kernel_rate(by["dense_3x3"]), dense_pointwise=kernel_rate(by["dense_1x1"]),
        dram_bytes_s=4 * out_work(dram_row) / dram_row["seconds"],
        dense_linear=by["dense_linear"]["fmas"] / by["dense_linear"]["seconds"],
        sparse_linear=by["sparse_linear"]["fmas"] / by["sparse_linear"]["seconds"], source="calibrated")
    # the "call" layer is the per-call cost by definition (its own few FMAs are in it)
    return rates, [{**r, "predicted_seconds": call + (r["layer"] != "call") * _predicted(r, rates)} for r in rows]


def _predicted(r: dict, rates: X86Rates) -> float:
    """A calibration layer's time under `rates` without the per-call cost (cost.model.conv_cost's terms)."""
    if r["passes"] == 0:
        return r["fmas"] / (rates.dense_linear if r["kernel"] == "dense" else rates.sparse_linear)
    if r["kernel"] == "dense":
        rate = rates.dense_pointwise if r["layer"] == "dense_1x1" else rates.dense_conv
    else:
        rate = rates.fma_rate(r["kernel"])
    predicted = r["fmas"] / rate + r["passes"] * r["outputs"] / rates.output
    if 4 * r["outputs"] > rates.cache_bytes:
        predicted = max(predicted, 4 * r["passes"] * r["outputs"] / rates.dram_bytes_s)
    return predicted
