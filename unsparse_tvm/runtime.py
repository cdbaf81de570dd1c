"""Running and describing compiled modules with the TVM runtime only.

Nothing here imports torch or TVM's compiler: `run_file` imports TVM with TVM_USE_RUNTIME_LIB=1 (only
libtvm_runtime.so is loaded) and blocks the torch import that tvm_ffi attempts at start-up.
A module's metadata (target, arch, inputs, per-layer decisions, the image's checksum) is a JSON trailer
appended to the .so (unsparse_tvm.module_file): `inspect` reads it without loading the module (which a
CUDA module cannot be, on a machine without a GPU).
"""

from __future__ import annotations

import math
import os
import sys

from .errors import UnsparseError
from .hostcpu import describe_missing, missing_features
from .inputs import check_input_file
# trailer_size and fatbin_images are re-exported: tests and scripts read them from here
from .module_file import (trailer_size, check_image, check_payload, device_code_summary, fatbin_images,  # noqa: F401
                          integrity, read_metadata)
from .outputs import check_output, writing


def describe_module(path: str) -> str:
    meta = read_metadata(path)
    try:
        return _describe(path, meta)
    except (KeyError, TypeError, ValueError, AttributeError):  # well-formed JSON, but not what compile writes
        raise UnsparseError(f"{path} has damaged metadata (a field is missing or of the wrong kind); "
                            "compile it again") from None


def _describe(path: str, meta: dict) -> str:
    lines = [
        f"file:         {path} ({os.path.getsize(path) / 1e6:.1f} MB)",
        f"model:        {meta['model']}",
        f"target:       {meta['target']}" + (f" (host cpu {meta['mcpu']})" if meta.get("mcpu") else ""),
        f"arch:         {meta['arch'] or '-'}",
        *([f"cpu code:     uses {', '.join(meta['cpu_features']) or 'no x86 extension'}; "
           + (f"this CPU lacks {', '.join(missing_features(meta['cpu_features']))}"
              if missing_features(meta['cpu_features']) else "this CPU runs it")] if "cpu_features" in meta else []),
        f"device code:  {meta['device_code']}; found in file: {device_code_summary(path)}",
        "inputs:       " + ", ".join(f"{i['name']} {i['shape']} {i['dtype']}" for i in meta["inputs"]),
        "outputs:      " + (", ".join(f"{o['name']} {o['shape']} {o['dtype']}" for o in meta["outputs"])
                            if meta.get("outputs") is not None else "(not recorded)"),
        f"sparse layers: {meta['sparse_layers']} of {len(meta['layers'])} ({'threshold ' + str(meta['threshold']) if meta.get('threshold') is not None else 'chosen by predicted time'})",
        f"built with:   TVM {meta.get('tvm_version', '?')} on {meta.get('created', '?')}",
        f"library:      {integrity(path, meta)}",
    ]
    width = max([30] + [len(layer["name"]) for layer in meta["layers"]])
    for layer in meta["layers"]:
        lines.append(f"  {layer['name']:{width}s} {layer['op']:7s} {str(layer['shape']):20s} "
                     f"sparsity {layer['sparsity']:.3f}  {layer['decision']} "
                     f"{layer['format'] if layer['decision'] == 'sparse' else '(' + layer['reason'] + ')' if layer.get('reason') else ''}"
                     + _stored(layer))
    if any("weight_bytes" in layer for layer in meta["layers"]):
        total = sum(layer.get("weight_bytes", 0) for layer in meta["layers"])
        dense = sum(math.prod(layer["shape"]) * 4 for layer in meta["layers"])
        lines.append(f"weights:      {total / 1e6:.2f} MB stored ({total / dense:.0%} of the dense fp32 {dense / 1e6:.2f} MB)")
    return "\n".join(lines)


def _stored(layer: dict) -> str:
    """A layer's stored precision and weight bytes (files written before they were recorded: nothing)."""
    if "weight_bytes" not in layer:
        return ""
    return f"  [{layer.get('precision', 'fp32')}, {layer['weight_bytes']} B]"


def _import_runtime_only():
    """`import tvm` with only libtvm_runtime.so and without torch. The environment is put back afterwards
    (TVM reads it once, at import): a process that runs a module and then starts `unsparse-tvm compile`
    must not hand it TVM_USE_RUNTIME_LIB=1, which leaves the child without TVM's compiler."""
    saved = {k: os.environ.get(k) for k in ("TVM_USE_RUNTIME_LIB", "TVM_FFI_DISABLE_TORCH_C_DLPACK")}
    os.environ["TVM_USE_RUNTIME_LIB"] = "1"
    os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")
    if "torch" not in sys.modules:
        sys.modules["torch"] = None  # tvm_ffi tries `import torch` at start-up; make that a clean miss
    try:
        import tvm
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return tvm


def check_cpu(path: str, meta: dict) -> None:
    """Code built for a CPU model with extensions this CPU lacks would die of SIGILL: one line instead."""
    why = describe_missing(f"{path} was compiled for CPU {meta.get('mcpu')}, whose code", meta.get("cpu_features", ()))
    if why:
        raise UnsparseError(f"{why}: compile it again on this machine (or for a CPU model it has, with "
                            "UNSPARSE_MCPU=..., e.g. haswell for AVX2)")


def load(path: str, device: str | None = None):
    """(VirtualMachine, device, metadata) for a compiled module, runtime only."""
    meta = read_metadata(path)
    check_image(path)
    check_payload(path, meta)  # a damaged image would crash the loader or compute garbage
    check_cpu(path, meta)
    tvm = _import_runtime_only()
    kind = device or ("cuda" if meta["target"] == "cuda" else "cpu")
    if kind not in ("cpu", "cuda"):
        raise UnsparseError(f"unknown device '{kind}': use cpu or cuda")
    if kind != ("cuda" if meta["target"] == "cuda" else "cpu"):
        raise UnsparseError(f"{path} was compiled for {meta['target']}; it cannot run on {kind}")
    dev = tvm.cuda(0) if kind == "cuda" else tvm.cpu(0)
    if kind == "cuda" and not dev.exist:
        raise UnsparseError(f"{path} was compiled for CUDA but this machine has no usable CUDA GPU")
    try:
        lib = tvm.runtime.load_module(path)
    except Exception as err:
        raise UnsparseError(f"cannot load {path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    from tvm.runtime.vm import VirtualMachine

    return VirtualMachine(lib, dev), dev, meta


def check_input(arr, meta: dict) -> None:
    """One clear error for an input the module cannot take: another dtype or shape, NaN or Inf."""
    spec = meta["inputs"][0]
    if str(arr.dtype) != spec["dtype"]:
        raise UnsparseError(f"input dtype is {arr.dtype}, the module expects {spec['dtype']} "
                            f"(convert with arr.astype('{spec['dtype']}'))")
    if list(arr.shape) != list(spec["shape"]):
        raise UnsparseError(f"input shape is {list(arr.shape)}, the module expects {spec['shape']}")
    check_finite(arr)


def check_finite(arr) -> None:
    """Refuse NaN/Inf: the sparse kernels never multiply a pruned zero by it, and ReLU turns NaN into 0."""
    import numpy as np

    # one sum in the input's own dtype: NaN and Inf propagate; finite values that overflow it only send us
    # to the exact count below, which then finds nothing (the cheapest check found: 18 us after a model
    # has run and evicted the caches, where a float64 sum took 26 us and BLAS's dot would start threads)
    if math.isfinite(np.add.reduce(arr, axis=None)):
        return
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise UnsparseError(f"input holds {bad} NaN/Inf value{'s' if bad > 1 else ''}; unsparse-tvm modules take "
                            "finite inputs only (they would not propagate NaN/Inf as PyTorch does)")


def is_torch_tensor(x) -> bool:
    """A torch tensor, known by its type's module: nothing here imports torch."""
    return type(x).__module__.split(".")[0] == "torch" and hasattr(x, "detach")


class Caller:
    """A module's main function with what every call needs looked up once. Python run between two calls
    runs cache-cold (the model has streamed its weights through the caches): each step below cost 10-80 us
    there, a few us warm, so a call does as little as it can: no imports, no attribute chains, numpy's and
    TVM's functions bound here (docs/results.md, "Python per call")."""

    def __init__(self, vm, dev, meta: dict):
        import numpy as np
        import tvm
        import tvm_ffi

        spec = meta["inputs"][0]
        self.meta, self.main, self.dev = meta, vm["main"], dev
        self.dtype, self.shape = np.dtype(spec["dtype"]), tuple(spec["shape"])
        self.on_cpu = dev.dlpack_device_type() == tvm.cpu().dlpack_device_type()
        self.from_dlpack, self.tensor = tvm_ffi.from_dlpack, tvm.runtime.tensor
        self.ndarray, self.asarray, self.add_reduce, self.np_from_dlpack = (np.ndarray, np.asarray, np.add.reduce,
                                                                            np.from_dlpack)
        # torch.Tensor, torch.from_numpy and the input's torch dtype, once a torch input is seen
        self.torch_type = self.from_numpy = self.torch_dtype = None
        self.single = None  # does main return a one-tensor tuple (what torch.export programs give)? Seen once

    def run(self, x):
        """One input, a numpy array or a torch tensor (any device); the outputs as the same kind: one, or a tuple.
        This module never imports torch: a torch tensor is known by its type's module."""
        kind = type(x)
        as_torch = kind is self.torch_type or (kind is not self.ndarray and self._torch_input(x))
        if as_torch:
            if x.dtype is not self.torch_dtype:  # numpy has no bfloat16: say it here, in torch's words
                raise UnsparseError(f"input dtype is {x.dtype}, the module expects {self.dtype} (convert with "
                                    f"x.to(torch.{self.dtype}))")
            arr = (x.detach() if x.is_cpu else x.detach().cpu()).numpy()  # on the CPU: a view, no copy
        else:
            arr = x if kind is self.ndarray else self.asarray(x)
        outs = [self.host_array(t) for t in self(arr)]
        if as_torch:
            outs = [self.from_numpy(o) for o in outs]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _torch_input(self, x) -> bool:
        if not is_torch_tensor(x):
            return False
        torch = sys.modules["torch"]
        self.torch_type, self.from_numpy, self.torch_dtype = type(x), torch.from_numpy, getattr(torch, self.dtype.name)
        return True

    def __call__(self, arr) -> list:
        """Every output as a TVM tensor, in order."""
        if arr.dtype is not self.dtype or arr.shape != self.shape:  # dtype: numpy's builtin ones are singletons
            check_input(arr, self.meta)
        if not math.isfinite(self.add_reduce(arr, axis=None)):  # check_finite's first step, without its call
            check_finite(arr)
        out = self.main(self.device_tensor(arr))
        if self.single is None:
            self.single = not hasattr(out, "numpy") and len(out) == 1 and hasattr(out[0], "numpy")
        return [out[0]] if self.single else _flatten(out)  # out[0]: 12 us cold where _flatten took 24

    def device_tensor(self, arr):
        """The caller's own memory where TVM can take it (CPU, C-contiguous, 64-byte aligned: DLPack's import
        checks both and raises otherwise; writable), else a copy. The module only reads its input; a copy per
        call cost ~0.1-0.3 ms on a 224x224 input."""
        if self.on_cpu:
            try:
                return self.from_dlpack(arr, require_alignment=64, require_contiguous=True)
            except (BufferError, RuntimeError, TypeError):  # read-only arrays, dtypes DLPack lacks, misaligned
                pass
        return self.tensor(arr, self.dev)

    def host_array(self, t):
        """One output as a numpy array of its own. A CPU tensor goes through DLPack and one copy (the copy: a
        module may return a constant it keeps, which the caller must not be able to change); TVM's `.numpy()`
        costs several times more Python (11 us warm, ~80 us after a 2 ms model: docs/results.md)."""
        try:
            return self.np_from_dlpack(t).copy()
        except (BufferError, RuntimeError, TypeError):  # a GPU tensor, a dtype numpy's DLPack lacks
            return t.numpy()


def output_specs(meta: dict) -> list[dict] | None:
    """The outputs recorded at compile time (None for modules written before outputs were recorded)."""
    return meta.get("outputs")


def _flatten(out) -> list:
    if hasattr(out, "numpy"):
        return [out]
    return [a for item in out for a in _flatten(item)]  # a tuple (torch.export programs return one)


def run_outputs(vm, dev, meta: dict, arr) -> list:
    """Run the module's main function on one numpy array; every output, as numpy arrays, in order."""
    call = Caller(vm, dev, meta)
    return [call.host_array(t) for t in call(arr)]


def run_array(vm, dev, meta: dict, arr):
    """The model's output: one numpy array, or a tuple of them for a model with several outputs."""
    outs = run_outputs(vm, dev, meta, arr)
    return outs[0] if len(outs) == 1 else tuple(outs)


def check_run_output(path: str, meta: dict, overwrite: bool, inputs: tuple) -> None:
    check_output(path, overwrite=overwrite, suffixes=(".npy", ".npz"), inputs=inputs)
    specs = output_specs(meta)
    if path.endswith(".npy") and specs is not None and len(specs) > 1:
        raise UnsparseError(f"the module has {len(specs)} outputs: use -o OUT.npz (one array per output)")


def save_outputs(path: str, outs: list) -> str:
    """.npy for one output; .npz with out0, out1, ... for any number."""
    import numpy as np

    if path.endswith(".npy") and len(outs) != 1:
        raise UnsparseError(f"the module returned {len(outs)} outputs: use -o OUT.npz (one array per output)")
    with writing(path) as tmp:
        if path.endswith(".npy"):
            np.save(tmp, outs[0])
        else:
            np.savez(tmp, **{f"out{i}": a for i, a in enumerate(outs)})
    return ", ".join(f"{list(a.shape)} {a.dtype}" for a in outs)


def time_module(vm, dev, arr, *, number: int, repeat: int) -> list[float]:
    """Milliseconds per call of main, one value per repeat (each the mean of `number` back-to-back calls),
    after one untimed call; TVM's time_evaluator, so no Python overhead between calls."""
    import tvm

    x = tvm.runtime.tensor(arr, dev)
    vm["main"](x)
    timer = vm.time_evaluator("main", dev, number=number, repeat=repeat)
    return [t * 1e3 for t in timer(x).results]


def read_input(path: str):
    """The one array of a .npy file, or of a .npz file holding exactly one."""
    import numpy as np

    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return loaded
        with loaded:
            names = list(loaded.files)
            if len(names) == 1:
                return loaded[names[0]]
    except Exception:  # numpy raises assorted errors for a damaged or foreign file
        raise UnsparseError(f"{path} is not a numpy array file (save inputs with numpy.save or numpy.savez)") from None
    raise UnsparseError(f"{path} holds {len(names)} arrays ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}); "
                        "the module takes one input: save just that array")


def run_file(module: str, input_path: str | None, output_path: str | None, *, overwrite: bool = False,
             device: str | None = None, print_time: bool = False, number: int = 10, repeat: int = 10) -> None:
    """`unsparse-tvm run`: .so (+ input .npy, or a seeded random input) -> output .npy and/or timings,
    runtime only."""
    import numpy as np

    if output_path is None and not print_time:
        raise UnsparseError("nothing to do: give -o OUT.npy to save the output, or --print-time to time the module")
    if number < 1 or repeat < 1:
        raise UnsparseError(f"--number and --repeat must be at least 1 (got {number}, {repeat})")
    if input_path is not None:
        check_input_file(input_path, "input file", suffixes=(".npy", ".npz"), hint="save inputs with numpy.save")
    meta = read_metadata(module)
    if output_path is not None:
        check_run_output(output_path, meta, overwrite, inputs=(module, input_path))
    vm, dev, meta = load(module, device)
    if input_path is None:  # tvmc's fill-mode random: timings do not depend on the values
        spec = meta["inputs"][0]
        arr = np.random.default_rng(0).standard_normal(spec["shape"]).astype(spec["dtype"])
        print(f"input: random normal {spec['shape']} {spec['dtype']} (no --input given)")
    else:
        arr = read_input(input_path)
    outs = run_outputs(vm, dev, meta, arr)
    if output_path is not None:
        print(f"wrote {output_path} {save_outputs(output_path, outs)}")
    if print_time:
        ms = sorted(time_module(vm, dev, arr, number=number, repeat=repeat))
        print(f"execution time summary ({repeat} repeats x {number} calls, {dev}):\n"
              f"  mean {sum(ms) / len(ms):.3f} ms  median {ms[len(ms) // 2]:.3f} ms  "
              f"min {ms[0]:.3f} ms  max {ms[-1]:.3f} ms")
