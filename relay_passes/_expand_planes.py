"""The expand conv before a phase-split depthwise conv, computed on the planes that depthwise reads (llvm).

A mobile block's expand (a 1x1 conv, then its activation) writes a map of K x H x W that the strided
depthwise conv after it reads as phase planes; split (ops/phase_planes.py), it reads only P of the K*sh*sw
planes, which an operator of their own copies out. Each plane (channel c, phase (a, b)) is the expand's
channel c at every sh-th row and sw-th column from (a - pt, b - pl): the same 1x1 conv on its input's phase
plane (a, b). So the expand runs on its input's phase planes (C per phase the planes use, copied by the same
operator: a narrow input, 16 or 24 channels where its output has 96 or 144) as a 1x1 conv with P output planes, row p
holding channel c's weights at the input planes of phase (a, b). It then computes P planes of Hq x Wq
instead of K maps of H x W (efficientnet_b0's 16 -> 96 before its 3x3/2 at 90%: 75 planes of 57x57 against
54 channels of 112x112, 36%), and the wide copy is gone. Positions of a plane in the depthwise's padding must
read 0 where the bias and activation would make them act(b): the kernel's epilogue zeroes each row outside
its plane's rows and columns (`bounds`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from unsparse_tvm.cost.model import DW_SPARSE_INPUT_S, CostModel
from unsparse_tvm.ops.geometry import ConvGeometry
from unsparse_tvm.ops.phase_planes import PhaseSplit

from ._util import Epilogue

# maps smaller than this keep the expand as written: its planes' separate epilogue pass and part-filled vectors
# (9x9 planes in 6 vectors of 16) outweigh what it saves. One thread, Zen 4, 90%, expand + depthwise (copy
# included), ms: efficientnet_b0's 112 -> 624 before a 5x5/2 on 14x14 0.165 -> 0.194, mobilenet_v2's 96 -> 350
# before a 3x3/2 on 14x14 0.061 -> 0.041; on 28x28 0.093 -> 0.079 and 0.033 -> 0.033; on 56x56 and 112x112
# 0.336 -> 0.280 and 0.385 -> 0.294 (efficientnet_b0), 0.094 -> 0.073 and 0.308 -> 0.147 (mobilenet_v2)
PLANES_MIN_POSITIONS = 28 * 28


@dataclasses.dataclass(frozen=True)
class PlanesExpand:
    """The expand conv as a 1x1 conv from its input's phase planes to the planes a split depthwise conv reads."""

    inputs: PhaseSplit       # the input's phase planes it reads (zero planes appended up to geo.pad_channels)
    geo: ConvGeometry        # the 1x1 conv over them: C' input planes of Hq x Wq, P output planes
    weight: np.ndarray       # float32 [P, C', 1, 1]: row p the expand's row of plane p's channel, at its phase
    bias: np.ndarray | None  # float32 [P]: the expand's bias of plane p's channel (0 for a zero plane)
    bounds: np.ndarray       # int32 [P, 4]: plane p's rows [b0, b1) and columns [b2, b3) inside the map


def expandable(geo: ConvGeometry | None, ep: Epilogue) -> bool:
    """Whether a conv with this geometry and epilogue can write phase planes: a plain 1x1 conv, stride 1, no
    padding, its chain without a residual (its activation maps 0 to 0: ReLU, ReLU6, SiLU or none)."""
    return geo is not None and geo.pointwise and geo.dilation == (1, 1) and ep.residual is None


def planes_expand(weight: np.ndarray, bias: np.ndarray | None, geo: ConvGeometry,
                  split: PhaseSplit) -> PlanesExpand | None:
    """The expand conv (weight [K, C, 1, 1], geometry geo) writing the planes of `split` (the depthwise conv
    reading its output), or None where their maps differ."""
    src, (sh, sw) = split.source, split.source.stride
    if (src.h, src.w, src.n) != (geo.h, geo.w, geo.n) or src.c != geo.k:
        return None
    channel, phase = split.planes // (sh * sw), split.planes % (sh * sw)
    real = channel < geo.k  # the rest are zero planes (PhaseSplit.with_planes)
    phases = np.unique(phase[real])
    codes = (np.arange(geo.c)[:, None] * (sh * sw) + phases[None, :]).reshape(-1).astype(np.int32)  # sorted
    run = ConvGeometry(geo.n, len(codes), src.hq, src.wq, len(split.planes), 1, 1, (1, 1), (0, 0, 0, 0), (1, 1))
    inputs = PhaseSplit(dataclasses.replace(src, c=geo.c), codes).with_planes(run.pad_channels)
    w = np.zeros((len(split.planes), len(codes), 1, 1), np.float32)
    p = np.nonzero(real)[0]
    slot = np.searchsorted(phases, phase[p])  # the input plane of channel c' and phase q is c' * len(phases) + slot
    w[p[:, None], np.arange(geo.c)[None, :] * len(phases) + slot[:, None], 0, 0] = weight[channel[p], :, 0, 0]
    planes_bias = None if bias is None else np.where(real, bias[np.minimum(channel, geo.k - 1)], 0).astype(np.float32)
    # plane row i reads source row i*sh + a - pt: inside the map from ceil((pt - a) / sh) to ceil((H + pt - a) / sh)
    (pt, pl), a, b = src.padding[:2], phase // sw, phase % sw
    rows = np.clip([-((a - pt) // sh), -((a - pt - geo.h) // sh)], 0, src.hq)
    cols = np.clip([-((b - pl) // sw), -((b - pl - geo.w) // sw)], 0, src.wq)
    bounds = np.where(real[:, None], np.stack([rows[0], rows[1], cols[0], cols[1]], 1), 0).astype(np.int32)
    return PlanesExpand(inputs, run, w, planes_bias, bounds)


def planes_pay(plan: PlanesExpand, rows, expand_us: float, cost: CostModel) -> tuple[float, float]:
    """(predicted us of the expand on the planes, with its input's planes copied; of the expand as written,
    `expand_us`, with the depthwise's planes copied): each copy priced per element as the depthwise kernel's."""
    plane = plan.geo.n * plan.geo.h * plan.geo.w
    fused = cost.conv(plan.geo, rows).sparse_us + len(plan.inputs.planes) * plane * DW_SPARSE_INPUT_S * 1e6
    return fused, expand_us + plan.geo.k * plane * DW_SPARSE_INPUT_S * 1e6
