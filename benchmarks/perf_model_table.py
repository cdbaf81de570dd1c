"""The performance model's predictions for every conv shape of VGG-16 and ResNet-50 (224x224) on an H200:
our sparse kernel (default knobs) against cuDNN FP32 / TF32 / FP16, batch 1 and 8.

  python benchmarks/perf_model_table.py [--json benchmarks/results/perf_model_h200.json] [--sparsity 0.9]

Prints a markdown table at one sparsity (docs/gpu.md's) and the sparsity at which ours is predicted to
overtake each cuDNN mode; the JSON holds every sparsity of the GPU kit's grid."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

import torch

from unsparse_tvm.ops.geometry import ConvGeometry
from unsparse_tvm.models import build_model
from unsparse_tvm.cost.gpu import H200, H200_FITTED, Knobs, layer_table

SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)


def conv_shapes(model: str, size: int = 224) -> Counter:
    """{(C, K, H, W, R, S, stride, pad, dilation): how many layers} of a built-in model."""
    net, seen = build_model(model).eval(), Counter()

    def hook(mod, inputs, _out):
        _, c, h, w = inputs[0].shape
        if mod.groups == 1:
            seen[(c, mod.out_channels, h, w, *mod.kernel_size, mod.stride, mod.padding, mod.dilation)] += 1

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        net(torch.zeros(1, 3, size, size))
    for h in handles:
        h.remove()
    return seen


def geometry(shape, batch: int) -> ConvGeometry:
    c, k, h, w, r, s, stride, pad, dil = shape
    return ConvGeometry(batch, c, h, w, k, r, s, tuple(stride), (pad[0], pad[1], pad[0], pad[1]), tuple(dil))


def name_of(model: str, shape, count: int) -> str:
    c, k, h, _w, r, s, stride, *_ = shape
    return f"{model} {r}x{s}{'/' + str(stride[0]) if stride[0] > 1 else ''} {c}->{k} @{h}" + (f" (x{count})" if count > 1 else "")


def overtake(rows: list[dict], mode: str) -> str:
    """Lowest sparsity of the grid from which ours is predicted faster (and stays faster), or '-'."""
    faster = [r["sparsity"] for r in rows if r[f"speedup_vs_{mode}"] >= 1.0]
    for sp in sorted(r["sparsity"] for r in rows):
        if all(s in faster for s in [r["sparsity"] for r in rows] if s >= sp):
            return f"{sp:.2f}"
    return "-"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write every prediction here")
    ap.add_argument("--sparsity", type=float, default=0.9, help="the sparsity of the printed table")
    ap.add_argument("--gpu", choices=("fitted", "built-in"), default="fitted",
                    help="the constants: fitted to the GPU kit's measurements (cost.gpu.H200_FITTED) or the datasheet's")
    args = ap.parse_args(argv)
    gpu = H200_FITTED if args.gpu == "fitted" else H200
    everything = []
    print("| layer | batch | ours (us) | bound | vector-4 (us) | cuDNN FP32 | TF32 | FP16 | vs FP32 | vs TF32 | "
          "vs FP16 | vector-4 vs FP32 | overtakes FP32 / TF32 / FP16 at |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model in ("vgg16", "resnet50"):
        for shape, count in conv_shapes(model).items():
            for batch in (1, 8):
                name = name_of(model, shape, count)
                rows = layer_table([(name, geometry(shape, batch))], SPARSITIES, Knobs(), gpu)
                for r in rows:
                    r["count"] = count
                everything += rows
                r = min(rows, key=lambda r: abs(r["sparsity"] - args.sparsity))
                us = {key: r[key] * 1e6 for key in ("ours_s", "ours_vector4_s", "cudnn_fp32_s", "cudnn_tf32_s",
                                                    "cudnn_fp16_s")}
                print(f"| {name} | {batch} | {us['ours_s']:.1f} | {r['ours_bound']} | {us['ours_vector4_s']:.1f} | "
                      f"{us['cudnn_fp32_s']:.1f} | {us['cudnn_tf32_s']:.1f} | {us['cudnn_fp16_s']:.1f} | "
                      f"{r['speedup_vs_fp32']:.2f}x | {r['speedup_vs_tf32']:.2f}x | {r['speedup_vs_fp16']:.2f}x | "
                      f"{r['cudnn_fp32_s'] / r['ours_vector4_s']:.2f}x | "
                      f"{overtake(rows, 'fp32')} / {overtake(rows, 'tf32')} / {overtake(rows, 'fp16')} |")
    for model in ("vgg16", "resnet50"):
        for batch in (1, 8):
            for sp in (args.sparsity,):
                sel = [r for r in everything if r["layer"].startswith(model) and r["batch"] == batch
                       and abs(r["sparsity"] - sp) < 1e-9]
                total = {key: sum(r[key] * r["count"] for r in sel) * 1e3
                         for key in ("ours_s", "ours_vector4_s", "cudnn_fp32_s", "cudnn_tf32_s", "cudnn_fp16_s")}
                print(f"{model} batch {batch} at {sp:.0%}, all convs (ms): ours {total['ours_s']:.3f}, vector-4 "
                      f"{total['ours_vector4_s']:.3f}, cuDNN FP32 {total['cudnn_fp32_s']:.3f} / TF32 "
                      f"{total['cudnn_tf32_s']:.3f} / FP16 {total['cudnn_fp16_s']:.3f}")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"model": "unsparse_tvm.cost.gpu", "gpu": gpu.__dict__, "knobs": Knobs().__dict__,
                       "rows": everything}, f, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
