"""What a kit holds besides its kernels: the runner's files (run.py and its modules, README.md, kitlib/:
the TVM-free project modules the runner uses, a package of their own) and the TVM runtime (the `tvm`
package without the compiler, libtvm_runtime, the apache-tvm-ffi wheel for the GPU machine's Python)."""

from __future__ import annotations

import glob
import lzma
import os
import shutil
import subprocess
import sys
import tarfile

from . import log

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # benchmarks/
RUNNER_DIR = os.path.join(HERE, "gpu_kit")


# unsparse_tvm's modules the runner uses (reference.py's own imports follow them), copied into kitlib/ at
# the same paths: the package's relative imports work unchanged, with no compiler and no TVM
KITLIB_MODULES = ("reference", "models", "errors", "ops.formats", "ops.geometry")


def kitlib_sources() -> dict[str, str]:
    """{path inside kitlib/: source} of KITLIB_MODULES; refuses a module that imports TVM, or a part of the
    project that is not shipped with it."""
    import ast
    import importlib

    import unsparse_tvm

    root = os.path.dirname(unsparse_tvm.__file__)
    shipped = set(KITLIB_MODULES)
    out = {}
    for name in KITLIB_MODULES:
        path = importlib.import_module(f"unsparse_tvm.{name}").__file__
        src = open(path).read()
        package = name.split(".")[:-1]
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[: len(package) - node.level + 1]
                targets = [".".join(base + node.module.split("."))] if node.module else \
                    [".".join(base + [a.name]) for a in node.names]
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                targets = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                if not any(t.split(".")[0] in ("unsparse_tvm", "tvm", "tvm_ffi") for t in targets):
                    continue
            else:
                continue
            if any(t not in shipped for t in targets):
                raise SystemExit(f"{path} imports {', '.join(targets)}, which the kit does not ship: "
                                 "kitlib/ must stay TVM-free and self-contained (see KITLIB_MODULES)")
        out[os.path.relpath(path, root)] = src
    return out


def write_runner_files(kit: str) -> None:
    """run.py and its modules, README.md and kitlib/ (KITLIB_MODULES, as a package of their own)."""
    for name in sorted(os.listdir(RUNNER_DIR)):
        if name.endswith(".py") or name == "README.md":
            shutil.copy(os.path.join(RUNNER_DIR, name), os.path.join(kit, name))
    lib = os.path.join(kit, "kitlib")
    for rel, src in kitlib_sources().items():
        os.makedirs(os.path.join(lib, os.path.dirname(rel)), exist_ok=True)
        with open(os.path.join(lib, rel), "w") as f:
            f.write(src)
    for folder, _, _ in os.walk(lib):
        with open(os.path.join(folder, "__init__.py"), "w") as f:
            f.write('"""Copies of unsparse_tvm modules for the GPU kit\'s runner (benchmarks/gpu_kit_build/scaffold.py)."""\n')


def ffi_wheel(cache: str) -> str:
    """apache-tvm-ffi (this environment's version) as a cp312 manylinux wheel, downloaded once."""
    import importlib.metadata as md

    version = md.version("apache-tvm-ffi")
    found = glob.glob(os.path.join(cache, f"apache_tvm_ffi-{version}-cp312-*.whl"))
    shared = glob.glob(os.path.expanduser(f"~/.cache/unsparse-devbundle/*/wheels/apache_tvm_ffi-{version}-cp312-*.whl"))
    if found or shared:
        return (found or shared)[0]
    os.makedirs(cache, exist_ok=True)
    log(f"downloading apache-tvm-ffi {version} for Python 3.12 (once)")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp",
                    "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_24_x86_64",
                    "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
                    "-d", cache, f"apache-tvm-ffi=={version}"], check=True)
    found = glob.glob(os.path.join(cache, f"apache_tvm_ffi-{version}-cp312-*.whl"))
    if not found:
        raise SystemExit("could not get the apache-tvm-ffi wheel for Python 3.12")
    return found[0]


def _runtime_filter(ti: tarfile.TarInfo):
    name = ti.name
    if "__pycache__" in name or name.startswith(("tvm/3rdparty", "tvm/src", "tvm/web")):
        return None
    if name.startswith("tvm/lib/") and os.path.basename(name) not in ("libtvm_runtime.so", "libtvm_runtime_cuda.so"):
        return None
    return ti


def write_runtime(kit: str, cache: str) -> dict:
    """The TVM runtime pieces: python `tvm` without the compiler library, the ffi wheel, libcudart.13."""
    import importlib.metadata as md

    import tvm

    from unsparse_tvm.cuda_package import find_nvcc

    rdir = os.path.join(kit, "runtime")
    os.makedirs(rdir, exist_ok=True)
    version = md.version("apache-tvm")
    cached = os.path.join(cache, f"tvm-runtime-{version}.tar.xz")
    if not os.path.exists(cached):
        log("packing the TVM runtime (python package + libtvm_runtime*.so, no compiler)")
        site = os.path.dirname(os.path.dirname(tvm.__file__))
        tmp = cached + f".{os.getpid()}"
        os.makedirs(cache, exist_ok=True)
        with tarfile.open(tmp, "w:xz", preset=9) as t:
            t.add(os.path.join(site, "tvm"), arcname="tvm", filter=_runtime_filter)
        os.replace(tmp, cached)
    shutil.copy(cached, os.path.join(rdir, "tvm-runtime.tar.xz"))
    wheel = ffi_wheel(cache)
    shutil.copy(wheel, os.path.join(rdir, os.path.basename(wheel)))
    info = {"tvm_tar": "runtime/tvm-runtime.tar.xz", "ffi_wheel": f"runtime/{os.path.basename(wheel)}",
            "python": "cp312", "tvm_version": version, "ffi_version": md.version("apache-tvm-ffi")}
    root = os.path.dirname(os.path.dirname(os.path.realpath(find_nvcc())))
    cudart = []
    for base in (root, "/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-13*"))):
        cudart += sorted(glob.glob(os.path.join(base, "lib*", "libcudart.so.13*")))
        cudart += sorted(glob.glob(os.path.join(base, "targets", "*", "lib", "libcudart.so.13*")))
    if cudart:  # a fallback only: the runner prefers the GPU machine's own (PyTorch's or the toolkit's)
        real = os.path.realpath(cudart[0])
        with open(real, "rb") as fin, lzma.open(os.path.join(rdir, "libcudart.so.13.xz"), "wb", preset=9) as fout:
            shutil.copyfileobj(fin, fout)
        info["cudart"] = "runtime/libcudart.so.13.xz"
    return info


def write_xz(src: str, dst: str) -> None:
    with open(src, "rb") as fin, lzma.open(dst, "wb", preset=9 | lzma.PRESET_EXTREME) as fout:
        shutil.copyfileobj(fin, fout)
