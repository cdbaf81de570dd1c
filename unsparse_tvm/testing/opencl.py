"""CUDA schedules run without a GPU: the same scheduled TIR, lowered for OpenCL, on PoCL (CPU OpenCL).

TVM emits OpenCL C from the TIR our CUDA rules produce, so launching those kernels with the CUDA
launch extents checks what a schedule can get wrong: bindings, splits and their predicates, index
math, shared-memory staging and barriers, cross-thread reductions, kernel order, fused epilogues.
What it cannot check: CUDA-only code (warp shuffles are lowered as shared-memory trees for OpenCL),
nvcc, and speed; `cuda_limits` checks CUDA's resource limits statically.

Every buffer sits between two guard zones of NaN (ints: a huge value): an out-of-bounds read turns the
result into NaN or garbage, an out-of-bounds write damages a zone (and fails). Outputs and
intermediates start as NaN, so an output no thread writes fails too.

The route (the production schedules unchanged):
  build_pipeline(cuda, stop_after="schedule") -> each PrimFunc lowered by TVM's default TIR pipeline for
  the opencl target, without MakePackedAPI (disabled in the PassContext) so the host side stays plain
  TIR: its buffer allocations and one call_ffi_kernel per launch -> device functions through
  target.build.opencl -> PoCL compiles the source; this module walks the host function and the Relax
  main and launches each kernel with global = grid * block, local = block, in order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

# PoCL's compiled-kernel cache, in a folder that outlives the run (CI on the same machine reuses it);
# it must be set before PoCL starts
os.environ.setdefault("POCL_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "unsparse-tvm", "pocl"))

import pyopencl as cl  # noqa: E402
import tvm  # noqa: E402
from tvm import s_tir, tirx  # noqa: E402
from tvm.target import Target  # noqa: E402

from ..relay_passes import build_pipeline  # noqa: E402
from ..relay_passes.pipeline import pipeline_phases  # noqa: E402
from ..schedules import rule_for  # noqa: E402
from ..ops.names import op_of  # noqa: E402
from ..target import make_target  # noqa: E402

OPENCL = Target({"kind": "opencl", "host": {"kind": "llvm"}})
GUARD_BYTES = 4096  # each side of a buffer; also the alignment a sub-buffer's origin needs
# passes that turn the host side into packed-API calls (and two that require them): kept off
_HOST_ABI_PASSES = ["tirx.MakePackedAPI", "tirx.FP8StorageLegalize", "tirx.BF16StorageLegalize"]


@dataclass
class Launch:
    kernel: str
    args: list            # TIR expressions: buffer data pointers and scalars
    grid: list[int]       # blockIdx x, y, z
    block: list[int]      # threadIdx x, y, z

    @property
    def threads(self) -> int:
        return int(np.prod(self.block))


def lower(func: tirx.PrimFunc, target: Target) -> tuple[tirx.PrimFunc, tvm.IRModule]:
    """(host PrimFunc, device IRModule) of a scheduled PrimFunc, by TVM's own TIR pipeline for target."""
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    mod = tirx.transform.BindTarget(target)(mod)
    pipeline, _host, finalize_device = tirx.get_default_tir_pipeline(target)
    with tvm.transform.PassContext(disabled_pass=_HOST_ABI_PASSES), target:
        mod = pipeline(mod)
    device = tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv.name_hint != "main"})
    return mod["main"], finalize_device()(device)


def device_source(device: tvm.IRModule, target: Target) -> str:
    """OpenCL C or CUDA C of the device functions (source only: no runtime for it is needed)."""
    return tvm.get_global_func(f"target.build.{target.kind.name}")(device, target).inspect_source()


def statements(stmt):
    """Every statement under stmt, in program order (pre-order)."""
    yield stmt
    for child in list(getattr(stmt, "seq", None) or []) + [getattr(stmt, a, None) for a in ("body", "then_case", "else_case")]:
        if child is not None:
            yield from statements(child)


def _kernel_call(stmt):
    if isinstance(stmt, tirx.Evaluate) and isinstance(stmt.value, tvm.ir.Call) \
            and stmt.value.op.name == "tirx.call_ffi_kernel":
        return stmt.value
    return None


def launches(host: tirx.PrimFunc) -> list[Launch]:
    """The kernel launches of a lowered host function, in order (static extents only)."""
    out = []
    for s in statements(host.body):
        if (call := _kernel_call(s)) is not None:
            out.append(_launch_of(call))
    return out


def _launch_of(call) -> Launch:
    args, tags = list(call.args), [str(t) for t in call.attrs.launch_params]
    cut = len(args) - len(tags)
    grid, block = [1, 1, 1], [1, 1, 1]
    for tag, extent in zip(tags, args[cut:]):
        dims = grid if tag.startswith("blockIdx.") else block if tag.startswith("threadIdx.") else None
        if dims is None:  # dynamic shared memory is the other launch parameter TVM knows
            raise NotImplementedError(f"launch parameter {tag}")
        dims["xyz".index(tag[-1])] = int(extent)
    return Launch(str(args[0].value), args[1:cut], grid, block)


def _poison(dtype: np.dtype):
    return np.nan if dtype.kind == "f" else np.iinfo(dtype).max // 3  # a huge index: out of any buffer


class GuardedBuffer:
    """A device buffer between two poisoned guard zones; `sub` is what kernels get."""

    def __init__(self, ctx, size: int, dtype, init: np.ndarray | None = None):
        self.dtype, self.size = np.dtype(dtype), max(int(size), 1)
        guard = GUARD_BYTES // self.dtype.itemsize
        self.host = np.full(self.size + 2 * guard, _poison(self.dtype), self.dtype)
        if init is not None:
            self.host[guard:guard + self.size] = np.ascontiguousarray(init, self.dtype).reshape(-1)
        self.buffer = cl.Buffer(ctx, cl.mem_flags.READ_WRITE | cl.mem_flags.COPY_HOST_PTR, hostbuf=self.host)
        self.sub = self.buffer.get_sub_region(GUARD_BYTES, self.size * self.dtype.itemsize)
        self._guard = guard

    def read(self, queue) -> np.ndarray:
        """The buffer's contents; AssertionError if a guard zone was written."""
        now = np.empty_like(self.host)
        cl.enqueue_copy(queue, now, self.buffer).wait()
        g, n = self._guard, self.size
        for zone in (slice(0, g), slice(g + n, None)):
            if not np.array_equal(now[zone].view(np.uint8), self.host[zone].view(np.uint8)):
                raise AssertionError("out-of-bounds write: a guard zone was overwritten")
        return now[g:g + n]


class PoCL:
    """The PoCL CPU device, with one in-order queue (launches are sequenced like one CUDA stream)."""

    def __init__(self):
        platforms = [p for p in cl.get_platforms() if "Portable Computing Language" in p.name]
        if not platforms:
            raise RuntimeError("no PoCL platform: pip install pocl-binary-distribution")
        self.ctx = cl.Context(platforms[0].get_devices())
        self.queue = cl.CommandQueue(self.ctx)

    def buffer(self, size: int, dtype, init: np.ndarray | None = None) -> GuardedBuffer:
        return GuardedBuffer(self.ctx, size, dtype, init)


class OpenCLFunc:
    """One scheduled PrimFunc built for PoCL; called destination-passing style with numpy arrays
    (inputs, then outputs, which are overwritten). `launch_hook(launch) -> launch` lets negative
    controls break a launch on purpose."""

    def __init__(self, device: PoCL, func: tirx.PrimFunc, name: str = "main"):
        self.device, self.name = device, name
        self.host, device_mod = lower(func, OPENCL)
        self.source = device_source(device_mod, OPENCL)
        program = cl.Program(device.ctx, self.source).build()
        self.params = {gv.name_hint: list(f.params) for gv, f in device_mod.functions_items()}
        self.kernels = {name: cl.Kernel(program, name) for name in self.params}
        self.launches = launches(self.host)
        self.launch_hook = None

    def __call__(self, *arrays: np.ndarray) -> None:
        params = list(self.host.params)
        if len(params) != len(arrays):
            raise TypeError(f"{self.name}: {len(params)} arguments expected, {len(arrays)} given")
        env, buffers = [], []
        for p, a in zip(params, arrays):
            want = (tuple(int(s) for s in p.shape), np.dtype(str(p.dtype)))
            if (a.shape, a.dtype) != want:
                raise TypeError(f"{self.name}: argument {p.name} is {a.shape} {a.dtype}, expected {want}")
            buf = self.device.buffer(a.size, a.dtype, a)
            env.append((p, buf))
            buffers.append((a, buf))
        self._run(self.host.body, env)
        self.device.queue.finish()
        for a, buf in buffers:  # every argument is read back, so every guard zone is checked
            a.reshape(-1)[:] = buf.read(self.device.queue)

    def _run(self, body, env) -> None:
        for s in statements(body):
            if isinstance(s, tirx.AllocBuffer):
                if s.buffer.scope() != "global":
                    raise NotImplementedError(f"host allocation in scope {s.buffer.scope()}")
                size = int(np.prod([int(d) for d in s.buffer.shape]))
                env.append((s.buffer, self.device.buffer(size, str(s.buffer.dtype))))
            elif isinstance(s, tirx.DeclBuffer):  # a view (e.g. flattened) of a parameter or allocation
                env.append((s.buffer, _bound(env, s.data)))
            elif (call := _kernel_call(s)) is not None:
                self._launch(_launch_of(call), env)
            elif isinstance(s, tirx.Evaluate) and isinstance(s.value, tvm.ir.Call):  # any other host call
                raise NotImplementedError(f"host call {s.value.op}")
            elif not isinstance(s, (tirx.SeqStmt, tirx.AttrStmt, tirx.Evaluate)):  # loops, branches, lets
                raise NotImplementedError(f"host statement {type(s).__name__}")

    def _launch(self, launch: Launch, env) -> None:
        if self.launch_hook is not None:
            launch = self.launch_hook(launch)
        args = []
        for p, a in zip(self.params[launch.kernel], launch.args):
            if "handle" in str(p.ty):
                args.append(_bound(env, a).sub)
            else:
                args.append(np.dtype(str(p.ty.dtype)).type(_scalar(env, a)))
        glob = tuple(g * b for g, b in zip(launch.grid, launch.block))
        self.kernels[launch.kernel](self.device.queue, glob, tuple(launch.block), *args)


def _bound(env, expr):
    """What a host Var / buffer (or buffer_data(buffer)) is bound to."""
    if isinstance(expr, tvm.ir.Call) and expr.op.name == "tirx.buffer_data":
        expr = expr.args[0]
    for var, value in reversed(env):  # TVM objects compare by identity (same_as), not as dict keys
        if var.same_as(expr):
            return value
    raise KeyError(f"unbound {expr}")


def _scalar(env, expr):
    if isinstance(expr, (tirx.IntImm, tirx.FloatImm)):
        return expr.value
    return _bound(env, expr)


class OpenCLModule:
    """A Relax module at the end of the pipeline's "schedule" phase, run on PoCL: its main function
    interpreted binding by binding, every call_tir launched as an OpenCLFunc."""

    def __init__(self, mod: tvm.IRModule, device: PoCL | None = None):
        self.device = device or PoCL()
        self.mod = mod
        self.funcs = {gv.name_hint: OpenCLFunc(self.device, f, gv.name_hint)
                      for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}

    def __call__(self, *inputs: np.ndarray):
        main = self.mod["main"]
        env = list(zip(main.params, inputs))
        for block in main.body.blocks:
            for binding in block.bindings:
                env.append((binding.var, self._value(binding.value, env)))
        return self._value(main.body.body, env)

    def _value(self, e, env):
        if isinstance(e, tvm.ir.GenericConst):
            return e.value.numpy()
        if isinstance(e, tvm.ir.Var):
            return _bound(env, e)
        if isinstance(e, tvm.ir.Tuple):
            return tuple(self._value(f, env) for f in e.fields)
        if isinstance(e, tvm.ir.TupleGetItem):
            return self._value(e.tuple_value, env)[e.index]
        if isinstance(e, tvm.ir.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.call_tir":
            if len(e.args) != 2:
                raise NotImplementedError("call_tir with symbolic shape arguments")
            out_ty = e.ty_args[0]
            types = list(out_ty.fields) if isinstance(out_ty, tvm.ir.TupleType) else [out_ty]
            outs = [np.empty(tuple(int(d) for d in t.shape), str(t.dtype)) for t in types]
            args = [np.ascontiguousarray(a) for a in self._value(e.args[1], env)]
            self.funcs[e.args[0].name_hint](*args, *outs)
            return tuple(outs) if isinstance(out_ty, tvm.ir.TupleType) else outs[0]
        raise NotImplementedError(f"Relax expression {type(e).__name__}")


def schedule_for_cuda(mod: tvm.IRModule, arch: str = "sm_90", **pipeline_kwargs) -> tvm.IRModule:
    """The production pipeline for --target cuda, through its "schedule" phase."""
    return build_pipeline(make_target("cuda", arch), stop_after="schedule", **pipeline_kwargs)(mod)


def run_cuda_on_pocl(mod: tvm.IRModule, *inputs: np.ndarray, device: PoCL | None = None, **pipeline_kwargs):
    """Schedule an imported Relax module for CUDA and run it on PoCL; the main function's result."""
    return OpenCLModule(schedule_for_cuda(mod, **pipeline_kwargs), device)(*inputs)


def schedule_space_point(mod: tvm.IRModule, seed: int, arch: str = "sm_90",
                         **pipeline_kwargs) -> tuple[tvm.IRModule, list]:
    """Like schedule_for_cuda, but each unsparse operator gets its CUDA rule's space() (MetaSchedule's
    design space) with the knobs drawn by a Schedule seeded with `seed`: a point tuning may pick.
    Returns (scheduled module, the knob decisions drawn)."""
    target = make_target("cuda", arch)
    mod = build_pipeline(target, stop_after="legalize", **pipeline_kwargs)(mod)
    knobs = []
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc) and op_of(func) is not None:
            sch = s_tir.Schedule(func, seed=seed + 1)  # seed 0 is not allowed
            rule_for(op_of(func), "cuda").space(sch)
            knobs += [(str(inst.kind.name), str(d)) for inst, d in sch.trace.decisions.items()]
            mod[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
    schedule_phase = dict(pipeline_phases(target, **pipeline_kwargs))["schedule"]
    with target:  # the rest as the production pipeline schedules it (scheduled functions are left alone)
        mod = tvm.transform.Sequential(schedule_phase)(mod)
    return mod, knobs
