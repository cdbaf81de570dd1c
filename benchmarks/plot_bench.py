"""Plot a `unsparse-tvm bench --json` result: per-layer times of the sparse kernels, TVM's dense code and
PyTorch, and the end-to-end speedups.

    python benchmarks/plot_bench.py benchmarks/results/vgg16-cifar-llvm.json -o vgg16-cifar-llvm.png
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt
import numpy as np


LABELS = {"unsparse_ms": "unsparse", "unsparse_tuned_ms": "unsparse tuned", "tvm_dense_ms": "TVM dense",
          "torch_ms": "PyTorch", "torch_compile_ms": "torch.compile", "onnxruntime_ms": "ONNX Runtime",
          "openvino_ms": "OpenVINO"}


def plot(result: dict, out: str) -> None:
    layers = result["layers"]
    by_threads = result.get("by_threads") or {"all": result["end_to_end"]}
    if layers:
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 4.8), gridspec_kw={"width_ratios": [3, 2]})
        names = [f"{l['name']}\n{'x'.join(map(str, l['shape'][:2]))} {l['format']}" for l in layers]
        x = np.arange(len(layers))
        for i, (key, label) in enumerate([("unsparse_ms", "unsparse (sparse)"), ("tvm_dense_ms", "TVM dense"),
                                          ("torch_ms", "PyTorch eager")]):
            ax.bar(x + (i - 1) * 0.27, [l[key] for l in layers], 0.27, label=label)
        ax.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("ms per call (median)")
        ax.set_yscale("log")
        pruning = result.get("pruning", "").split(":")[0]
        ax.set_title(f"{result['model']} per layer, sparsity {result['sparsity']} {pruning}, {result['target']}, "
                     f"batch {result['batch']}", fontsize=10)
        ax.legend(fontsize=8)
    else:
        fig, ax2 = plt.subplots(figsize=(7, 4.5))
    # end to end: every contender, one group of bars per thread count
    keys = [k for k in LABELS if all(k in e for e in by_threads.values())]
    width = 0.8 / len(by_threads)
    for i, (n, e) in enumerate(by_threads.items()):
        ax2.bar(np.arange(len(keys)) + (i - (len(by_threads) - 1) / 2) * width, [e[k] for k in keys], width,
                label=f"{n} thread{'s' if n != '1' else ''}")
    ax2.set_xticks(np.arange(len(keys)), [LABELS[k] for k in keys], rotation=30, ha="right", fontsize=8)
    ax2.set_ylabel("ms per inference (median)")
    ax2.set_title(f"{result['model']} end to end (lower is better)", fontsize=9)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json")
    p.add_argument("-o", "--output", required=True)
    args = p.parse_args()
    with open(args.json) as f:
        plot(json.load(f), args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
