"""Targets from the CLI's words (`--target llvm|cuda --arch sm_90`) to tvm.target.Target.

TVM 0.27 accepts only JSON-dict targets; the llvm target gets the host CPU (so AVX-512/AVX2 are used)
and the machine's core count.
"""

from __future__ import annotations

import functools
import glob
import os
import re
import shutil
import subprocess

from .errors import UnsparseError
from .hostcpu import ISA_FEATURES, describe_missing, missing_features
from .ops import names
from .reference import usable_cores

TARGETS = ("llvm", "cuda")
DEFAULT_ARCH = "sm_90"  # H100; pass --arch for other GPUs
_ARCH = re.compile(r"^sm_(\d{2,3})[af]?$")


TRIPLE = "x86_64-unknown-linux-gnu"
MCPU_ENV = "UNSPARSE_MCPU"  # e.g. haswell: code for an older x86 CPU (AVX2 timings on an AVX-512 machine)


def host_cpu() -> str:
    from tvm.target import codegen  # deferred: TVM's compiler, not needed to check --target/--arch

    override = os.environ.get(MCPU_ENV)
    if override:
        if not codegen.llvm_is_valid_cpu(override, TRIPLE):
            raise UnsparseError(f"{MCPU_ENV}={override} is not an x86 CPU LLVM knows (e.g. haswell, skylake-avx512)")
        return override
    cpu = str(codegen.llvm_get_system_cpu())
    return cpu if cpu and cpu != "generic" and codegen.llvm_is_valid_cpu(cpu, TRIPLE) else "x86-64"


def llvm_target_dict(mcpu: str | None = None) -> dict:
    """The llvm target for CPU model `mcpu`, default this machine's (or UNSPARSE_MCPU's). For this machine's
    own model, the extensions LLVM's name implies but this CPU does not execute (a VM or an emulator that
    hides AVX-512, say) are switched off with `mattr`, so its code always runs here."""
    d = {"kind": "llvm", "mtriple": TRIPLE, "mcpu": mcpu or host_cpu(), "num-cores": usable_cores()}
    if mcpu is None and not os.environ.get(MCPU_ENV):
        off = missing_features(cpu_features(d["mcpu"]))
        if off:
            d["mattr"] = [f"-{f}" for f in off]
    return d


@functools.lru_cache(maxsize=None)
def cpu_features(mcpu: str, mattr: tuple[str, ...] = ()) -> frozenset[str]:
    """The x86 extensions (hostcpu.ISA_FEATURES) code built for LLVM CPU model `mcpu` (+ `mattr`) may use."""
    import tvm  # deferred likewise
    from tvm.target import codegen

    target = tvm.target.Target({"kind": "llvm", "mtriple": TRIPLE, "mcpu": mcpu,
                                **({"mattr": list(mattr)} if mattr else {})})
    return frozenset(str(f) for f in codegen.llvm_get_cpu_features(target)) & frozenset(ISA_FEATURES)


def target_cpu_features(target) -> frozenset[str]:
    """cpu_features of an llvm target (a cuda target: of its host); empty where no CPU model is set."""
    host = target if target.kind.name == "llvm" else target.host
    if host is None or "mcpu" not in host.attrs:
        return frozenset()
    mattr = tuple(str(a) for a in host.attrs["mattr"]) if "mattr" in host.attrs else ()
    return cpu_features(str(host.attrs["mcpu"]), mattr)


def runnable_here(target) -> str | None:
    """None where this CPU executes the target's (host) code, else why not, in one phrase."""
    host = target if target.kind.name == "llvm" else target.host
    mcpu = str(host.attrs["mcpu"]) if host is not None and "mcpu" in host.attrs else "?"
    return describe_missing(f"code for {mcpu}", target_cpu_features(target))


# int8-execution kernels: their write-back requantises 16 int32 sums to 16 bytes per vector, which LLVM's
# 256-bit preference (a tuning flag of its Skylake-AVX512-and-later models) legalises in 8-lane halves, twice
# the instructions. Built without it, resnet50 95% channel4 int8 ran 6.98 -> 6.04 ms (one thread, the same
# outputs bit for bit); fp32 kernels keep it: some of their 1x1 write-backs ran 1.4x slower without it
WIDE_VECTOR_OPS = frozenset({names.SPARSE_CONV2D_INT8, names.SPARSE_DENSE_INT8})
WIDE_VECTORS = True  # tests turn it off to compare


def kernel_target(target, mod):
    """The target an IRModule of kernels is built for: `target`, except where every kernel in it executes int8
    (WIDE_VECTOR_OPS) and the llvm target has AVX-512: then `target` with LLVM's prefer-256-bit off."""
    import tvm  # deferred likewise

    if not WIDE_VECTORS or target.kind.name != "llvm" or "avx512f" not in target_cpu_features(target):
        return target
    ops = [names.op_of(f) for f in mod.functions.values()]
    if not ops or any(op not in WIDE_VECTOR_OPS for op in ops):
        return target
    d = {k: v for k, v in target.export().items() if k not in ("tag", "keys")}
    d["mattr"] = [str(a) for a in d.get("mattr", [])] + ["-prefer-256-bit"]
    return tvm.target.Target(d)


@functools.lru_cache(maxsize=None)
def nvcc_arches() -> tuple[str, ...] | None:
    """The real architectures this machine's nvcc compiles for (`nvcc --list-gpu-code`); None without nvcc."""
    nvcc = shutil.which("nvcc") or next(iter(glob.glob("/usr/local/cuda*/bin/nvcc")), None)
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    arches = tuple(line.strip() for line in out.splitlines() if _ARCH.match(line.strip()))
    return arches or None


def check_arch(arch: str) -> str:
    """sm_XY (optionally sm_XYa / sm_XYf) that the installed nvcc can compile for, before any work."""
    m = _ARCH.match(arch)
    if not m or int(m.group(1)) < 50:
        raise UnsparseError(f"unknown CUDA arch '{arch}': use the form sm_XY, e.g. sm_80 (A100) or sm_90 (H100)")
    known = nvcc_arches()
    if known is not None and f"sm_{m.group(1)}" not in known:
        raise UnsparseError(f"CUDA arch '{arch}' is not supported by this machine's nvcc, which compiles for "
                            f"{', '.join(known)}")
    return arch


def make_target(kind: str, arch: str | None = None):
    """tvm.target.Target for 'llvm' or 'cuda' (with arch), or a clear error."""
    import tvm  # deferred likewise

    if kind not in TARGETS:
        raise UnsparseError(f"unknown target '{kind}': use llvm (x86 CPU) or cuda")
    if kind == "llvm":
        if arch is not None:  # refused, not ignored: the llvm target always uses this machine's CPU
            raise UnsparseError("--arch is for --target cuda; the llvm target uses this machine's CPU")
        return tvm.target.Target(llvm_target_dict())
    arch = check_arch(arch or DEFAULT_ARCH)
    return tvm.target.Target({"kind": "cuda", "arch": arch, "host": llvm_target_dict()})


def require_runnable(target, command: str) -> None:
    """`bench` and local `tune` run what they build: refuse, in one line, code this CPU cannot execute."""
    why = runnable_here(target)
    if why:
        raise UnsparseError(f"{command} runs the code it builds here, but {why}: leave {MCPU_ENV} unset or name "
                            "a CPU model this machine has (e.g. haswell for AVX2)")
