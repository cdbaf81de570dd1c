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


def plot(result: dict, out: str) -> None:
    layers = result["layers"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [4, 1]})
    names = [f"{l['name']}\n{'x'.join(map(str, l['shape'][:2]))} {l['format']}" for l in layers]
    x = np.arange(len(layers))
    for i, (key, label) in enumerate([("unsparse_ms", "unsparse (sparse)"), ("tvm_dense_ms", "TVM dense"),
                                      ("torch_ms", "PyTorch eager")]):
        ax.bar(x + (i - 1) * 0.27, [l[key] for l in layers], 0.27, label=label)
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("ms per call (median)")
    ax.set_yscale("log")
    ax.set_title(f"{result['model']} per layer, sparsity {result['sparsity']}, {result['target']}, "
                 f"batch {result['batch']}")
    ax.legend(fontsize=8)
    e = result["end_to_end"]
    keys = [("unsparse_ms", "unsparse"), ("tvm_dense_ms", "TVM dense"), ("torch_ms", "PyTorch")]
    ax2.bar([k[1] for k in keys], [e[k[0]] for k in keys], color=["C0", "C1", "C2"])
    ax2.set_title(f"end to end: {e['torch_ms'] / e['unsparse_ms']:.2f}x vs PyTorch")
    ax2.set_ylabel("ms per inference")
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
