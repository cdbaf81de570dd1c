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

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import UnsparseError


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


def _is_torch_tensor(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch" and hasattr(x, "detach")


class CompiledModel:
    """A compiled model, ready to run: call it like the PyTorch model (numpy arrays or torch tensors in, the
    same kind out; several outputs: a tuple), `.save(path)` it as one .so, read `.report` (per layer: sparse
    or dense, format, sparsity, predicted times) and `.inputs` / `.outputs` (name, shape, dtype)."""

    def __init__(self, meta: dict, *, executable=None, vm=None, device=None, path: str | None = None,
                 compiled=None):
        self.meta = meta
        self._executable, self._vm, self._dev, self.path, self._compiled = executable, vm, device, path, compiled

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

    def __call__(self, x):
        """Run on one input (numpy array or torch tensor, float32, the compiled shape); the same kind back."""
        import numpy as np

        from .runtime import run_outputs

        as_torch = _is_torch_tensor(x)
        arr = x.detach().cpu().numpy() if as_torch else np.asarray(x)
        vm, dev = self._machine()
        outs = run_outputs(vm, dev, self.meta, arr)
        if as_torch:
            import torch

            outs = [torch.from_numpy(o) for o in outs]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def benchmark(self, x=None, *, number: int = 10, repeat: int = 10) -> dict[str, float]:
        """Milliseconds per call (TVM's time_evaluator: `repeat` means of `number` calls): mean, median,
        min, max. Without `x`, a seeded random input of the compiled shape."""
        import numpy as np

        from .runtime import time_module

        if number < 1 or repeat < 1:
            raise UnsparseError(f"number and repeat must be at least 1 (got {number}, {repeat})")
        spec = self.inputs[0]
        arr = (np.random.default_rng(0).standard_normal(spec["shape"]).astype(spec["dtype"]) if x is None
               else (x.detach().cpu().numpy() if _is_torch_tensor(x) else np.asarray(x)))
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
        if not _is_torch_tensor(example_input):
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


def _module(model, example_input=None):
    """(nn.Module to change in place, its ExportedProgram where it is a reloaded foreign .pt2, input shape)."""
    import torch

    from .frontend import load_model

    if isinstance(model, (str, os.PathLike)):
        loaded = load_model(os.fspath(model))
        return loaded.module, loaded.ep, loaded.input_shape
    if isinstance(model, torch.nn.Module):
        shape = tuple(example_input.shape) if example_input is not None else None
        return model, None, shape
    raise UnsparseError(f"expected an nn.Module, a .pt2 path or a built-in model name, not {type(model).__name__}")


def _dataset(data):
    from .compress.data import load_dataset

    return load_dataset(data) if isinstance(data, str) else data


def prune(model, sparsity: float | None = None, *, method: str = "unstructured", data=None, epochs: int = 0,
          speedup: float | None = None, latency_ms: float | None = None, pattern: str = "unstructured",
          example_input=None, threads: int | None = None, **config):
    """Prune every conv2d/linear weight (torch.nn.utils.prune underneath, made permanent), in place for an
    nn.Module (a .pt2 path or built-in name is loaded first); returns the module.

    Either to `sparsity` overall with `method` (unstructured, vector, block, mixed, channel4), or for speed:
    `speedup=3` (over the model compiled dense, on this CPU) or `latency_ms=T`, with per-layer sparsity and
    `pattern` (unstructured, vector, block, or auto: per layer) chosen by the compiler's cost model and
    verified by timing (unsparse_tvm.speed_target; `module.unsparse_speed` holds the plan and the measured
    speedup; `threads`: the thread count it is timed at, default TVM_NUM_THREADS / every core).
    data: a data set ("digits", "cifar10:PATH" or a compress.data.Dataset) for `epochs` of fine-tuning while
    the sparsity ramps up, for `sensitivity=True`, and as the speed planner's accuracy proxy. Other keywords:
    compress.targets.PruneConfig's fields (scope, vector_size, block_size, block_share, first_layer_sparsity,
    last_layer_sparsity, lr, batch_size, seed)."""
    from .compress.prune import prune_model
    from .compress.config import PruneConfig

    module, ep, shape = _module(model, example_input)
    data = _dataset(data)
    plan = {}
    if speedup is not None or latency_ms is not None:
        from .cost.calibration import run_threads
        from .speed_target import PATTERNS, prune_for_speed, weighted_sparsity

        if sparsity is not None:
            raise UnsparseError("give a sparsity or a speed target (speedup / latency_ms), not both")
        if pattern not in PATTERNS + ("auto",):
            raise UnsparseError(f"unknown pattern '{pattern}': use {', '.join(PATTERNS)} or auto")
        if shape is None:
            raise UnsparseError("prune(nn.Module, speedup=...) needs example_input= (it compiles and times the model)")
        layer_sparsity, layer_pattern, result = prune_for_speed(
            module, ep, shape, speedup=speedup, latency_ms=latency_ms, data=data, threads=threads or run_threads(),
            patterns=PATTERNS if pattern == "auto" else (pattern,), log=lambda m: None)
        sparsity = weighted_sparsity(module, ep, layer_sparsity)
        plan = {"layer_sparsity": layer_sparsity, "layer_pattern": layer_pattern}
    elif sparsity is None:
        raise UnsparseError("prune needs a sparsity, or a speed target (speedup= or latency_ms=)")
    try:
        cfg = PruneConfig(sparsity=sparsity, method=method, epochs=epochs, **plan, **config)
    except TypeError as err:
        raise UnsparseError(f"prune: {err}") from None
    prune_model(module, cfg, data, ep, log=lambda m: None)
    if plan:
        module.unsparse_speed = result
    return module


def quantize(model, scheme: str = "int8", *, activations: str | None = None, calibration_data=None,
             data=None, epochs: int = 0, example_input=None):
    """Quantise the nonzero conv/linear weights (zeros stay zero), in place; returns the module, which carries
    its quantisation (`module.unsparse_quant`, the .pt2's unsparse_quant.json) into `compile`.

    scheme: int8, int4 (intB), kmeansB, pow2. activations="int8": also calibrate every layer's input range
    (static, per tensor) on `calibration_data` (a data set name or Dataset, "random", or a list of input
    batches), so that `compile` runs those layers int8 x int8 on x86. data/epochs: fine-tuning (STE)."""
    from .compress.calibrate import RANDOM, calibrate, calibration_batches
    from .compress.quantize import quantize_model

    if activations not in (None, "int8"):
        raise UnsparseError(f"unknown activation quantisation '{activations}': use int8")
    module, ep, shape = _module(model, example_input)
    quant = quantize_model(module, scheme, _dataset(data), epochs, ep=ep)
    if activations:
        if calibration_data is None:
            raise UnsparseError("activations='int8' needs calibration_data (a data set, 'random', or input batches)")
        if isinstance(calibration_data, (list, tuple)):
            batches, name = list(calibration_data), "batches"
        else:
            cal = None if calibration_data == RANDOM else _dataset(calibration_data)
            if shape is None:
                raise UnsparseError("quantize(nn.Module, activations='int8') needs example_input= for the input shape")
            batches, name = calibration_batches(shape, cal), getattr(cal, "name", RANDOM)
        quant["activations"] = {**calibrate(module, batches, ep), "dataset": name}
    module.unsparse_quant = quant
    return module


def tune(model, log_dir: str, trials: int, target: str = "llvm", *, example_input=None, arch: str | None = None,
         threshold: float | None = None, include_dense: bool = False, rpc_tracker: str | None = None,
         rpc_key: str | None = None, seed: int = 1, progress: bool = False):
    """MetaSchedule search over the sparse kernels' knobs, records appended to `log_dir` (resumable);
    `compile(..., tuning_log=log_dir)` applies them. Returns the per-workload result table's object."""
    from .cost.calibration import rates_for
    from .target import make_target, require_runnable
    from .tuning import tune as search
    from .tuning.rpc import parse_tracker

    tgt = make_target(target, arch)
    rpc = (*parse_tracker(rpc_tracker), rpc_key) if rpc_tracker else None
    if rpc is None:
        require_runnable(tgt, "tune")
    ep, _, _ = _program(model, example_input, None)
    rates = rates_for(tgt, calibrate=rpc is None, log=_calibration_note) if threshold is None else None
    return search(ep, tgt, log_dir, trials, threshold=threshold, include_dense=include_dense, rpc=rpc, seed=seed,
                  progress=progress, rates=rates)


def calibrate(threads: int | None = None, *, store: bool = True):
    """Measure this CPU's cost-model rates (under a minute) and cache them for `compile`; returns them."""
    from .cost.calibration import calibrate_rates, run_threads
    from .target import make_target, require_runnable

    target = make_target("llvm")
    require_runnable(target, "calibrate")
    return calibrate_rates(target, threads or run_threads(), log=lambda m: None, store=store)


def train(model, data, epochs: int, *, lr: float = 3e-3, batch_size: int = 64, seed: int = 0):
    """Train densely (Adam, cosine learning rate; weights that are exactly zero stay zero): an nn.Module in
    place, or a built-in name from its seeded weights; returns the module. data: "digits",
    "cifar10:PATH" or a compress.data.Dataset."""
    from .compress.train import keep_zeros
    from .compress.train import train as fit

    module, _, _ = _module(model)
    with keep_zeros(module):
        fit(module, _dataset(data), epochs, lr=lr, batch_size=batch_size, seed=seed)
    return module


def evaluate(model, data) -> float:
    """Top-1 accuracy (%) on the data set's test split, of an nn.Module or a CompiledModel (run at its
    compiled batch size)."""
    from .compress.train import evaluate as accuracy

    data = _dataset(data)
    if isinstance(model, CompiledModel):
        return accuracy(model, data, fixed_batch=model.inputs[0]["shape"][0])
    module, _, _ = _module(model)
    return accuracy(module, data)
