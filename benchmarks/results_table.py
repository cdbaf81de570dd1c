"""The markdown table of `bench --json` files: one row per file and thread count, ms per inference for every
contender the run timed ("unsparse" of a quantised model: its weight-quantised kernels, fp32
arithmetic; "unsparse fp32": the same zeros with fp32 weights; "unsparse int8": int8 execution), and ours against the fastest peer of the same precision (fp32 runtimes for an
fp32 model, int8 runtimes for an int8 one), as the README and docs/results.md print them, and where the run kept
its rounds (bench since 2026-12-06) the same comparison round by round: the median and middle half of the
per-round ratios (timing.paired_ratio).

    python benchmarks/results_table.py benchmarks/results/2026-12-03-xeon/*.json
"""

from __future__ import annotations

import argparse
import json
import os

from unsparse_tvm.peers import fastest_peer

COLUMNS = [  # (key in by_threads, heading)
    ("unsparse_ms", "unsparse"), ("unsparse_fp32_ms", "unsparse fp32"), ("unsparse_int8_ms", "unsparse int8"),
    ("unsparse_torch_compile_ms", "unsparse via torch.compile"),
    ("onnxruntime_ms", "ONNX Runtime"), ("openvino_ms", "OpenVINO"), ("deepsparse_ms", "DeepSparse"),
    ("onnxruntime_int8_ms", "ONNX Runtime int8"), ("openvino_int8_ms", "OpenVINO int8"),
    ("deepsparse_int8_ms", "DeepSparse int8"),
    ("torch_compile_ms", "torch.compile"), ("torch_ms", "PyTorch"), ("tvm_dense_ms", "TVM dense"),
]


def rows(paths: list[str]) -> tuple[list[str], list[list[str]]]:
    runs = [(os.path.basename(p).removesuffix(".json"), json.load(open(p))) for p in paths]
    keys = [k for k, _ in COLUMNS if any(k in t for _, d in runs for t in d["by_threads"].values())]
    out = []
    for name, d in runs:
        for threads, times in sorted(d["by_threads"].items(), key=lambda kv: int(kv[0])):
            ours_key = "unsparse_int8_ms" if "unsparse_int8_ms" in times else "unsparse_ms"
            found = fastest_peer(times, "int8" if ours_key == "unsparse_int8_ms" else "fp32")
            ratio = f"**{found[1] / times[ours_key]:.2f}x**" if found else "-"
            p = d.get("paired", {}).get(threads, {}).get(f"{ours_key[:-3]}_vs_{found[0][:-3]}") if found else None
            rounds = f"{p['median']:.2f}x [{p['q1']:.2f}-{p['q3']:.2f}]" if p else "-"
            out.append([name, threads] + [f"{times[k]:.2f}" if k in times else "" for k in keys] + [ratio, rounds])
    return [dict(COLUMNS)[k] for k in keys], out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    heads, table = rows(ap.parse_args().files)
    print("| run | threads | " + " | ".join(heads) + " | vs fastest peer | round by round |")
    print("|---" * (len(heads) + 4) + "|")
    for row in table:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
