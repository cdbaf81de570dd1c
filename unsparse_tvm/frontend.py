"""The front end: every way a model comes in, and its import into Relax.

`load_program(name_or_path, batch)` is the one loader the compiler side uses: a built-in name
(exported at the batch size) or a `.pt2` saved with `torch.export.save`, checked (one tensor input,
float32 only) and with a dynamic input dimension specialised (and said); `import_program` turns it into
a Relax module with the layers' PyTorch names. `load_model` is the same for the compress side (a
trainable nn.Module where the .pt2 was written by us), `save_model` writes one back (.pt2 + metadata).
(`compress.prune.load_model_program` prunes first, for tune and bench.)
"""

from __future__ import annotations

import json
import logging
import math
import os
import zipfile
import zlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .errors import UnsparseError
from .inputs import check_input_file
from .models import BUILTIN_MODELS, build_model, export_program
from .operators import check_operators, importer_fixes
from .outputs import check_output, writing


def load_pt2(path: str) -> torch.export.ExportedProgram:
    if not os.path.exists(path):
        raise UnsparseError(f"no such file: {path}")
    if not path.endswith(".pt2"):
        raise UnsparseError(f"{path} is not a .pt2 file: save models with torch.export.save(ep, 'model.pt2')")
    check_input_file(path)
    logger = logging.getLogger("torch.export")  # it logs a whole traceback before raising: ours is one line
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        ep = torch.export.load(path)
    except Exception as err:  # torch raises many kinds for a bad archive
        raise UnsparseError(f"{path} could not be read as a torch.export program ({type(err).__name__})") from None
    finally:
        logger.setLevel(level)
    check_program(ep)  # every command that reads a .pt2 refuses the same programs, before any work
    return ep


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


def check_program(ep: torch.export.ExportedProgram) -> None:
    """What every command requires of a program, checked once where it is loaded: one tensor input of
    float32 (an image batch, not token ids), float32 weights and outputs, verified operators only."""
    (val,) = _user_input_vals(ep)
    if not val.dtype.is_floating_point:
        name = next(n.name for n in ep.graph.nodes if n.op == "placeholder" and n.name in ep.graph_signature.user_inputs)
        dtype = str(val.dtype).removeprefix("torch.")
        raise UnsparseError(f"the program's input {name} is {dtype} (token ids or indices, e.g. for nn.Embedding?); "
                            "unsparse-tvm compiles models whose one input is a float32 tensor")
    check_dtypes(ep)
    check_operators(ep)


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


def batch_range(ep: torch.export.ExportedProgram) -> tuple[int, int | None] | None:
    """(lowest, highest or None) batch a dynamic-batch program was exported for; None for a static batch."""
    size = _user_input_vals(ep)[0].shape[0]
    if isinstance(size, int):
        return None
    bounds = ep.range_constraints.get(size.node.expr)
    if bounds is None:
        return 1, None
    try:
        upper = int(str(bounds.upper))
    except ValueError:  # torch's int_oo: no upper bound
        upper = None
    return max(1, int(str(bounds.lower))), upper


def check_batch_fits(ep: torch.export.ExportedProgram, model: str, batch: int | None) -> None:
    """--batch must be one the program can take: its own static batch, or within its dynamic range."""
    if batch is None:
        return
    span = batch_range(ep)
    if span is None:
        static = program_input_shape(ep)[0]
        if batch != static:
            raise UnsparseError(f"--batch {batch}: {model} was exported with a static batch of {static}; export it "
                                "with a dynamic batch (torch.export.Dim) to choose another, or leave out --batch")
    elif batch < span[0] or (span[1] is not None and batch > span[1]):
        raise UnsparseError(f"--batch {batch} is outside the batch range {model} was exported for "
                            f"({span[0]} to {span[1] if span[1] is not None else 'any'})")


def check_batch(batch: int | None) -> int | None:
    if batch is not None and batch < 1:
        raise UnsparseError(f"--batch must be at least 1, got {batch}")
    return batch


def check_fits_memory(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The example input alone must fit in this machine's memory (a huge --batch), or the first
    allocation would fail deep inside torch; the activations are larger still."""
    need = math.prod(shape) * 4
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    if have and need > have:
        raise UnsparseError(f"an input of shape {list(shape)} takes {need / 2**30:,.0f} GiB, more than this machine's "
                            f"{have / 2**30:,.0f} GiB of memory: use a smaller --batch")
    return shape


def load_program(model: str, batch: int | None = None, log=print) -> torch.export.ExportedProgram:
    """A built-in name (exported at the given batch size, default 1) or a .pt2 path, as an ExportedProgram
    with static shapes and float32 values (a dynamic batch is specialised, and `log` says so)."""
    check_batch(batch)
    if model in BUILTIN_MODELS:
        shape = check_fits_memory((batch or 1, *BUILTIN_MODELS[model].input_shape))
        ep = export_program(build_model(model), shape)
        check_program(ep)  # a tv:/timm: network may use operators nobody here verified
        return ep
    if model.endswith(".pt2") or os.path.sep in model or os.path.exists(model):
        ep = load_pt2(model)
        dyn = dynamic_dims(ep)
        check_batch_fits(ep, model, batch)
        if dyn:
            shape = list(program_input_shape(ep))
            if batch is not None and 0 in dyn:
                shape[0] = batch
            check_fits_memory(tuple(shape))
            with torch.no_grad():
                ep = torch.export.export(ep.module(), (torch.randn(*shape),))
            log(f"note: {model} has a dynamic input (axes {', '.join(map(str, dyn))}); compiled for the static "
                f"shape {shape}" + (" (--batch N picks another batch)" if 0 in dyn and batch is None else ""))
        return ep
    raise UnsparseError(f"unknown model '{model}': use one of {', '.join(BUILTIN_MODELS)} or a .pt2 file")


MODEL_META = "unsparse_model.json"  # extra file in .pt2 archives we write: {"model": builtin name, ...}


QUANT_FILE = "unsparse_quant.json"


def read_extra_file(path: str, name: str) -> str | None:
    """An extra file stored with `torch.export.save(..., extra_files=...)`, or None when absent.

    Reads the zip member directly (no need to deserialise a large program); falls back to
    `torch.export.load(path, extra_files=...)` if the archive layout is not the one we know.
    """
    if not os.path.exists(path):
        raise UnsparseError(f"no such file: {path}")
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if any(n.endswith("/archive_format") for n in names):  # layout known: absence is meaningful
                hits = [n for n in names if n.endswith(f"/extra/{name}")]
                data = zf.read(hits[0]) if hits else None
                return data.decode("utf-8") if data is not None else None  # ValueError when not UTF-8
    except zipfile.BadZipFile:
        raise UnsparseError(f"{path} could not be read as a torch.export program (not a zip archive)") from None
    except (OSError, EOFError, zlib.error) as err:  # a damaged member
        raise UnsparseError(f"{path} could not be read as a torch.export program ({type(err).__name__})") from None
    extra = {name: ""}
    try:
        torch.export.load(path, extra_files=extra)
    except Exception as err:
        raise UnsparseError(f"{path} could not be read as a torch.export program ({type(err).__name__})") from None
    return extra[name] or None


def read_model_meta(path: str) -> dict:
    return _extra_json(path, MODEL_META) or {}


def read_quantization(path: str) -> dict | None:
    """The quantisation stored in a .pt2 (`unsparse_quant.json`), or None for an unquantised program."""
    if not path.endswith(".pt2"):
        load_pt2(path)  # raises the usual one-line error (missing file, not .pt2)
    quant = _extra_json(path, QUANT_FILE)
    if quant is None:
        return None
    acts = quant.get("activations")
    if not (isinstance(quant.get("scheme"), str) and isinstance(quant.get("bits"), int)
            and isinstance(quant.get("layers"), dict) and (acts is None or isinstance(acts.get("layers"), dict))):
        raise UnsparseError(f"{path}: its {QUANT_FILE} is damaged (fields missing); quantise the model again")
    return quant


def _extra_json(path: str, name: str) -> dict | None:
    """One of our JSON extra files in a .pt2, or None; a damaged one (not UTF-8, not a JSON object) is one line."""
    try:
        text = read_extra_file(path, name)
        value = json.loads(text) if text else None
    except ValueError:  # UnicodeDecodeError, JSONDecodeError
        value = []
    if value is not None and not isinstance(value, dict):
        raise UnsparseError(f"{path}: its {name} is damaged (not a JSON object); write the model again")
    return value


@dataclass
class LoadedModel:
    """A model ready to prune/quantise/train: `module` is trainable when `builtin` is set."""

    module: nn.Module
    input_shape: tuple[int, ...]                 # full input shape baked into the exported program (with batch)
    builtin: str | None = None                   # built-in model name, or None for a foreign .pt2
    ep: torch.export.ExportedProgram | None = None  # the loaded program of a foreign .pt2 (finds its weights)
    source: str = ""
    meta: dict = field(default_factory=dict)     # carried into the output's unsparse_model.json
    trained: bool = False                        # False: seeded random weights (accuracy is chance level)

    @property
    def trainable(self) -> bool:
        return self.builtin is not None


def _load_state(module: nn.Module, path: str) -> None:
    if not os.path.exists(path):
        raise UnsparseError(f"no such weights file: {path}")
    if path.endswith(".pt2"):
        state = dict(load_pt2(path).state_dict)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise UnsparseError(f"{path} is not a state_dict saved with torch.save ({type(err).__name__})") from None
        if isinstance(state, nn.Module):
            state = state.state_dict()
        if not isinstance(state, dict):
            raise UnsparseError(f"{path} does not hold a state_dict")
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(getattr(state[k], "shape", ()))]
    if missing or unexpected or wrong:
        example = (missing or unexpected or wrong)[0]
        raise UnsparseError(f"weights in {path} do not fit {type(module).__name__}: {len(missing)} missing, "
                            f"{len(unexpected)} unexpected, {len(wrong)} wrong-shaped tensors (e.g. {example})")
    module.load_state_dict(state, strict=True)


def load_model(model: str, weights: str | None = None, batch: int | None = None) -> LoadedModel:
    """A built-in name (optionally with `weights`: a state_dict .pt or a .pt2) or a .pt2 file, as a module to
    prune, quantise or train (a .pt2 written by unsparse-tvm: its real nn.Module, trainable again)."""
    check_batch(batch)
    if model in BUILTIN_MODELS:
        if weights:
            check_input_file(weights, "weights file")
        net = build_model(model)
        if weights:
            _load_state(net, weights)
        shape = check_fits_memory((batch or 1, *BUILTIN_MODELS[model].input_shape))
        return LoadedModel(net.eval(), shape, model, None, model, {"model": model, "trained": bool(weights)}, trained=bool(weights))
    if not (model.endswith(".pt2") or os.path.sep in model or os.path.exists(model)):
        raise UnsparseError(f"unknown model '{model}': use one of {', '.join(BUILTIN_MODELS)} or a .pt2 file")
    ep = load_pt2(model)
    shape = program_input_shape(ep)
    if batch is not None:
        shape = check_fits_memory((batch, *shape[1:]))
    meta = read_model_meta(model)
    if weights:
        raise UnsparseError("--weights is for built-in model names; a .pt2 already holds its weights")
    name = meta.get("model")
    if name in BUILTIN_MODELS:  # one of ours: rebuild the real module so it can be fine-tuned
        net = build_model(name)
        try:
            net.load_state_dict(dict(ep.state_dict), strict=True)
        except RuntimeError:
            name = None  # changed beyond recognition: treat it as foreign
        else:
            return LoadedModel(net.eval(), shape, name, None, model, meta, trained=bool(meta.get("trained", True)))
    check_batch_fits(ep, model, batch)  # a foreign program is re-exported as it is: its batch rules hold
    return LoadedModel(ep.module(), shape, None, ep, model, meta, trained=True)


def eval_mode(module: nn.Module) -> nn.Module:
    """module.eval(), except for a reloaded program's module, which is always in eval mode and refuses it."""
    try:
        module.eval()
    except NotImplementedError:
        pass
    return module


def loaded_program(loaded: LoadedModel) -> torch.export.ExportedProgram:
    """torch.export the (pruned/quantised) module at the loaded input shape."""
    eval_mode(loaded.module)
    if loaded.builtin is not None:
        return export_program(loaded.module, loaded.input_shape)
    with torch.no_grad():
        return torch.export.export(loaded.module, (torch.randn(*loaded.input_shape),))


def save_program(ep: torch.export.ExportedProgram, path: str, overwrite: bool = False,
                 extra_files: dict[str, str] | None = None) -> None:
    check_output(path, overwrite=overwrite, suffixes=(".pt2",))
    torch.export.save(ep, path, extra_files=extra_files or None)


def save_model(loaded: LoadedModel, path: str, overwrite: bool = False, quant: dict | None = None) -> torch.export.ExportedProgram:
    """Export and save as .pt2 with `unsparse_model.json` (and `unsparse_quant.json` when quantised)."""
    ep = loaded_program(loaded)
    extra = {MODEL_META: json.dumps(loaded.meta)} if loaded.builtin else {}
    if quant is not None:
        extra[QUANT_FILE] = json.dumps(quant)
    with writing(path, overwrite=overwrite) as tmp:  # an interrupted run never leaves half a file
        save_program(ep, tmp, overwrite=True, extra_files=extra)
    return ep


def import_program(ep):
    """ExportedProgram -> (Relax IRModule with weights as constants, LayerNames for reporting)."""
    from tvm.relax.frontend.torch import from_exported_program  # deferred: TVM's compiler, ~3 s to import

    from .relay_passes.layers import LayerNames  # deferred likewise (relay_passes imports TVM)

    check_dtypes(ep)  # before TVM's importer, whose message for other dtypes is an IR dump
    check_operators(ep)  # an operator nobody checked could compile into a silently wrong module
    try:
        mod = from_exported_program(ep, custom_convert_map=importer_fixes())
    except Exception as err:  # the importer raises assorted errors; the first line names the op
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnsparseError(f"TVM's PyTorch importer cannot convert this model: {first[:300]}") from None
    named = {k: v.detach().cpu().numpy() for k, v in ep.state_dict.items() if k.endswith("weight")}
    return mod, LayerNames(named)
