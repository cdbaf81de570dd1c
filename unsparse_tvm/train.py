"""Training and evaluation, and loading/saving models so that prune, quantize and train chain through .pt2 files.

A .pt2 written by `train`, `prune` or `quantize` carries `unsparse_model.json` (the built-in model name and what
was done to it) next to the program. Loading such a file rebuilds the real `nn.Module` and loads the program's
weights into it, so it can be fine-tuned again: a reloaded `ep.module()` cannot (its `train()` is unsupported
and its batch size is fixed). A foreign .pt2 is used as `ep.module()`: one-shot pruning/quantisation only.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import zipfile
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .data import Dataset
from . import outputs
from .errors import UnsparseError
from .frontend import load_pt2, program_input_shape
from .models import BUILTIN_MODELS, build_model, export

MODEL_META = "unsparse_model.json"  # extra file in .pt2 archives we write: {"model": builtin name, ...}


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
                return zf.read(hits[0]).decode("utf-8") if hits else None
    except zipfile.BadZipFile:
        raise UnsparseError(f"{path} could not be read as a torch.export program (not a zip archive)") from None
    extra = {name: ""}
    try:
        torch.export.load(path, extra_files=extra)
    except Exception as err:
        raise UnsparseError(f"{path} could not be read as a torch.export program ({type(err).__name__})") from None
    return extra[name] or None


def read_model_meta(path: str) -> dict:
    text = read_extra_file(path, MODEL_META)
    return json.loads(text) if text else {}


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
    """A built-in name (optionally with `weights`: a state_dict .pt or a .pt2) or a .pt2 file."""
    if batch is not None and batch < 1:
        raise UnsparseError(f"batch must be at least 1, got {batch}")
    if model in BUILTIN_MODELS:
        net = build_model(model)
        if weights:
            _load_state(net, weights)
        shape = (batch or 1, *BUILTIN_MODELS[model].input_shape)
        return LoadedModel(net.eval(), shape, model, None, model, {"model": model, "trained": bool(weights)}, trained=bool(weights))
    if not (model.endswith(".pt2") or os.path.sep in model or os.path.exists(model)):
        raise UnsparseError(f"unknown model '{model}': use one of {', '.join(BUILTIN_MODELS)} or a .pt2 file")
    ep = load_pt2(model)
    shape = program_input_shape(ep)
    if batch is not None:
        shape = (batch, *shape[1:])
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
    return LoadedModel(ep.module(), shape, None, ep, model, meta, trained=True)


def eval_mode(module: nn.Module) -> nn.Module:
    """module.eval(), except for a reloaded program's module, which is always in eval mode and refuses it."""
    try:
        module.eval()
    except NotImplementedError:
        pass
    return module


def check_output(path: str, overwrite: bool, inputs: tuple[str | None, ...] = (), suffix: str = ".pt2") -> None:
    """Refuse a bad output path before any work (unsparse_tvm.outputs.check_output)."""
    outputs.check_output(path, overwrite=overwrite, suffixes=(suffix,), inputs=inputs)


def export_model(loaded: LoadedModel) -> torch.export.ExportedProgram:
    """torch.export the (pruned/quantised) module at the loaded input shape."""
    eval_mode(loaded.module)
    if loaded.builtin is not None:
        return export(loaded.module, loaded.input_shape)
    with torch.no_grad():
        return torch.export.export(loaded.module, (torch.randn(*loaded.input_shape),))


def save_model(loaded: LoadedModel, path: str, overwrite: bool = False, quant: dict | None = None) -> torch.export.ExportedProgram:
    """Export and save as .pt2 with `unsparse_model.json` (and `unsparse_quant.json` when quantised)."""
    from .prune import save_program
    from .quantize import QUANT_FILE

    ep = export_model(loaded)
    extra = {MODEL_META: json.dumps(loaded.meta)} if loaded.builtin else {}
    if quant is not None:
        extra[QUANT_FILE] = json.dumps(quant)
    with outputs.writing(path, overwrite=overwrite) as tmp:  # an interrupted run never leaves half a file
        save_program(ep, tmp, overwrite=True, extra_files=extra)
    return ep


def check_compatible(loaded: LoadedModel, data: Dataset) -> None:
    """The data set's samples must fit the model's input and its classes its outputs."""
    if tuple(loaded.input_shape[1:]) != data.input_shape:
        raise UnsparseError(
            f"{loaded.source} takes inputs of shape {list(loaded.input_shape[1:])} but {data.name} samples are "
            f"{list(data.input_shape)}: use smallcnn with digits, vgg16-cifar with cifar10"
        )
    with torch.no_grad():
        out = eval_mode(loaded.module)(torch.zeros(*loaded.input_shape))  # [N,classes]
    if out.ndim != 2 or out.shape[1] < data.num_classes:
        raise UnsparseError(f"{loaded.source} has {out.shape[-1]} outputs, fewer than {data.name}'s {data.num_classes} classes")


SMALL_MODEL_PARAMS = 1_000_000


@contextlib.contextmanager
def compute_threads(module: nn.Module, threads: int | None = None):
    """Use only the cores nobody else is using: when the machine is busy, torch's OpenMP threads spin-wait
    for a descheduled partner and a 2-second job takes a minute (measured on a shared 2-core machine).
    Small models always run on one thread, which costs them little."""
    if threads is None:
        small = sum(p.numel() for p in module.parameters()) < SMALL_MODEL_PARAMS
        idle = (os.cpu_count() or 1) - round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 1
        threads = 1 if small else max(1, min(torch.get_num_threads(), idle))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def keep_zeros(module: nn.Module):
    """Weights that are exactly zero stay zero while training (torch.nn.utils.prune masks, removed after)."""
    import torch.nn.utils.prune as tprune

    from .prune import prunable_parameters

    masked = []
    for _, owner, pname in prunable_parameters(module):
        w = getattr(owner, pname).detach()
        if bool((w == 0).any()):
            tprune.custom_from_mask(owner, pname, (w != 0).to(w.dtype))
            masked.append((owner, pname))
    try:
        yield
    finally:
        for owner, pname in masked:
            tprune.remove(owner, pname)


def _progress(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="batch", leave=False, disable=not sys.stderr.isatty())


@torch.no_grad()
def evaluate(module: nn.Module, data: Dataset, batch_size: int = 256, fixed_batch: int | None = None) -> float:
    """Top-1 accuracy on the test split, in percent. `fixed_batch`: the program only accepts that batch size."""
    eval_mode(module)
    correct = 0
    bs = fixed_batch or batch_size
    for i in range(0, len(data.x_test), bs):
        x = data.x_test[i : i + bs]  # [b,C,H,W]
        n = len(x)
        if fixed_batch and n < fixed_batch:  # pad the last chunk up to the program's batch size
            x = torch.cat([x, x.new_zeros(fixed_batch - n, *x.shape[1:])])
        pred = module(x)[:n].argmax(1)  # [n]
        correct += int((pred == data.y_test[i : i + n]).sum())
    return 100.0 * correct / len(data.x_test)


def evaluate_loaded(loaded: LoadedModel, data: Dataset) -> float:
    return evaluate(loaded.module, data, fixed_batch=None if loaded.trainable else loaded.input_shape[0])


def untrained_hint(loaded: LoadedModel, data: Dataset | None) -> str | None:
    """Why the accuracy is at chance level, and what to run instead, for a model with random weights."""
    if data is None or loaded.trained:
        return None
    name = loaded.builtin or loaded.source
    return (f"{loaded.source} is untrained (seeded random weights), so its accuracy is chance level; train it "
            f"first: unsparse-tvm train {name} --dataset {data.name} --epochs 40 -o dense.pt2, then prune/quantize "
            "dense.pt2 (or pass --weights)")


def evaluated_around(loaded: LoadedModel, data: Dataset | None, model: str, transform, log=print):
    """(transform(), accuracy before, accuracy after): the accuracies are None without a data set.
    Shared by `prune` and `quantize`; call it inside `compute_threads`."""
    acc_before = acc_after = None
    if data is not None:
        check_compatible(loaded, data)
        hint = untrained_hint(loaded, data)
        if hint:
            log(f"note: {hint}")
        acc_before = evaluate_loaded(loaded, data)
    result = transform()
    if data is not None:
        acc_after = evaluate_loaded(loaded, data)
    return result, acc_before, acc_after


def train(
    module: nn.Module,
    data: Dataset,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    weight_decay: float = 0.0,
    on_step: Callable[[int, int], None] | None = None,
    on_epoch: Callable[[int], None] | None = None,
    desc: str = "train",
    threads: int | None = None,
) -> None:
    """Adam with a cosine learning-rate decay; `on_step(step, total)` runs before every step (mask updates).

    `threads`: torch threads while training (default: 1 for small models, see `compute_threads`).
    """
    if epochs < 0:
        raise UnsparseError(f"epochs must be >= 0, got {epochs}")
    if epochs == 0:
        return
    with compute_threads(module, threads):
        _train(module, data, epochs, lr, batch_size, seed, weight_decay, on_step, on_epoch, desc)


def _train(module, data, epochs, lr, batch_size, seed, weight_decay, on_step, on_epoch, desc) -> None:
    torch.manual_seed(seed)
    loader = data.train_loader(batch_size, seed)
    total = epochs * len(loader)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    # cosine to 5% of lr: the last epochs settle the weights under the final mask / quantiser
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t / total)))
    step = 0
    with _progress(total, desc) as bar:
        for epoch in range(epochs):
            if on_epoch is not None:
                on_epoch(epoch)
            module.train()
            for x, y in loader:
                if on_step is not None:
                    on_step(step, total)
                loss = F.cross_entropy(module(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    eval_mode(module)


def train_command(
    model: str,
    dataset: str,
    epochs: int,
    output: str,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
    weights: str | None = None,
    batch: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Dense training of a built-in model (or continue one of our .pt2 files); saves a .pt2, returns a summary."""
    from .data import load_dataset

    check_output(output, overwrite, inputs=(model, weights))
    if epochs < 1:
        raise UnsparseError(f"epochs must be >= 1, got {epochs}")
    loaded = load_model(model, weights, batch)
    if not loaded.trainable:
        raise UnsparseError(f"{model} is not a built-in model or a .pt2 written by unsparse-tvm: it cannot be trained")
    data = load_dataset(dataset)  # the split is fixed, whatever --seed says
    with compute_threads(loaded.module):
        check_compatible(loaded, data)
        before = evaluate_loaded(loaded, data)
        with keep_zeros(loaded.module):  # continuing a pruned model keeps it pruned
            train(loaded.module, data, epochs, lr=lr, batch_size=batch_size, seed=seed, desc=f"train {loaded.builtin}")
        after = evaluate_loaded(loaded, data)
    loaded.meta.pop("quantization", None)  # float training leaves the quantisation grid
    loaded.meta.update(trained=True, dataset=data.name, accuracy=round(after, 3))
    save_model(loaded, output, overwrite)
    return {"model": loaded.builtin, "dataset": data.name, "epochs": epochs, "accuracy_before": before, "accuracy_after": after}
