"""Peers held to AVX2 by what CPUID tells them: for `bench` on the AVX2 code path of an AVX-512 CPU.

ONNX Runtime (its MLAS kernels) and DeepSparse (its JIT: NM_ARCH only picks which of its builds loads, whose
kernels were still `vpdpbusds zmm`) choose their code by CPUID and have no switch to cap it (oneDNN, under OpenVINO
and PyTorch's convolutions, has ONEDNN_MAX_CPU_ISA), so on an AVX-512 machine they ran VNNI kernels against our
AVX2 code. Linux can make the CPUID instruction fault in one thread (`arch_prctl(ARCH_SET_CPUID, 0)`, where
/proc/cpuinfo lists `cpuid_fault`); a SIGSEGV handler (the C shim below, compiled once into the cache) then
answers it from a table read beforehand, with the AVX-512, AVX-VNNI and AMX bits cleared: what an AVX2-only CPU
(Zen 2-3, Haswell-Skylake client) reports. A runtime reads CPUID when it starts, so only peers built while the
mask is on are held (`held()`); threads they start inherit it, and the handler stays installed for them. A
process started meanwhile (DeepSparse's worker, and the probe it runs) preloads the shim, which masks it from its
first instruction and keeps its handler first when the runtime installs its own (its crash reporter), passing it
real faults. XGETBV still reports the AVX-512 registers enabled, which runtimes only check next to CPUID's bits.
Our own kernels are compiled before, for the target given; numpy and PyTorch read their CPU features at import.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

from .hostcpu import cpuinfo_flags

MASK_ENV = "UNSPARSE_CPUID_AVX2"  # "1" in a process that preloads the shim: masked from its start

SOURCE = r"""
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <dlfcn.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>
#define SUBS 64       /* sub-leaves read per leaf (ECX); others answer as sub-leaf 0 */
#define ENTRIES 12288
typedef struct { uint32_t leaf, sub, r[4]; } Entry;
static Entry table[ENTRIES];
static int entries, installed;
static long faults;
static struct sigaction previous;  /* where a fault that is not CPUID goes */
static int real_sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
  static int (*real)(int, const struct sigaction *, struct sigaction *);
  if (!real) real = (int (*)(int, const struct sigaction *, struct sigaction *))dlsym(RTLD_NEXT, "sigaction");
  return real(sig, act, old);
}
static void read_range(uint32_t first) {  /* leaves first..max as the CPU reports them, before any mask */
  uint32_t r[4];
  __cpuid_count(first, 0, r[0], r[1], r[2], r[3]);
  uint32_t last = r[0] >= first && r[0] - first < 256 ? r[0] : first;
  for (uint32_t leaf = first; leaf <= last; leaf++)
    for (uint32_t sub = 0; sub < SUBS && entries < ENTRIES; sub++) {
      Entry *e = &table[entries++];
      e->leaf = leaf, e->sub = sub;
      __cpuid_count(leaf, sub, e->r[0], e->r[1], e->r[2], e->r[3]);
    }
}
static void answer(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
  const Entry *hit = 0;
  for (int i = 0; i < entries; i++)
    if (table[i].leaf == leaf && (table[i].sub == sub || (!hit && table[i].sub == 0))) {
      hit = &table[i];
      if (table[i].sub == sub) break;
    }
  if (hit) memcpy(r, hit->r, sizeof hit->r); else memset(r, 0, 4 * sizeof r[0]);
  if (leaf == 7 && sub == 0) {  /* AVX512 F DQ IFMA PF ER CD BW VL; VBMI VBMI2 VNNI BITALG VPOPCNTDQ; 4VNNIW 4FMAPS
                                   VP2INTERSECT AMX-BF16 FP16 AMX-TILE AMX-INT8 */
    r[1] &= ~(1u << 16 | 1u << 17 | 1u << 21 | 1u << 26 | 1u << 27 | 1u << 28 | 1u << 30 | 1u << 31);
    r[2] &= ~(1u << 1 | 1u << 6 | 1u << 11 | 1u << 12 | 1u << 14);
    r[3] &= ~(1u << 2 | 1u << 3 | 1u << 8 | 1u << 22 | 1u << 23 | 1u << 24 | 1u << 25);
  } else if (leaf == 7 && sub == 1) {  /* AVX-VNNI, AVX512-BF16, AVX-IFMA; AVX-VNNI-INT8, NE-CONVERT, INT16, AVX10 */
    r[0] &= ~(1u << 4 | 1u << 5 | 1u << 23);
    r[3] &= ~(1u << 4 | 1u << 5 | 1u << 10 | 1u << 19);
  } else if (leaf == 0xd && sub == 0) {  /* the opmask, ZMM and AMX tile states among those XSAVE supports */
    r[0] &= ~(1u << 5 | 1u << 6 | 1u << 7 | 1u << 17 | 1u << 18);
  }
}
static void on_segv(int sig, siginfo_t *info, void *context) {
  greg_t *g = ((ucontext_t *)context)->uc_mcontext.gregs;
  const unsigned char *ip = (const unsigned char *)g[REG_RIP];
  if (ip[0] == 0x0f && ip[1] == 0xa2) {  /* CPUID, faulting in a masked thread: answer it, step over it */
    uint32_t r[4];
    answer((uint32_t)g[REG_RAX], (uint32_t)g[REG_RCX], r);
    g[REG_RAX] = r[0], g[REG_RBX] = r[1], g[REG_RCX] = r[2], g[REG_RDX] = r[3];
    g[REG_RIP] += 2;
    __atomic_fetch_add(&faults, 1, __ATOMIC_RELAXED);
    return;
  }
  real_sigaction(SIGSEGV, &previous, 0);  /* a real fault: it happens again, under the handler that was there */
}
int unsparse_mask(void) {  /* this thread (and the threads it starts) sees CPUID without AVX-512: 0, or -1 */
  if (!installed) {
    read_range(0), read_range(0x40000000u), read_range(0x80000000u);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv, sa.sa_flags = SA_SIGINFO;
    if (real_sigaction(SIGSEGV, &sa, &previous)) return -1;
    installed = 1;
  }
  return (int)syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
}
/* preloaded (LD_PRELOAD): a handler for SIGSEGV installed after ours takes the real faults, behind ours */
int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
  if (sig != SIGSEGV || !installed) return real_sigaction(sig, act, old);
  struct sigaction was = previous;
  if (act) previous = *act;
  if (old) *old = was;
  return 0;
}
sighandler_t signal(int sig, sighandler_t handler) {
  struct sigaction act, old;
  memset(&act, 0, sizeof act);
  act.sa_handler = handler, act.sa_flags = SA_RESTART;
  return sigaction(sig, &act, &old) ? SIG_ERR : old.sa_handler;
}
/* preloaded and masked: /proc/cpuinfo as an AVX2-only CPU's, for runtimes that read their CPU there (hwloc) */
static int masked_process;
static const char *const hidden[] = {"avx512", "avx_vnni", "amx", "avx10", 0};
static int cpuinfo_copy(void) {  /* a memfd holding it, or -1 */
  static int (*real_open)(const char *, int, ...);
  if (!real_open) real_open = (int (*)(const char *, int, ...))dlsym(RTLD_NEXT, "open");
  enum { SIZE = 1 << 20 };  /* /proc/cpuinfo of 256 cores */
  char *buf = malloc(SIZE);
  int in = real_open("/proc/cpuinfo", O_RDONLY), out = in < 0 ? -1 : memfd_create("cpuinfo", 0);
  ssize_t n = 0, got, kept = 0;
  if (buf && out >= 0) {
    while (n < SIZE - 1 && (got = read(in, buf + n, SIZE - 1 - n)) > 0) n += got;
    buf[n] = 0;
    for (char *line = buf; *line;) {  /* compacted in place, a "flags" line's hidden words left out */
      char *end = strchr(line, '\n'), *last = end ? end : line + strlen(line);
      int flags = !strncmp(line, "flags", 5);
      for (char *word = line; word < last;) {
        char *stop = word;
        while (stop < last && *stop != ' ') stop++;
        int drop = 0;
        for (int i = 0; flags && hidden[i]; i++) drop |= !strncmp(word, hidden[i], strlen(hidden[i]));
        ssize_t len = stop - word + (stop < last);  /* the word and its space */
        if (!drop) memmove(buf + kept, word, len), kept += len;
        word = stop + 1;
      }
      if (end) buf[kept++] = '\n';
      line = end ? end + 1 : last;
    }
  }
  if (in >= 0) close(in);
  int ok = buf && out >= 0 && write(out, buf, kept) == kept && lseek(out, 0, SEEK_SET) == 0;
  free(buf);
  if (!ok && out >= 0) close(out);
  return ok ? out : -1;
}
static int is_cpuinfo(const char *path) { return masked_process && path && !strcmp(path, "/proc/cpuinfo"); }
#define MODE(flags, mode) mode_t mode = 0; if ((flags) & (O_CREAT | O_TMPFILE)) { \
    va_list ap; va_start(ap, flags); mode = va_arg(ap, mode_t); va_end(ap); }  /* passed only with these */
int open(const char *path, int flags, ...) {
  static int (*real)(const char *, int, ...);
  if (!real) real = (int (*)(const char *, int, ...))dlsym(RTLD_NEXT, "open");
  if (is_cpuinfo(path)) return cpuinfo_copy();
  MODE(flags, mode)
  return real(path, flags, mode);
}
int openat(int dir, const char *path, int flags, ...) {
  static int (*real)(int, const char *, int, ...);
  if (!real) real = (int (*)(int, const char *, int, ...))dlsym(RTLD_NEXT, "openat");
  if (is_cpuinfo(path)) return cpuinfo_copy();
  MODE(flags, mode)
  return real(dir, path, flags, mode);
}
FILE *fopen(const char *path, const char *how) {
  static FILE *(*real)(const char *, const char *);
  if (!real) real = (FILE *(*)(const char *, const char *))dlsym(RTLD_NEXT, "fopen");
  if (is_cpuinfo(path)) { int fd = cpuinfo_copy(); return fd < 0 ? 0 : fdopen(fd, how); }
  return real(path, how);
}
int open64(const char *path, int flags, ...) __attribute__((alias("open")));
int openat64(int dir, const char *path, int flags, ...) __attribute__((alias("openat")));
FILE *fopen64(const char *path, const char *how) __attribute__((alias("fopen")));
__attribute__((constructor)) static void from_environment(void) {
  const char *mask = getenv("UNSPARSE_CPUID_AVX2");
  if (mask && mask[0] == '1') masked_process = 1, unsparse_mask();
}
int unsparse_unmask(void) { return (int)syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1); }
long unsparse_faults(void) { return faults; }
void unsparse_cpuid(uint32_t leaf, uint32_t sub, uint32_t *r) { __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]); }
"""


def unavailable() -> str | None:
    """Why this process cannot mask CPUID (one line), or None where it can."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return "CPUID faulting is a Linux x86-64 feature"
    if "cpuid_fault" not in (cpuinfo_flags() or ()):
        return "this CPU or hypervisor offers no CPUID faulting (no cpuid_fault in /proc/cpuinfo)"
    if not (shutil.which("cc") or shutil.which("gcc")):
        return "no C compiler (cc) to build the CPUID shim"
    return None


def shim_path() -> str:
    """The compiled shim, built once into the cache (named by its source's hash; written whole, then renamed)."""
    from .cost.calibration import cache_dir

    digest = hashlib.sha256(SOURCE.encode()).hexdigest()[:16]
    path = os.path.join(cache_dir(), f"cpuid-avx2-{digest}.so")
    if not os.path.exists(path):
        os.makedirs(cache_dir(), exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            src, lib = os.path.join(tmp, "shim.c"), os.path.join(tmp, "shim.so")
            with open(src, "w") as f:
                f.write(SOURCE)
            compiler = shutil.which("cc") or shutil.which("gcc")
            subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", lib, src, "-ldl"], check=True,
                           capture_output=True)
            os.replace(lib, path)
    return path


@functools.cache
def _shim() -> ctypes.CDLL:
    lib = ctypes.CDLL(shim_path())
    lib.unsparse_faults.restype = ctypes.c_long
    return lib


def cpuid(leaf: int, sub: int = 0) -> tuple[int, int, int, int]:
    """(EAX, EBX, ECX, EDX) of CPUID as the calling thread sees it (masked or not)."""
    regs = (ctypes.c_uint32 * 4)()
    _shim().unsparse_cpuid(leaf, sub, regs)
    return tuple(regs)


def faults() -> int:
    """CPUID instructions answered by the shim so far (every masked thread of the process)."""
    return int(_shim().unsparse_faults())


@contextlib.contextmanager
def held(active: bool = True):
    """While inside, this thread (and the threads started meanwhile, e.g. a runtime's pool) sees CPUID without
    AVX-512, and so does every process started meanwhile (exec clears the mask: they preload the shim, MASK_ENV
    set). Yields None, or the line saying why nothing is masked (the runtime then runs this CPU's widest code).
    Not active: does nothing, yields None."""
    why = unavailable() if active else "not asked"
    if why is None:
        try:
            lib = _shim()
        except (OSError, subprocess.CalledProcessError) as err:
            why = f"the CPUID shim did not build: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        else:
            if lib.unsparse_mask() != 0:
                why = "arch_prctl(ARCH_SET_CPUID) was refused"
    if why is not None:
        yield why if active else None
        return
    before = {k: os.environ.get(k) for k in ("LD_PRELOAD", MASK_ENV)}
    os.environ["LD_PRELOAD"] = " ".join(p for p in (shim_path(), before["LD_PRELOAD"]) if p)
    os.environ[MASK_ENV] = "1"
    try:
        yield None
    finally:
        lib.unsparse_unmask()
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
