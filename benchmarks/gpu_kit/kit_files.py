"""The kit's files and its TVM runtime: sizes and digests against the manifest, the runtime unpacked and
imported (the kit's `tvm` package without the compiler library), and TVM's CUDA runtime loaded."""

from __future__ import annotations

import hashlib
import lzma
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import zipfile

MAX_KIT_BYTES = 64 * 1024 * 1024


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
