"""Speed by pruning pattern and sparsity: one `bench --peers` run per (pattern, sparsity), as a user would
run them, JSON per run and a Markdown table (ms, and the speedup over the faster of ONNX Runtime and
OpenVINO) on stdout.

    python benchmarks/pattern_sweep.py resnet18 -o benchmarks/results/resnet18-patterns \
        [--sparsities 0.8,0.9,0.95] [--patterns unstructured,vector,block,mixed] [--threads 1] [--wrap PREFIX]

Each run: `prune MODEL --method M --sparsity S -o p.pt2` (one-shot), then
`bench p.pt2 --peers onnxruntime,openvino --threads T --no-layers --repeat R --json DIR/M-sS.json`.
--wrap PREFIX runs each bench under a command prefix (e.g. one that keeps other jobs off the CPU while
it times); existing JSON files are kept, not re-run, so an interrupted sweep resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile

PATTERNS = {  # name -> (label, prune arguments)
    "unstructured": ("unstructured", ["--method", "unstructured"]),
    "vector": ("vector-4", ["--method", "vector", "--vector-size", "4"]),
    "block": ("block 4x4", ["--method", "block", "--block-size", "4"]),
    "mixed": ("mixed (vector-4 AND block-8)", ["--method", "mixed"]),
}


def _cli(args: list[str], wrap: str | None = None) -> None:
    cmd = [sys.executable, "-m", "unsparse_tvm.cli", *args]
    if wrap:
        cmd = [*shlex.split(wrap), *cmd]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def _ratio(r: dict, threads: str) -> tuple[float, float, str]:
    """(our ms, fastest peer's ms, its name) of one thread count."""
    t = r["by_threads"][threads]
    peers = {k: t[f"{k}_ms"] for k in ("onnxruntime", "openvino")}
    best = min(peers, key=peers.get)
    return t["unsparse_ms"], peers[best], best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("-o", "--output", required=True, help="folder for the JSON files")
    ap.add_argument("--sparsities", default="0.8,0.9,0.95")
    ap.add_argument("--patterns", default=",".join(PATTERNS))
    ap.add_argument("--threads", default="1")
    ap.add_argument("--repeat", default="10")
    ap.add_argument("--wrap", default=None, help="command prefix for each bench run")
    args = ap.parse_args()
    sparsities = [float(s) for s in args.sparsities.split(",")]
    patterns = args.patterns.split(",")
    os.makedirs(args.output, exist_ok=True)
    for p in patterns:
        for s in sparsities:
            out = os.path.join(args.output, f"{p}-s{s}.json")
            if os.path.exists(out):
                continue
            with tempfile.TemporaryDirectory() as tmp:
                pt2 = os.path.join(tmp, "p.pt2")
                prune = ["prune", args.model, *PATTERNS[p][1], "--sparsity", str(s), "-o", pt2]
                _cli(prune)
                bench = ["bench", pt2, "--peers", "onnxruntime,openvino", "--threads", args.threads, "--no-layers",
                         "--repeat", args.repeat, "--json", os.path.join(tmp, "b.json")]
                _cli(bench, args.wrap)
                r = json.load(open(os.path.join(tmp, "b.json")))
            shown = ["bench", "p.pt2", *bench[2:-2]]  # the temporary folder's name means nothing later
            r["pruning"] = f"{p}: unsparse-tvm {' '.join(prune[:-1])} p.pt2; {' '.join(shown)}"
            with open(out + ".tmp", "w") as f:
                json.dump(r, f, indent=1)
            os.replace(out + ".tmp", out)
            print(f"{p} {s}: done", file=sys.stderr)
    threads = args.threads.split(",")[0]
    print(f"| sparsity | " + " | ".join(PATTERNS[p][0] for p in patterns) + " | ONNX Runtime | OpenVINO |")
    print("|---|" + "---|" * (len(patterns) + 2))
    for s in sparsities:
        cells, ort, ov = [], [], []
        for p in patterns:
            r = json.load(open(os.path.join(args.output, f"{p}-s{s}.json")))
            ours, best, _ = _ratio(r, threads)
            cells.append(f"{ours:.2f} ({best / ours:.2f}x)")
            ort.append(r["by_threads"][threads]["onnxruntime_ms"])
            ov.append(r["by_threads"][threads]["openvino_ms"])
        print(f"| {int(s * 100)}% | " + " | ".join(cells) + f" | {min(ort):.2f}-{max(ort):.2f} | {min(ov):.2f}-{max(ov):.2f} |")


if __name__ == "__main__":
    main()
