#!/usr/bin/env python3
"""GPU kit runner: checks and times every kernel of a kit built by `benchmarks/gpu_kit.py build DIR`.

    python DIR/run.py OUTDIR              on the GPU machine (PyTorch with CUDA; no TVM, no network)
    python DIR/run.py --dry-run OUTDIR    on a CPU machine: every code path except GPU launches

Needs only Python 3.12, numpy and PyTorch there: the TVM runtime (libtvm_runtime*.so, the python `tvm`
package, the apache-tvm-ffi wheel) travels in DIR/runtime and is unpacked into a temporary folder.
Weights are not shipped: they are regenerated from the same seeds (DIR/kitlib/models.py is a copy of
unsparse_tvm/models.py), pruned by magnitude and packed by DIR/kitlib/formats.py (a copy of
unsparse_tvm/formats.py); the kernels take the sparse arrays as arguments. The arrays' shapes (and a
hash of the index arrays) are checked against the manifest before a kernel runs.

Every kernel is checked against PyTorch CUDA (FP32, TF32 off) before it is timed; timings are CUDA
events around one call, the L2 flushed before each call and the inputs rotated, median of --repeat
(>= 50) after a warm-up. Baselines: cuDNN FP32 (TF32 off), TF32, and FP16 channels-last. One JSON,
written atomically (after every group, so a run cut short still leaves what it measured).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import lzma
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
import zipfile

import numpy as np

KIT = os.path.dirname(os.path.abspath(__file__))
MAX_KIT_BYTES = 64 * 1024 * 1024
CHECK_RTOL = {"layer": 1e-4, "model": 1e-3}   # ||out - ref|| / ||ref||, fp32 vs fp32 (TF32 off)
formats = models = None  # the kit's copies, see load_kitlib


# ----------------------------------------------------------------------------------------------- files

def load_kitlib(kit: str = KIT):
    """Import the kit's copies of formats.py and models.py (numpy / torch only)."""
    global formats, models
    mods = []
    for name in ("formats", "models"):
        spec = importlib.util.spec_from_file_location(f"gpukit_{name}", os.path.join(kit, "kitlib", f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        mods.append(mod)
    formats, models = mods
    return formats, models


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_files(kit: str, manifest: dict) -> dict:
    """Every file the manifest lists exists with its size and sha256; the kit is within the size limit."""
    problems, total = [], 0
    for rel, info in manifest["files"].items():
        path = os.path.join(kit, rel)
        if not os.path.isfile(path):
            problems.append(f"missing {rel}")
            continue
        size = os.path.getsize(path)
        total += size
        if size != info["bytes"] or sha256(path) != info["sha256"]:
            problems.append(f"corrupt {rel}")
    on_disk = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(kit) for f in fs
                  if "__pycache__" not in r)
    return {"files": len(manifest["files"]), "listed_bytes": total, "kit_bytes": on_disk,
            "within_limit": on_disk <= MAX_KIT_BYTES, "problems": problems}


def unxz(src: str, dst: str) -> str:
    with lzma.open(src) as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 22)
    return dst


# ------------------------------------------------------------------------------------------- runtime

def unpack_runtime(kit: str, manifest: dict, work: str) -> tuple[str, str]:
    """The TVM runtime into work/: the runtime part of the python `tvm` package (work/tvm_site) and the
    apache-tvm-ffi wheel, a zip (work/ffi_site)."""
    tvm_site, ffi_site = os.path.join(work, "tvm_site"), os.path.join(work, "ffi_site")
    os.makedirs(tvm_site, exist_ok=True)
    rt = manifest["runtime"]
    with zipfile.ZipFile(os.path.join(kit, rt["ffi_wheel"])) as z:
        z.extractall(ffi_site)
    with tarfile.open(os.path.join(kit, rt["tvm_tar"])) as t:
        if hasattr(tarfile, "data_filter"):
            t.extractall(tvm_site, filter="data")
        else:
            t.extractall(tvm_site)
    return tvm_site, ffi_site


def _wheel_matches_python(manifest: dict) -> bool:
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    return f"-{tag}-" in os.path.basename(manifest["runtime"]["ffi_wheel"])


def _find_cudart(kit: str, manifest: dict, work: str) -> str | None:
    import glob

    cands = ["libcudart.so.13"]
    for base in sys.path:
        cands += sorted(glob.glob(os.path.join(base, "nvidia", "*", "lib", "libcudart.so.13*")))
        cands += sorted(glob.glob(os.path.join(base, "nvidia", "cu13", "lib", "libcudart.so.13*")))
    cands += sorted(glob.glob("/usr/local/cuda*/lib*/libcudart.so.13*"))
    cands += sorted(glob.glob("/usr/local/cuda*/targets/*/lib/libcudart.so.13*"))
    import ctypes

    for c in cands:
        try:
            ctypes.CDLL(c, ctypes.RTLD_GLOBAL)
            return c
        except OSError:
            continue
    shipped = manifest["runtime"].get("cudart")
    if shipped:
        path = unxz(os.path.join(kit, shipped), os.path.join(work, "libcudart.so.13"))
        ctypes.CDLL(path, ctypes.RTLD_GLOBAL)
        return path + " (shipped)"
    return None


_STUB_DRIVER = r"""
static const char *msg = "no CUDA driver (gpu kit dry-run stand-in)";
int cuGetErrorName(int e, const char **s) { *s = msg; return 0; }
int cuGetErrorString(int e, const char **s) { *s = msg; return 0; }
""" + "\n".join(f"int {n}(void) {{ return 100; }}" for n in (
    "cuDeviceGetName", "cuFuncSetAttribute", "cuLaunchKernelEx", "cuModuleGetFunction", "cuModuleLoadData",
    "cuModuleUnload", "cuTensorMapEncodeTiled", "cuLaunchKernel", "cuModuleGetGlobal", "cuCtxGetCurrent"))


def import_tvm(kit: str, manifest: dict, work: str, dry_run: bool) -> tuple[object, dict]:
    """`import tvm` (runtime library only) from the kit, then load TVM's CUDA runtime library.
    On a dry run under another Python than the kit's wheel, falls back to an installed TVM."""
    import ctypes

    info = {}
    tvm_site, ffi_site = unpack_runtime(kit, manifest, work)
    use_wheel = _wheel_matches_python(manifest)
    if not use_wheel and not dry_run:
        raise SystemExit(f"the kit's TVM runtime is for {manifest['runtime']['python']}, this is Python "
                         f"{platform.python_version()}: run it with python3.12")
    # the kit's `tvm` always (so a dry run checks that it imports without the compiler library); its
    # tvm-ffi wheel where this Python can load it, else (dry run only) the installed tvm-ffi
    sys.path.insert(0, tvm_site)
    if use_wheel:
        sys.path.insert(0, ffi_site)
        info["tvm_from"] = "kit"
    else:
        info["tvm_from"] = f"kit (with the installed tvm-ffi: the kit's wheel is for {manifest['runtime']['python']})"
    os.environ["TVM_USE_RUNTIME_LIB"] = "1"
    os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")  # no JIT build of tvm-ffi's torch extension
    import tvm

    info["tvm"] = getattr(tvm, "__version__", "?")
    info["tvm_path"] = os.path.dirname(tvm.__file__)
    if dry_run:
        try:
            ctypes.CDLL("libcuda.so.1", ctypes.RTLD_GLOBAL)
            info["driver"] = "libcuda.so.1"
        except OSError:
            cc = shutil.which("cc") or shutil.which("gcc")
            if cc is None:
                info["driver"] = None
                info["cuda_runtime"] = "not loaded: no libcuda and no C compiler for a stand-in"
                return tvm, info
            src, so = os.path.join(work, "stub.c"), os.path.join(work, "libcuda.so.1")
            with open(src, "w") as f:
                f.write(_STUB_DRIVER)
            subprocess.run([cc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", so, src], check=True,
                           capture_output=True)
            ctypes.CDLL(so, ctypes.RTLD_GLOBAL)
            info["driver"] = "stand-in (dry run)"
    info["cudart"] = _find_cudart(kit, manifest, work)
    if not info["tvm_path"].startswith(tvm_site):
        raise SystemExit(f"imported tvm from {info['tvm_path']}, not from the kit")
    lib = os.path.join(info["tvm_path"], "lib", "libtvm_runtime_cuda.so")
    ctypes.CDLL(lib, ctypes.RTLD_GLOBAL)
    info["cuda_runtime"] = lib
    return tvm, info


# ----------------------------------------------------------------------------------------- weights

def regen_model(model: str, sparsity: float, seed: int = 0):
    """The built-in model with its seeded weights, every conv/linear weight magnitude-pruned to `sparsity`
    (torch.nn.utils.prune L1, layer-wise, as `unsparse-tvm prune`), on the CPU, in eval mode."""
    import torch
    import torch.nn.utils.prune as tprune

    net = models.build_model(model, seed)
    if sparsity:
        for m in net.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                tprune.l1_unstructured(m, "weight", amount=float(sparsity))
                tprune.remove(m, "weight")
    return net.eval()


def folded_layer(net, entry: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """(weight, bias) of one layer as the compiler sees it: batch norm folded in (as FoldBatchNormIntoConv)."""
    mods = dict(net.named_modules())
    conv = mods[entry["module"]]
    w = conv.weight.detach().numpy().astype(np.float32)
    b = conv.bias.detach().numpy().astype(np.float32) if conv.bias is not None else None
    if entry.get("bn"):
        bn = mods[entry["bn"]]
        gamma, beta = bn.weight.detach().numpy(), bn.bias.detach().numpy()
        mean, var = bn.running_mean.detach().numpy(), bn.running_var.detach().numpy()
        k = w.shape[0]
        scale = gamma / np.sqrt(var + float(bn.eps))
        w = (w * scale.reshape(k, 1, 1, 1)).astype(np.float32)
        b0 = np.zeros(k, np.float32) if b is None else b
        b = ((b0 - mean) * scale + beta).astype(np.float32)
    return w, b


def geometry(layer: dict, batch: int):
    n, c, h, w = [batch] + list(layer["input_shape"][1:])
    k, _, r, s = layer["weight_shape"]
    a = layer["attrs"]
    return formats.ConvGeometry(n, c, h, w, k, r, s, tuple(a["strides"]), tuple(a["padding"]), tuple(a["dilation"]))


def pack_layer(layer: dict, w: np.ndarray, b: np.ndarray | None, batch: int) -> dict:
    """The sparse operands of one layer's kernel, as the compiler packs them for CUDA."""
    saving = formats.HYB_MIN_SAVING["cuda"]
    if layer["op"] == "conv2d":
        rows = formats.conv_weight_rows(w, geometry(layer, batch), None, saving)
    else:
        rows = formats.dense_weight_rows(w, None, saving)
    arrays = {"data": rows.data, "off": formats.compact_offsets(rows.off)}  # as relay_passes' rows_consts
    if rows.fmt == "hyb":
        arrays.update(ovf_data=rows.ovf_data, ovf_off=formats.compact_offsets(rows.ovf_off),
                      ovf_slot=rows.ovf_slot)
    if b is not None:
        arrays["bias"] = b
    return {"fmt": rows.fmt, "arrays": arrays}


def structure_hash(arrays: dict) -> str:
    """Hash of the index arrays (offsets, overflow slots): the sparsity structure a kernel was built for."""
    h = hashlib.sha1()
    for key in ("off", "ovf_off", "ovf_slot"):
        if key in arrays:
            a = np.ascontiguousarray(arrays[key])
            h.update(key.encode() + str(a.shape).encode() + a.tobytes())
    return h.hexdigest()


def model_param_candidates(manifest_model: dict, net, batch: int, needed: set | None = None,
                           packed: bool = True) -> dict:
    """The arrays a whole-model module's lifted parameters are made of, by (layer, role): all of them, or
    only the `needed` (layer, role) keys; packed=False leaves out the sparse formats (dense models)."""
    out = {}
    for i, layer in enumerate(manifest_model["layers"]):
        roles = None if needed is None else {r for (li, r) in needed if li == i}
        if roles is not None and not roles:
            continue
        w, b = folded_layer(net, layer)
        out[(i, "weight")] = w
        if layer["op"] == "dense":
            out[(i, "weight_t")] = np.ascontiguousarray(w.T)
        if b is not None:
            out[(i, "bias")] = b
            out[(i, "bias4")] = b.reshape(1, -1, 1, 1)
        want_packed = packed if roles is None else bool(roles - {"weight", "weight_t", "bias", "bias4"})
        if want_packed:
            for role, arr in pack_layer(layer, w, b, batch)["arrays"].items():
                if role != "bias":
                    out[(i, role)] = arr
    return out


def fingerprint(a: np.ndarray) -> dict:
    a = np.asarray(a)
    fp = {"shape": list(a.shape), "dtype": str(a.dtype)}
    if a.dtype.kind in "iu":
        fp["sha1"] = hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()
    else:
        fp["sum"] = float(a.astype(np.float64).sum())
        fp["abs_sum"] = float(np.abs(a.astype(np.float64)).sum())
    return fp


def fingerprint_ok(a: np.ndarray, fp: dict) -> bool:
    a = np.asarray(a)
    if list(a.shape) != fp["shape"] or str(a.dtype) != fp["dtype"]:
        return False
    if "sha1" in fp:
        return hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest() == fp["sha1"]
    s, t = float(a.astype(np.float64).sum()), float(np.abs(a.astype(np.float64)).sum())
    return abs(t - fp["abs_sum"]) <= 1e-5 * max(fp["abs_sum"], 1e-12) and abs(s - fp["sum"]) <= 1e-5 * max(t, 1e-12)


# ----------------------------------------------------------------------------------------- reference

def torch_layer_fn(layer: dict, w, b, dtype=None, channels_last: bool = False):
    """The layer in PyTorch (dense weights): conv2d / linear [+ bias] [+ ReLU]."""
    import torch.nn.functional as F

    relu, a = layer["relu"], layer.get("attrs", {})

    def run(x):
        if layer["op"] == "conv2d":
            t, l, bt, r = a["padding"]
            pad = (t, l)
            if (t, l) != (bt, r):
                x = F.pad(x, (l, r, t, bt))
                pad = (0, 0)
            y = F.conv2d(x, w, b, a["strides"], pad, a["dilation"], a.get("groups", 1))
        else:
            y = F.linear(x, w, b)
        return F.relu(y) if relu else y

    return run


def emulate_sparse(layer: dict, packed: dict, x: np.ndarray, batch: int) -> np.ndarray:
    """numpy model of what the kernel computes from the packed arrays (dry run: checks packing + geometry)."""
    arr = dict(packed["arrays"])
    if arr["data"].ndim == 3:  # grouped rows (vellV): data [G, L, V], off [G, L] -> V rows per group
        g, l, v = arr["data"].shape
        arr["data"] = arr["data"].transpose(0, 2, 1).reshape(g * v, l)
        arr["off"] = np.repeat(arr["off"], v, axis=0)

    def rows_sum(data, off, flat, q_extent):
        out = np.zeros((flat.shape[0], data.shape[0], q_extent), np.float64)
        for j in range(data.shape[1]):
            idx = off[:, j][:, None] + np.arange(q_extent)[None, :]
            out += data[:, j][None, :, None] * flat[:, idx]
        return out

    if layer["op"] == "conv2d":
        geo = geometry(layer, batch)
        (sh, sw), (pt, pl, _, _) = geo.stride, geo.padding
        xp = np.zeros((geo.n, geo.pad_channels, geo.hq * sh, geo.wq * sw), np.float64)
        xp[:, : geo.c, pt: pt + geo.h, pl: pl + geo.w] = x
        # phases: padded pixel (h, w) -> phase (h % sh, w % sw), position (h // sh, w // sw)
        ph = xp.reshape(geo.n, geo.pad_channels, geo.hq, sh, geo.wq, sw).transpose(0, 1, 3, 5, 2, 4)
        flat = np.ascontiguousarray(ph).reshape(geo.n, -1)
        acc = rows_sum(arr["data"], arr["off"], flat, geo.q_extent)
        if "ovf_data" in arr:
            extra = rows_sum(arr["ovf_data"], arr["ovf_off"], flat, geo.q_extent)
            slot = arr["ovf_slot"]
            acc += np.where(slot[None, :, None] >= 0, extra[:, np.maximum(slot, 0)], 0.0)
        y = acc[:, :, : geo.oh * geo.wq].reshape(geo.n, geo.k, geo.oh, geo.wq)[:, :, :, : geo.ow]
        bshape = (1, -1, 1, 1)
    else:
        def dense_rows(data, off):
            return np.einsum("kj,nkj->nk", data.astype(np.float64), x.astype(np.float64)[:, off])
        y = dense_rows(arr["data"], arr["off"])
        if "ovf_data" in arr:
            extra = dense_rows(arr["ovf_data"], arr["ovf_off"])
            slot = arr["ovf_slot"]
            y = y + np.where(slot[None, :] >= 0, extra[:, np.maximum(slot, 0)], 0.0)
        bshape = (1, -1)
    if "bias" in arr:
        y = y + arr["bias"].reshape(bshape)
    if layer["relu"]:
        y = np.maximum(y, 0)
    return y.astype(np.float32)


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    if not np.all(np.isfinite(out)):
        return float("inf")
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def rel_err_torch(out, ref) -> float:
    """rel_err on the device (large outputs: no copy to the host)."""
    if not bool(out.isfinite().all()):
        return float("inf")
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------- timing

class Timer:
    """Median ms of single calls, each bracketed by CUDA events, the L2 flushed and the inputs rotated
    before each; on a dry run, host timers (the same loop, no GPU)."""

    def __init__(self, dry_run: bool, repeat: int, warmup: int):
        import torch

        self.dry_run, self.repeat, self.warmup = dry_run, repeat, warmup
        self.cuda = not dry_run
        if self.cuda:
            l2 = torch.cuda.get_device_properties(0).L2_cache_size
            self.flush_buf = torch.empty(max(2 * l2, 64 << 20) // 4, dtype=torch.int32, device="cuda")
        else:
            self.flush_buf = torch.empty(1 << 16, dtype=torch.int32)

    def __call__(self, fn, arg_sets: list) -> dict:
        import torch

        for i in range(self.warmup):
            fn(*arg_sets[i % len(arg_sets)])
        times = []
        if self.cuda:
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(self.repeat)]
            for i, (start, end) in enumerate(events):
                self.flush_buf.zero_()
                start.record()
                fn(*arg_sets[i % len(arg_sets)])
                end.record()
            torch.cuda.synchronize()
            times = [s.elapsed_time(e) for s, e in events]
        else:
            for i in range(self.repeat):
                self.flush_buf.zero_()
                t0 = time.perf_counter()
                fn(*arg_sets[i % len(arg_sets)])
                times.append((time.perf_counter() - t0) * 1e3)
        return {"median_ms": statistics.median(times), "min_ms": min(times), "n": len(times)}


def rotation_count(bytes_per_set: int, l2_bytes: int, cap: int = 8) -> int:
    """Input sets to rotate through so that consecutive calls don't find their input in L2."""
    return int(max(2, min(cap, -(-2 * l2_bytes // max(bytes_per_set, 1)))))


# ------------------------------------------------------------------------------------------- runner

class Run:
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
                                    "check": "||out-ref||/||ref|| vs PyTorch CUDA FP32 (TF32 off)",
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
        load_kitlib(self.kit)
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
            if not self.selected(g["name"]):
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

    def run_layers(self, g: dict, section: str):
        import torch

        model, sparsity, batch = g["model"], g["sparsity"], g["batch"]
        _, folded = self.weights(model, sparsity)
        layers = self.manifest["models"][model]["layers"]
        no_load = g.get("file") is None or (self.dry and not self.result["runtime"].get("driver"))
        mod = None if no_load else self.module(g["file"])
        by_layer = {}
        for k in g["kernels"]:
            by_layer.setdefault(k["layer"], []).append(k)
        for li, kernels in by_layer.items():
            layer = layers[li]
            where = f"{g['name']}/layer{li}"
            w, b = folded[li]
            packed = pack_layer(layer, w, b, batch)
            arrays = packed["arrays"]
            kinfo = kernels[0]
            shapes = {r: list(arrays[r].shape) for r in kinfo["args"][1:] if r in arrays}
            if packed["fmt"] != kinfo["fmt"] or shapes != {r: kinfo["shapes"][r] for r in shapes} or \
                    set(kinfo["args"][1:]) - set(arrays):
                self.error(where, f"regenerated weights do not fit the kernel (format {packed['fmt']} vs "
                                  f"{kinfo['fmt']}, shapes {shapes} vs {kinfo['shapes']}): not run")
                continue
            same = structure_hash(arrays) == kinfo["structure"]
            in_shape = [batch] + list(layer["input_shape"][1:])
            out_shape = kinfo["out_shape"]
            gen = torch.Generator().manual_seed(1000 + li)
            nsets = rotation_count(int(np.prod(in_shape)) * 4, self.l2)
            xs = [torch.randn(*in_shape, generator=gen) for _ in range(nsets)]
            wt, bt = torch.from_numpy(w), (torch.from_numpy(b) if b is not None else None)
            ref_fn = torch_layer_fn(layer, wt.to(self.tdev), bt.to(self.tdev) if bt is not None else None)
            xd = [x.to(self.tdev) for x in xs]
            row = {"model": model, "layer": li, "name": layer["name"], "op": layer["op"], "sparsity": sparsity,
                   "batch": batch, "weight_shape": layer["weight_shape"], "input_shape": in_shape,
                   "fmt": packed["fmt"], "ell_width": kinfo["shapes"]["data"][1], "same_structure_as_build": same,
                   "nnz": int((w != 0).sum()), "kernels": []}
            spatial = int(np.prod(out_shape[2:])) if layer["op"] == "conv2d" else 1
            light = self.dry and 2 * row["nnz"] * spatial * batch > self.args.emulate_max_flops
            if light:  # a CPU machine: the large layers' references would only cost time
                row["dry_run_note"] = "large layer: no CPU reference, emulation or baseline timing"
            else:
                with torch.no_grad():
                    ref = ref_fn(xd[0])
            if self.dry and not light:
                emulated = torch.from_numpy(emulate_sparse(layer, packed, xs[0].numpy(), batch))
                row["emulated_rel_err"] = rel_err_torch(emulated, ref)
                if row["emulated_rel_err"] > CHECK_RTOL["layer"]:
                    self.error(where, f"packed arrays do not reproduce the layer (rel err {row['emulated_rel_err']:.2e})")
            dev_arrays = {r: torch.from_numpy(np.ascontiguousarray(a)).to(self.tdev) for r, a in arrays.items()}
            out = torch.empty(out_shape, device=self.tdev)
            for k in kernels:
                entry = {"func": k["func"], "config": k["config"], "variant": k["variant"]}
                if k.get("same_as"):
                    entry["same_as"] = k["same_as"]
                    row["kernels"].append(entry)
                    continue
                try:
                    if "build_error" in k:
                        raise RuntimeError(f"not built: {k['build_error']}")
                    f = mod[k["func"]] if mod is not None else None
                    args = [self.to_tvm(dev_arrays[r]) for r in k["args"][1:]]
                    if self.dry:  # everything but the launch: function found, operands converted
                        entry["loaded"] = f is not None
                        sets = [[self.to_tvm(x)] + args + [self.to_tvm(out)] for x in xd]
                        row["kernels"].append(entry)
                        continue
                    out.fill_(float("nan"))
                    f(self.to_tvm(xd[0]), *args, self.to_tvm(out))
                    torch.cuda.synchronize()
                    entry["rel_err"] = rel_err_torch(out, ref)
                    if entry["rel_err"] > CHECK_RTOL["layer"]:
                        entry["error"] = "wrong result: not timed"
                    else:
                        sets = [[self.to_tvm(x)] + args + [self.to_tvm(out)] for x in xd]
                        entry.update(self.timer(f, sets))
                except Exception as err:
                    entry["error"] = f"{type(err).__name__}: {str(err).strip()[:300]}"
                    if not self.dry:
                        self.check_context(where, entry)
                row["kernels"].append(entry)
            if section == "layers" and not light:
                row["torch"] = self.time_torch_layer(layer, wt, bt, xs)
            self.result[section].append(row)
            del dev_arrays, out

    def check_context(self, where: str, entry: dict) -> None:
        """After a failed launch: if the CUDA context is broken (e.g. an illegal address), nothing after
        it can be trusted: record it and stop the run (the JSON keeps everything measured so far)."""
        import torch

        try:
            torch.cuda.synchronize()
            torch.zeros(1, device="cuda").add_(1).item()
        except Exception as err:
            self.result["fatal"] = {"where": where, "kernel": entry.get("func"), "error": str(err)[:300]}
            raise SystemExit(f"CUDA context broken after {entry.get('func')}: {str(err)[:200]}")

    def time_torch_layer(self, layer, wt, bt, xs) -> dict:
        import torch

        res = {}
        for name, dtype, cl, tf32 in (("cudnn_fp32", torch.float32, False, False), ("cudnn_tf32", torch.float32, False, True),
                                      ("cudnn_fp16_channels_last", torch.float16, True, False)):
            if self.dry and dtype == torch.float16:
                continue  # CPU half convs are slow or missing; the path is the same as on the GPU
            self.set_tf32(tf32)
            try:
                w = wt.to(self.tdev, dtype)
                b = bt.to(self.tdev, dtype) if bt is not None else None
                xs_d = [x.to(self.tdev, dtype) for x in xs]
                if cl and layer["op"] == "conv2d":
                    w = w.contiguous(memory_format=torch.channels_last)
                    xs_d = [x.contiguous(memory_format=torch.channels_last) for x in xs_d]
                fn = torch_layer_fn(layer, w, b)
                with torch.no_grad():
                    res[name] = self.timer(fn, [[x] for x in xs_d])
            except Exception as err:
                res[name] = {"error": f"{type(err).__name__}: {str(err).strip()[:200]}"}
            finally:
                self.set_tf32(False)
        return res

    def run_model(self, g: dict):
        import torch

        model, sparsity, batch = g["model"], g["sparsity"], g["batch"]
        net, folded = self.weights(model, sparsity)
        mm = self.manifest["models"][model]
        row = {"model": model, "variant": g["variant"], "sparsity": sparsity, "batch": batch, "params": len(g["params"])}
        cands = model_param_candidates(mm, net, batch, {(p["layer"], p["role"]) for p in g["params"] if "layer" in p})
        npz = np.load(os.path.join(self.kit, g["npz"])) if g.get("npz") else {}
        params, bad = [], []
        for p in g["params"]:
            a = npz[p["npz"]] if "npz" in p else cands.get((p["layer"], p["role"]))
            if a is None or not fingerprint_ok(a, p["fp"]):
                bad.append(p)
                a = None
            params.append(a)
        row["params_match_build"] = not bad
        if any(a is None for a in params):
            self.error(g["name"], f"{len(bad)} regenerated parameters do not fit the module (first: {bad[0]})")
            self.result["models"].append(row)
            return
        in_shape = [batch] + list(mm["input_shape"][1:])
        gen = torch.Generator().manual_seed(7)
        x = torch.randn(*in_shape, generator=gen)
        with torch.no_grad():
            ref = net.to(self.tdev)(x.to(self.tdev)).float().cpu().numpy()
        if self.dry:
            mod = self.module(g["file"]) if self.result["runtime"].get("driver") else None
            row["loaded"] = mod is not None
            if mod is not None:  # the VM on the host device: its inputs bind, nothing launches
                from tvm.runtime.vm import VirtualMachine

                try:
                    vm = VirtualMachine(mod, self.tvm.cpu(0))
                    vm.set_input("main", self.to_tvm(x), *[self.to_tvm(torch.from_numpy(np.ascontiguousarray(a)))
                                                         for a in params])
                    row["vm_inputs_bound"] = True
                except Exception as err:
                    row["vm_inputs_bound"] = f"{type(err).__name__}: {str(err).strip()[:200]}"
            with torch.no_grad():
                row["torch_cpu_ms"] = self.timer(lambda: net(x), [[]])
        else:
            from tvm.runtime.vm import VirtualMachine

            vm = VirtualMachine(self.module(g["file"]), self.dev)
            dparams = [self.to_tvm(torch.from_numpy(np.ascontiguousarray(a)).cuda()) for a in params]
            xd = self.to_tvm(x.cuda())
            vm.set_input("main", xd, *dparams)
            vm.invoke_stateful("main")
            out = vm.get_outputs("main")
            out = out if hasattr(out, "numpy") else out[0]
            row["rel_err"] = rel_err(out.numpy(), ref)
            if row["rel_err"] > CHECK_RTOL["model"]:
                row["error"] = "wrong result: not timed"
            else:
                row["unsparse"] = self.timer(lambda: vm.invoke_stateful("main"), [[]])
            del vm, dparams
            if g["variant"] == "tvm_dense" or g.get("time_torch", True):
                row["torch"] = self.time_torch_model(net, x)
        self.result["models"].append(row)
        net.to("cpu")

    def time_torch_model(self, net, x) -> dict:
        import copy

        import torch

        res = {}
        for name, half, tf32 in (("cudnn_fp32", False, False), ("cudnn_tf32", False, True),
                                 ("cudnn_fp16_channels_last", True, False)):
            self.set_tf32(tf32)
            try:
                m = copy.deepcopy(net).cuda()
                xd = x.cuda()
                if half:
                    m = m.half().to(memory_format=torch.channels_last)
                    xd = xd.half().contiguous(memory_format=torch.channels_last)
                with torch.no_grad():
                    res[name] = self.timer(m, [[xd]])
                del m
            except Exception as err:
                res[name] = {"error": f"{type(err).__name__}: {str(err).strip()[:200]}"}
            finally:
                self.set_tf32(False)
        return res

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
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    if not args.dry_run and args.repeat < 50:
        ap.error("--repeat must be at least 50 on the GPU")
    if args.dry_run:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    r = Run(KIT, args.outdir, args).run()
    s = r["summary"]
    print(json.dumps(s))
    return 0 if not r["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
