"""What the compiler does to weights, without TVM, and the measures every check shares: the one definition
of each, used by the project and shipped to the GPU kit (benchmarks/gpu_kit_build/scaffold.py copies this
file, with the modules it imports, into the kit's `kitlib/` package for a machine without TVM or this
project).

- usable_cores(): the cores this process may run on (what "cores" means everywhere)
- rel_error(out, ref): max |out - ref| / max |ref| (inf where either has a NaN or an infinity)
- magnitude_prune(module, sparsity): layer-wise L1 magnitude pruning, as `unsparse-tvm prune --sparsity`
- fold_batchnorm(...) / folded_weights(layer, bn): an inference batch norm folded into the conv before it,
  as the FoldBatchNormIntoConv pass does
- operand_arrays(rows) / pack_layer(...): the sparse operands a kernel takes (data, off [, ovf_data,
  ovf_off, ovf_slot]), as the sparsify passes pass them

Imports: only `.ops.formats` (numpy) from the project; numpy and torch where a function needs them, so
that `import unsparse_tvm` (which sizes TVM's thread pool with usable_cores) stays light.
"""

from __future__ import annotations

import math
import os


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def rel_error(out, ref) -> float:
    """max |out - ref| / max |ref| (floor 1e-12), in float64; inf where either holds a NaN or an infinity (a
    broken kernel must not pass a `<=` check). Two torch tensors are compared where they are (a GPU's
    output is not copied to the host); anything else as numpy arrays."""
    if hasattr(out, "detach") and hasattr(ref, "detach"):
        a, b = out.detach().double(), ref.detach().double()
        if a.numel() == 0:
            return 0.0
        if not bool(a.isfinite().all()) or not bool(b.isfinite().all()):
            return math.inf
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
    import numpy as np

    a, b = (np.asarray(v.detach().cpu() if hasattr(v, "detach") else v, np.float64) for v in (out, ref))
    if not np.isfinite(a).all() or not np.isfinite(b).all():
        return math.inf
    return float(np.abs(a - b).max(initial=0.0) / max(np.abs(b).max(initial=0.0), 1e-12))


# ------------------------------------------------------------------------------------------- pruning

def prunable_layers(module) -> list[tuple[str, object, str]]:
    """(qualified name, owning module, "weight") of every nn.Conv2d / nn.Linear of `module`, in order."""
    import torch.nn as nn

    return [(f"{name}.weight", m, "weight") for name, m in module.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))]


def magnitude_prune(module, sparsity: float, layers: list | None = None):
    """One-shot layer-wise L1 magnitude pruning of every conv/linear weight (or of the given (name, owner,
    parameter name) `layers`) to `sparsity`, in place: torch.nn.utils.prune.l1_unstructured per layer,
    made permanent. No checks (compress.masks.magnitude_prune checks its arguments, then calls this)."""
    import torch.nn.utils.prune as tprune

    for _, owner, pname in prunable_layers(module) if layers is None else layers:
        tprune.l1_unstructured(owner, pname, amount=float(sparsity))
        tprune.remove(owner, pname)  # permanent: the zeros are now in the weight itself
    return module


# ---------------------------------------------------------------------------------------- batch norm

def fold_batchnorm(weight, bias, gamma, beta, mean, var, eps: float):
    """(weight', bias') of conv2d(weight [K, C, R, S]) [+ bias [K]] -> batch_norm(gamma, beta, mean, var, eps):
    scale = gamma / sqrt(var + eps), weight' = weight * scale per output channel (the weight's dtype: pruned
    zeros stay zero), bias' = (bias - mean) * scale + beta (float32, [K]; bias None counts as zeros)."""
    import numpy as np

    k = weight.shape[0]
    scale = gamma / np.sqrt(var + float(eps))                                # [K]
    new_w = (weight * scale.reshape(k, 1, 1, 1)).astype(weight.dtype)
    b = np.zeros(k, np.float32) if bias is None else np.asarray(bias).reshape(k)
    new_b = ((b - mean) * scale + beta).astype(np.float32)
    return new_w, new_b


def folded_weights(layer, bn=None):
    """(weight, bias or None) of a torch conv/linear module as float32 numpy, with the BatchNorm2d `bn` that
    follows it (eval mode: its running statistics) folded in as the compiler folds it."""
    import numpy as np

    w = layer.weight.detach().numpy().astype(np.float32)
    b = layer.bias.detach().numpy().astype(np.float32) if layer.bias is not None else None
    if bn is None:
        return w, b
    k = w.shape[0]
    gamma = bn.weight.detach().numpy() if bn.weight is not None else np.ones(k, np.float32)
    beta = bn.bias.detach().numpy() if bn.bias is not None else np.zeros(k, np.float32)
    return fold_batchnorm(w, b, gamma, beta, bn.running_mean.detach().numpy(), bn.running_var.detach().numpy(),
                          float(bn.eps))


# ------------------------------------------------------------------------------------------- packing

def operand_arrays(rows) -> dict:
    """The arrays a sparse kernel takes for a formats.SparseRows, in its argument order: data, off [,
    ovf_data, ovf_off, ovf_slot] (hyb), offsets stored as uint16 where they fit (formats.compact_offsets)."""
    from .ops.formats import compact_offsets

    arrays = {"data": rows.data, "off": compact_offsets(rows.off)}
    if rows.fmt == "hyb":
        arrays.update(ovf_data=rows.ovf_data, ovf_off=compact_offsets(rows.ovf_off), ovf_slot=rows.ovf_slot)
    return arrays


def conv_geometry(input_shape, weight_shape, attrs: dict):
    """formats.ConvGeometry of an NCHW conv2d: input [N, C, H, W], weight [K, C, R, S] and the layer's
    attrs (strides, padding (top, left, bottom, right), dilation), as single_layer.LayerSpec holds them."""
    from .ops.geometry import ConvGeometry

    n, c, h, w = input_shape
    k, _, r, s = weight_shape
    return ConvGeometry(n, c, h, w, k, r, s, tuple(attrs["strides"]), tuple(attrs["padding"]),
                        tuple(attrs["dilation"]))


def pack_layer(op: str, weight, input_shape, attrs: dict | None = None, target_kind: str = "cuda"):
    """(format, operand arrays) of one conv2d / dense layer's weight as the compiler packs it for
    `target_kind` when the format is left to it (ell or hyb, hyb where it saves HYB_MIN_SAVING[target_kind])."""
    from .ops.formats import HYB_MIN_SAVING, conv_weight_rows, dense_weight_rows

    saving = HYB_MIN_SAVING[target_kind]
    if op == "conv2d":
        rows = conv_weight_rows(weight, conv_geometry(input_shape, weight.shape, attrs), None, saving)
    else:
        rows = dense_weight_rows(weight, None, saving)
    return rows.fmt, operand_arrays(rows)
