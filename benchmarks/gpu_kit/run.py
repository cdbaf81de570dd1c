#!/usr/bin/env python3
"""GPU kit runner: checks and times every kernel of a kit built by `benchmarks/gpu_kit.py build DIR`.

    python DIR/run.py OUTDIR              on the GPU machine (PyTorch with CUDA; no TVM, no network)
    python DIR/run.py --dry-run OUTDIR    on a CPU machine: every code path except GPU launches

Needs only Python 3.12, numpy and PyTorch there: the TVM runtime (libtvm_runtime*.so, the python `tvm`
package, the apache-tvm-ffi wheel) travels in DIR/runtime and is unpacked into a temporary folder.
Weights are not shipped: they are regenerated from the same seeds, pruned by magnitude, batch norms
folded and packed by DIR/kitlib/ (copies of unsparse_tvm's models.py, reference.py and ops/formats.py,
the same package layout); the kernels take the sparse arrays as arguments. The arrays' shapes (and a
hash of the index arrays) are checked against the manifest before a kernel runs.

Every kernel is checked against PyTorch CUDA (FP32, TF32 off) before it is timed; timings are CUDA
events around one call, the L2 flushed before each call and the inputs rotated, median of --repeat
(>= 50) after a warm-up. Baselines: cuDNN FP32 (TF32 off), TF32, and FP16 channels-last. One JSON,
written atomically (after every group, so a run cut short still leaves what it measured).

Modules, next to this file: kit_files (the kit's files and its TVM runtime), kit_weights (weights
regenerated and packed, fingerprints, references), kit_check (error measure, timer), kit_layers and
kit_models (the per-layer and whole-model groups, mixins of Run below).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

KIT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, KIT)  # the runner's own modules, next to it (also when the builder loads this file)

from kit_check import CHECK_RTOL, Timer  # noqa: E402
from kit_files import check_files, import_tvm, sha256, unxz  # noqa: E402,F401 (sha256: the builder's digest)
from kit_layers import LayerRuns  # noqa: E402
from kit_models import ModelRuns  # noqa: E402
from kit_weights import (fingerprint, folded_layer, model_param_candidates, pack_layer,  # noqa: E402,F401
                         regen_model, structure_hash)
# (sha256, fingerprint, model_param_candidates, pack_layer and structure_hash are here for the builder,
#  benchmarks/gpu_kit.py, which loads the kit's own run.py and packs weights with exactly this code)


class Run(LayerRuns, ModelRuns):
    def __init__(self, kit: str, outdir: str, args):
        self.kit, self.outdir, self.args = kit, outdir, args
        self.dry = args.dry_run
        with open(os.path.join(kit, "manifest.json")) as f:
            self.manifest = json.load(f)
        self.t0 = time.time()
        self.deadline = self.t0 + args.budget_s
        self.result = {"dry_run": self.dry, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "kit": {k: self.manifest[k] for k in ("built", "target", "arch", "seed", "counts", "knob_fields",
                                                              "threshold") if k in self.manifest},
                       "settings": {"repeat": args.repeat, "warmup": args.warmup, "budget_s": args.budget_s,
                                    "timing": "CUDA events around one call; L2 flushed before each; inputs rotated; median",
                                    "check": "max|out-ref|/max|ref| vs PyTorch CUDA FP32 (TF32 off)",
                                    "check_rtol": CHECK_RTOL},
                       "layers": [], "grid": [], "models": [], "errors": [], "skipped": [], "complete": False}
        self.out_path = os.path.join(outdir, "gpu_kit_results.json")
        self.modules = {}

    # -- bookkeeping
    def save(self):
        self.result["elapsed_s"] = round(time.time() - self.t0, 2)
        os.makedirs(self.outdir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.outdir, prefix=".gpu_kit_results.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(self.result, f, indent=1, default=float)
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.out_path)

    def over_budget(self) -> bool:
        return time.time() > self.deadline

    def error(self, where: str, err: BaseException | str):
        msg = err if isinstance(err, str) else f"{type(err).__name__}: {str(err).strip().splitlines()[0][:400] if str(err).strip() else ''}"
        self.result["errors"].append({"where": where, "error": msg})
        print(f"  error in {where}: {msg}", flush=True)

    def log(self, msg: str):
        print(f"[{time.time() - self.t0:7.1f}s] {msg}", flush=True)

    # -- setup
    def setup(self):
        import torch

        files = check_files(self.kit, self.manifest)
        self.result["files"] = files
        if files["problems"]:
            raise SystemExit(f"kit damaged: {files['problems'][:5]}")
        self.work = tempfile.mkdtemp(prefix="gpukit.")
        self.tvm, rt = import_tvm(self.kit, self.manifest, self.work, self.dry)
        self.result["runtime"] = rt
        machine = {"python": platform.python_version(), "torch": torch.__version__, "tvm": rt.get("tvm"),
                   "numpy": np.__version__, "cuda_available": torch.cuda.is_available(), "host": platform.node()}
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            machine.update(gpu=torch.cuda.get_device_name(0), capability=f"sm_{p.major}{p.minor}",
                           sms=p.multi_processor_count, l2_bytes=p.L2_cache_size, memory_bytes=p.total_memory,
                           cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            machine["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()[:200]
            if q.returncode == 0 and q.stdout.strip():
                machine["driver"] = q.stdout.strip().splitlines()[0].split(",")[1].strip()
        except (OSError, subprocess.TimeoutExpired):
            machine["nvidia_smi"] = None
        self.result["machine"] = machine
        if not self.dry:
            if not torch.cuda.is_available():
                raise SystemExit("no CUDA GPU visible to PyTorch: use --dry-run on a CPU machine")
            self.dev = self.tvm.cuda(0)
            if not self.dev.exist:
                raise SystemExit("TVM's runtime sees no CUDA GPU")
            torch.backends.cudnn.benchmark = True
        self.set_tf32(False)
        self.l2 = machine.get("l2_bytes", 60 << 20)
        self.timer = Timer(self.dry, self.args.repeat, self.args.warmup)
        self.tdev = "cpu" if self.dry else "cuda"
        self.save()

    def set_tf32(self, on: bool):
        import torch

        torch.backends.cudnn.allow_tf32 = on
        torch.backends.cuda.matmul.allow_tf32 = on

    def module(self, rel: str):
        """A kernel module, loaded once (decompressed into the work folder)."""
        if rel not in self.modules:
            so = unxz(os.path.join(self.kit, rel), os.path.join(self.work, os.path.basename(rel)[: -len(".xz")]))
            self.modules[rel] = self.tvm.runtime.load_module(so)
        return self.modules[rel]

    def to_tvm(self, t):
        import tvm_ffi

        return tvm_ffi.from_dlpack(t)

    # -- work
    def selected(self, text: str) -> bool:
        return self.args.only is None or re.search(self.args.only, text) is not None

    def run(self):
        self.setup()
        groups = self.manifest["groups"]
        # per (model, sparsity): its layer kernels, then its whole models (one weight regeneration);
        # the knob grids last, so a run cut short by the budget loses only grid points
        kind_section = {"layers": "layers", "model": "models", "grid": "grid"}
        order = sorted(((kind_section[g["kind"]], g) for g in groups),
                       key=lambda sg: (sg[0] == "grid", sg[1]["model"], sg[1]["sparsity"], sg[0] == "models",
                                       sg[1]["batch"], sg[1]["name"]))
        self.cache = {}
        for n, (section, g) in enumerate(order):
            if not self.selected(g["name"]) or (self.args.profile and section == "models"):
                continue
            if self.over_budget():
                self.result["skipped"].append({"group": g["name"], "why": "time budget"})
                continue
            self.log(f"{section} {g['name']} ({n + 1}/{len(order)})")
            try:
                if section == "models":
                    self.run_model(g)
                else:
                    self.run_layers(g, section)
            except SystemExit:  # a broken CUDA context: keep what was measured, then stop
                self.result["summary"] = self.summary()
                self.save()
                raise
            except Exception as err:  # one group's failure must not lose the rest
                self.error(g["name"], err)
                if self.args.verbose:
                    traceback.print_exc()
                if not self.dry:
                    try:
                        self.check_context(g["name"], {})
                    except SystemExit:
                        self.result["summary"] = self.summary()
                        self.save()
                        raise
            self.save()
        self.result["complete"] = not self.result["skipped"]
        self.result["summary"] = self.summary()
        self.save()
        self.log(f"wrote {self.out_path}")
        return self.result

    def weights(self, model: str, sparsity: float):
        """Per-layer folded weights of (model, sparsity): regenerated once, the last two kept."""
        key = (model, sparsity)
        if key not in self.cache:
            if len(self.cache) >= 2:
                self.cache.pop(next(iter(self.cache)))
            net = regen_model(model, sparsity, self.manifest["seed"])
            layers = self.manifest["models"][model]["layers"]
            self.cache[key] = (net, [folded_layer(net, l) for l in layers])
        return self.cache[key]

    def summary(self) -> dict:
        kernels = [k for r in self.result["layers"] + self.result["grid"] for k in r["kernels"]]
        return {"layer_rows": len(self.result["layers"]), "grid_rows": len(self.result["grid"]),
                "kernels": len(kernels), "timed": sum("median_ms" in k for k in kernels),
                "wrong": sum(k.get("error", "").startswith("wrong") for k in kernels),
                "failed": sum("error" in k and not k["error"].startswith("wrong") for k in kernels),
                "models": len(self.result["models"]), "errors": len(self.result["errors"]),
                "skipped_groups": len(self.result["skipped"])}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir", help="folder for gpu_kit_results.json")
    ap.add_argument("--dry-run", action="store_true", help="CPU machine: every code path except GPU launches")
    ap.add_argument("--repeat", type=int, default=50, help="timed calls per figure (median; at least 50 on the GPU)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=400.0,
                    help="stop starting new groups after this many seconds (default fits an 8-minute device call)")
    ap.add_argument("--only", help="regex over group names (e.g. 'resnet50.*s0.9')")
    ap.add_argument("--emulate-max-flops", type=float, default=2e8, help="dry run: numpy-emulate layers up to this")
    ap.add_argument("--profile", action="store_true",
                    help="for a profiler (ncu): every kernel launched once, for its check; nothing timed, no cuDNN")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    if not args.dry_run and not args.profile and args.repeat < 50:
        ap.error("--repeat must be at least 50 on the GPU")
    if args.dry_run:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    run = Run(KIT, args.outdir, args)
    try:
        r = run.run()
    finally:  # the unpacked runtime and modules (already loaded: removing the files is safe on Linux)
        if getattr(run, "work", None):
            shutil.rmtree(run.work, ignore_errors=True)
    s = r["summary"]
    print(json.dumps(s))
    return 0 if not r["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
