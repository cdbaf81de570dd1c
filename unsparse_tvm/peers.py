"""The runtimes a user would pick instead of ours, on the same (pruned) model, for `bench --peers`:
ONNX Runtime and OpenVINO (the `peers` extra: pip install -e ".[peers]") and torch.compile (Inductor).
Each contender is built once, checked against PyTorch eager, and timed by bench's round robin.

Fairness: the same ExportedProgram for everyone (exported to ONNX once, with torch.onnx's dynamo
exporter); every runtime gets the same thread count; OpenVINO is held to f32 (on CPUs with AVX-512 BF16
it would otherwise run bf16 and not compute the same thing).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from importlib.util import find_spec
from typing import Callable

import numpy as np
import torch

PEERS = ("onnxruntime", "openvino", "torch_compile")
# our own compiler behind torch.compile(backend="unsparse"): timed beside the peers, never counted as one
OURS = ("unsparse_torch_compile",)
EXTRA_HINT = 'pip install -e ".[peers]"'


def available() -> dict[str, str | None]:
    """{peer: None if usable, else why not} (no import of the heavy runtimes beyond a spec lookup)."""
    need = {"onnxruntime": ["onnxruntime", "onnxscript", "onnx"], "openvino": ["openvino", "onnxscript", "onnx"],
            "torch_compile": [], "unsparse_torch_compile": []}
    return {p: (f"needs {', '.join(m for m in mods if find_spec(m) is None)} ({EXTRA_HINT})"
                if any(find_spec(m) is None for m in mods) else None) for p, mods in need.items()}


def export_onnx(ep, x, folder: str) -> str:
    """The ExportedProgram as an ONNX file (weights beside it) in folder; exported once per folder."""
    path = os.path.join(folder, "model.onnx")
    if os.path.exists(path):
        return path
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)  # it warns about torchvision ops it cannot register, which no model here uses
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter narrates every step
            torch.onnx.export(ep, (x,), path, dynamo=True, external_data=True)
    finally:
        log.setLevel(level)
    return path


def _onnxruntime(path: str, x_np: np.ndarray, threads: int):
    import onnxruntime as ort  # deferred: an optional extra (peers), imported only when asked for

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x_np}
    return lambda: sess.run(None, feed)[0]


def _openvino(path: str, x_np: np.ndarray, threads: int):
    import openvino as ov  # deferred likewise

    model = ov.Core().compile_model(path, "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                                                  "INFERENCE_PRECISION_HINT": "f32"})
    request, out = model.create_infer_request(), model.output(0)
    return lambda: request.infer({0: x_np})[out]


def _torch_compile(ep, x):
    fn = torch.compile(ep.module())  # per thread count: Inductor bakes the thread count into its C++ kernels

    def call():
        with torch.no_grad():
            y = fn(x)
        return (y[0] if isinstance(y, (tuple, list)) else y).numpy()

    return call


def _unsparse_torch_compile(ep, x):
    """torch.compile(model, backend="unsparse") on the same program: the .so path's kernels, called through
    Dynamo's guards and the backend's argument binding (what a torch.compile user gets)."""
    torch._dynamo.reset()
    fn = torch.compile(ep.module(), backend="unsparse")

    def call():
        with torch.no_grad():
            y = fn(x)
        return (y[0] if isinstance(y, (tuple, list)) else y).numpy()

    return call


def peer_callables(ep, x, threads: int, peers: list[str], onnx_dir: str,
                   log=print) -> dict[str, Callable[[], np.ndarray]]:
    """{peer: a call returning the output as numpy}, for each requested peer that is installed (the
    others are reported through `log` and left out). The ONNX file is written once into onnx_dir (the
    caller's, reused for every thread count; the runtimes hold the model in memory once built)."""
    why = available()
    calls = {}
    x_np = x.numpy()
    for peer in peers:
        if why.get(peer):
            log(f"skipping {peer}: {why[peer]}")
        elif peer == "onnxruntime":
            calls[peer] = _onnxruntime(export_onnx(ep, x, onnx_dir), x_np, threads)
        elif peer == "openvino":
            calls[peer] = _openvino(export_onnx(ep, x, onnx_dir), x_np, threads)
        elif peer == "torch_compile":
            calls[peer] = _torch_compile(ep, x)
        elif peer == "unsparse_torch_compile":
            calls[peer] = _unsparse_torch_compile(ep, x)
    return calls
