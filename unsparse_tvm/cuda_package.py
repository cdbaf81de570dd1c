"""Put compiled CUDA device code (a fatbin for the chosen arch) into an exported module.

TVM 0.27's CUDA codegen emits CUDA *source*; the runtime compiles it when the module is loaded, so a
deploy machine would need NVRTC or nvcc. Instead, at build time we let TVM's CUDA runtime library
load the freshly exported module once with our `tvm_callback_cuda_compile` (nvcc -> fatbin for
--arch), take the now-compiled CUDA module and put it into the executable before the final export.

On a build machine without a GPU driver, TVM's CUDA runtime library cannot load (it links
libcuda.so.1); we then compile a stand-in driver whose every call fails with "no device" (only
loading and serialising modules happens here, never a launch).

TVM is imported inside the functions (deliberately: after the CUDA driver, or its stand-in, is loaded).
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import UnsparseError

_DRIVER_SYMBOLS = ["cuDeviceGetName", "cuFuncSetAttribute", "cuLaunchKernelEx", "cuModuleGetFunction",
                   "cuModuleLoadData", "cuModuleUnload", "cuTensorMapEncodeTiled"]
_STUB_C = "\n".join(
    ['static const char *msg = "no CUDA driver on this machine (unsparse-tvm build-time stand-in)";',
     "int cuGetErrorName(int e, const char **s) { *s = msg; return 0; }",
     "int cuGetErrorString(int e, const char **s) { *s = msg; return 0; }"]
    + [f"int {name}(void) {{ return 100; /* CUDA_ERROR_NO_DEVICE */ }}" for name in _DRIVER_SYMBOLS]
)
_loaded = False


def find_nvcc() -> str:
    nvcc = shutil.which("nvcc") or next(iter(glob.glob("/usr/local/cuda*/bin/nvcc")), None)
    if nvcc is None:
        raise UnsparseError("--target cuda needs nvcc (the CUDA toolkit) on PATH to compile device code")
    return nvcc


def _cudart_candidates() -> list[str]:
    nvcc = Path(os.path.realpath(find_nvcc()))
    roots = [nvcc.parent.parent, Path("/usr/local/cuda")]
    found = []
    for root in roots:
        found += sorted(glob.glob(str(root / "lib*" / "libcudart.so*"))) + sorted(
            glob.glob(str(root / "targets" / "*" / "lib" / "libcudart.so*")))
    return found


def _load_cuda_runtime() -> None:
    """Load TVM's CUDA runtime library (with a stand-in driver where no real one exists)."""
    global _loaded
    if _loaded:
        return
    import tvm  # noqa: F401  (loads libtvm_runtime first)

    lib = os.path.join(os.path.dirname(tvm.__file__), "lib", "libtvm_runtime_cuda.so")
    try:
        ctypes.CDLL("libcuda.so.1", ctypes.RTLD_GLOBAL)
    except OSError:
        _load_stub_driver()
    for cand in _cudart_candidates():
        try:
            ctypes.CDLL(cand, ctypes.RTLD_GLOBAL)
            break
        except OSError:
            continue
    try:
        ctypes.CDLL(lib, ctypes.RTLD_GLOBAL)
    except OSError as err:
        raise UnsparseError(f"cannot load TVM's CUDA runtime library to package device code: {err}") from None
    _loaded = True


def _load_stub_driver() -> None:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "unsparse-tvm" / "stub-driver"
    so = cache / "libcuda.so.1"
    if not so.exists():
        cache.mkdir(parents=True, exist_ok=True)
        src = cache / "stub.c"
        src.write_text(_STUB_C)
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            raise UnsparseError("no GPU driver here and no C compiler to build the stand-in: install gcc")
        tmp = cache / f"libcuda.so.1.{os.getpid()}"
        subprocess.run([cc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(tmp), str(src)],
                       check=True, capture_output=True)
        os.replace(tmp, so)
    ctypes.CDLL(str(so), ctypes.RTLD_GLOBAL)


_ARCH: dict[str, str | None] = {"building": None, "loading": None}


@contextlib.contextmanager
def building_for(target) -> Iterator[None]:
    """Say which arch a cuda build in this block is for. Once our nvcc callback is registered (by the
    first embed_device_code), TVM calls it while *building* every later cuda module, with no target given
    or in scope: it compiled those for the previous module's arch (sm_90 code in an sm_90a module)."""
    before = _ARCH["building"]
    _ARCH["building"] = str(target.attrs["arch"]) if target.kind.name == "cuda" else before
    try:
        yield
    finally:
        _ARCH["building"] = before


def _register_compiler(arch: str) -> None:
    """nvcc compiles CUDA source for the arch being built (building_for), or else for `arch` (the module
    embed_device_code loads)."""
    import tvm
    import tvm_ffi
    from tvm.support import nvcc

    _ARCH["loading"] = arch

    @tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
    def _compile(code, *_):
        target_arch = _ARCH["building"] or _ARCH["loading"]
        with tvm.target.Target({"kind": "cuda", "arch": target_arch}):
            try:
                return nvcc.compile_cuda(code, target_format="fatbin", arch=target_arch, compiler="nvcc")
            except Exception as err:  # nvcc's own message is the useful part
                raise UnsparseError(f"nvcc failed to compile the device code for {target_arch}: {err}") from None


def embed_device_code(executable, arch: str):
    """Replace the CUDA source module in `executable`'s module tree by one compiled to a fatbin."""
    find_nvcc()
    _load_cuda_runtime()
    _register_compiler(arch)
    import tvm

    with tempfile.TemporaryDirectory() as tmp:
        src_so = os.path.join(tmp, "with_source.so")
        executable.export_library(src_so)
        loaded = tvm.runtime.load_module(src_so)  # the CUDA module compiles (our callback) on load
        compiled = [m for m in _walk(loaded) if m.kind == "cuda"]
    hosts = [m for m in _walk(executable.mod) if any(i.kind == "cuda" for i in m.imports)]
    if len(compiled) != 1 or len(hosts) != 1:
        raise UnsparseError("unexpected module layout: could not find the one CUDA module to compile")
    host = hosts[0]
    others = [i for i in host.imports if i.kind != "cuda"]
    host.clear_imports()
    for m in others + compiled:
        host.import_module(m)
    return executable


def _walk(mod):
    yield mod
    for child in mod.imports:
        yield from _walk(child)
