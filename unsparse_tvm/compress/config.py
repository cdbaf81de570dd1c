"""How far to prune each layer: the configuration, and per-layer sparsity targets that reach the overall
`--sparsity` (uniform, first/last layer kept denser, or from a one-shot sensitivity scan)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.utils.prune as tprune

from ..errors import MAX_SPARSITY, UnsparseError, check_fraction, check_sparsity
from .data import Dataset
from .masks import MAX_LAYER_SPARSITY, BlockPruning, MixedPruning, VectorPruning
from .train import evaluate

METHODS = ("unstructured", "vector", "block", "mixed", "channel4")
VECTOR_SIZES = (2, 4, 8)
BLOCK_SIZES = (2, 4, 8, 16, 32)
SENSITIVITY_GRID = (0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98)


@dataclass
class PruneConfig:
    """What `prune_model` does; the CLI flags map one to one."""

    sparsity: float = 0.5                    # overall fraction of zeros over all prunable weights
    method: str = "unstructured"
    scope: str = "layer"                     # layer | global (global: unstructured only)
    vector_size: int | None = None          # V for vector/mixed (default 4); refused for the other methods
    block_size: int | None = None           # default 4 for block, 8 for mixed; refused for the others
    block_share: float | None = None        # mixed: part of the target reached by the block mask (default 0.5)
    first_layer_sparsity: float | None = None
    last_layer_sparsity: float | None = None
    sensitivity: bool = False                # per-layer sparsity from a one-shot sensitivity scan
    epochs: int = 0                          # 0: one-shot; > 0: gradual pruning while fine-tuning
    lr: float = 3e-3
    batch_size: int = 64
    ramp_fraction: float = 0.6               # share of the fine-tuning steps over which sparsity ramps up
    updates: int = 30                        # mask updates along the ramp
    seed: int = 0
    # per layer (weight name -> value), where a plan chose them (speed_target): these layers' own sparsity
    # and pattern ("unstructured", "vector", "block": this config's V and B), instead of the uniform ones
    layer_sparsity: dict | None = None
    layer_pattern: dict | None = None

    def validate(self) -> "PruneConfig":
        check_sparsity("sparsity", self.sparsity)
        if self.method not in METHODS:
            raise UnsparseError(f"unknown pruning method '{self.method}': use one of {', '.join(METHODS)}")
        for option, value, methods in (("--vector-size", self.vector_size, ("vector", "mixed")),
                                       ("--block-size", self.block_size, ("block", "mixed")),
                                       ("--block-share", self.block_share, ("mixed",))):
            if value is not None and self.method not in methods:  # refused, not silently ignored
                raise UnsparseError(f"{option} is for --method {' or '.join(methods)}, not {self.method}")
        if self.method in ("vector", "mixed") and self.vector_size is None:
            self.vector_size = 4
        if self.method in ("block", "mixed") and self.block_size is None:
            self.block_size = 8 if self.method == "mixed" else 4
        if self.method == "mixed" and self.block_share is None:
            self.block_share = 0.5
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
        if self.block_share is not None:
            check_fraction("block share", self.block_share)
        for name in ("first_layer_sparsity", "last_layer_sparsity"):
            value = getattr(self, name)
            if value is not None:
                check_sparsity(name.replace("_", " "), value)
        if self.epochs < 0:
            raise UnsparseError(f"epochs must be >= 0, got {self.epochs}")
        if self.lr <= 0 or self.batch_size < 1:
            raise UnsparseError("the learning rate must be > 0 and the batch size >= 1")
        return self

    def method_for(self, amount: float, layer: str | None = None) -> tprune.BasePruningMethod:
        """The torch pruning method that prunes one layer to `amount` (the layer's own pattern, if planned)."""
        if layer is not None and self.layer_pattern and layer in self.layer_pattern:
            pattern = self.layer_pattern[layer]
            return PruneConfig(method=pattern, vector_size=self.vector_size,
                               block_size=self.block_size or 4).method_for(amount)
        if self.method == "vector":
            return VectorPruning(amount, self.vector_size)
        if self.method == "block":
            return BlockPruning(amount, self.block_size)
        if self.method == "mixed":
            return MixedPruning(amount, self.vector_size, self.block_size, self.block_share)
        if self.method == "channel4":  # 4x1 input-channel quads, for the int8 kernels
            from .channel_quads import ChannelQuadPruning

            return ChannelQuadPruning(amount)
        return tprune.L1Unstructured(amount)

    def describe(self) -> str:
        extra = {"vector": f" V={self.vector_size}", "block": f" B={self.block_size}",
                 "mixed": f" V={self.vector_size} B={self.block_size}", "channel4": ""}.get(self.method, f" ({self.scope})")
        how = f"gradual over {self.epochs} epochs" if self.epochs else "one-shot"
        if self.layer_sparsity:  # a speed target's plan: each layer its own sparsity (and pattern)
            return f"a per-layer plan, {self.sparsity:.3f} of the weights, {how}"
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
    if cfg.layer_sparsity is not None:  # a plan's own per-layer sparsity (unplanned layers stay as they are)
        return {n: cfg.layer_sparsity.get(n, 0.0) for n in names}
    fixed = fixed_layers(names, cfg)
    pool = [n for n in names if n not in fixed]
    total = sum(sizes.values())
    if not pool:
        return fixed
    n_pool = sum(sizes[n] for n in pool)
    need = (cfg.sparsity * total - sum(fixed[n] * sizes[n] for n in fixed)) / n_pool
    if need > MAX_LAYER_SPARSITY:
        given = [f"--{n.replace('_', '-')}" for n in ("first_layer_sparsity", "last_layer_sparsity")
                 if getattr(cfg, n) is not None]
        raise UnsparseError(
            f"overall sparsity {cfg.sparsity:g} needs the other layers at {need:.3f} with {' and '.join(given)} "
            f"kept lower, above the {MAX_SPARSITY:g} a layer can be pruned to; lower --sparsity or raise "
            f"{' or '.join(given)}"
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
