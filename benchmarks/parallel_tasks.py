"""Where a compiled .so's time goes when it runs on several threads (design.md item 56): every parallel launch's
tasks timed, one thread against two.

A small C shim (compiled here with `cc`) is preloaded in front of the TVM runtime: it wraps each kernel's
TVMBackendParallelLaunch and times each task (each thread's share of the parallel loop) and the launch. Per
inference (median of runs), for one thread and for two: the time in launches, the slowest and the mean task,
and per kernel the CPU time of its tasks added up, so that work which grows when it is split (cache lines
moving between the cores) shows apart from imbalance and launch overhead.

    python benchmarks/parallel_tasks.py model.so [--runs 100] [--top 12]
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import subprocess
import sys
import tempfile

SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <time.h>
typedef struct { void *sync_handle; int32_t num_task; } Env;
typedef int (*Lambda)(int, Env *, void *);
typedef int (*Launch)(Lambda, void *, int);
typedef struct { Lambda f; void *cdata; } Wrapped;
#define TASKS 2
#define LAUNCHES 1024
static double begin[TASKS], end[TASKS];
static int tasks_seen;
static long launch;
static void *fn[LAUNCHES];
static double wall[LAUNCHES], busy[LAUNCHES][TASKS];
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
static int timed(int task, Env *env, void *cdata) {
  Wrapped *w = cdata;
  double s = now();
  int r = w->f(task, env, w->cdata);
  if (task < TASKS) { begin[task] = s; end[task] = now(); }
  if (task == 0) tasks_seen = env->num_task;
  return r;
}
int TVMBackendParallelLaunch(Lambda f, void *cdata, int num_task) {
  static Launch real = 0;
  if (!real) real = (Launch)dlsym(RTLD_NEXT, "TVMBackendParallelLaunch");
  Wrapped w = {f, cdata};
  for (int i = 0; i < TASKS; i++) begin[i] = end[i] = 0;
  double t0 = now();
  int r = real(timed, &w, num_task);
  double t1 = now();
  if (launch < LAUNCHES) {
    fn[launch] = (void *)f;
    wall[launch] = t1 - t0;
    for (int i = 0; i < TASKS && i < tasks_seen; i++) busy[launch][i] = end[i] - begin[i];
  }
  launch++;
  return r;
}
long unsparse_launches(void) { return launch; }
void unsparse_restart(void) { launch = 0; for (int i = 0; i < LAUNCHES; i++) busy[i][0] = busy[i][1] = 0; }
void unsparse_launch(long i, void **f, double *w, double *b) { *f = fn[i]; *w = wall[i]; b[0] = busy[i][0]; b[1] = busy[i][1]; }
"""


def measure(path: str, threads: int, runs: int) -> list[dict]:
    """Per launch of one inference (this process has the shim preloaded): kernel name, wall and per-task
    seconds, each the median over `runs` inferences."""
    import ctypes

    import tvm
    from so_profile import _input  # next to this file: the seeded input so_profile times with

    from unsparse_tvm.runtime import load
    from unsparse_tvm.timing import set_threads

    shim = ctypes.CDLL(os.environ["UNSPARSE_SHIM"])
    shim.unsparse_launches.restype = ctypes.c_long
    set_threads(threads)
    vm, _dev, meta = load(path)
    x = tvm.runtime.tensor(_input(meta))
    for _ in range(20):
        vm["main"](x)
    samples = []
    f, w, b = ctypes.c_void_p(), ctypes.c_double(), (ctypes.c_double * 2)()
    for _ in range(runs):
        shim.unsparse_restart()
        vm["main"](x)
        one = []
        for i in range(shim.unsparse_launches()):
            shim.unsparse_launch(i, ctypes.byref(f), ctypes.byref(w), b)
            one.append((f.value, w.value, b[0], b[1]))
        samples.append(one)
    names = _kernel_names(path, [launch[0] for launch in samples[0]])
    mid = runs // 2
    return [{"kernel": names[i], "wall": sorted(s[i][1] for s in samples)[mid],
             "tasks": [sorted(s[i][2 + t] for s in samples)[mid] for t in range(threads)]}
            for i in range(len(samples[0]))]


def _kernel_names(path: str, addresses: list[int]) -> list[str]:
    """The function each task lambda lies in (`nm` of the .so, offset by where it is loaded)."""
    base = next(int(line.split("-")[0], 16) for line in open("/proc/self/maps")
                if line.rstrip().endswith(os.path.abspath(path)) and " 00000000 " in line)
    symbols = sorted((int(a, 16), name) for a, _, name in (line.split() for line in subprocess.run(
        ["nm", path], capture_output=True, text=True, check=True).stdout.splitlines() if len(line.split()) == 3))
    starts = [a for a, _ in symbols]
    return [symbols[bisect.bisect_right(starts, a - base) - 1][1].removesuffix("_compute_") for a in addresses]


def report(one: list[dict], two: list[dict], top: int) -> None:
    def totals(rows):
        return (sum(r["wall"] for r in rows), sum(max(r["tasks"]) for r in rows),
                sum(sum(r["tasks"]) / len(r["tasks"]) for r in rows))

    for label, rows in (("1 thread", one), ("2 threads", two)):
        w, slowest, mean = totals(rows)
        print(f"{label}: {len(rows)} launches, {w * 1e3:.3f} ms in them; slowest task {slowest * 1e3:.3f}, mean task "
              f"{mean * 1e3:.3f} (imbalance {(slowest - mean) * 1e3:.3f}, launch overhead {(w - slowest) * 1e3:.3f})")
    grown = [(sum(b["tasks"]) - a["tasks"][0], a["kernel"], a["tasks"][0], b["tasks"], b["wall"]) for a, b in zip(one, two)]
    print(f"CPU time of all tasks: {sum(a['tasks'][0] for a in one) * 1e3:.3f} ms on one thread, "
          f"{sum(sum(b['tasks']) for b in two) * 1e3:.3f} on two; the kernels whose work grew most:")
    for extra, name, alone, tasks, w in sorted(grown, reverse=True)[:top]:
        print(f"  +{extra * 1e6:6.1f} us  {name:28s} one thread {alone * 1e6:6.1f} us, two: tasks "
              f"{' / '.join(f'{t * 1e6:.1f}' for t in tasks)} us, launch {w * 1e6:.1f} us")
    print("by kind of kernel (the layer number dropped): one thread's time, two threads' launches against half of it")
    kinds: dict[str, list[float]] = {}
    for a, b in zip(one, two):
        k = kinds.setdefault(a["kernel"].rstrip("0123456789"), [0.0, 0.0, 0.0])
        k[0], k[1], k[2] = k[0] + a["tasks"][0], k[1] + b["wall"], k[2] + b["tasks"][0] - b["tasks"][-1]
    for name, (alone, w, first) in sorted(kinds.items(), key=lambda kv: -kv[1][1]):
        print(f"  {name:28s} one thread {alone * 1e3:6.3f} ms, two {w * 1e3:6.3f} (half of one: {alone * 5e2:6.3f}); "
              f"first task minus last {first * 1e3:+.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("module")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--threads", type=int, help=argparse.SUPPRESS)  # the child's: measure at this count
    args = ap.parse_args()
    if args.threads:
        json.dump(measure(args.module, args.threads, args.runs), sys.stdout)
        return
    with tempfile.TemporaryDirectory() as tmp:
        src, lib = os.path.join(tmp, "shim.c"), os.path.join(tmp, "shim.so")
        with open(src, "w") as f:
            f.write(SHIM)
        subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", lib, src, "-ldl"], check=True)
        env = {**os.environ, "UNSPARSE_SHIM": lib, "LD_PRELOAD": lib, "TVM_NUM_THREADS": "2"}
        runs = [json.loads(subprocess.run([sys.executable, __file__, args.module, "--runs", str(args.runs),
                                           "--threads", str(n)], env=env, capture_output=True, text=True,
                                          check=True).stdout) for n in (1, 2)]
    report(*runs, args.top)


if __name__ == "__main__":
    main()
