"""`prune --method channel4`: 4x1 blocks along the *input channels* of a conv weight [O, C, R, S] (at one
tap (r, s) of one output channel, channels 4c..4c+3 are kept or removed together; for a linear weight
[O, In], features 4i..4i+3). The int8 kernels store weights as such quads (int8_rows: one 32-bit word
of activations per quad, one vpdpbusd per quad and vector), so a channel4 mask makes every stored quad
whole, where an unstructured mask stores mostly-zero quads."""

from __future__ import annotations

import torch
import torch.nn.utils.prune as tprune

from .masks import group_mask

QUAD = 4


def channel_quad_mask(t: torch.Tensor, amount: float) -> torch.Tensor:
    """Keep-mask (shape of t) removing whole channel quads, lowest L2 norm first (group_mask's ranking;
    a last partial quad when 4 does not divide C competes with its norm scaled as if full)."""
    if t.dim() == 2:
        return group_mask(t, amount, 1, QUAD)
    o, c, r, s = t.shape
    taps = t.permute(0, 2, 3, 1).reshape(o * r * s, c)       # one row per (o, r, s), channels along it
    keep = group_mask(taps, amount, 1, QUAD)
    return keep.reshape(o, r, s, c).permute(0, 3, 1, 2).contiguous()


class ChannelQuadPruning(tprune.BasePruningMethod):
    """Magnitude pruning of channel quads (see `channel_quad_mask`); composes with the mask in place."""

    PRUNING_TYPE = "unstructured"

    def __init__(self, amount: float):
        self.amount = amount

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        return channel_quad_mask(t * default_mask, self.amount) * default_mask
