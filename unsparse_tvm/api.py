"""The public Python API: a few calls in the shape users know from OpenVINO's `compile_model` and ONNX
Runtime's `InferenceSession` (import these from `unsparse_tvm`, which loads this module lazily).

    model = unsparse_tvm.prune(net, 0.9)                                   # nn.Module, pruned in place
    compiled = unsparse_tvm.compile(model, example_input=x)                # -> CompiledModel, a callable
    y = compiled(x)                                                        # numpy in, numpy out (torch: torch)
    compiled.save("model.so")                                              # one file, weights inside
    y = unsparse_tvm.load("model.so")(x)                                   # TVM runtime only

`compile` takes an nn.Module (with `example_input`), a torch.export ExportedProgram, or a path to a .pt2
(or a built-in model name). The command line (`unsparse-tvm`) is a thin layer on these calls.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import UnsparseError
from .runtime import is_torch_tensor


@dataclass(frozen=True)
class CompileOptions:
    """Everything that decides how a model is compiled (the CLI's compile flags, as one value)."""

    target: str = "llvm"                 # llvm (this x86 CPU, or UNSPARSE_MCPU's) or cuda
    arch: str | None = None              # cuda: sm_XY (default sm_90)
    threshold: float | None = None       # None: each layer sparse where predicted faster; else sparsity >= it
    tuning_log: str | None = None        # a tuning log directory (or a folder of them: tuning_logs/)
    calibrate: bool = True               # x86: predict with this CPU's calibration (measured once, cached)
    batch: int | None = None             # built-in models and .pt2 files with a dynamic batch

    def __post_init__(self):
        from .errors import check_fraction

        if self.threshold is not None:
            check_fraction("threshold", self.threshold)
        if self.batch is not None and (not isinstance(self.batch, int) or self.batch < 1):
            raise UnsparseError(f"batch must be a whole number >= 1, got {self.batch!r}")


class CompiledModel:
    """A compiled model, ready to run: call it like the PyTorch model (numpy arrays or torch tensors in, the
    same kind out; several outputs: a tuple), `.save(path)` it as one .so, read `.report` (per layer: sparse
    or dense, format, sparsity, predicted times) and `.inputs` / `.outputs` (name, shape, dtype)."""

    def __init__(self, meta: dict, *, executable=None, vm=None, device=None, path: str | None = None,
                 compiled=None):
        self.meta = meta
        self._executable, self._vm, self._dev, self.path, self._compiled = executable, vm, device, path, compiled
        self._call = None  # the runtime's Caller, made on the first call

    # ---- what it is
    @property
    def inputs(self) -> list[dict]:
        return self.meta["inputs"]

    @property
    def outputs(self) -> list[dict]:
        return self.meta.get("outputs") or []

    @property
    def report(self) -> list[dict]:
        """Per conv/linear layer: name, op, weight shape, sparsity, decision, format, nnz, predicted us, ..."""
        return self.meta["layers"]

    @property
    def target(self) -> str:
        return self.meta["target"] + (f" {self.meta['arch']}" if self.meta.get("arch") else "")

    def __repr__(self) -> str:
        where = self.path or "in memory"
        return (f"CompiledModel({self.meta.get('model')!r}, {self.target}, {self.meta['sparse_layers']} of "
                f"{len(self.report)} layers sparse, {where})")

    # ---- running
    def eval(self) -> "CompiledModel":
        """A compiled model is always in inference mode (here so that code written for nn.Module runs)."""
        return self

    def _machine(self):
        if self._vm is None:
            from .runtime import check_cpu

            check_cpu(self.meta.get("model", "the model"), self.meta)
            import tvm
            from tvm import relax

            if self.meta["target"] == "cuda":
                from .cuda_package import embed_device_code

                dev = tvm.cuda(0)
                if not dev.exist:
                    raise UnsparseError("this model was compiled for CUDA and this machine has no usable CUDA GPU")
                embed_device_code(self._executable, self.meta["arch"])
            else:
                dev = tvm.cpu(0)
            self._vm, self._dev = relax.VirtualMachine(self._executable, dev), dev
        return self._vm, self._dev

    def _caller(self):
        if self._call is None:
            from .runtime import Caller

            self._call = Caller(*self._machine(), self.meta)
        return self._call

    def __call__(self, x):
        """Run on one input (numpy array or torch tensor, float32, the compiled shape); the same kind back."""
        return (self._call or self._caller()).run(x)

    def benchmark(self, x=None, *, number: int = 10, repeat: int = 10) -> dict[str, float]:
        """Milliseconds per call (TVM's time_evaluator: `repeat` means of `number` calls): mean, median,
        min, max. Without `x`, a seeded random input of the compiled shape."""
        import numpy as np

        from .runtime import time_module

        if number < 1 or repeat < 1:
            raise UnsparseError(f"number and repeat must be at least 1 (got {number}, {repeat})")
        spec = self.inputs[0]
        arr = (np.random.default_rng(0).standard_normal(spec["shape"]).astype(spec["dtype"]) if x is None
               else (x.detach().cpu().numpy() if is_torch_tensor(x) else np.asarray(x)))
        vm, dev = self._machine()
        ms = sorted(time_module(vm, dev, arr, number=number, repeat=repeat))
        return {"mean_ms": sum(ms) / len(ms), "median_ms": ms[len(ms) // 2], "min_ms": ms[0], "max_ms": ms[-1]}

    # ---- keeping it
    def save(self, path: str, *, overwrite: bool = False) -> str:
        """Write the deployable .so (weights and metadata inside; `load` or `unsparse-tvm run` it)."""
        from .outputs import check_output, writing

        if self._compiled is not None:
            from .build import write_module

            write_module(self._compiled, path, model=self.meta.get("model", "model"), overwrite=overwrite)
            return path
        import shutil

        check_output(path, overwrite=overwrite, suffixes=(".so",), inputs=(self.path,))
        with writing(path, overwrite=overwrite) as tmp:
            shutil.copyfile(self.path, tmp)
        return path


def load(path: str, device: str | None = None) -> CompiledModel:
    """A .so written by `compile`/`CompiledModel.save`, with the TVM runtime only (no torch, no compiler)."""
    from .runtime import load as load_module

    vm, dev, meta = load_module(path, device)
    return CompiledModel(meta, vm=vm, device=dev, path=path)


def _program(model, example_input, batch: int | None):
    """(ExportedProgram, quantisation record or None, name) for whatever `compile`/`tune` were given."""
    import torch

    from .frontend import load_program, read_quantization

    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if example_input is not None:
            raise UnsparseError("example_input is for nn.Module models; a file or built-in name knows its input")
        quant = read_quantization(path) if path.endswith(".pt2") else None
        return load_program(path, batch=batch), quant, path
    if isinstance(model, torch.export.ExportedProgram):
        return model, None, "ExportedProgram"
    if isinstance(model, torch.nn.Module):
        if example_input is None:
            raise UnsparseError("compile(nn.Module) needs example_input=, a tensor of the input shape (batch included)")
        if not is_torch_tensor(example_input):
            import numpy as np

            example_input = torch.from_numpy(np.asarray(example_input))
        from .frontend import eval_mode

        eval_mode(model)
        with torch.no_grad():
            try:
                ep = torch.export.export(model, (example_input,))
            except Exception as err:  # torch raises many kinds; the first line says what it could not trace
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                raise UnsparseError(f"torch.export could not export the model: {first[:300]}") from None
        return ep, getattr(model, "unsparse_quant", None), type(model).__name__
    raise UnsparseError(f"compile takes an nn.Module, an ExportedProgram or a path (.pt2, .onnx), not "
                        f"{type(model).__name__}")


def _calibration_note(line: str) -> None:
    """The library stays quiet, except that the first compile on a CPU pauses to calibrate: say so."""
    if line.startswith("calibrating"):
        import sys

        print(f"unsparse_tvm: {line}", file=sys.stderr)


def _stderr_note(line: str) -> None:
    """What the ONNX door decided for the user (a dynamic batch fixed, a QDQ model run as fp32)."""
    import sys

    print(f"unsparse_tvm: {line}", file=sys.stderr)


def compile(model, target: str = "llvm", *, example_input=None, options: CompileOptions | None = None,
            **option_values) -> CompiledModel:  # noqa: A001 (the name users expect, as tvm.compile)
    """Compile a model into sparse (where it pays) kernels for `target`; returns a callable CompiledModel.

    `model`: an nn.Module (give `example_input`), an ExportedProgram, a .pt2 or .onnx path or a built-in
    name. Options: `options=CompileOptions(...)` or its fields as keywords (arch, threshold, tuning_log,
    calibrate, batch). A quantised module (`quantize`) keeps its quantisation; a QDQ ONNX model runs as fp32."""
    from .build import activation_ranges, compile_onnx, compile_program, metadata
    from .cost.calibration import rates_for
    from .target import make_target

    opts = options or CompileOptions(target=target, **option_values)
    if options is not None and option_values:
        raise UnsparseError("give either options= or option keywords, not both")
    tgt = make_target(opts.target, opts.arch)
    database = None
    if opts.tuning_log is not None:
        from .tuning.database import open_database

        database = open_database(opts.tuning_log, tgt)
    if isinstance(model, (str, os.PathLike)) and os.fspath(model).endswith(".onnx"):  # the ONNX door
        if example_input is not None:
            raise UnsparseError("example_input is for nn.Module models; an ONNX file knows its input")
        name = os.fspath(model)
        rates = (lambda: rates_for(tgt, calibrate=opts.calibrate, log=_calibration_note)) \
            if opts.threshold is None else None  # measured once the file is known to be good
        compiled = compile_onnx(name, tgt, batch=opts.batch, log=_stderr_note, threshold=opts.threshold,
                                database=database, rates=rates)
    else:
        ep, quant, name = _program(model, example_input, opts.batch)
        rates = rates_for(tgt, calibrate=opts.calibrate, log=_calibration_note) if opts.threshold is None else None
        compiled = compile_program(ep, tgt, threshold=opts.threshold, database=database,
                                   activations=activation_ranges(quant), quant=quant, rates=rates)
    meta = metadata(compiled, model=name)
    return CompiledModel(meta, executable=compiled.executable, compiled=compiled)


def tune(model, log_dir: str, trials: int, target: str = "llvm", *, example_input=None, arch: str | None = None,
         threshold: float | None = None, include_dense: bool = False, rpc_tracker: str | None = None,
         rpc_key: str | None = None, seed: int = 1, progress: bool = False):
    """MetaSchedule search over the sparse kernels' knobs, records appended to `log_dir` (resumable);
    `compile(..., tuning_log=log_dir)` applies them. Returns the per-workload result table's object."""
    from .cost.calibration import rates_for
    from .target import make_target, require_runnable
    from .tuning import tune as search
    from .tuning.search import SearchOptions
    from .tuning.rpc import parse_tracker

    tgt = make_target(target, arch)
    rpc = (*parse_tracker(rpc_tracker), rpc_key) if rpc_tracker else None
    if rpc is None:
        require_runnable(tgt, "tune")
    ep, _, _ = _program(model, example_input, None)
    rates = rates_for(tgt, calibrate=rpc is None, log=_calibration_note) if threshold is None else None
    return search(ep, tgt, log_dir, trials, threshold=threshold, include_dense=include_dense, rpc=rpc, rates=rates,
                  options=SearchOptions(seed=seed, progress=progress))


def calibrate(threads: int | None = None, *, store: bool = True):
    """Measure this CPU's cost-model rates (under a minute) and cache them for `compile`; returns them."""
    from .cost.calibration import calibrate_rates, run_threads
    from .target import make_target, require_runnable

    target = make_target("llvm")
    require_runnable(target, "calibrate")
    return calibrate_rates(target, threads or run_threads(), log=lambda m: None, store=store)
