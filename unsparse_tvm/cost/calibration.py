"""Calibration: the x86 cost model's rates (layer_cost.X86Rates) measured on this CPU, once per CPU model,
code path and thread count, and kept in the user's cache folder.

The built-in rates were fitted on the developers' 2-vCPU AVX-512 VM; vector width, FMA throughput, caches
and memory bandwidth differ elsewhere, and with them which kernel wins a layer. `calibrate` (or, once, the
first `compile` for this CPU) builds a few single layers with the very rules `compile` uses (our dense
direct conv, ell / hyb / vell sparse rows, a flat and an unfused epilogue, an output larger than the
caches, the linear kernels), times each with TVM's time_evaluator, and fits the rates to them.

A calibration belongs to the host: it is used only for code this CPU runs (UNSPARSE_MCPU=haswell on an
AVX-512 machine has a calibration of its own, keyed by the code path), with the thread count the module
will run with (TVM_NUM_THREADS, all usable cores by default). `--no-calibrate` or UNSPARSE_CALIBRATION=off
keeps the built-in rates. A damaged or foreign file is ignored with one warning and measured again; a
calibration measured while other processes used the CPU is refused where it is more than 2x off.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import re
import sys
import time

from ..errors import UnsparseError
from ..hostcpu import host_features
from ..reference import usable_cores
from .model import BUILTIN, X86Rates

# 2: new dense linear and dense conv schedules (2026-12-03); files of format 1 timed the old ones.
# 3: the dense conv's pointwise rate of its own, ell fitted to 3x3s only, the per-call cost taken off, the
#    sparse layers' terms at their kernel's own domain (calibration_layers; 2026-12-05)
FORMAT = 3
MODE_ENV = "UNSPARSE_CALIBRATION"    # "off": the built-in rates, as --no-calibrate
CACHE_ENV = "UNSPARSE_CACHE_DIR"     # default: $XDG_CACHE_HOME/unsparse-tvm, else ~/.cache/unsparse-tvm
BUSY_CORES = 0.5                     # other processes using more than half a core on average: a busy machine
MAX_BUSY_RATIO = 2.0                 # ... whose rates are refused where they are this far from the built-in
RATE_FIELDS = tuple(f.name for f in dataclasses.fields(X86Rates) if f.name not in ("cache_bytes", "source"))


def cache_dir() -> str:
    base = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "unsparse-tvm")
    return os.path.join(base, "calibration")


def run_threads() -> int:
    """Threads the compiled module will run with: TVM_NUM_THREADS (unsparse_tvm sets it to the usable cores
    unless the user did)."""
    env = os.environ.get("TVM_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else usable_cores()


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor() or platform.machine()


# bumped when the kernels the rates are measured on change speed for every layer (3: small buffers on the stack,
# tir_pipeline): rates measured on the older code no longer describe what compile builds
KERNELS = 3


def identity(target, threads: int) -> dict:
    """What a calibration is valid for: this CPU (model name, extensions), the code path (LLVM mcpu and
    mattr of the target), the thread count and the kernels' generation (KERNELS)."""
    mattr = sorted(str(a) for a in target.attrs["mattr"]) if "mattr" in target.attrs else []
    return {"cpu_model": cpu_model_name(), "cpu_features": sorted(host_features()),
            "mcpu": str(target.attrs["mcpu"]), "mattr": mattr, "threads": threads, "kernels": KERNELS}


def cache_path(ident: dict) -> str:
    digest = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:10]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", ident["mcpu"])
    return os.path.join(cache_dir(), f"{slug}-t{ident['threads']}-{digest}.json")


class CalibrationFileError(Exception):
    """A calibration file that cannot be used (damaged, or measured for another CPU or thread count)."""


def read_rates_file(path: str, expect: dict | None = None) -> X86Rates:
    """The rates stored in a calibration file; CalibrationFileError where it is damaged or, given `expect`
    (an identity), measured for something else."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CalibrationFileError(f"{path} is not a calibration file ({type(err).__name__})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("rates"), dict):
        raise CalibrationFileError(f"{path} is not a calibration file of format {FORMAT}")
    rates = data["rates"]
    bad = [k for k in RATE_FIELDS if not isinstance(rates.get(k), (int, float)) or not math.isfinite(rates[k])
           or rates[k] <= 0]
    if bad:
        raise CalibrationFileError(f"{path} holds no valid rate for {', '.join(bad)}")
    if expect is not None and data.get("identity") != expect:
        theirs = data.get("identity") if isinstance(data.get("identity"), dict) else {}
        diff = [k for k in expect if theirs.get(k) != expect[k]]
        raise CalibrationFileError(f"{path} was measured for another {' and '.join(diff) or 'machine'}")
    return dataclasses.replace(BUILTIN, **{k: float(rates[k]) for k in RATE_FIELDS},
                               source=f"calibrated {data.get('date', '?')}, {path}")


def cached_rates(target, threads: int | None = None, warn=None) -> X86Rates | None:
    """This CPU's calibration for `target` and `threads`, or None (missing; damaged or foreign: with one
    warning through `warn`)."""
    ident = identity(target, threads or run_threads())
    path = cache_path(ident)
    if not os.path.exists(path):
        return None
    try:
        return read_rates_file(path, ident)
    except CalibrationFileError as err:
        if warn:
            warn(f"warning: {err}; ignored, measuring again")
        return None


def rates_for(target, *, calibrate: bool = True, log=print, threads: int | None = None) -> X86Rates:
    """The rates `compile` uses for `target`, saying which in one line: this CPU's calibration (measured
    now if there is none yet), or the built-in rates (cuda, --no-calibrate / UNSPARSE_CALIBRATION=off, code
    this CPU does not run). threads: the count the module will run with (default run_threads())."""
    from ..target import runnable_here

    if target.kind.name != "llvm":
        return BUILTIN
    if not calibrate or os.environ.get(MODE_ENV, "").lower() in ("off", "0", "no", "builtin", "built-in"):
        why = "--no-calibrate" if not calibrate else f"{MODE_ENV}={os.environ[MODE_ENV]}"
        log(f"cost model: built-in x86 rates ({why})")
        return BUILTIN
    if runnable_here(target):
        log(f"cost model: built-in x86 rates (code for {target.attrs['mcpu']} does not run here to calibrate)")
        return BUILTIN
    threads = threads or run_threads()
    rates = cached_rates(target, threads, warn=lambda m: print(m, file=sys.stderr))
    if rates is None:
        log(f"calibrating the cost model for this CPU ({target.attrs['mcpu']}, {threads} thread(s)); once, "
            "under a minute (--no-calibrate skips it)")
        try:
            rates = calibrate_rates(target, threads, log=log)
        except UnsparseError as err:  # a busy machine: this compile goes on with the built-in rates
            print(f"warning: {err}; compiling with the built-in rates", file=sys.stderr)
            return BUILTIN
    log(f"cost model: x86 rates {rates.source}")
    return rates


# ---- measuring ------------------------------------------------------------------------------------------
def _busy_cores(stat_before: list[int], stat_after: list[int], own_cpu_s: float, wall_s: float) -> float:
    """Cores' worth of CPU that other processes used while we measured (/proc/stat minus our own time)."""
    hz = os.sysconf("SC_CLK_TCK")
    busy = lambda s: sum(s) - s[3] - (s[4] if len(s) > 4 else 0)  # everything but idle and iowait
    return max(0.0, ((busy(stat_after) - busy(stat_before)) / hz - own_cpu_s) / max(wall_s, 1e-9))


def _proc_stat() -> list[int]:
    try:
        with open("/proc/stat") as f:
            return [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return [0] * 8


def calibrate_rates(target, threads: int, *, log=print, store: bool = True) -> X86Rates:
    """Measure, check and (store) this CPU's rates for `target` at `threads`."""
    from .calibration_layers import fit_rates, measure_layers

    ident = identity(target, threads)
    stat0, cpu0, t0 = _proc_stat(), sum(os.times()[:4]), time.perf_counter()
    measured = measure_layers(target, threads, log=log)
    wall = time.perf_counter() - t0
    others = _busy_cores(stat0, _proc_stat(), sum(os.times()[:4]) - cpu0, wall)
    rates, fit = fit_rates(measured)
    builtin_scale = threads / 2  # the built-in rates are both threads of a 2-vCPU machine
    off = {k: getattr(rates, k) / (getattr(BUILTIN, k) * builtin_scale) for k in RATE_FIELDS}
    far = {k: v for k, v in off.items() if not 1 / MAX_BUSY_RATIO <= v <= MAX_BUSY_RATIO}
    if others > BUSY_CORES and far:
        k = max(far, key=lambda k: abs(math.log(far[k])))
        raise UnsparseError(f"the machine is busy (other processes used {others:.1f} cores while calibrating) and "
                            f"the rates measured are up to {max(far[k], 1 / far[k]):.1f}x off the built-in ones "
                            f"({k}); nothing stored: calibrate again on an idle machine")
    date = time.strftime("%Y-%m-%d %H:%M")
    path = cache_path(ident)
    rates = dataclasses.replace(rates, source=f"calibrated {date}, {path}")
    if store:
        from ..outputs import write_text

        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_text(path, json.dumps({
            "format": FORMAT, "identity": ident, "date": date, "seconds": round(wall, 1),
            "busy_cores": round(others, 2), "rates": {k: getattr(rates, k) for k in RATE_FIELDS},
            "layers": fit, "tvm": __import__("tvm").__version__}, indent=1))
        log(f"calibration stored in {path} ({wall:.0f} s)")
    return rates


def calibrate_command(*, threads: int | None = None, no_store: bool = False) -> X86Rates:
    """`unsparse-tvm calibrate`: measure this CPU's rates for the host target (or UNSPARSE_MCPU's), print them
    beside the built-in ones, store them."""
    from ..target import make_target, require_runnable

    target = make_target("llvm")
    require_runnable(target, "calibrate")
    threads = threads or run_threads()
    print(f"calibrating the x86 cost model: {cpu_model_name()}, code for {target.attrs['mcpu']}, "
          f"{threads} thread(s)")
    rates = calibrate_rates(target, threads, store=not no_store)
    print(f"{'rate':14s} {'measured':>12s} {'built-in':>12s}")
    for k in RATE_FIELDS:
        unit = "B/s" if k.endswith("bytes_s") else ("out/s" if k == "output" else "FMA/s")
        print(f"{k:14s} {getattr(rates, k) / 1e9:9.2f} G {getattr(BUILTIN, k) / 1e9:9.2f} G  {unit}")
    return rates
