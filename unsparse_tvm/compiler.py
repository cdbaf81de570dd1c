"""Import (torch.export -> Relax), compile through our pipeline, and export one deployable .so."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from .errors import UnsparseError
from .runtime import write_metadata


@dataclass
class Compiled:
    executable: object                 # tvm.relax.Executable
    target: object                     # tvm.target.Target
    input_shape: tuple[int, ...]
    report: list = field(default_factory=list)   # LayerDecision per conv/linear layer
    seconds: float = 0.0


def import_program(ep):
    """ExportedProgram -> (Relax IRModule with weights as constants, LayerNames for reporting)."""
    from tvm.relax.frontend.torch import from_exported_program

    from .relay_passes._util import LayerNames

    try:
        mod = from_exported_program(ep)
    except Exception as err:  # the importer raises assorted errors; the first line names the op
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnsparseError(f"TVM's PyTorch importer cannot convert this model: {first[:300]}") from None
    named = {k: v.detach().cpu().numpy() for k, v in ep.state_dict.items() if k.endswith("weight")}
    return mod, LayerNames(named)


def compile_program(ep, target, *, threshold: float = 0.7, sparse: bool = True, fmt: str | None = None,
                    configs: dict | None = None, database=None) -> Compiled:
    """Compile an ExportedProgram for a tvm Target; sparse=False is "TVM without our sparse pass"."""
    import tvm

    from .models import program_input_shape
    from .relay_passes import build_pipeline

    mod, names = import_program(ep)
    report: list = []
    pipeline = build_pipeline(target, threshold=threshold, sparse=sparse, names=names, report=report,
                              fmt=fmt, configs=configs, database=database)
    start = time.perf_counter()
    executable = tvm.compile(mod, target=target, relax_pipeline=pipeline)
    return Compiled(executable, target, program_input_shape(ep), report, time.perf_counter() - start)


def print_report(report: list, threshold: float) -> None:
    sparse = [r for r in report if r.decision == "sparse"]
    print(f"{'layer':28s} {'op':7s} {'weight shape':20s} {'sparsity':>8s} {'decision':26s} {'format':6s} "
          f"{'nnz':>9s} {'padded':>9s} fused")
    for r in report:
        print(f"{r.name[:28]:28s} {r.op:7s} {str(r.shape):20s} {r.sparsity:8.3f} {r.decision[:26]:26s} "
              f"{r.format:6s} {r.nnz:9d} {r.padded if r.padded else '-':>9} {r.fused}")
    if not sparse:
        print(f"note: no layer reaches the sparsity threshold {threshold}; the model was compiled dense")


def export(compiled: Compiled, path: str, *, model: str, threshold: float, overwrite: bool = False) -> dict:
    """Write the .so (weights inside; CUDA: device code compiled for the arch) and its metadata."""
    import tvm

    if not path.endswith(".so"):
        raise UnsparseError(f"output {path} must end in .so")
    if os.path.exists(path) and not overwrite:
        raise UnsparseError(f"{path} exists; pass --force to overwrite it")
    out_dir = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(out_dir) or not os.access(out_dir, os.W_OK):
        raise UnsparseError(f"cannot write {path}: directory {out_dir} is missing or not writable")
    target = compiled.target
    kind = target.kind.name
    arch = str(target.attrs["arch"]) if kind == "cuda" else None
    if kind == "cuda":
        from .cuda_package import embed_device_code

        embed_device_code(compiled.executable, arch)
    tmp = f"{path}.tmp{os.getpid()}.so"
    compiled.executable.export_library(tmp)
    host = target.host if kind == "cuda" else target
    meta = {
        "format": 1,
        "model": model,
        "target": kind,
        "arch": arch,
        "mcpu": str(host.attrs["mcpu"]) if host is not None and "mcpu" in host.attrs else None,
        "device_code": "fatbin" if kind == "cuda" else "none (host code only)",
        "inputs": [{"name": "x", "shape": list(compiled.input_shape), "dtype": "float32"}],
        "threshold": threshold,
        "sparse_layers": sum(1 for r in compiled.report if r.decision == "sparse"),
        "layers": [r.as_dict() for r in compiled.report],
        "tvm_version": tvm.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_metadata(tmp, meta)
    os.replace(tmp, path)  # the user's file is only replaced once the new one is complete
    return meta


def compile_file(model: str, target_name: str, arch: str | None, threshold: float, output: str, *,
                 batch: int = 1, overwrite: bool = False, tuning_log: str | None = None) -> dict:
    """`unsparse-tvm compile`: model name or .pt2 -> .so, with the per-layer decisions printed."""
    from .models import load_program
    from .target import make_target

    if not output.endswith(".so"):
        raise UnsparseError(f"output {output} must end in .so")
    if os.path.exists(output) and not overwrite:
        raise UnsparseError(f"{output} exists; pass --force to overwrite it")
    target = make_target(target_name, arch)
    database = None
    if tuning_log is not None:
        from .tuning import open_database

        database = open_database(tuning_log, target)  # only records of this target
    ep = load_program(model, batch=batch)
    compiled = compile_program(ep, target, threshold=threshold, database=database)
    print_report(compiled.report, threshold)
    if database is not None:
        print(database.summary())  # how many layers were scheduled from the log
    meta = export(compiled, output, model=model, threshold=threshold, overwrite=overwrite)
    print(f"wrote {output} ({target_name}{' ' + arch if meta['arch'] else ''}, "
          f"{meta['sparse_layers']} sparse layers, compiled in {compiled.seconds:.1f} s)")
    return meta
