"""A strided depthwise conv on only the phase planes its nonzeros read (llvm).

A stride-2 conv's kernel reads its zero-padded input split into sh x sw phase planes per channel
(geometry.ConvGeometry), and the pad stage copies all of them. A pruned depthwise filter keeps one or two
of its 9 or 25 taps, so most of those planes are never read: efficientnet_b0's 3x3/2 on 96 x 112x112 at 90%
reads 75 of its 216. Here the used planes alone are copied, by an operator of their own ("phase_planes",
[N, P, Hq, Wq]), and the conv runs on them as a stride-1, unpadded conv with a ceil(R/sh) x ceil(S/sw)
filter: row k's tap (r, s) reads plane (channel of k, phase (r % sh, s % sw)) at (r // sh, s // sw). The
kernel then reads that copy in place (ConvGeometry.input_is_flat), rows, flat domain and fused epilogue
as any other conv.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from tvm import te, tirx

from .formats import SparseRows, pack_rows
from .geometry import ConvGeometry

# split only where at most this share of the phase planes is read: the copy costs 1.5-2x the pad stage's per
# element (a strided read per plane, where the pad stage splits each source row into its phases at once).
# efficientnet_b0 at 128, one thread, Xeon: the 144-channel 5x5/2 on 32x32 reading 71% of its planes (80%
# pruned) 0.049 -> 0.074 ms split; the 672-channel one on 8x8 at 73% level; at 50% (at 224, 90%) 0.268 -> 0.213
PHASE_SPLIT_MAX_SHARE = 0.6


@dataclasses.dataclass(frozen=True)
class PhaseSplit:
    """A strided depthwise conv as a stride-1 conv over its used phase planes."""

    source: ConvGeometry  # the conv as written (its input [N, C, H, W], stride, padding)
    planes: np.ndarray    # int32 [P]: plane p is phase planes[p] % (sh*sw) of channel planes[p] // (sh*sw);
                          # a code of C * sh * sw is a plane of zeros (the flat domain's reads past the last)

    def geometry(self) -> ConvGeometry:
        """The stride-1, unpadded conv over this split's planes of Hq x Wq."""
        (sh, sw), g = self.source.stride, self.source
        return ConvGeometry(g.n, len(self.planes), g.hq, g.wq, g.k, -(-g.r // sh), -(-g.s // sw), (1, 1),
                            (0, 0, 0, 0), (1, 1))

    def with_planes(self, count: int) -> "PhaseSplit":
        """The same split with zero planes appended up to `count` (ConvGeometry.pad_channels of the conv as run)."""
        sh, sw = self.source.stride
        extra = np.full(count - len(self.planes), self.source.c * sh * sw, np.int32)
        return dataclasses.replace(self, planes=np.concatenate([self.planes, extra]))


def phase_split(weight: np.ndarray, geo: ConvGeometry, channels: np.ndarray | None = None) -> PhaseSplit | None:
    """The split of a strided depthwise conv (weight [K, 1, R, S]; row k reads input channel channels[k], or
    k) onto the phase planes its nonzeros read; None where the conv is not strided, is dilated, or reads
    more than PHASE_SPLIT_MAX_SHARE of its planes."""
    sh, sw = geo.stride
    if (sh, sw) == (1, 1) or geo.dilation != (1, 1) or geo.r * geo.s == 1:
        return None
    used = np.unique(_taps(weight, geo, channels)[3]).astype(np.int32)
    split = PhaseSplit(geo, used)
    run = split.geometry()
    if len(used) == 0 or len(used) > PHASE_SPLIT_MAX_SHARE * geo.c * sh * sw or (run.oh, run.ow) != (geo.oh, geo.ow):
        return None
    return split


def _taps(weight: np.ndarray, geo: ConvGeometry, channels: np.ndarray | None) -> tuple:
    """(row, r, s, plane code) of every nonzero tap of a depthwise weight [K, 1, R, S], in row order; the code of
    a plane is channel * sh*sw + phase, row k reading input channel channels[k] (or k)."""
    (sh, sw), k = geo.stride, weight.shape[0]
    src = np.arange(k) if channels is None else np.asarray(channels)
    row, r, s = np.nonzero(weight.reshape(k, geo.r, geo.s))
    return row, r, s, src[row] * (sh * sw) + (r % sh) * sw + s % sw


def phase_rows(weight: np.ndarray, split: PhaseSplit, run: ConvGeometry,
               channels: np.ndarray | None = None) -> SparseRows:
    """ELL rows of the depthwise weight [K, 1, R, S] over the split's planes, offsets into `run`'s flat input
    (the stride-1 conv as the kernel runs it: its flat domain, its plane pitch), each row's in ascending order."""
    (sh, sw), k = split.source.stride, weight.shape[0]
    row, r, s, code = _taps(weight, split.source, channels)
    plane = np.searchsorted(split.planes, code)  # the planes are sorted codes (zero planes last, the largest)
    off = run.tap_offset(plane, r // sh, s // sw).astype(np.int64)
    order = np.lexsort((off, row))  # by row, then address
    row, off, vals = row[order], off[order], weight.reshape(k, -1)[row[order], (r * split.source.s + s)[order]]
    bounds = np.searchsorted(row, np.arange(k + 1))
    return pack_rows([off[a:b].astype(np.int32) for a, b in zip(bounds[:-1], bounds[1:])],
                     [vals[a:b] for a, b in zip(bounds[:-1], bounds[1:])], (k, run.c * run.r * run.s))


def phase_planes(x: te.Tensor, planes: te.Tensor, geo: ConvGeometry) -> te.Tensor:
    """[N, C, H, W] -> [N, P*Hq*Wq]: plane p the phase planes[p] % (sh*sw) of channel planes[p] // (sh*sw) of
    the zero-padded input (geo: the conv as written), zeros for a code of C * sh * sw; flat, as the sparse
    conv reads it."""
    (sh, sw), (pt, pl, _, _) = geo.stride, geo.padding
    plane = geo.hq * geo.wq

    def value(n, i):
        code = planes[i // plane]
        c, phase, hh, ww = code // (sh * sw), code % (sh * sw), i % plane // geo.wq, i % geo.wq
        h, w = hh * sh + phase // sw - pt, ww * sw + phase % sw - pl
        inside = tirx.all(c < geo.c, h >= 0, h < geo.h, w >= 0, w < geo.w)
        return tirx.if_then_else(inside, x[n, tirx.min(c, geo.c - 1), h, w], tirx.const(0.0, "float32"))

    return te.compute((geo.n, int(planes.shape[0]) * plane), value, name="phase_planes")
