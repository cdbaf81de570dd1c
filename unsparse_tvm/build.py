"""Build: an ExportedProgram through our Relax pipeline (unsparse_tvm.relay_passes) into one deployable .so,
with the per-layer report and the metadata trailer `run` and `inspect` read (unsparse_tvm.runtime)."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field

import tvm

from .cuda_package import building_for, embed_device_code
from .errors import UnsparseError
from .frontend import (check_batch, import_program, load_program, program_input_shape, program_outputs,
                       read_quantization)
from .module_file import write_metadata
from .outputs import check_output, writing
from .parallel_build import compile_module, export_library
from .relay_passes import build_pipeline
from .target import make_target, target_cpu_features
from .tuning.database import open_database


@dataclass
class Compiled:
    executable: object                 # tvm.relax.Executable
    target: object                     # tvm.target.Target
    input_shape: tuple[int, ...]
    outputs: list = field(default_factory=list)  # {"name", "shape", "dtype"} of every output, in order
    report: list = field(default_factory=list)   # LayerDecision per conv/linear layer
    seconds: float = 0.0
    threshold: float | None = None     # what chose the sparse layers: this sparsity, or (None) predicted time


def compile_program(ep, target, *, threshold: float | None = None, sparse: bool = True, fmt: str | None = None,
                    configs: dict | None = None, database=None, activations: dict | None = None,
                    quant: dict | None = None) -> Compiled:
    """Compile an ExportedProgram for a tvm Target; sparse=False is "TVM without our sparse pass";
    activations (calibrated input ranges by layer name, see activation_ranges): those convs run int8;
    quant (the .pt2's unsparse_quant.json): the other sparse layers' kernels read quantised weights."""
    mod, names = import_program(ep)
    report: list = []
    pipeline = build_pipeline(target, threshold=threshold, sparse=sparse, names=names, report=report,
                              fmt=fmt, configs=configs, database=database, activations=activations, quant=quant)
    start = time.perf_counter()
    with building_for(target):  # the arch nvcc compiles for, should TVM call it while building
        executable = compile_module(mod, target, pipeline)  # tvm.compile, kernels built on every core
    return Compiled(executable, target, program_input_shape(ep), program_outputs(ep), report,
                    time.perf_counter() - start, threshold)


def activation_ranges(quant: dict | None) -> dict | None:
    """The calibrated activation ranges (`quantize --activations int8`) in a .pt2's quantisation record
    (frontend.read_quantization, read once by the caller), or None."""
    return ((quant or {}).get("activations") or {}).get("layers") or None


def format_report(report: list, threshold: float | None) -> str:
    """The per-layer table: whole names (the column is as wide as the longest), whole reasons."""
    name_w = max([len("layer")] + [len(r.name) for r in report])
    dec_w = max([len("decision")] + [len(r.decision) for r in report])
    lines = [f"{'layer':{name_w}s} {'op':7s} {'weight shape':20s} {'sparsity':>8s} {'decision':{dec_w}s} {'format':6s} "
             f"{'nnz':>9s} {'padded':>9s} {'pred. us':>17s} fused"]
    for r in report:  # predicted: the kernel chosen, then the other one (dense vs sparse)
        pred = (f"{r.sparse_us:.1f} vs {r.dense_us:.1f}" if r.decision == "sparse" else f"{r.dense_us:.1f} vs {r.sparse_us:.1f}") \
            if r.dense_us else "-"
        lines.append(f"{r.name:{name_w}s} {r.op:7s} {str(r.shape):20s} {r.sparsity:8.3f} {r.decision:{dec_w}s} "
                     f"{r.format:6s} {r.nnz:9d} {r.padded if r.padded else '-':>9} {pred:>17s} {r.fused}".rstrip()
                     + (f"  [{r.precision}, {r.weight_bytes} B]" if r.precision != "fp32" else ""))
    if not any(r.decision == "sparse" for r in report):
        why = (f"no layer reaches the sparsity threshold {threshold}" if threshold is not None
               else "no layer is predicted faster sparse than dense")
        lines.append(f"note: {why}; the model was compiled dense")
    return "\n".join(lines)


def print_report(compiled: Compiled) -> None:
    print(format_report(compiled.report, compiled.threshold))


def export(compiled: Compiled, path: str, *, model: str, overwrite: bool = False) -> dict:
    """Write the .so (weights inside; CUDA: device code compiled for the arch) and its metadata, through a
    temp file that is removed on any exit (unsparse_tvm.outputs). The threshold recorded is the one the
    layers were compiled with (compiled.threshold), so `inspect` cannot describe another choice."""
    check_output(path, overwrite=overwrite, suffixes=(".so",))
    target = compiled.target
    kind = target.kind.name
    arch = str(target.attrs["arch"]) if kind == "cuda" else None
    host = target.host if kind == "cuda" else target
    meta = {
        "format": 1,
        "model": model,
        "target": kind,
        "arch": arch,
        "mcpu": str(host.attrs["mcpu"]) if host is not None and "mcpu" in host.attrs else None,
        "cpu_features": sorted(target_cpu_features(target)),  # `run` refuses a CPU without them (SIGILL)
        "device_code": "fatbin" if kind == "cuda" else "none (host code only)",
        "inputs": [{"name": "x", "shape": list(compiled.input_shape), "dtype": "float32"}],
        "outputs": compiled.outputs,
        "threshold": compiled.threshold,
        "sparse_layers": sum(1 for r in compiled.report if r.decision == "sparse"),
        "layers": [r.as_dict() for r in compiled.report],
        "tvm_version": tvm.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    check_space(path, compiled)
    with writing(path, overwrite=overwrite) as tmp:
        if kind == "cuda":
            embed_device_code(compiled.executable, arch)
        workspace = os.path.join(os.path.dirname(tmp), "tvm")
        os.makedirs(workspace)
        export_library(compiled.executable, tmp, workspace)  # object files written on every core
        write_metadata(tmp, meta)
    return meta


def check_space(path: str, compiled: Compiled) -> None:
    """LLVM cannot report a full disk: it aborts the process while writing object files. So the module's
    folder must have room for the object files and the library (each about the weights plus the code)."""
    weights = sum(int(getattr(r, "weight_bytes", 0)) for r in compiled.report)
    need = 2 * (weights + 4 * 2**20)
    folder = os.path.dirname(os.path.abspath(path))
    free = shutil.disk_usage(folder).free
    if free < need:
        raise UnsparseError(f"not enough free space in {folder} for {path}: about {need / 2**20:.0f} MiB needed "
                            f"(object files and the library), {free / 2**20:.1f} MiB free")


def compile_file(model: str, target_name: str, arch: str | None, threshold: float | None, output: str, *,
                 batch: int | None = None, overwrite: bool = False, tuning_log: str | None = None) -> dict:
    """`unsparse-tvm compile`: model name or .pt2 -> .so, with the per-layer decisions printed."""
    check_batch(batch)
    check_output(output, overwrite=overwrite, suffixes=(".so",), inputs=(model,))
    target = make_target(target_name, arch)
    database = None
    if tuning_log is not None:
        database = open_database(tuning_log, target)  # only records of this target
    ep = load_program(model, batch=batch)
    quant = read_quantization(model) if model.endswith(".pt2") else None
    compiled = compile_program(ep, target, threshold=threshold, database=database,
                               activations=activation_ranges(quant), quant=quant)
    print_report(compiled)
    if database is not None:
        print(database.summary())  # how many layers were scheduled from the log
    meta = export(compiled, output, model=model, overwrite=overwrite)
    print(f"wrote {output} ({target_name}{' ' + meta['arch'] if meta['arch'] else ''}, "
          f"{meta['sparse_layers']} sparse layers, compiled in {compiled.seconds:.1f} s)")
    return meta
