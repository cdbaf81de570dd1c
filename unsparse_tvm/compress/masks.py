"""What to prune: the prunable weights of a model and the masks of each method, as
`torch.nn.utils.prune.BasePruningMethod`s (masks until `prune.remove` makes them permanent).

A conv weight [O,C,R,S] is viewed as the matrix [O, C*R*S]; every method ranks by magnitude:
  unstructured  single weights (torch's L1Unstructured), layer-wise or global
  vector        groups of V adjacent output channels at the same input position (c, r, s): a sparse kernel
                loads one input value for V outputs; the last group is partial when V does not divide O
  block         B x B tiles of the [O, C*R*S] matrix
  mixed         a vector-wise fine-grained mask AND a block-wise coarse mask (Guo et al., ISQED 2021)
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.utils.prune as tprune

from .. import reference
from ..errors import MAX_SPARSITY, UnsparseError, check_sparsity

# aten ops whose second argument is a weight worth pruning
WEIGHT_OPS = {"aten.conv2d.default", "aten.convolution.default", "aten.linear.default"}
MAX_LAYER_SPARSITY = MAX_SPARSITY  # a layer pruned further than this is effectively cut out of the network


def prunable_parameters(module: nn.Module, ep: torch.export.ExportedProgram | None = None) -> list[tuple[str, nn.Module, str]]:
    """(qualified name, owning module, parameter name) of every conv2d / linear weight.

    Ordinary modules are recognised by type; a program loaded from .pt2 (whose `module()` has no
    nn.Conv2d left) by the graph: the weight operand of each conv/linear call.
    """
    found = reference.prunable_layers(module)
    if found or ep is None:
        return found
    params = ep.graph_signature.inputs_to_parameters
    for node in ep.graph.nodes:
        if node.op == "call_function" and str(node.target) in WEIGHT_OPS:
            weight = node.args[1]
            fqn = params.get(getattr(weight, "name", ""))
            if fqn is not None and fqn not in {f for f, _, _ in found}:
                owner_name, _, pname = fqn.rpartition(".")
                found.append((fqn, module.get_submodule(owner_name), pname))
    return found


def magnitude_prune(module: nn.Module, sparsity: float, ep: torch.export.ExportedProgram | None = None) -> nn.Module:
    """One-shot layer-wise L1 magnitude pruning to `sparsity` of every conv/linear weight, in place
    (reference.magnitude_prune, after the checks)."""
    check_sparsity("sparsity", sparsity)
    layers = prunable_parameters(module, ep)
    if not layers:
        raise UnsparseError("the model has no conv2d or linear layer to prune")
    return reference.magnitude_prune(module, sparsity, layers)


def layer_sparsity(ep: torch.export.ExportedProgram) -> list[tuple[str, tuple[int, ...], float]]:
    """(name, shape, fraction of zeros) for every conv/linear weight of a program."""
    sd = ep.state_dict
    out = []
    for fqn, _, _ in prunable_parameters(ep.module(), ep):
        w = sd[fqn] if fqn in sd else dict(ep.module().named_parameters())[fqn]
        out.append((fqn, tuple(w.shape), float((w == 0).sum()) / w.numel()))
    return out


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


class GroupPruning(tprune.BasePruningMethod):
    """Magnitude pruning of whole rows x cols groups (see `group_mask`); composes with the mask in place."""

    PRUNING_TYPE = "unstructured"  # element-wise mask; torch's "structured" means whole channels

    def __init__(self, amount: float, rows: int, cols: int):
        self.amount, self.rows, self.cols = amount, rows, cols

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        return group_mask(t * default_mask, self.amount, self.rows, self.cols) * default_mask


class VectorPruning(GroupPruning):
    """Vector-wise magnitude pruning (see `vector_mask`)."""

    def __init__(self, amount: float, vector_size: int = 4):
        super().__init__(amount, vector_size, 1)
        self.vector_size = vector_size


class BlockPruning(GroupPruning):
    """Block-wise magnitude pruning (see `block_mask`)."""

    def __init__(self, amount: float, block_size: int = 4):
        super().__init__(amount, block_size, block_size)
        self.block_size = block_size


class MixedPruning(tprune.BasePruningMethod):
    """Vector-wise AND block-wise masks (see `mixed_masks`)."""

    PRUNING_TYPE = "unstructured"

    def __init__(self, amount: float, vector_size: int = 4, block_size: int = 8, block_share: float = 0.5):
        self.amount, self.vector_size, self.block_size, self.block_share = amount, vector_size, block_size, block_share

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        vec, blk = mixed_masks(t * default_mask, self.amount, self.vector_size, self.block_size, self.block_share)
        return vec * blk * default_mask


def _orig_and_mask(owner: nn.Module, pname: str) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(owner, pname + "_mask"):
        return getattr(owner, pname + "_orig").detach(), getattr(owner, pname + "_mask")
    w = getattr(owner, pname).detach()
    return w, torch.ones_like(w)


def set_mask(owner: nn.Module, pname: str, mask: torch.Tensor) -> None:
    buf = getattr(owner, pname + "_mask", None)
    if buf is None:
        tprune.custom_from_mask(owner, pname, mask)  # weight_orig + weight_mask + forward pre-hook
    else:
        buf.copy_(mask)  # the pre-hook recomputes weight = weight_orig * weight_mask on the next forward


def update_masks(layers: list[tuple[str, nn.Module, str]], fractions: dict[str, float], cfg,
                  pool: set[str]) -> None:
    """Bring every layer to `fractions[name]`; in global scope the `pool` layers share one magnitude ranking.
    `cfg` is a targets.PruneConfig (its scope and `method_for`)."""
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
            mask = cfg.method_for(fractions[fqn], fqn).compute_mask(orig * mask, mask)
        set_mask(owner, pname, mask)
