"""Accuracy of each pruning pattern on digits (smallcnn), at several sparsities: the accuracy side of the
pattern x sparsity speed tables (what the structure costs in accuracy).

    python benchmarks/digits_patterns.py -o benchmarks/results/digits-patterns.json [--epochs 60]

Runs the CLI as a user would: `train smallcnn --dataset digits` once (the dense baseline), then for every
(pattern, sparsity) `prune BASELINE --method M --sparsity S --dataset digits --epochs N --report R`, and
collects each report's test accuracy into one JSON file (and a Markdown table on stdout).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

# (label, prune arguments): the four patterns of the speed tables
PATTERNS = [
    ("unstructured", ["--method", "unstructured"]),
    ("vector-4", ["--method", "vector", "--vector-size", "4"]),
    ("block 4x4", ["--method", "block", "--block-size", "4"]),
    ("mixed (vector-4 AND block-8)", ["--method", "mixed"]),
]
SPARSITIES = (0.8, 0.9, 0.95)


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "unsparse_tvm.cli", *args], check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", required=True, help="JSON file to write")
    ap.add_argument("--epochs", type=int, default=60, help="fine-tuning epochs per prune (as in docs/pruning.md)")
    ap.add_argument("--train-epochs", type=int, default=40, help="epochs of the dense baseline")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dense = os.path.join(tmp, "dense.pt2")
        _cli("train", "smallcnn", "--dataset", "digits", "--epochs", str(args.train_epochs), "-o", dense)
        dense_acc = None
        for label, method in PATTERNS:
            for s in SPARSITIES:
                rep = os.path.join(tmp, "r.json")
                _cli("prune", dense, "--sparsity", str(s), *method, "--dataset", "digits", "--epochs",
                     str(args.epochs), "-o", os.path.join(tmp, "p.pt2"), "--report", rep, "--force")
                r = json.load(open(rep))
                dense_acc = r["accuracy_before"]  # the baseline, measured again by every prune
                rows.append({"pattern": label, "sparsity": s, "args": method, "accuracy": r["accuracy_after"],
                             "achieved_sparsity": r.get("sparsity")})
                print(f"{label:30s} {s:.2f}  {r['accuracy_after']:.2f}%", file=sys.stderr)
    out = {"model": "smallcnn", "dataset": "digits", "epochs": args.epochs,
           "dense_accuracy": dense_acc, "runs": rows}
    with open(args.output, "w") as f:
        json.dump(out, f, indent=1)
    print("| pattern | " + " | ".join(f"{int(s * 100)}%" for s in SPARSITIES) + " |")
    print("|---|" + "---|" * len(SPARSITIES))
    for label, _ in PATTERNS:
        accs = [f"{r['accuracy']:.2f}%" for r in rows if r["pattern"] == label]
        print(f"| {label} | " + " | ".join(accs) + " |")


if __name__ == "__main__":
    main()
