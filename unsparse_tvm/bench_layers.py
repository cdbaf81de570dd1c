"""`bench`'s per-layer table: each conv/linear layer compiled alone as the model's compile would (its own
decision), timed against TVM's dense kernel, PyTorch, and the kernel the compile did not choose, so every
row says whether the choice was right and how far the layer is from the dense rate."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .cuda_package import building_for
from .parallel_build import compile_module
from .reference import rel_error
from .relay_passes import build_pipeline
from .single_layer import LayerSpec, extract_layers, layer_flops, layer_module
from .timing import call_timer, round_robin, vm_timer


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
        sparse = compile_layer(mod, target, threshold, True, names, layer_report, quant, rates)
        decision = layer_report[0]
        chose_sparse = decision.decision == "sparse"
        dense = compile_layer(mod, target, threshold, False)
        contenders = {}
        contenders["unsparse"], y = vm_timer(sparse, dev, x_np, gpu, arch)
        contenders["tvm_dense"], _ = vm_timer(dense, dev, x_np, gpu, arch)
        if not chose_sparse and decision.dense_us:  # costed and chosen dense: the sparse kernel it passed over
            forced = compile_layer(mod, target, 0.0, True, names, [], quant)
            contenders["sparse_not_chosen"], _ = vm_timer(forced, dev, x_np, gpu, arch)
        run = torch_layer(spec, torch_dev)
        xt = torch.from_numpy(x_np).to(torch_dev)
        sync = torch.cuda.synchronize if torch_dev == "cuda" else None
        with torch.no_grad():
            ref = run(xt).cpu().numpy()
        contenders["torch"] = call_timer(lambda: run(xt), sync)
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


def compile_layer(mod, target, threshold, sparse, names=None, report=None, quant=None, rates=None):
    pipeline = build_pipeline(target, threshold=threshold, sparse=sparse, names=names, report=report, quant=quant,
                              rates=rates)
    with building_for(target):
        return compile_module(mod, target, pipeline)  # each kernel for its kernel_target, as compile does
