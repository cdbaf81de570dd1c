"""ONNX files of pruned models, as a user would write them, and ONNX Runtime's answer on them: the
reference the ONNX door (unsparse_tvm.onnx_frontend) is held to. Needs the peers extra (onnx,
onnxscript, onnxruntime)."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import numpy as np
import torch
import torch.nn as nn

EXPORTERS = ("dynamo", "torchscript")


def pruned_module(model: str, sparsity: float = 0.9) -> tuple[nn.Module, tuple[int, ...]]:
    """A built-in or zoo model (seeded weights), magnitude-pruned as `prune_to_program` does, with its input
    shape: the nn.Module itself, which the TorchScript exporter needs (it cannot take an ExportedProgram)."""
    from unsparse_tvm.compress.masks import magnitude_prune
    from unsparse_tvm.frontend import eval_mode, load_model

    loaded = load_model(model)
    magnitude_prune(loaded.module, sparsity)
    return eval_mode(loaded.module), loaded.input_shape


def export_onnx(module: nn.Module, x: torch.Tensor, path: str, exporter: str, *, optimize: bool = True,
                dynamic_batch: bool = False) -> str:
    """`torch.onnx.export` with the dynamo exporter (from the ExportedProgram, as peers.export_onnx does;
    optimize=False keeps what its optimiser folds, BatchNormalization among them) or the TorchScript one
    (dynamo=False; dynamic_batch: a symbolic batch dimension), weights inside the file; quiet."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                ep = torch.export.export(module.eval(), (x,))
                torch.onnx.export(ep, (x,), path, dynamo=True, optimize=optimize)
            else:
                named = {"input_names": ["input"], "dynamic_axes": {"input": {0: "batch"}}} if dynamic_batch else {}
                torch.onnx.export(module.eval(), (x,), path, dynamo=False, **named)
    finally:
        log.setLevel(level)
    return path


def ort_outputs(path: str, x: np.ndarray) -> list[np.ndarray]:
    """Every output of the ONNX file on x, by ONNX Runtime (CPU, one thread: the machine is shared)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})
