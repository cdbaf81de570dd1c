"""What this CPU can execute, and what code built for an LLVM CPU model needs from it.

Compiled x86 code uses the instruction-set extensions of the CPU model it was built for (`mcpu`): code
for `skylake-avx512` dies with SIGILL on an AVX2-only CPU. Three places ask before running such code:
`run` (the CPU features a module needs are stored in it at compile time), the test suite (it only runs
kernels this CPU can execute, and compiles-and-reads the assembly of the others), and the host target
(`target.llvm_target_dict`), which switches off what LLVM's CPU name implies but this CPU lacks.

This CPU's features come from numpy's CPUID probe (`__cpu_features__`, which also checks that the OS saves
the wide registers), not from /proc/cpuinfo alone: under an emulator such as `qemu-x86_64 -cpu Haswell`,
/proc/cpuinfo still describes the real machine while CPUID answers for the emulated one. /proc/cpuinfo
fills in the few features numpy does not probe, and only where it agrees with numpy on every feature both
report. This module imports neither TVM nor torch (`run` is runtime-only).
"""

from __future__ import annotations

import functools
import glob
import os

# The x86 extensions that decide whether compiled code runs: LLVM's feature name -> (numpy's CPUID name,
# Linux's /proc/cpuinfo flag). None where numpy does not probe it.
ISA_FEATURES: dict[str, tuple[str | None, str]] = {
    "sse4.1": ("SSE41", "sse4_1"),
    "sse4.2": ("SSE42", "sse4_2"),
    "avx": ("AVX", "avx"),
    "avx2": ("AVX2", "avx2"),
    "fma": ("FMA3", "fma"),
    "f16c": ("F16C", "f16c"),
    "avx512f": ("AVX512F", "avx512f"),
    "avx512cd": ("AVX512CD", "avx512cd"),
    "avx512bw": ("AVX512BW", "avx512bw"),
    "avx512dq": ("AVX512DQ", "avx512dq"),
    "avx512vl": ("AVX512VL", "avx512vl"),
    "avx512vnni": ("AVX512VNNI", "avx512_vnni"),
    "avx512ifma": ("AVX512IFMA", "avx512ifma"),
    "avx512vbmi": ("AVX512VBMI", "avx512vbmi"),
    "avx512vbmi2": ("AVX512VBMI2", "avx512_vbmi2"),
    "avx512bitalg": ("AVX512BITALG", "avx512_bitalg"),
    "avx512vpopcntdq": ("AVX512VPOPCNTDQ", "avx512_vpopcntdq"),
    "avx512bf16": ("AVX512BF16", "avx512_bf16"),
    "avx512fp16": ("AVX512FP16", "avx512_fp16"),
    "avxvnni": (None, "avx_vnni"),
    "amx-tile": (None, "amx_tile"),
    "amx-int8": (None, "amx_int8"),
    "amx-bf16": (None, "amx_bf16"),
}


def _numpy_cpu_features() -> dict[str, bool]:
    try:  # numpy 2
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # numpy 1
        from numpy.core._multiarray_umath import __cpu_features__
    return dict(__cpu_features__)


def cpuinfo_flags() -> set[str] | None:
    """The kernel's /proc/cpuinfo flags of this CPU (Linux), None where there is no such file."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


@functools.cache
def host_features() -> frozenset[str]:
    """The ISA_FEATURES this CPU executes, by LLVM's names."""
    probed, flags = _numpy_cpu_features(), cpuinfo_flags()
    known = {llvm: bool(probed[np_name]) for llvm, (np_name, _) in ISA_FEATURES.items() if np_name in probed}
    # /proc/cpuinfo is trusted for the rest only where it describes the CPU that CPUID describes
    trusted = flags is not None and all((ISA_FEATURES[llvm][1] in flags) == has for llvm, has in known.items())
    return frozenset(llvm for llvm in ISA_FEATURES
                     if known.get(llvm, trusted and ISA_FEATURES[llvm][1] in flags))


_CACHE_SYSFS = "/sys/devices/system/cpu/cpu0/cache"


@functools.cache
def l2_bytes() -> int | None:
    """This CPU's level-2 cache per core in bytes (Linux sysfs), None where the system does not say.
    Cores differ (256 KB on Haswell, 512 KB on Zen 3, 1 MB on Zen 4 and Skylake-SP, 2 MB on Sapphire
    Rapids), and the CPU schedules' loop order depends on whether an input fits (schedules.sparse_conv2d_cpu)."""
    units = {"K": 1 << 10, "M": 1 << 20}
    for index in sorted(glob.glob(os.path.join(_CACHE_SYSFS, "index*"))):
        try:
            level, kind, size = (_read(os.path.join(index, f)) for f in ("level", "type", "size"))
        except OSError:
            continue
        if level == "2" and kind in ("Unified", "Data") and size[:-1].isdigit() and size[-1] in units:
            return int(size[:-1]) * units[size[-1]]
    return None


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def missing_features(needed) -> list[str]:
    """The features in `needed` (LLVM names) this CPU lacks, sorted; [] where it runs such code."""
    return sorted(set(needed) & set(ISA_FEATURES) - host_features())


def describe_missing(what: str, needed) -> str | None:
    """One phrase for a message: "<what> needs avx512bw, avx512f; this CPU lacks them", or None."""
    missing = missing_features(needed)
    if not missing:
        return None
    return f"{what} needs {', '.join(missing)}; this CPU lacks {'it' if len(missing) == 1 else 'them'}"
