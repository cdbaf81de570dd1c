"""How many TVMBackendAllocWorkspace calls one inference of a compiled .so makes (design.md item 53).

A small C shim (compiled here with `cc`) is preloaded in front of the TVM runtime and counts the calls the
kernels make, then forwards them. One thread, after a warm-up call; the mean of 10 inferences.

    python benchmarks/workspace_calls.py a.so [b.so ...]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
static long calls = 0;
typedef void *(*alloc_t)(int, int, uint64_t, int, int);
void *TVMBackendAllocWorkspace(int device_type, int device_id, uint64_t size, int code, int bits) {
  static alloc_t real = 0;
  if (!real) real = (alloc_t)dlsym(RTLD_NEXT, "TVMBackendAllocWorkspace");
  __atomic_add_fetch(&calls, 1, __ATOMIC_RELAXED);
  return real(device_type, device_id, size, code, bits);
}
long unsparse_workspace_calls(void) { return calls; }
"""


def count(path: str, shim: str, runs: int = 10) -> float:
    """Calls per inference of the .so at `path` (this process has the shim preloaded)."""
    import ctypes

    import tvm
    from so_profile import _input  # next to this file: the seeded input so_profile times with

    from unsparse_tvm.runtime import load
    from unsparse_tvm.timing import set_threads

    calls = ctypes.CDLL(shim).unsparse_workspace_calls
    calls.restype = ctypes.c_long
    set_threads(1)
    vm, _dev, meta = load(path)
    x = tvm.runtime.tensor(_input(meta))
    vm["main"](x)  # warm-up: first-call allocations
    before = calls()
    for _ in range(runs):
        vm["main"](x)
    return (calls() - before) / runs


def main() -> None:
    paths = sys.argv[1:]
    if not paths:
        sys.exit(__doc__)
    shim = os.environ.get("UNSPARSE_SHIM")
    if shim is None:  # build the shim, then run again with it preloaded
        with tempfile.TemporaryDirectory() as tmp:
            src, lib = os.path.join(tmp, "shim.c"), os.path.join(tmp, "shim.so")
            with open(src, "w") as f:
                f.write(SHIM)
            subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", lib, src, "-ldl"], check=True)
            env = {**os.environ, "UNSPARSE_SHIM": lib, "LD_PRELOAD": lib}
            sys.exit(subprocess.run([sys.executable, __file__, *paths], env=env).returncode)
    for path in paths:
        print(f"{path}: {count(path, shim):.0f} workspace allocations per inference")


if __name__ == "__main__":
    main()
