"""Pruning for a speed target against uniform pruning, on digits (smallcnn): accuracy at the same measured
speedup. For each target, `prune --speedup T --dataset digits --epochs N` (the cost model chooses each
layer's sparsity, the accuracy proxy is the sensitivity scan); for uniform unstructured pruning, `prune
--sparsity S --dataset digits --epochs N` over a grid of S, each timed against the dense model the same way
(alternating rounds, one thread); the uniform accuracy at the targeted model's measured speedup is read off
the uniform curve (linear between grid points).

    python benchmarks/speed_target_digits.py -o benchmarks/results/speed-target-digits.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

TARGETS = (2.0, 3.0, 5.0)
UNIFORM = (0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99)


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unsparse_tvm.cli", *map(str, args)], capture_output=True, text=True)


def _speedup(pt2: str, dense: str, threads: int) -> float:
    """Measured speedup of a pruned .pt2 over the dense one (both compiled, alternating rounds)."""
    import torch

    import unsparse_tvm
    from unsparse_tvm.timing import round_robin, set_threads

    models = {name: unsparse_tvm.compile(path) for name, path in (("sparse", pt2), ("dense", dense))}
    set_threads(threads)
    x = torch.randn(*models["dense"].inputs[0]["shape"]).numpy()
    timers = {name: (lambda n, m=m: m.benchmark(x, number=n, repeat=1)["median_ms"]) for name, m in models.items()}
    t = round_robin(timers, 15)
    return t["dense"] / t["sparse"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="speed-digits-")
    dense = os.path.join(work, "dense.pt2")
    _cli("train", "smallcnn", "--dataset", "digits", "--epochs", 40, "-o", dense).check_returncode()
    rows = {"uniform": [], "targeted": []}
    for s in UNIFORM:
        out, rep = os.path.join(work, f"u{s}.pt2"), os.path.join(work, f"u{s}.json")
        _cli("prune", dense, "--sparsity", s, "--dataset", "digits", "--epochs", args.epochs, "-o", out,
             "--report", rep).check_returncode()
        acc = json.load(open(rep))["accuracy_after"]
        rows["uniform"].append({"sparsity": s, "accuracy": acc, "speedup": _speedup(out, dense, args.threads)})
        print(rows["uniform"][-1], flush=True)
    for t in TARGETS:
        out, rep = os.path.join(work, f"t{t}.pt2"), os.path.join(work, f"t{t}.json")
        proc = _cli("prune", dense, "--speedup", t, "--threads", args.threads, "--dataset", "digits",
                    "--epochs", args.epochs, "-o", out, "--report", rep)
        if proc.returncode != 0:
            rows["targeted"].append({"target": t, "refused": proc.stderr.strip()})
            print(rows["targeted"][-1], flush=True)
            continue
        report = json.load(open(rep))
        measured = _speedup(out, dense, args.threads)
        curve = sorted(rows["uniform"], key=lambda r: r["speedup"])
        uniform_acc = _interp(curve, measured)
        rows["targeted"].append({"target": t, "accuracy": report["accuracy_after"], "speedup": measured,
                                 "speedup_in_prune": report["speed"]["achieved"], "uniform_accuracy_at_speedup":
                                 uniform_acc, "layers": report["speed"]["layers"]})
        print({k: v for k, v in rows["targeted"][-1].items() if k != "layers"}, flush=True)
    json.dump(rows, open(args.output, "w"), indent=1)


def _interp(curve: list[dict], speedup: float) -> float | None:
    for a, b in zip(curve, curve[1:]):
        if a["speedup"] <= speedup <= b["speedup"]:
            f = (speedup - a["speedup"]) / max(b["speedup"] - a["speedup"], 1e-9)
            return a["accuracy"] + f * (b["accuracy"] - a["accuracy"])
    return None  # outside the uniform grid's range


if __name__ == "__main__":
    main()
