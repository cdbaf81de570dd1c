"""Training and evaluation: dense baselines (`train`), and the fine-tuning prune and quantize run.
Models come and go through `unsparse_tvm.frontend` (load_model, save_model)."""

from __future__ import annotations

import contextlib
import math
import os
import sys
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.prune as tprune
from tqdm import tqdm

from ..errors import UnsparseError
from ..frontend import LoadedModel, eval_mode, load_model, save_model
from ..outputs import check_output
from .data import Dataset, load_dataset
from .masks import prunable_parameters


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
        # the machine's count, not usable_cores(): the load average counts every core of the machine
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


def progress_bar(total: int, desc: str) -> tqdm:
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
    with progress_bar(total, desc) as bar:
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
    check_output(output, overwrite=overwrite, suffixes=(".pt2",), inputs=(model, weights))
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
