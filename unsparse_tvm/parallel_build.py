"""LLVM codegen on every core: `tvm.compile` and `export_library` run LLVM over all kernels in one
module on one thread, which is most of a real network's compile time (densenet121: ~250 kernels, LLVM
~90% of `compile`). Here, for llvm targets, the kernels are split into a few modules built in threads
(TVM's FFI releases the GIL, and each LLVM module has its own context), imported into the first, and
their object files are written in threads too. The result is the executable `tvm.compile` would make
(same Relax pipeline, same VM link), except that each kernel is built for target.kernel_target and lowered
with tir_pipeline's small buffers on the stack; CUDA targets
take TVM's own path, UNSPARSE_BUILD_JOBS=1 builds in one thread.

This follows `tvm.relax.vm_build.build` / `Module.export_library` of TVM 0.27 (pinned) step by step.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import tvm
from tvm import relax

from . import tir_pipeline
from .reference import usable_cores
from .target import kernel_target


def jobs() -> int:
    """Threads for LLVM: UNSPARSE_BUILD_JOBS, else this process's usable cores (at most 8)."""
    env = os.environ.get("UNSPARSE_BUILD_JOBS", "")
    if env.isdigit() and int(env) >= 1:
        return int(env)
    return max(1, min(usable_cores(), 8))


def compile_module(mod: tvm.IRModule, target, pipeline) -> relax.Executable:
    """tvm.compile(mod, target, relax_pipeline=pipeline), with the kernels built in parallel on llvm, each
    group of them for its target.kernel_target (int8 kernels: 512-bit vectors on AVX-512)."""
    n = jobs()
    if target.kind.name != "llvm":
        return tvm.compile(mod, target=target, relax_pipeline=pipeline)
    from tvm.relax import vm_build  # the steps of relax.build, with the TIR build split

    with target:
        mod = pipeline(mod)
    attrs = dict(mod.attrs) if mod.attrs else {}
    ext_libs = list(attrs.get("external_mods", []))
    params = dict(attrs.get("const_name_to_constant", {}))
    builder = relax.ExecBuilder()
    mod = vm_build._vmcodegen(builder, mod, "bytecode")
    tir_mod = vm_build._filter_tir(mod)
    parts = _parts(tir_mod, target, n) if tir_mod is not None else []
    if len(parts) <= 1:
        lib = _build(*parts[0]) if parts else None
        return vm_build.VMExecutable(relax._ffi_api.VMLink(builder, target, lib, ext_libs, params))
    with ThreadPoolExecutor(n) as pool:
        libs = list(pool.map(lambda part: _build(*part), parts))
    lib = libs[0]
    for other in libs[1:]:
        lib.import_module(other)
    return vm_build.VMExecutable(relax._ffi_api.VMLink(builder, target, lib, ext_libs, params))


def _parts(tir_mod: tvm.IRModule, target, n: int) -> list[tuple[tvm.IRModule, object]]:
    """(module, target) to build: the kernels grouped by kernel_target, a group of 2n or more split round
    robin into 2n parts (kernels differ a lot in LLVM time, so parts even out)."""
    items = sorted(tir_mod.functions.items(), key=lambda kv: kv[0].name_hint)
    groups: dict = {}
    for gv, func in items:
        t = kernel_target(target, tvm.IRModule({gv: func}))
        groups.setdefault(str(t), (t, []))[1].append((gv, func))
    parts = []
    for t, group in groups.values():
        k = 2 * n if n > 1 and len(group) >= 2 * n else 1
        parts += [(tvm.IRModule(dict(group[i::k]), attrs=tir_mod.attrs), t) for i in range(k)]
    return parts


def _build(tir_mod: tvm.IRModule, target):
    return tvm.tirx.build(tir_mod, target=target, pipeline=tir_pipeline.pipeline())  # small buffers on the stack


def export_library(executable: relax.Executable, path: str, workspace: str) -> None:
    """executable.export_library(path, workspace_dir=workspace), object files written in parallel (llvm)."""
    from tvm.support import cc
    from tvm.runtime import _ffi_api

    module = executable.mod
    dso = module._collect_dso_modules()
    n = jobs()
    if n <= 1 or len(dso) < 2 or any(m.kind != "llvm" for m in dso):
        executable.export_library(path, workspace_dir=workspace)
        return
    files = [os.path.join(workspace, f"lib{i}.o") for i in range(len(dso))]
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(lambda mf: mf[0].write_to_file(mf[1]), zip(dso, files)))
    host = dso[0]
    is_system_lib = host.get_function("__tvm_is_system_module")()
    llvm_target = host.get_function("_get_target_string")()
    prefix = host.get_function("__tvm_get_system_lib_prefix")() or ""
    if module.imports:  # the VM bytecode and constants, packed as TVM's export_library packs them
        devc = os.path.join(workspace, f"{prefix}devc.o")
        _ffi_api.ModulePackImportsToLLVM(module, is_system_lib, llvm_target, prefix).write_to_file(devc)
        files.append(devc)
    cc.create_shared(path, files)
