"""The front end: every way a model comes in, and its import into Relax.

`load_program(name_or_path, batch)` is the one loader the flow uses: a built-in name (exported at the
batch size) or a `.pt2` saved with `torch.export.save`, checked (one tensor input, float32 only) and
with a dynamic input dimension specialised (and said). `load_model_program` prunes it first (tune,
bench); `import_program` turns it into a Relax module with the layers' PyTorch names.
"""

from __future__ import annotations

import logging
import os

import torch

from .errors import UnsparseError
from .models import BUILTIN_MODELS, build_model, export


def load_pt2(path: str) -> torch.export.ExportedProgram:
    if not os.path.exists(path):
        raise UnsparseError(f"no such file: {path}")
    if not path.endswith(".pt2"):
        raise UnsparseError(f"{path} is not a .pt2 file: save models with torch.export.save(ep, 'model.pt2')")
    logger = logging.getLogger("torch.export")  # it logs a whole traceback before raising: ours is one line
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        return torch.export.load(path)
    except Exception as err:  # torch raises many kinds for a bad archive
        raise UnsparseError(f"{path} could not be read as a torch.export program ({type(err).__name__})") from None
    finally:
        logger.setLevel(level)


def _user_input_vals(ep: torch.export.ExportedProgram) -> list:
    vals = []
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in ep.graph_signature.user_inputs:
            val = node.meta.get("val")
            if val is None or not hasattr(val, "shape"):
                raise UnsparseError("the .pt2 program has a non-tensor input; only single-tensor CNNs are supported")
            vals.append(val)
    if len(vals) != 1:
        raise UnsparseError(f"the .pt2 program has {len(vals)} inputs; unsparse-tvm supports models with one input")
    return vals


def dynamic_dims(ep: torch.export.ExportedProgram) -> list[int]:
    """Axes of the input exported as dynamic (torch.export.Dim)."""
    return [i for i, d in enumerate(_user_input_vals(ep)[0].shape) if not isinstance(d, int)]


SUPPORTED_DTYPES = ("float32",)


def check_dtypes(ep: torch.export.ExportedProgram) -> None:
    """Refuse programs whose input, weights or outputs are floats other than float32, naming the first."""
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    nodes = [n for n in ep.graph.nodes if n.op == "placeholder"] + [
        a for a in _flatten(out_node.args[0]) if isinstance(a, torch.fx.Node)]
    for node in nodes:
        val = node.meta.get("val")
        dtype = getattr(val, "dtype", None)
        if dtype is not None and dtype.is_floating_point and dtype != torch.float32:
            raise UnsparseError(f"the program uses {str(dtype).removeprefix('torch.')} ({node.name}); unsparse-tvm "
                                f"compiles float32 programs only: export model.float() instead")


def _flatten(v) -> list:
    if isinstance(v, (list, tuple)):
        return [x for item in v for x in _flatten(item)]
    return [v]


def program_outputs(ep: torch.export.ExportedProgram) -> list[dict]:
    """{"name", "shape", "dtype"} of every output of the program, flattened in order."""
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    outs = []
    for i, a in enumerate(_flatten(out_node.args[0])):
        val = a.meta.get("val") if isinstance(a, torch.fx.Node) else None
        if val is None or not hasattr(val, "shape"):
            continue
        outs.append({"name": f"out{i}", "shape": [int(d) for d in val.shape],
                     "dtype": str(val.dtype).removeprefix("torch.")})
    return outs


def program_input_shape(ep: torch.export.ExportedProgram) -> tuple[int, ...]:
    """The shape of the program's single tensor input (a dynamic dimension: its example size)."""
    return tuple(int(d) for d in _user_input_vals(ep)[0].shape)


def check_batch(batch: int | None) -> int | None:
    if batch is not None and batch < 1:
        raise UnsparseError(f"--batch must be at least 1, got {batch}")
    return batch


def load_program(model: str, batch: int | None = None, log=print) -> torch.export.ExportedProgram:
    """A built-in name (exported at the given batch size, default 1) or a .pt2 path, as an ExportedProgram
    with static shapes and float32 values (a dynamic batch is specialised, and `log` says so)."""
    check_batch(batch)
    if model in BUILTIN_MODELS:
        return export(build_model(model), (batch or 1, *BUILTIN_MODELS[model].input_shape))
    if model.endswith(".pt2") or os.path.sep in model or os.path.exists(model):
        ep = load_pt2(model)
        check_dtypes(ep)
        dyn = dynamic_dims(ep)
        if dyn:
            shape = list(program_input_shape(ep))
            if batch is not None and 0 in dyn:
                shape[0] = batch
            with torch.no_grad():
                ep = torch.export.export(ep.module(), (torch.randn(*shape),))
            log(f"note: {model} has a dynamic input (axes {', '.join(map(str, dyn))}); compiled for the static "
                f"shape {shape}" + (" (--batch N picks another batch)" if 0 in dyn and batch is None else ""))
        return ep
    raise UnsparseError(f"unknown model '{model}': use one of {', '.join(BUILTIN_MODELS)} or a .pt2 file")


def load_model_program(model: str, sparsity: float | None, batch: int | None = None):
    """load_program, magnitude-pruned to `sparsity` first when it is given (tune, bench)."""
    if sparsity is not None:
        from .compress.prune import prune_to_program  # deferred: compress imports this module

        return prune_to_program(model, sparsity, batch=batch)
    return load_program(model, batch=batch)


def import_program(ep):
    """ExportedProgram -> (Relax IRModule with weights as constants, LayerNames for reporting)."""
    from tvm.relax.frontend.torch import from_exported_program  # deferred: TVM's compiler, ~3 s to import

    from .relay_passes.layers import LayerNames  # deferred likewise (relay_passes imports TVM)

    check_dtypes(ep)  # before TVM's importer, whose message for other dtypes is an IR dump
    try:
        mod = from_exported_program(ep)
    except Exception as err:  # the importer raises assorted errors; the first line names the op
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnsparseError(f"TVM's PyTorch importer cannot convert this model: {first[:300]}") from None
    named = {k: v.detach().cpu().numpy() for k, v in ep.state_dict.items() if k.endswith("weight")}
    return mod, LayerNames(named)
