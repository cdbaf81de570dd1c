"""int8 execution of a sparse conv2d: activation quantisation parameters, weight quads and the PyTorch
reference of the same integer arithmetic.

Layout (see te_ops_int8): the input is quantised to uint8 and stored as channel *quads*, xq[N, P, 4] with
P = Cq4 * channel_plane flat positions of the padded, phase-split input (formats.ConvGeometry), the 4
channels 4c..4c+3 of one position forming one 32-bit word. A weight row k stores, per nonzero quad
(channels 4c..4c+3 at one tap (r, s)), 4 int8 weights and one offset into that flat domain, so one
`vpdpbusd` multiplies a broadcast weight quad by 16 (or 8) consecutive output positions' input quads.
A quad is stored when any of its 4 weights is nonzero: `prune --method channel4` makes quads whole.

Arithmetic, per output (n, k, y, x):
    u   = clamp(round_half_even(x * inv_scale) + zp, 0, qmax)      uint8, padding holds zp (the value 0)
    acc = sum over stored quads of u * w                              int32, exact
    y   = float32(acc - comp[k]) * wscale[k] (+ bias[k]) (+ residual) (ReLU)
where comp[k] = zp * sum(w[k]) removes the zero point and wscale[k] = scale * weight_scale[k].
qmax is 255 where the CPU has VNNI; 127 elsewhere, because AVX2's `vpmaddubsw` adds two u8 x s8
products into a saturating int16 and 2 * 127 * 127 fits where 2 * 255 * 127 does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .formats import offsets_with_lengths
from .geometry import ConvGeometry

QUAD = 4
# A float32 in [2^23, 2^24) has a unit of 1 in its last place, so y + ROUNDING_BIAS (|y| < 2^22) is y rounded to an
# integer, half to even (IEEE's default rounding, as nearbyint and torch.round: the bias is even), and the float's
# bits are the bias's plus that integer; the bias's low byte is 0, so the requantisation reads the result's low
# byte (sparse_int8.quantize). 1.5 * 2^23 - 512, a multiple of 256 in 6 digits: TVM's OpenCL code prints float
# constants to 7 significant digits, and printed so 1.5 * 2^23 itself came back as 12582910
ROUNDING_BIAS = 12582400.0


@dataclass(frozen=True)
class ActQuant:
    """Static per-tensor quantisation of one activation: u = clamp(round(x * inv_scale) + zp, 0, qmax)."""

    scale: float
    zero_point: int
    qmax: int
    # how the kernels compute it, not what it is (the bytes are the same): the target rounds a float to int32 half
    # to even and narrows int32 to uint8 saturating, an instruction each (AVX-512: vcvtps2dq, vpmovusdb), so a zero
    # point of 0 quantises in 3 vector ops instead of 4 (sparse_int8.quantize)
    saturating: bool = False
    # x86 without VNNI (AVX2 code): a float rounds to int32 half to even in one instruction (vcvtps2dq) and int32
    # narrows to uint8 by saturating packs, which clamp at 0 for free: a zero point of 0 quantises in 2 vector ops
    # instead of 5 (sparse_int8._packed)
    packs: bool = False

    @property
    def inv_scale(self) -> float:
        return float(np.float32(1.0) / np.float32(self.scale))

    @staticmethod
    def from_range(lo: float, hi: float, qmax: int = 255, saturating: bool = False,
                   packs: bool = False) -> "ActQuant":
        """Unsigned (zp 0) when the calibrated range is non-negative (after a ReLU), else symmetric around
        zp = (qmax + 1) / 2 (the u8/s8 trick: the shift is folded into comp)."""
        if lo >= 0.0:
            return ActQuant(float(hi) / qmax if hi > 0 else 1.0, 0, qmax, saturating, packs)
        zp = (qmax + 1) // 2
        amax = max(abs(float(lo)), abs(float(hi)))
        return ActQuant(amax / (qmax - zp) if amax > 0 else 1.0, zp, qmax, saturating, packs)


def quantize_weight(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 weight, per-output-channel scale [K] float32): symmetric, +-127; a nonzero weight stays
    nonzero (the sparsity pattern holds), an int8-quantised .pt2 comes back exactly."""
    k = weight.shape[0]
    w = weight.reshape(k, -1).astype(np.float32)
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127)
    q = np.where((q == 0) & (w != 0), np.sign(w), q)
    return q.astype(np.int8).reshape(weight.shape), scale


@dataclass
class QuadRows:
    """ELL rows of weight quads: data[K, L, 4] int8, off[K, L] int32 into the quad domain xq[N, P, 4]."""

    data: np.ndarray
    off: np.ndarray
    quads: int          # stored (nonzero) quads, padding excluded
    nnz: int            # nonzero weights
    pad_quads: int      # Cq4: channel quads of the flat input (trailing ones keep extended reads in bounds)

    @property
    def padded_size(self) -> int:
        return int(self.data.shape[0] * self.data.shape[1] * QUAD)

    def off_with_lengths(self) -> np.ndarray:
        """formats.offsets_with_lengths of these rows: each row's stored quads in the last column."""
        return offsets_with_lengths(self.data, self.off)


def record_int8(decision, rows: QuadRows, *consts: np.ndarray, off: np.ndarray | None = None) -> None:
    """An int8 layer's stored precision and bytes for its LayerDecision (inspect and bench show them): the
    weight quads, their offsets (`off` as stored: uint16 where they fit, else rows.off's int32), and the
    per-channel compensation and output scales."""
    off = rows.off if off is None else off
    decision.precision = f"int8/{off.dtype.itemsize * 8}-bit off"
    decision.weight_bytes = int(sum(a.nbytes for a in (rows.data, off, *consts)))


def quad_channels(c: int) -> int:
    return -(-c // QUAD)


def pad_quads(geo: ConvGeometry) -> int:
    """Channel quads of the flat input: every stored offset + q_extent - 1 stays inside it (patches: exactly)."""
    if geo.patches:
        return quad_channels(geo.c)
    taps = [geo.tap_offset(0, r, s) for r in range(geo.r) for s in range(geo.s)]
    reach = (geo.oh - 1) * geo.wq + geo.ow if geo.row_domain else geo.q_extent  # a row domain: its last row's end
    last = (quad_channels(geo.c) - 1) * geo.channel_plane + max(taps) + reach - 1
    return max(quad_channels(geo.c), last // geo.channel_plane + 1)


def conv_quad_rows(wq: np.ndarray, geo: ConvGeometry) -> QuadRows:
    """Pack an int8 OIHW weight into quad rows (quads whose 4 weights are all zero are skipped)."""
    k, c, r, s = wq.shape
    cq = quad_channels(c)
    wp = np.zeros((k, cq * QUAD, r, s), np.int8)
    wp[:, :c] = wq
    quads = wp.reshape(k, cq, QUAD, r, s).transpose(0, 1, 3, 4, 2).reshape(k, cq * r * s, QUAD)  # [K, Cq*R*S, 4]
    ci, ri, si = np.meshgrid(np.arange(cq), np.arange(r), np.arange(s), indexing="ij")
    offsets = geo.tap_offset(ci, ri, si).reshape(-1).astype(np.int32)  # channel quad ci as a channel
    data, off, stored = _ell_quads(quads, offsets)
    return QuadRows(data, off, stored, int((wq != 0).sum()), pad_quads(geo))


def _ell_quads(quads: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """ELL rows of the nonzero quads: data [K, L, 4] int8 and off [K, L] int32 (offsets[i] of quad i),
    L the most quads in a row (at least 1); padding is zero quads at offset 0. Also the stored quads."""
    keep = (quads != 0).any(axis=2)                                                               # [K, quads]
    width = max(int(keep.sum(axis=1).max(initial=0)), 1)
    data = np.zeros((quads.shape[0], width, QUAD), np.int8)
    off = np.zeros((quads.shape[0], width), np.int32)
    for row in range(quads.shape[0]):
        idx = np.flatnonzero(keep[row])
        data[row, : len(idx)] = quads[row, idx]
        off[row, : len(idx)] = offsets[idx]
    return data, off, int(keep.sum())


def epilogue_consts(wq: np.ndarray, wscale: np.ndarray, act: ActQuant) -> tuple[np.ndarray, np.ndarray]:
    """(comp[K] int32 = zp * row sum of w, out_scale[K] float32 = act.scale * wscale[k])."""
    rowsum = wq.reshape(wq.shape[0], -1).astype(np.int64).sum(axis=1)
    comp = (act.zero_point * rowsum).astype(np.int32)
    out_scale = (np.float32(act.scale) * wscale.astype(np.float32)).astype(np.float32)
    return comp, out_scale


def torch_quantize(x, act: ActQuant):
    """The uint8 values the compiled module computes for x (as a float tensor of integers)."""
    import torch

    return torch.clamp(torch.round(x * np.float32(act.inv_scale)) + act.zero_point, 0, act.qmax)


def torch_reference(x, wq: np.ndarray, wscale: np.ndarray, act: ActQuant, bias=None, residual=None,
                    relu: bool = False, stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1)):
    """PyTorch reference of the same integer arithmetic: u8 x s8 -> exact integer sums (float64 conv of
    integers below 2^53), then the same float32 epilogue."""
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(x, dtype=torch.float32)
    u = torch_quantize(x, act) - act.zero_point                       # padding (zeros) is u == zp
    t, l, b, r = padding
    u = F.pad(u.double(), (l, r, t, b))
    acc = F.conv2d(u, torch.as_tensor(wq, dtype=torch.float64), stride=stride, dilation=dilation)
    _, out_scale = epilogue_consts(wq, wscale, act)
    y = acc.float() * torch.as_tensor(out_scale).view(1, -1, 1, 1)
    if bias is not None:
        y = y + torch.as_tensor(bias, dtype=torch.float32).view(1, -1, 1, 1)
    if residual is not None:
        y = y + torch.as_tensor(residual, dtype=torch.float32)
    return torch.relu(y) if relu else y


def dense_quad_rows(wq: np.ndarray) -> QuadRows:
    """Pack an int8 [out, in] linear weight into quad rows; offsets are quad numbers (input features 4i..4i+3)."""
    o, fin = wq.shape
    iq = quad_channels(fin)
    wp = np.zeros((o, iq * QUAD), np.int8)
    wp[:, :fin] = wq
    data, off, stored = _ell_quads(wp.reshape(o, iq, QUAD), np.arange(iq, dtype=np.int32))
    return QuadRows(data, off, stored, int((wq != 0).sum()), iq)


def torch_linear_reference(x, wq: np.ndarray, wscale: np.ndarray, act: ActQuant, bias=None, relu: bool = False):
    """PyTorch reference of the int8 linear layer's arithmetic (as torch_reference for conv2d)."""
    import torch

    x = torch.as_tensor(x, dtype=torch.float32)
    u = (torch_quantize(x, act) - act.zero_point).double()
    acc = u @ torch.as_tensor(wq, dtype=torch.float64).T
    _, out_scale = epilogue_consts(wq, wscale, act)
    y = acc.float() * torch.as_tensor(out_scale)
    if bias is not None:
        y = y + torch.as_tensor(bias, dtype=torch.float32)
    return torch.relu(y) if relu else y
