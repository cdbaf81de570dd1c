"""Pruning: one-shot, or gradual while fine-tuning (the cubic schedule of Zhu & Gupta, 2017), with the
masks of `masks.py` and the per-layer targets of `targets.py`. `--sparsity` is always the overall
fraction of zeros over all prunable weights.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.utils.prune as tprune

from ..errors import UnsparseError, check_sparsity
from ..frontend import eval_mode, loaded_program, load_model, load_program, save_model
from ..outputs import check_output
from .data import load_dataset
from .masks import set_mask, update_masks, magnitude_prune, prunable_parameters
from .report import check_report_path, weight_report, write_report
from .schedule import cubic_sparsity
from .config import PruneConfig, fixed_layers, layer_targets, sensitivity_scan
from .train import compute_threads, evaluated_around, train, untrained_hint


def prune_to_program(model: str, sparsity: float, batch: int | None = None) -> torch.export.ExportedProgram:
    """Magnitude-prune a built-in model or a .pt2 file (one-shot, layer-wise) and export it again."""
    check_sparsity("sparsity", sparsity)
    loaded = load_model(model, batch=batch)
    magnitude_prune(loaded.module, sparsity, loaded.ep)
    return loaded_program(loaded)


def load_model_program(model: str, sparsity: float | None, batch: int | None = None):
    """load_program, magnitude-pruned to `sparsity` first when it is given (tune, bench)."""
    if sparsity is not None:
        return prune_to_program(model, sparsity, batch=batch)
    return load_program(model, batch=batch)


def zero_fraction(module: nn.Module, ep: torch.export.ExportedProgram | None = None) -> float:
    """The fraction of conv/linear weights that are zero."""
    weights = [getattr(owner, pname).detach() for _, owner, pname in prunable_parameters(module, ep)]
    return sum(int((w == 0).sum()) for w in weights) / max(1, sum(w.numel() for w in weights))


def prune_model(module: nn.Module, cfg: PruneConfig, data=None, ep: torch.export.ExportedProgram | None = None,
                fixed_batch: int | None = None, log=print) -> dict:
    """Prune `module` in place (permanently); returns {"targets": per-layer sparsity, "sensitivity": curves}.

    Existing zeros stay zero (their mask starts at 0). With `cfg.epochs` > 0 and a data set, sparsity ramps
    up on the cubic schedule while fine-tuning, then the network trains on at the final mask.
    """

    cfg.validate()
    layers = prunable_parameters(module, ep)
    if not layers:
        raise UnsparseError("the model has no conv2d or linear layer to prune")
    if (cfg.epochs or cfg.sensitivity) and data is None:
        raise UnsparseError("--epochs and --sensitivity need a data set (--dataset digits or cifar10:PATH)")
    sizes = {fqn: getattr(owner, pname).numel() for fqn, owner, pname in layers}
    curves = None
    if cfg.sensitivity:
        log("sensitivity scan: pruning each layer alone ...")
        curves = sensitivity_scan(module, layers, data, cfg, fixed_batch=fixed_batch)
    targets = layer_targets(sizes, cfg, curves)
    fixed = fixed_layers(list(sizes), cfg)
    pool = {n for n in sizes if n not in fixed}
    # existing zeros (an already pruned model) stay pruned
    initial = {}
    for fqn, owner, pname in layers:
        w = getattr(owner, pname).detach()
        initial[fqn] = float((w == 0).sum()) / w.numel()
        set_mask(owner, pname, (w != 0).to(w.dtype))
    # a layer already sparser than its target stays as it is (global: the shared ranking sees its zeros first)
    targets = {n: t if (cfg.scope == "global" and n in pool) else max(t, initial[n]) for n, t in targets.items()}
    if cfg.scope == "global":
        pool_now = sum(initial[n] * sizes[n] for n in pool) / max(1, sum(sizes[n] for n in pool))
        initial.update({n: pool_now for n in pool})
    if cfg.epochs:
        steps_per_epoch = math.ceil(len(data.x_train) / cfg.batch_size)
        ramp = max(1, round(cfg.ramp_fraction * cfg.epochs * steps_per_epoch))
        every = max(1, ramp // cfg.updates)

        def on_step(step: int, total: int) -> None:
            if step <= ramp and (step % every == 0 or step == ramp):
                update_masks(layers, {n: cubic_sparsity(step, ramp, initial[n], targets[n]) for n in sizes}, cfg, pool)

        train(module, data, cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed, on_step=on_step,
              desc=f"prune {cfg.method}")
    update_masks(layers, targets, cfg, pool)  # one-shot, or make sure the final target is reached
    for _, owner, pname in layers:
        tprune.remove(owner, pname)  # permanent: weight = weight_orig * weight_mask, hooks gone
    eval_mode(module)
    return {"targets": targets, "sensitivity": curves}


def prune_command(model: str, cfg: PruneConfig, output: str, dataset: str | None = None,
                  weights: str | None = None, batch: int | None = None, report: str | None = None,
                  overwrite: bool = False, log=print, speed: dict | None = None) -> dict:
    """Load, (evaluate,) prune, (evaluate,) export to `output`; returns the report (also written to `report`).
    speed: {speedup | latency_ms, pattern, threads}: the per-layer sparsity and pattern come from
    unsparse_tvm.speed_target's plan (the report's "speed": requested and measured speedup, per layer)."""
    start = time.perf_counter()
    cfg.validate()
    check_output(output, overwrite=overwrite, suffixes=(".pt2",), inputs=(model, weights))
    check_report_path(report, overwrite)
    if (cfg.epochs or cfg.sensitivity) and not dataset:
        raise UnsparseError("--epochs and --sensitivity need a data set (--dataset digits or cifar10:PATH)")
    loaded = load_model(model, weights, batch)
    if cfg.epochs and not loaded.trainable:
        raise UnsparseError(f"{model} was not written by unsparse-tvm, so it cannot be fine-tuned: use "
                            "--epochs 0 (one-shot) or a built-in model name with --weights")
    data = load_dataset(dataset) if dataset else None  # the split is fixed: --seed must not leak test samples
    planned = None
    if speed is not None:  # a loop through the compiler (compile, time): imported only for speed targets
        from ..speed_target import plan_config

        cfg, planned = plan_config(loaded, cfg, data, log=log, **speed)
    before = zero_fraction(loaded.module, loaded.ep)
    with compute_threads(loaded.module):  # only idle cores: see compute_threads
        fixed_batch = None if loaded.trainable else loaded.input_shape[0]
        info, acc_before, acc_after = evaluated_around(
            loaded, data, model, lambda: prune_model(loaded.module, cfg, data, loaded.ep, fixed_batch=fixed_batch, log=log), log)
        loaded.meta["pruning"] = {k: v for k, v in asdict(cfg).items() if k not in ("seed", "updates", "ramp_fraction")}
        loaded.meta.pop("quantization", None)
        save_model(loaded, output, overwrite)  # a pruned model is no longer quantised: no unsparse_quant.json
        result = {
            "command": "prune", "model": model, "output": output, "config": asdict(cfg),
            "dataset": data.name if data else None,
            "accuracy_before": acc_before, "accuracy_after": acc_after, "untrained_hint": untrained_hint(loaded, data),
            **weight_report(loaded.module, loaded.ep, None, targets=info["targets"]),
            "sensitivity": info["sensitivity"],
            "speed": planned.finish(loaded) if planned is not None else None,
            "notes": [f"{model} was already {before:.3f} sparse, above --sparsity {cfg.sparsity:g}: pruning never "
                      "revives a weight, so its zeros stayed as they were"] if before > cfg.sparsity + 5e-4 else [],
            "seconds": round(time.perf_counter() - start, 2),
        }
    write_report(result, report)
    return result
