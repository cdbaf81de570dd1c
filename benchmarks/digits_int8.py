"""Accuracy of int8 execution against the fp32 pruned model, per pruning pattern, on digits (smallcnn).

Issue 25's accuracy check, through the public API as a user would run it: one dense baseline
(`train`), then per pattern `prune(..., data="digits", epochs=N)` to the sparsity, the fp32 pruned model
compiled and evaluated, then `quantize(..., activations="int8", calibration_data="digits")` compiled and
evaluated: its layers run our int8 x int8 kernels (the report's format int8q4), so the accuracy is that of
the int8 arithmetic the deployed module does, not of a fake-quantised PyTorch model.

    python benchmarks/digits_int8.py -o benchmarks/results/digits-int8.json [--sparsity 0.9] [--epochs 60]
"""

from __future__ import annotations

import argparse
import copy
import json

# (label, prune keywords): the patterns of the speed tables, and channel4 (the int8 kernels' quads)
PATTERNS = [
    ("unstructured", {"method": "unstructured"}),
    ("vector-4", {"method": "vector", "vector_size": 4}),
    ("block 4x4", {"method": "block", "block_size": 4}),
    ("channel4", {"method": "channel4"}),
]


def measure(sparsity: float, epochs: int, train_epochs: int) -> list[dict]:
    import torch

    import unsparse_tvm as ut
    from unsparse_tvm.models import build_model

    x = torch.zeros(1, 1, 8, 8)  # [N, C, H, W]: smallcnn's digits input
    base = ut.train(build_model("smallcnn"), "digits", epochs=train_epochs)
    dense = ut.evaluate(base, "digits")
    rows = []
    for label, kw in PATTERNS:
        pruned = ut.prune(copy.deepcopy(base), sparsity, data="digits", epochs=epochs, **kw).eval()
        fp32 = ut.evaluate(ut.compile(pruned, example_input=x), "digits")
        quant = ut.quantize(copy.deepcopy(pruned), activations="int8", calibration_data="digits", example_input=x)
        compiled = ut.compile(quant, example_input=x)
        int8_layers = [r["name"] for r in compiled.report if str(r.get("format", "")).startswith("int8")]
        rows.append({"pattern": label, "sparsity": sparsity, "dense_accuracy": dense, "fp32_pruned_accuracy": fp32,
                     "int8_accuracy": ut.evaluate(compiled, "digits"), "int8_layers": int8_layers,
                     "layers": len(compiled.report)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", required=True, help="JSON file to write")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--epochs", type=int, default=60, help="fine-tuning epochs per prune (as in docs/pruning.md)")
    ap.add_argument("--train-epochs", type=int, default=40, help="epochs of the dense baseline")
    args = ap.parse_args()
    rows = measure(args.sparsity, args.epochs, args.train_epochs)
    print("| pattern | sparsity | fp32 pruned | int8 execution | difference | layers run int8 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['pattern']} | {r['sparsity']:g} | {r['fp32_pruned_accuracy']:.2f}% | {r['int8_accuracy']:.2f}% | "
              f"{r['int8_accuracy'] - r['fp32_pruned_accuracy']:+.2f} | {len(r['int8_layers'])} of {r['layers']} |")
    with open(args.output, "w") as f:
        json.dump({"dense_accuracy": rows[0]["dense_accuracy"], "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
