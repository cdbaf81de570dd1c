"""CUDA's resource limits, checked statically on the CUDA lowering of a scheduled PrimFunc: what PoCL
cannot see (it allows 4096 threads per work group and 1 MiB of local memory).

- threads per block <= 1024, and a grid inside CUDA's bounds;
- static shared memory per block <= 48 KiB (more needs the opt-in dynamic kind, which we do not use);
- registers per thread from `ptxas -v` where nvcc is present: <= 255, and a block's registers fit the
  SM's 64K (otherwise the launch fails with "too many resources requested").
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tvm
from tvm import tirx

from .opencl import device_source, launches, lower, statements

MAX_THREADS_PER_BLOCK = 1024
MAX_GRID = (2**31 - 1, 65535, 65535)
MAX_STATIC_SHARED_BYTES = 48 * 1024
MAX_REGISTERS_PER_THREAD = 255
REGISTERS_PER_SM = 65536


@dataclass
class KernelUsage:
    kernel: str
    grid: list[int]
    block: list[int]
    shared_bytes: int
    registers: int | None = None           # from ptxas -v; None without nvcc
    problems: list[str] = field(default_factory=list)


def _shared_bytes(func: tirx.PrimFunc) -> int:
    return sum(int(np.prod([int(d) for d in s.buffer.shape])) * np.dtype(str(s.buffer.dtype)).itemsize
               for s in statements(func.body)
               if isinstance(s, tirx.AllocBuffer) and s.buffer.scope().startswith("shared"))


def ptxas_registers(cuda_source: str, arch: str) -> dict[str, int]:
    """{kernel name: registers per thread} from nvcc's ptxas -v, or {} where nvcc is absent."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.cu"
        src.write_text(cuda_source)
        proc = subprocess.run([nvcc, "-cubin", f"-arch={arch}", "-O3", "-Xptxas", "-v", "-o", str(Path(tmp) / "k.cubin"),
                               str(src)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed on the generated CUDA source:\n{proc.stderr[-2000:]}")
    usage, current = {}, None
    for line in proc.stderr.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            current = m.group(1)
        elif (m := re.search(r"Used (\d+) registers", line)) and current is not None:
            usage[current] = int(m.group(1))
    return usage


def check_cuda_limits(func: tirx.PrimFunc, target, registers: bool = True) -> list[KernelUsage]:
    """Every kernel of one scheduled PrimFunc, lowered for `target` (cuda), with the limits it breaks."""
    host, device = lower(func, target)
    shared = {gv.name_hint: _shared_bytes(f) for gv, f in device.functions_items()}
    regs = ptxas_registers(device_source(device, target), str(target.attrs["arch"])) if registers else {}
    out = []
    for launch in launches(host):
        use = KernelUsage(launch.kernel, launch.grid, launch.block, shared.get(launch.kernel, 0),
                          regs.get(launch.kernel))
        if launch.threads > MAX_THREADS_PER_BLOCK:
            use.problems.append(f"{launch.threads} threads per block > {MAX_THREADS_PER_BLOCK}")
        if any(g > m for g, m in zip(launch.grid, MAX_GRID)):
            use.problems.append(f"grid {launch.grid} exceeds {MAX_GRID}")
        if use.shared_bytes > MAX_STATIC_SHARED_BYTES:
            use.problems.append(f"{use.shared_bytes} B static shared memory > {MAX_STATIC_SHARED_BYTES}")
        if use.registers is not None:
            if use.registers > MAX_REGISTERS_PER_THREAD:
                use.problems.append(f"{use.registers} registers per thread > {MAX_REGISTERS_PER_THREAD}")
            if use.registers * launch.threads > REGISTERS_PER_SM:
                use.problems.append(f"{use.registers} x {launch.threads} threads > {REGISTERS_PER_SM} registers")
        out.append(use)
    return out


def module_cuda_limits(mod: tvm.IRModule, target, registers: bool = True) -> list[KernelUsage]:
    """check_cuda_limits over every PrimFunc of a scheduled module."""
    return [u for _gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)
            for u in check_cuda_limits(f, target, registers)]
