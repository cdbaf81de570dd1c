"""The public Python API's model side (imported from `unsparse_tvm`): train, prune (to a sparsity, or for a
speed target), quantize, evaluate; each changes an nn.Module in place (a .pt2 path or built-in name is
loaded first) and returns it. The compiler side is api.py."""

from __future__ import annotations

import os

from .api import CompiledModel
from .errors import UnsparseError


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
