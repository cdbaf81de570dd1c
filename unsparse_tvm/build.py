"""Build: an ExportedProgram through our Relax pipeline (unsparse_tvm.relay_passes) into one deployable .so,
with the per-layer report and the metadata trailer `run` and `inspect` read (unsparse_tvm.runtime)."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field

import tvm

from .cost.calibration import rates_for
from .cuda_package import building_for, embed_device_code
from .errors import UnsparseError
from .frontend import (check_batch, import_program, load_program, program_input_shape, program_outputs,
                       read_quantization)
from .outputs import check_output, writing
from .parallel_build import compile_module, export_library
from .module_file import write_metadata
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
    inputs: list | None = None  # {"name", "shape", "dtype"} of the input; None: "x", input_shape, float32
    threshold: float | None = None     # what chose the sparse layers: this sparsity, or (None) predicted time
    dropped: dict = field(default_factory=dict)  # depthwise layer -> (channels dropped, channels), DropDeadChannels
    gathered: dict = field(default_factory=dict)  # the same, dropped from the expand conv only
    fp32_int8: dict = field(default_factory=dict)  # layer with an int8 range run fp32 -> its quads' fill
    fp32_capped: dict = field(default_factory=dict)  # the same, for its ReLU6 or SiLU -> which

    @property
    def input_specs(self) -> list[dict]:
        return self.inputs or [{"name": "x", "shape": list(self.input_shape), "dtype": "float32"}]


def compile_program(ep, target, *, threshold: float | None = None, sparse: bool = True, fmt: str | None = None,
                    configs: dict | None = None, database=None, activations: dict | None = None,
                    quant: dict | None = None, rates=None) -> Compiled:
    """Compile an ExportedProgram for a tvm Target; sparse=False is "TVM without our sparse pass";
    activations (calibrated input ranges by layer name, see activation_ranges): those convs run int8;
    quant (the .pt2's unsparse_quant.json): the other sparse layers' kernels read quantised weights;
    rates: the x86 cost model's (calibration.rates_for; default the built-in ones)."""
    mod, names = import_program(ep)
    return compile_relax(mod, names, target, program_input_shape(ep), program_outputs(ep), threshold=threshold,
                         sparse=sparse, fmt=fmt, configs=configs, database=database, activations=activations,
                         quant=quant, rates=rates)


def compile_relax(mod, names, target, input_shape: tuple[int, ...], outputs: list, *, inputs: list | None = None,
                  **options) -> Compiled:
    """An imported Relax module (weights as constants, `names` its LayerNames) through our pipeline;
    `options` are build_pipeline's (threshold, sparse, fmt, configs, database, activations, quant, rates)."""
    report: list = []
    pipeline = build_pipeline(target, names=names, report=report, **options)
    start = time.perf_counter()
    with building_for(target):  # the arch nvcc compiles for, should TVM call it while building
        executable = compile_module(mod, target, pipeline)  # tvm.compile, kernels built on every core
    # the int8 passes report before the fp32 ones: back to the layers' order, which is the kernels' order that
    # benchmarks/so_profile.py labels by (sorted() is stable: unnamed layers keep their order, after the named)
    rank = names.rank()
    report.sort(key=lambda d: rank.get(d.name, len(rank)))
    return Compiled(executable, target, tuple(input_shape), outputs, report, time.perf_counter() - start, inputs,
                    options.get("threshold"), dict(names.dropped), dict(names.gathered), dict(names.fp32_int8),
                    dict(names.capped_int8))


def compile_onnx(path: str, target, *, batch: int | None = None, log=print, **options) -> Compiled:
    """An .onnx file compiled like compile_program compiles a .pt2 (options: compile_relax's; `rates` may be
    a callable, called after the import succeeded); the module's input is the graph's (name, shape, dtype)."""
    from .onnx_frontend import import_onnx  # deferred: onnx is an optional extra

    imported = import_onnx(path, batch=batch, log=log)
    if callable(options.get("rates")):  # measured only once the file is known to be good (it takes a while)
        options["rates"] = options["rates"]()
    return compile_relax(imported.mod, imported.names, target, imported.input_shape, imported.outputs,
                         inputs=[imported.input], **options)


def activation_ranges(quant: dict | None) -> dict | None:
    """The calibrated activation ranges (`quantize --activations int8`) in a .pt2's quantisation record
    (frontend.read_quantization, read once by the caller), or None."""
    return ((quant or {}).get("activations") or {}).get("layers") or None


def format_decisions(report: list, threshold: float | None) -> str:
    """The per-layer table: whole names (the column is as wide as the longest), whole reasons."""
    name_w = max([len("layer")] + [len(r.name) for r in report])
    dec_w = max([len("decision")] + [len(r.label) for r in report])
    lines = [f"{'layer':{name_w}s} {'op':7s} {'weight shape':20s} {'sparsity':>8s} {'decision':{dec_w}s} {'format':6s} "
             f"{'nnz':>9s} {'padded':>9s} {'pred. us':>17s} fused"]
    for r in report:  # predicted: the kernel chosen, then the other one (dense vs sparse)
        pred = (f"{r.sparse_us:.1f} vs {r.dense_us:.1f}" if r.decision == "sparse" else f"{r.dense_us:.1f} vs {r.sparse_us:.1f}") \
            if r.dense_us else "-"
        lines.append(f"{r.name:{name_w}s} {r.op:7s} {str(r.shape):20s} {r.sparsity:8.3f} {r.label:{dec_w}s} "
                     f"{r.format:6s} {r.nnz:9d} {r.padded if r.padded else '-':>9} {pred:>17s} {r.fused}".rstrip()
                     + (f"  [{r.precision}, {r.weight_bytes} B]" if r.precision != "fp32" else ""))
    if not any(r.decision == "sparse" for r in report):
        why = (f"no layer reaches the sparsity threshold {threshold}" if threshold is not None
               else "no layer is predicted faster sparse than dense")
        lines.append(f"note: {why}; the model was compiled dense")
    return "\n".join(lines)


def print_report(compiled: Compiled) -> None:
    print(format_decisions(compiled.report, compiled.threshold))
    for found, what in ((compiled.dropped, "left their blocks (expand, depthwise and project convs shrunk)"),
                        (compiled.gathered, "left their expand convs (the depthwise output has other uses)")):
        if found:
            dropped, total = (sum(v[i] for v in found.values()) for i in (0, 1))
            print(f"dead channels: {dropped} of {total} depthwise channels in {len(found)} blocks had all-zero "
                  f"filters and {what}")
    if compiled.fp32_int8:
        fills = compiled.fp32_int8.values()
        print(f"note: {len(fills)} layer(s) with an int8 range run fp32 ({', '.join(compiled.fp32_int8)}): their "
              f"int8 quads would hold {min(fills):.2f}-{max(fills):.2f} of 4 nonzeros, where fp32 runs faster (convs "
              "outside the gathered kernel's maps without VNNI, or on an fp32 input); prune --method channel4 fills "
              "the quads")
    if compiled.fp32_capped:
        acts = "/".join(sorted(set(compiled.fp32_capped.values())))
        print(f"note: {len(compiled.fp32_capped)} conv(s) with an int8 range run fp32 "
              f"({', '.join(compiled.fp32_capped)}): a {acts} follows them, which the int8 epilogue does not "
              "apply, and fp32 fuses it")


def metadata(compiled: Compiled, *, model: str) -> dict:
    """What a compiled module says about itself (the .so's trailer; `inspect`, `run` and `load` read it). The
    threshold recorded is the one the layers were compiled with, so `inspect` cannot describe another choice."""
    target = compiled.target
    kind = target.kind.name
    host = target.host if kind == "cuda" else target
    return {
        "format": 1,
        "model": model,
        "target": kind,
        "arch": str(target.attrs["arch"]) if kind == "cuda" else None,
        "mcpu": str(host.attrs["mcpu"]) if host is not None and "mcpu" in host.attrs else None,
        "cpu_features": sorted(target_cpu_features(target)),  # `run` refuses a CPU without them (SIGILL)
        "device_code": "fatbin" if kind == "cuda" else "none (host code only)",
        "inputs": compiled.input_specs,
        "outputs": compiled.outputs,
        "threshold": compiled.threshold,
        "sparse_layers": sum(1 for r in compiled.report if r.decision == "sparse"),
        "dead_channels": {name: list(v) for name, v in compiled.dropped.items()},
        "dead_channels_expand_only": {name: list(v) for name, v in compiled.gathered.items()},
        "int8_left_fp32": dict(compiled.fp32_int8),
        "int8_left_fp32_for_activation": dict(compiled.fp32_capped),
        "layers": [r.as_dict() for r in compiled.report],
        "tvm_version": tvm.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def write_module(compiled: Compiled, path: str, *, model: str, overwrite: bool = False) -> dict:
    """Write the .so (weights inside; CUDA: device code compiled for the arch) and its metadata, through a
    temp file that is removed on any exit (unsparse_tvm.outputs)."""
    check_output(path, overwrite=overwrite, suffixes=(".so",))
    kind = compiled.target.kind.name
    meta = metadata(compiled, model=model)
    arch = meta["arch"]
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
                 batch: int | None = None, overwrite: bool = False, tuning_log: str | None = None,
                 calibrate: bool = True) -> dict:
    """`unsparse-tvm compile`: model name or .pt2 -> .so, with the per-layer decisions printed (and which
    cost-model calibration chose them: calibration.rates_for); an .onnx file goes to compile_onnx_file."""
    if model.endswith(".onnx"):
        return compile_onnx_file(model, target_name, arch, threshold, output, batch=batch, overwrite=overwrite,
                                 tuning_log=tuning_log, calibrate=calibrate)
    check_batch(batch)
    check_output(output, overwrite=overwrite, suffixes=(".so",), inputs=(model,))
    target = make_target(target_name, arch)
    database = None
    if tuning_log is not None:
        database = open_database(tuning_log, target)  # only records of this target
    ep = load_program(model, batch=batch)
    quant = read_quantization(model) if model.endswith(".pt2") else None
    rates = rates_for(target, calibrate=calibrate) if threshold is None else None  # --threshold: no costs
    compiled = compile_program(ep, target, threshold=threshold, database=database,
                               activations=activation_ranges(quant), quant=quant, rates=rates)
    return _report_and_export(compiled, output, model=model, target_name=target_name, database=database,
                              overwrite=overwrite)


def _report_and_export(compiled: Compiled, output: str, *, model: str, target_name: str, database,
                       overwrite: bool) -> dict:
    print_report(compiled)
    if database is not None:
        print(database.summary())  # how many layers were scheduled from the log
    meta = write_module(compiled, output, model=model, overwrite=overwrite)
    print(f"wrote {output} ({target_name}{' ' + meta['arch'] if meta['arch'] else ''}, "
          f"{meta['sparse_layers']} sparse layers, compiled in {compiled.seconds:.1f} s)")
    return meta


def compile_onnx_file(path: str, target_name: str, arch: str | None, threshold: float | None, output: str, *,
                      batch: int | None = None, overwrite: bool = False, tuning_log: str | None = None,
                      calibrate: bool = True) -> dict:
    """`unsparse-tvm compile model.onnx`: as compile_file, from an ONNX file (a QDQ model runs as fp32, said
    in a note); the .so's metadata carries the graph's input name, shape and dtype."""
    check_batch(batch)
    check_output(output, overwrite=overwrite, suffixes=(".so",), inputs=(path,))
    target = make_target(target_name, arch)
    database = open_database(tuning_log, target) if tuning_log is not None else None
    rates = (lambda: rates_for(target, calibrate=calibrate)) if threshold is None else None  # --threshold: no costs
    compiled = compile_onnx(path, target, batch=batch, threshold=threshold, database=database, rates=rates)
    return _report_and_export(compiled, output, model=path, target_name=target_name, database=database,
                              overwrite=overwrite)
