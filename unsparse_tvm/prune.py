"""Pruning: masks through `torch.nn.utils.prune`, made permanent (`prune.remove`) before export.

Methods (all rank by magnitude; a conv weight [O,C,R,S] is viewed as the matrix [O, C*R*S]):
  unstructured  single weights (torch's L1Unstructured), layer-wise or global
  vector        groups of V adjacent output channels at the same input position (c, r, s): a sparse kernel
                loads one input value for V outputs; the last group is partial when V does not divide O
  block         B x B tiles of the [O, C*R*S] matrix
  mixed         a vector-wise fine-grained mask AND a block-wise coarse mask (Guo et al., ISQED 2021)
One-shot (no data set) or gradual with retraining: cubic sparsity schedule (Zhu & Gupta, 2017) while
fine-tuning, per-layer sparsity uniform or from a sensitivity scan, first/last layer optionally denser.
`--sparsity` is always the overall fraction of zeros over all prunable weights.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.utils.prune as tprune

from .errors import UnsparseError, check_fraction
from .outputs import check_output, write_text
from .frontend import check_batch, load_program, program_input_shape
from .models import BUILTIN_MODELS, build_model, export

# aten ops whose second argument is a weight worth pruning
_WEIGHT_OPS = {"aten.conv2d.default", "aten.convolution.default", "aten.linear.default"}

METHODS = ("unstructured", "vector", "block", "mixed")
VECTOR_SIZES = (2, 4, 8)
BLOCK_SIZES = (2, 4, 8, 16, 32)
SENSITIVITY_GRID = (0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98)
MAX_LAYER_SPARSITY = 0.99  # a layer pruned further than this is effectively cut out of the network


def prunable_parameters(module: nn.Module, ep: torch.export.ExportedProgram | None = None) -> list[tuple[str, nn.Module, str]]:
    """(qualified name, owning module, parameter name) of every conv2d / linear weight.

    Ordinary modules are recognised by type; a program loaded from .pt2 (whose `module()` has no
    nn.Conv2d left) by the graph: the weight operand of each conv/linear call.
    """
    found = [
        (f"{name}.weight", m, "weight")
        for name, m in module.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    if found or ep is None:
        return found
    params = ep.graph_signature.inputs_to_parameters
    for node in ep.graph.nodes:
        if node.op == "call_function" and str(node.target) in _WEIGHT_OPS:
            weight = node.args[1]
            fqn = params.get(getattr(weight, "name", ""))
            if fqn is not None and fqn not in {f for f, _, _ in found}:
                owner_name, _, pname = fqn.rpartition(".")
                found.append((fqn, module.get_submodule(owner_name), pname))
    return found


def magnitude_prune(module: nn.Module, sparsity: float, ep: torch.export.ExportedProgram | None = None) -> nn.Module:
    """One-shot layer-wise L1 magnitude pruning to `sparsity` of every conv/linear weight, in place."""
    check_fraction("sparsity", sparsity, upper_inclusive=False)
    layers = prunable_parameters(module, ep)
    if not layers:
        raise UnsparseError("the model has no conv2d or linear layer to prune")
    for _, owner, pname in layers:
        tprune.l1_unstructured(owner, pname, amount=float(sparsity))
        tprune.remove(owner, pname)  # permanent: the zeros are now in the weight itself
    return module


def prune_to_program(model: str, sparsity: float, batch: int | None = None) -> torch.export.ExportedProgram:
    """Prune a built-in model or a .pt2 file and return the exported program."""
    check_fraction("sparsity", sparsity, upper_inclusive=False)
    check_batch(batch)
    if model in BUILTIN_MODELS:
        net = magnitude_prune(build_model(model), sparsity)
        return export(net, (batch or 1, *BUILTIN_MODELS[model].input_shape))
    ep = load_program(model, batch=batch)
    gm = ep.module()
    magnitude_prune(gm, sparsity, ep)
    shape = program_input_shape(ep)
    with torch.no_grad():
        return torch.export.export(gm, (torch.randn(*shape),))


def save_program(ep: torch.export.ExportedProgram, path: str, overwrite: bool = False,
                 extra_files: dict[str, str] | None = None) -> None:
    if not path.endswith(".pt2"):
        raise UnsparseError(f"output {path} must end in .pt2")
    if os.path.exists(path) and not overwrite:
        raise UnsparseError(f"{path} exists; pass --force to overwrite it")
    torch.export.save(ep, path, extra_files=extra_files or None)


def layer_sparsity(ep: torch.export.ExportedProgram) -> list[tuple[str, tuple[int, ...], float]]:
    """(name, shape, fraction of zeros) for every conv/linear weight of a program."""
    sd = ep.state_dict
    out = []
    for fqn, _, _ in prunable_parameters(ep.module(), ep):
        w = sd[fqn] if fqn in sd else dict(ep.module().named_parameters())[fqn]
        out.append((fqn, tuple(w.shape), float((w == 0).sum()) / w.numel()))
    return out


# ---- masks ---------------------------------------------------------------------------------------
def group_mask(t: torch.Tensor, amount: float, group_rows: int, group_cols: int) -> torch.Tensor:
    """Keep-mask (1/0, shape of t) removing whole groups of the [O, K] weight matrix, lowest L2 norm first.

    Groups are group_rows x group_cols tiles; edge tiles are partial and compete with their norm scaled as if
    full (sqrt(full/count)), so a small edge group is not pruned just for being small. Whole groups are
    removed until the pruned count is closest to round(amount * t.numel()).
    """
    m = t.detach().reshape(t.shape[0], -1).float()  # [O,K]
    rows, cols = m.shape
    gr, gc = math.ceil(rows / group_rows), math.ceil(cols / group_cols)
    padded = m.new_zeros(gr * group_rows, gc * group_cols)
    padded[:rows, :cols] = m
    inside = torch.zeros_like(padded)
    inside[:rows, :cols] = 1
    sumsq = padded.pow(2).reshape(gr, group_rows, gc, group_cols).sum((1, 3)).flatten()   # [G]
    count = inside.reshape(gr, group_rows, gc, group_cols).sum((1, 3)).flatten()          # [G]
    score = torch.sqrt(sumsq * (group_rows * group_cols) / count)                          # [G]
    order = torch.argsort(score, stable=True)
    pruned_after = torch.cat([count.new_zeros(1), torch.cumsum(count[order], 0)])          # [G+1]
    k = int(torch.argmin((pruned_after - round(amount * t.numel())).abs()))
    keep = torch.ones_like(score)
    keep[order[:k]] = 0
    keep = keep.reshape(gr, gc).repeat_interleave(group_rows, 0).repeat_interleave(group_cols, 1)  # [gr*R, gc*C]
    return keep[:rows, :cols].reshape(t.shape).to(t.dtype)


def vector_mask(t: torch.Tensor, amount: float, vector_size: int) -> torch.Tensor:
    """Groups of `vector_size` adjacent output channels at one input position (c, r, s)."""
    return group_mask(t, amount, vector_size, 1)


def block_mask(t: torch.Tensor, amount: float, block_size: int) -> torch.Tensor:
    """`block_size` x `block_size` tiles of the [O, C*R*S] matrix."""
    return group_mask(t, amount, block_size, block_size)


def mixed_masks(t: torch.Tensor, amount: float, vector_size: int, block_size: int,
                block_share: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(vector mask, block mask); the mixed mask is their product (AND).

    The coarse block mask removes `block_share` of the target; the fine vector mask is then ranked on what
    the blocks left and brings the total to `amount`.
    """
    blk = block_mask(t, amount * block_share, block_size)
    vec = vector_mask(t * blk, amount, vector_size)
    return vec, blk


class VectorPruning(tprune.BasePruningMethod):
    """Vector-wise magnitude pruning (see `vector_mask`); composes with the mask already in place."""

    PRUNING_TYPE = "unstructured"  # element-wise mask; torch's "structured" means whole channels

    def __init__(self, amount: float, vector_size: int = 4):
        self.amount, self.vector_size = amount, vector_size

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        return vector_mask(t * default_mask, self.amount, self.vector_size) * default_mask


class BlockPruning(tprune.BasePruningMethod):
    """Block-wise magnitude pruning (see `block_mask`)."""

    PRUNING_TYPE = "unstructured"

    def __init__(self, amount: float, block_size: int = 4):
        self.amount, self.block_size = amount, block_size

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        return block_mask(t * default_mask, self.amount, self.block_size) * default_mask


class MixedPruning(tprune.BasePruningMethod):
    """Vector-wise AND block-wise masks (see `mixed_masks`)."""

    PRUNING_TYPE = "unstructured"

    def __init__(self, amount: float, vector_size: int = 4, block_size: int = 8, block_share: float = 0.5):
        self.amount, self.vector_size, self.block_size, self.block_share = amount, vector_size, block_size, block_share

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        vec, blk = mixed_masks(t * default_mask, self.amount, self.vector_size, self.block_size, self.block_share)
        return vec * blk * default_mask


def vector_prune(module: nn.Module, name: str, amount: float, vector_size: int = 4) -> nn.Module:
    """Like `torch.nn.utils.prune.l1_unstructured`, for vector groups (mask until `prune.remove`)."""
    VectorPruning.apply(module, name, amount=amount, vector_size=vector_size)
    return module


def block_prune(module: nn.Module, name: str, amount: float, block_size: int = 4) -> nn.Module:
    BlockPruning.apply(module, name, amount=amount, block_size=block_size)
    return module


def mixed_prune(module: nn.Module, name: str, amount: float, vector_size: int = 4, block_size: int = 8,
                block_share: float = 0.5) -> nn.Module:
    MixedPruning.apply(module, name, amount=amount, vector_size=vector_size, block_size=block_size,
                       block_share=block_share)
    return module


# ---- configuration and per-layer targets ---------------------------------------------------------
@dataclass
class PruneConfig:
    """What `prune_model` does; the CLI flags map one to one."""

    sparsity: float = 0.5                    # overall fraction of zeros over all prunable weights
    method: str = "unstructured"
    scope: str = "layer"                     # layer | global (global: unstructured only)
    vector_size: int = 4
    block_size: int | None = None           # default 4 for block, 8 for mixed
    block_share: float = 0.5                 # mixed: part of the target reached by the block mask
    first_layer_sparsity: float | None = None
    last_layer_sparsity: float | None = None
    sensitivity: bool = False                # per-layer sparsity from a one-shot sensitivity scan
    epochs: int = 0                          # 0: one-shot; > 0: gradual pruning while fine-tuning
    lr: float = 3e-3
    batch_size: int = 64
    ramp_fraction: float = 0.6               # share of the fine-tuning steps over which sparsity ramps up
    updates: int = 30                        # mask updates along the ramp
    seed: int = 0

    def validate(self) -> "PruneConfig":
        if self.block_size is None:
            self.block_size = 8 if self.method == "mixed" else 4
        check_fraction("sparsity", self.sparsity, upper_inclusive=False)
        if self.method not in METHODS:
            raise UnsparseError(f"unknown pruning method '{self.method}': use one of {', '.join(METHODS)}")
        if self.scope not in ("layer", "global"):
            raise UnsparseError(f"unknown scope '{self.scope}': use layer or global")
        if self.scope == "global" and self.method != "unstructured":
            raise UnsparseError("--scope global is for --method unstructured; structured methods prune layer by layer")
        if self.scope == "global" and self.sensitivity:
            raise UnsparseError("--sensitivity sets per-layer sparsities; it cannot be combined with --scope global")
        if self.method in ("vector", "mixed") and self.vector_size not in VECTOR_SIZES:
            raise UnsparseError(f"vector size must be one of {', '.join(map(str, VECTOR_SIZES))}, got {self.vector_size}")
        if self.method in ("block", "mixed") and self.block_size not in BLOCK_SIZES:
            raise UnsparseError(f"block size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {self.block_size}")
        if self.method == "mixed" and self.block_size % self.vector_size:
            raise UnsparseError(f"mixed pruning needs the block size ({self.block_size}) to be a multiple of the "
                                f"vector size ({self.vector_size}), so a removed block is whole vectors")
        check_fraction("block share", self.block_share)
        for name in ("first_layer_sparsity", "last_layer_sparsity"):
            value = getattr(self, name)
            if value is not None:
                check_fraction(name.replace("_", " "), value, upper_inclusive=False)
        if self.epochs < 0:
            raise UnsparseError(f"epochs must be >= 0, got {self.epochs}")
        if self.lr <= 0 or self.batch_size < 1:
            raise UnsparseError("the learning rate must be > 0 and the batch size >= 1")
        return self

    def method_for(self, amount: float) -> tprune.BasePruningMethod:
        """The torch pruning method that prunes one layer to `amount`."""
        if self.method == "vector":
            return VectorPruning(amount, self.vector_size)
        if self.method == "block":
            return BlockPruning(amount, self.block_size)
        if self.method == "mixed":
            return MixedPruning(amount, self.vector_size, self.block_size, self.block_share)
        return tprune.L1Unstructured(amount)

    def describe(self) -> str:
        extra = {"vector": f" V={self.vector_size}", "block": f" B={self.block_size}",
                 "mixed": f" V={self.vector_size} B={self.block_size}"}.get(self.method, f" ({self.scope})")
        how = f"gradual over {self.epochs} epochs" if self.epochs else "one-shot"
        return f"{self.method}{extra} to {self.sparsity:g}, {how}"


def fixed_layers(names: list[str], cfg: PruneConfig) -> dict[str, float]:
    """The first/last layer's own sparsity, where the config keeps them denser (or sparser)."""
    fixed: dict[str, float] = {}
    if cfg.first_layer_sparsity is not None:
        fixed[names[0]] = cfg.first_layer_sparsity
    if cfg.last_layer_sparsity is not None:
        fixed[names[-1]] = cfg.last_layer_sparsity
    return fixed


def layer_targets(sizes: dict[str, int], cfg: PruneConfig,
                  sensitivity: dict[str, list[tuple[float, float]]] | None = None) -> dict[str, float]:
    """Per-layer sparsity reaching `cfg.sparsity` overall; first/last layers may be fixed lower.

    The remaining ("pool") layers get a uniform sparsity, or one from the sensitivity curves: each layer
    is pruned as far as costs at most the same accuracy drop `d`, with `d` bisected to hit the total.
    """
    names = list(sizes)
    fixed = fixed_layers(names, cfg)
    pool = [n for n in names if n not in fixed]
    total = sum(sizes.values())
    if not pool:
        return fixed
    n_pool = sum(sizes[n] for n in pool)
    need = (cfg.sparsity * total - sum(fixed[n] * sizes[n] for n in fixed)) / n_pool
    if need > MAX_LAYER_SPARSITY:
        raise UnsparseError(
            f"overall sparsity {cfg.sparsity:g} needs the other layers at {need:.3f} with the first/last layer "
            "kept denser; lower --sparsity or raise --first-layer-sparsity/--last-layer-sparsity"
        )
    need = max(need, 0.0)
    if not sensitivity or cfg.scope == "global":
        return {n: fixed.get(n, need) for n in names}
    alloc = _allocate_by_sensitivity({n: sizes[n] for n in pool}, {n: sensitivity[n] for n in pool}, need)
    return {n: fixed.get(n, alloc.get(n, need)) for n in names}


def _allocate_by_sensitivity(sizes: dict[str, int], curves: dict[str, list[tuple[float, float]]],
                             need: float) -> dict[str, float]:
    """Equal-accuracy-drop allocation with a param-weighted mean sparsity of `need`."""
    prepared = {}
    for n, curve in curves.items():
        pts = [(0.0, 0.0)] + sorted(curve)
        drops, run = [], -math.inf
        for s, d in pts:  # a layer's drop may not decrease with more pruning (noise): take the running max
            run = max(run, d)
            drops.append((s, run))
        prepared[n] = drops

    def sparsity_at(drops: list[tuple[float, float]], d: float) -> float:
        for (s0, d0), (s1, d1) in zip(drops, drops[1:]):
            if d1 > d:
                return s0 if d1 == d0 else s0 + (s1 - s0) * max(0.0, d - d0) / (d1 - d0)
        return drops[-1][0]

    n_pool = sum(sizes.values())
    mean = lambda d: sum(sparsity_at(prepared[n], d) * sizes[n] for n in sizes) / n_pool
    lo = min(min(dd for _, dd in drops) for drops in prepared.values()) - 1.0
    hi = max(max(dd for _, dd in drops) for drops in prepared.values()) + 1.0
    if mean(hi) < need:  # the scan grid cannot reach it: fall back to uniform
        return {n: need for n in sizes}
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean(mid) < need else (lo, mid)
    alloc = {n: sparsity_at(prepared[n], hi) for n in sizes}
    scale = need / max(mean(hi), 1e-12)  # bisection lands on a step: scale down to the exact total
    return {n: min(MAX_LAYER_SPARSITY, s * scale) for n, s in alloc.items()}


@torch.no_grad()
def sensitivity_scan(module: nn.Module, layers: list[tuple[str, nn.Module, str]], data, cfg: PruneConfig,
                     grid: tuple[float, ...] = SENSITIVITY_GRID, samples: int = 1000,
                     fixed_batch: int | None = None) -> dict[str, list[tuple[float, float]]]:
    """Accuracy drop (points) of pruning each layer alone, one-shot with `cfg.method`, on training samples."""
    from .data import Dataset
    from .train import evaluate

    probe = Dataset("probe", data.x_train[:0], data.y_train[:0], data.x_train[:samples], data.y_train[:samples])
    base = evaluate(module, probe, fixed_batch=fixed_batch)
    curves: dict[str, list[tuple[float, float]]] = {}
    for fqn, owner, pname in layers:
        param = getattr(owner, pname)
        saved = param.detach().clone()
        curves[fqn] = []
        for s in grid:
            mask = cfg.method_for(s).compute_mask(saved, torch.ones_like(saved))
            param.copy_(saved * mask)
            curves[fqn].append((s, base - evaluate(module, probe, fixed_batch=fixed_batch)))
        param.copy_(saved)
    return curves


# ---- applying masks ------------------------------------------------------------------------------
def _orig_and_mask(owner: nn.Module, pname: str) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(owner, pname + "_mask"):
        return getattr(owner, pname + "_orig").detach(), getattr(owner, pname + "_mask")
    w = getattr(owner, pname).detach()
    return w, torch.ones_like(w)


def _set_mask(owner: nn.Module, pname: str, mask: torch.Tensor) -> None:
    buf = getattr(owner, pname + "_mask", None)
    if buf is None:
        tprune.custom_from_mask(owner, pname, mask)  # weight_orig + weight_mask + forward pre-hook
    else:
        buf.copy_(mask)  # the pre-hook recomputes weight = weight_orig * weight_mask on the next forward


def _update_masks(layers: list[tuple[str, nn.Module, str]], fractions: dict[str, float], cfg: PruneConfig,
                  pool: set[str]) -> None:
    """Bring every layer to `fractions[name]`; in global scope the `pool` layers share one magnitude ranking."""
    current = {fqn: _orig_and_mask(owner, pname) for fqn, owner, pname in layers}
    capped: set[str] = set()
    if cfg.scope == "global" and pool:
        # torch's global_unstructured ranks the same way: one top-k over all pool weights; but a layer is
        # never pruned past MAX_LAYER_SPARSITY (an all-zero layer cuts the network), the others take up the rest
        names = [f for f, _, _ in layers if f in pool]
        numels = {n: current[n][0].numel() for n in names}
        goal = round(fractions[names[0]] * sum(numels.values()))
        while True:
            free = [n for n in names if n not in capped]
            scores = torch.cat([(current[n][0] * current[n][1]).abs().flatten() for n in free])  # [sum numel]
            k = min(scores.numel(), max(0, goal - sum(round(MAX_LAYER_SPARSITY * numels[n]) for n in capped)))
            keep = torch.ones_like(scores)
            if k:
                keep[torch.topk(scores, k, largest=False).indices] = 0
            parts = dict(zip(free, torch.split(keep, [numels[n] for n in free])))
            over = {n for n in free if float((parts[n] == 0).sum()) > MAX_LAYER_SPARSITY * numels[n]}
            if not over or len(over) == len(free):
                break
            capped |= over
        for n in free:
            current[n] = (current[n][0], parts[n].view_as(current[n][0]) * current[n][1])
        fractions = {**fractions, **{n: MAX_LAYER_SPARSITY for n in capped}}
    for fqn, owner, pname in layers:
        orig, mask = current[fqn]
        if not (cfg.scope == "global" and fqn in pool and fqn not in capped):
            mask = cfg.method_for(fractions[fqn]).compute_mask(orig * mask, mask)
        _set_mask(owner, pname, mask)


def cubic_sparsity(step: int, ramp_steps: int, initial: float, final: float) -> float:
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) * (1 - t / (n dt))^3, held at s_f after the ramp."""
    frac = min(1.0, step / max(1, ramp_steps))
    return final + (initial - final) * (1.0 - frac) ** 3


def prune_model(module: nn.Module, cfg: PruneConfig, data=None, ep: torch.export.ExportedProgram | None = None,
                fixed_batch: int | None = None, log=print) -> dict:
    """Prune `module` in place (permanently); returns {"targets": per-layer sparsity, "sensitivity": curves}.

    Existing zeros stay zero (their mask starts at 0). With `cfg.epochs` > 0 and a data set, sparsity ramps
    up on the cubic schedule while fine-tuning, then the network trains on at the final mask.
    """
    from .train import eval_mode, train

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
        _set_mask(owner, pname, (w != 0).to(w.dtype))
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
                _update_masks(layers, {n: cubic_sparsity(step, ramp, initial[n], targets[n]) for n in sizes}, cfg, pool)

        train(module, data, cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed, on_step=on_step,
              desc=f"prune {cfg.method}")
    _update_masks(layers, targets, cfg, pool)  # one-shot, or make sure the final target is reached
    for _, owner, pname in layers:
        tprune.remove(owner, pname)  # permanent: weight = weight_orig * weight_mask, hooks gone
    eval_mode(module)
    return {"targets": targets, "sensitivity": curves}


# ---- the `prune` command -------------------------------------------------------------------------
def check_report_path(path: str | None, overwrite: bool) -> None:
    if path is not None:
        check_output(path, overwrite=overwrite, suffixes=(".json",), what="report")


def write_report(report: dict, path: str | None) -> None:
    if path:
        write_text(path, json.dumps(report, indent=2) + "\n")


def prune_command(model: str, cfg: PruneConfig, output: str, dataset: str | None = None,
                  weights: str | None = None, batch: int | None = None, report: str | None = None,
                  overwrite: bool = False, log=print) -> dict:
    """Load, (evaluate,) prune, (evaluate,) export to `output`; returns the report (also written to `report`)."""
    from .data import load_dataset
    from .inspection import weight_report
    from .train import compute_threads, evaluated_around, load_model, save_model, untrained_hint

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
            "seconds": round(time.perf_counter() - start, 2),
        }
    write_report(result, report)
    return result
