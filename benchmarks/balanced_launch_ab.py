"""TVM's static split of parallel loops against a two-ended work-stealing launcher (balanced_launch.c, preloaded),
the same module in alternating rounds, outputs compared (docs/results.md, 2026-12-07 08 h UTC: tried, not kept).

    cc -O2 -shared -fPIC -o /tmp/bl.so benchmarks/balanced_launch.c -ldl
    SHIM=/tmp/bl.so LD_PRELOAD=/tmp/bl.so TVM_NUM_THREADS=2 CHUNKS=8 MINUS=20 \
        python benchmarks/balanced_launch_ab.py model.so 2 41
"""
import ctypes
import os
import sys

import numpy as np
import tvm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from so_profile import _input  # noqa: E402
from unsparse_tvm.runtime import load  # noqa: E402
from unsparse_tvm.timing import (MULTI_THREAD_PAUSE_S, paired_ratio, round_robin_samples,  # noqa: E402
                                 set_threads, vm_timer)
shim = ctypes.CDLL(os.environ["SHIM"])
flag = ctypes.c_int.in_dll(shim, "unsparse_steal")
ctypes.c_int.in_dll(shim, "unsparse_chunks").value = int(os.environ.get("CHUNKS", "4"))
ctypes.c_double.in_dll(shim, "unsparse_min_us").value = float(os.environ.get("MINUS", "0"))
steals = ctypes.c_long.in_dll(shim, "unsparse_steals")
path, threads, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
set_threads(threads)
_, _, meta = load(path)
x = _input(meta)
timer, out = vm_timer(tvm.runtime.load_module(path), tvm.cpu(), x)
flag.value = 1
_, out2 = vm_timer(tvm.runtime.load_module(path), tvm.cpu(), x)
print("max diff", float(np.abs(out - out2).max()))


def switched(on: int):
    def measure(number: int) -> float:
        flag.value = on
        return timer(number)
    return measure


s = round_robin_samples({"static": switched(0), "steal": switched(1)}, rounds, pause=MULTI_THREAD_PAUSE_S)
r = paired_ratio(s["static"], s["steal"])
print(f"static {np.median(s['static']):.3f} ms, steal {np.median(s['steal']):.3f} ms, static/steal per round "
      f"{r['median']:.3f} [{r['q1']:.3f}, {r['q3']:.3f}], steals {steals.value}")
