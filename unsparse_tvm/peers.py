"""The runtimes a user would pick instead of ours, on the same (pruned) model, for `bench --peers`:
ONNX Runtime and OpenVINO (the `peers` extra: pip install -e ".[peers]") and torch.compile (Inductor).
Each contender is built once, checked against PyTorch eager, and timed by bench's round robin.

Fairness: the same ExportedProgram for everyone (exported to ONNX once, with torch.onnx's dynamo
exporter); every runtime gets the same thread count; OpenVINO is held to f32 (on CPUs with AVX-512 BF16
it would otherwise run bf16 and not compute the same thing). Where our code is AVX2 on an AVX-512 host
(`UNSPARSE_MCPU=haswell`), the peers that allow it run AVX2 too (`hold_to_avx2`); OpenVINO's runtime model
says which kernels it chose (on an AMX CPU its int8 convs are AMX ones), and bench prints them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from importlib.util import find_spec
from typing import Callable

import numpy as np

PEERS = ("onnxruntime", "openvino", "torch_compile", "deepsparse",
         "onnxruntime_int8", "openvino_int8", "deepsparse_int8")
INT8_PEERS = ("onnxruntime_int8", "openvino_int8", "deepsparse_int8")  # what an int8 model meets by default
# our own compiler behind torch.compile(backend="unsparse"), and the same model called through the public API
# (what torch.compile's row is compared with): timed beside the peers, never counted as one
OURS = ("unsparse_torch_compile", "unsparse_api")
INT8_TOLERANCE = 0.1  # max relative error vs fp32 PyTorch of an int8 runtime: quantisation error, not a bug
EXTRA_HINT = 'pip install -e ".[peers]"'
PEER_ISAS = ("auto", "native", "avx2")
# oneDNN's cap on the instruction set it dispatches to: read at its first primitive, by OpenVINO's CPU plugin
# and by PyTorch's convolutions alike (checked: OpenVINO then runs brgconv_avx2 / jit_avx2_I8 kernels)
ONEDNN_ISA = "ONEDNN_MAX_CPU_ISA"


def hold_to_avx2(mode: str, ours_avx512: bool, host_avx512: bool) -> str | None:
    """Peers held to AVX2 where our code is AVX2 on an AVX-512 host (mode "auto"), or always ("avx2"):
    compare like with like. Sets ONEDNN_ISA for the rest of the process (oneDNN reads it once) unless the
    user set it. Returns the line to print, or None where nothing is held."""
    if mode not in PEER_ISAS:
        from .errors import UnsparseError

        raise UnsparseError(f"--peer-isa must be one of {', '.join(PEER_ISAS)}, got {mode!r}")
    if mode == "native" or not host_avx512 or (mode == "auto" and ours_avx512):
        return None
    os.environ.setdefault(ONEDNN_ISA, "AVX2")
    return (f"peers held to {os.environ[ONEDNN_ISA]} like our code: OpenVINO and PyTorch's convolutions "
            f"({ONEDNN_ISA}={os.environ[ONEDNN_ISA]}), ONNX Runtime and DeepSparse by a CPUID and /proc/cpuinfo "
            "without AVX-512 where Linux can mask CPUID (cpuid_avx2); torch.compile's own kernels run this CPU's "
            "widest code")


def fastest_peer(times: dict[str, float], kind: str) -> tuple[str, float] | None:
    """The fastest peer of one precision in a run's `{contender_ms: ms}`, like with like: kind "fp32" picks
    among the fp32 runtimes, "int8" among the int8 ones; None where the run timed none."""
    peers = {k: v for k, v in times.items() if k[:-3] in PEERS and k.endswith("_int8_ms") == (kind == "int8")}
    if not peers:
        return None
    best = min(peers, key=peers.get)
    return best, peers[best]


def available() -> dict[str, str | None]:
    """{peer: None if usable, else why not} (no import of the heavy runtimes beyond a spec lookup)."""
    onnx = ["onnxscript", "onnx"]
    need = {"onnxruntime": ["onnxruntime", *onnx], "openvino": ["openvino", *onnx], "torch_compile": [],
            "unsparse_torch_compile": [], "unsparse_api": [], "onnxruntime_int8": ["onnxruntime", *onnx],
            "openvino_int8": ["openvino", "onnxruntime", *onnx], "deepsparse": [*onnx],
            "deepsparse_int8": ["onnxruntime", *onnx]}
    return {p: (f"needs {', '.join(m for m in mods if find_spec(m) is None)} ({EXTRA_HINT})"
                if any(find_spec(m) is None for m in mods) else None) for p, mods in need.items()}


def export_onnx(ep, x, folder: str, opset: int | None = None) -> str:
    """The ExportedProgram as an ONNX file (weights beside it) in folder; exported once per folder and opset.
    opset 17 is for DeepSparse (its ONNX Runtime reads IR version 9 at most: the file says 9)."""
    path = os.path.join(folder, f"model{'' if opset is None else f'-opset{opset}'}.onnx")
    if os.path.exists(path):
        return path
    import torch  # deferred: the peer names above are read when the command line is parsed

    # torch.onnx warns about torchvision ops it cannot register (no model here uses them); onnxscript logs
    # a traceback at WARNING when the ONNX C API cannot convert a node to opset 17, then keeps the model
    logs = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            torch.onnx.export(ep, (x,), path, dynamo=True, external_data=opset is None,
                              **({"opset_version": opset} if opset else {}))
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)
    if opset is not None:
        import onnx

        model = onnx.load(path)
        model.ir_version = min(model.ir_version, 9)  # opset 17 needs no more than IR 9
        onnx.save(model, path)
    return path


def int8_onnx(fp32_path: str, batches: list[np.ndarray]) -> str:
    """ONNX Runtime's static quantisation of an ONNX file, beside it: QDQ, per-channel int8 weights, uint8
    activations, calibrated (min/max) on `batches` (the samples our `quantize --activations int8` saw)."""
    path = fp32_path.replace(".onnx", "-int8.onnx")
    if os.path.exists(path):
        return path
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    name = onnx.load(fp32_path, load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feed = iter({name: b} for b in batches)

        def get_next(self):
            return next(self.feed, None)

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # it advises pre-processing on every call
    try:
        quantize_static(fp32_path, path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    return path


def onnxruntime_call(path: str, x_np: np.ndarray, threads: int):  # fp32 or QDQ int8: the file says
    import onnxruntime as ort  # deferred: an optional extra (peers), imported only when asked for

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x_np}
    return lambda: sess.run(None, feed)[0]


def openvino_call(path: str, x_np: np.ndarray, threads: int):
    import openvino as ov  # deferred likewise

    # f32: on CPUs with AVX-512 BF16 it would otherwise run bf16; a QDQ model runs its int8 kernels either way
    model = ov.Core().compile_model(path, "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                                                  "INFERENCE_PRECISION_HINT": "f32"})
    request, out = model.create_infer_request(), model.output(0)

    def call():
        return request.infer({0: x_np})[out]
    call.kernels = openvino_kernels(model)
    return call


def openvino_kernels(model) -> str:
    """The kernels a compiled OpenVINO model runs its convolutions with, counted ("brgconv_avx2_f32 x17, ..."),
    from its runtime model; "" where that cannot be read."""
    counts: dict[str, int] = {}
    try:
        for op in model.get_runtime_model().get_ops():
            info = op.get_rt_info()
            if info["layerType"].astype(str) == "Convolution":
                kind = info["primitiveType"].astype(str)
                counts[kind] = counts.get(kind, 0) + 1
    except Exception:  # an OpenVINO without these runtime attributes: nothing to report, the timing stands
        return ""
    return ", ".join(f"{k} x{n}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def plain_module(ep):
    """The program as a plain nn.Module, what a user's own model is to PyTorch: without the hooks
    `ExportedProgram.module()` adds (input checks and pytree packing, run in Python on every call: ~0.1 ms,
    6% of vgg16-cifar at 90%, that no one calling their own model pays)."""
    net = ep.module(check_guards=False)
    net._forward_pre_hooks.clear()
    net._forward_hooks.clear()
    return net


def torch_compile_call(ep, x):
    import torch

    return _numpy_call(torch.compile(plain_module(ep)), x)  # per thread count: Inductor bakes it into its kernels


def _numpy_call(fn, x):
    """fn(x) without autograd, its (first) output as numpy."""
    import torch

    def call():
        with torch.no_grad():
            y = fn(x)
        return (y[0] if isinstance(y, (tuple, list)) else y).numpy()

    return call


def unsparse_torch_compile_call(ep, x):
    """torch.compile(model, backend="unsparse") on the same program: the .so path's kernels, called through
    Dynamo's guards and the backend's argument binding (what a torch.compile user gets)."""
    import torch

    torch._dynamo.reset()
    return _numpy_call(torch.compile(plain_module(ep), backend="unsparse"), x)


def unsparse_api_call(ep, x):
    """`unsparse_tvm.compile(program)` called on the torch tensor, as a script calls a loaded .so
    (CompiledModel: input checks, conversions both ways), with the same default options as the torch.compile
    row: bench's own "unsparse" row is the bare VM call on a ready TVM tensor."""
    from .api import compile

    model = compile(ep)
    return lambda: model(x).numpy()


def peer_callables(ep, x, threads: int, peers: list[str], onnx_dir: str, calibration: list[np.ndarray] | None = None,
                   log=print) -> dict[str, Callable]:
    """{peer: a call returning the output as numpy}, for each requested peer that is installed (the
    others are reported through `log` and left out). The ONNX file is written once into onnx_dir (the
    caller's, reused for every thread count; the runtimes hold the model in memory once built). int8 peers
    run ONNX Runtime's QDQ quantisation of it, calibrated on `calibration` (default: seeded normal inputs);
    DeepSparse's calls are timers of their own (peers_deepsparse.Worker: `.measure(number)`)."""
    why = available()
    calls = {}
    x_np = x.numpy()
    batches = calibration if calibration is not None else [
        np.random.default_rng(i).standard_normal(x_np.shape).astype(np.float32) for i in range(16)]
    if "unsparse_torch_compile" in peers and "unsparse_api" not in peers:  # its like-with-like reference
        peers = [*peers, "unsparse_api"]
    for peer in peers:
        if why.get(peer):
            log(f"skipping {peer}: {why[peer]}")
            continue
        try:
            if peer in ("onnxruntime", "openvino"):
                path = export_onnx(ep, x, onnx_dir)
            elif peer in ("onnxruntime_int8", "openvino_int8"):
                path = int8_onnx(export_onnx(ep, x, onnx_dir), batches)
            if peer.startswith("onnxruntime"):
                calls[peer] = onnxruntime_call(path, x_np, threads)
            elif peer.startswith("openvino"):
                calls[peer] = openvino_call(path, x_np, threads)
            elif peer.startswith("deepsparse"):
                from .peers_deepsparse import Worker

                path = export_onnx(ep, x, onnx_dir, opset=17)
                calls[peer] = Worker(int8_onnx(path, batches) if peer.endswith("int8") else path, x_np, threads)
            elif peer == "torch_compile":
                calls[peer] = torch_compile_call(ep, x)
            elif peer == "unsparse_torch_compile":
                calls[peer] = unsparse_torch_compile_call(ep, x)
            elif peer == "unsparse_api":
                calls[peer] = unsparse_api_call(ep, x)
        except Exception as err:  # a peer that cannot run is one line; the others still run
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            log(f"skipping {peer}: {first[:200]}")
    return calls
