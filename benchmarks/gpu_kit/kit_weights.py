"""Weights without shipping them: the seeded built-in models regenerated, pruned, folded and packed
exactly as the compiler does (by the kit's copies of unsparse_tvm's models.py and reference.py, in
kitlib/), fingerprints to check that they fit what was built, and the references a kernel is checked
against (PyTorch, and a numpy model of the packed arrays for dry runs)."""

from __future__ import annotations

import hashlib

import numpy as np

from kitlib import reference  # the kit's copy of unsparse_tvm/reference.py (KIT is on sys.path)


def regen_model(model: str, sparsity: float, seed: int = 0):
    """The built-in model with its seeded weights, every conv/linear weight magnitude-pruned to `sparsity`
    (as `unsparse-tvm prune`), on the CPU, in eval mode."""
    from kitlib import models

    net = models.build_model(model, seed)
    if sparsity:
        reference.magnitude_prune(net, sparsity)
    return net.eval()


def folded_layer(net, entry: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """(weight, bias) of one layer as the compiler sees it: batch norm folded in (as FoldBatchNormIntoConv)."""
    mods = dict(net.named_modules())
    return reference.folded_weights(mods[entry["module"]], mods[entry["bn"]] if entry.get("bn") else None)


def geometry(layer: dict, batch: int):
    return reference.conv_geometry([batch, *layer["input_shape"][1:]], layer["weight_shape"], layer["attrs"])


def pack_layer(layer: dict, w: np.ndarray, b: np.ndarray | None, batch: int) -> dict:
    """The sparse operands of one layer's kernel, as the compiler packs them for CUDA."""
    fmt, arrays = reference.pack_layer(layer["op"], w, [batch, *layer["input_shape"][1:]], layer.get("attrs"))
    if b is not None:
        arrays["bias"] = b
    return {"fmt": fmt, "arrays": arrays}


def structure_hash(arrays: dict) -> str:
    """Hash of the index arrays (offsets, overflow slots): the sparsity structure a kernel was built for."""
    h = hashlib.sha1()
    for key in ("off", "ovf_off", "ovf_slot"):
        if key in arrays:
            a = np.ascontiguousarray(arrays[key])
            h.update(key.encode() + str(a.shape).encode() + a.tobytes())
    return h.hexdigest()


def model_param_candidates(manifest_model: dict, net, batch: int, needed: set | None = None,
                           packed: bool = True) -> dict:
    """The arrays a whole-model module's lifted parameters are made of, by (layer, role): all of them, or
    only the `needed` (layer, role) keys; packed=False leaves out the sparse formats (dense models)."""
    out = {}
    for i, layer in enumerate(manifest_model["layers"]):
        roles = None if needed is None else {r for (li, r) in needed if li == i}
        if roles is not None and not roles:
            continue
        w, b = folded_layer(net, layer)
        out[(i, "weight")] = w
        if layer["op"] == "dense":
            out[(i, "weight_t")] = np.ascontiguousarray(w.T)
        if b is not None:
            out[(i, "bias")] = b
            out[(i, "bias4")] = b.reshape(1, -1, 1, 1)
        want_packed = packed if roles is None else bool(roles - {"weight", "weight_t", "bias", "bias4"})
        if want_packed:
            for role, arr in pack_layer(layer, w, b, batch)["arrays"].items():
                if role != "bias":
                    out[(i, role)] = arr
    return out


def fingerprint(a: np.ndarray) -> dict:
    a = np.asarray(a)
    fp = {"shape": list(a.shape), "dtype": str(a.dtype)}
    if a.dtype.kind in "iu":
        fp["sha1"] = hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()
    else:
        fp["sum"] = float(a.astype(np.float64).sum())
        fp["abs_sum"] = float(np.abs(a.astype(np.float64)).sum())
    return fp


def fingerprint_ok(a: np.ndarray, fp: dict) -> bool:
    a = np.asarray(a)
    if list(a.shape) != fp["shape"] or str(a.dtype) != fp["dtype"]:
        return False
    if "sha1" in fp:
        return hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest() == fp["sha1"]
    s, t = float(a.astype(np.float64).sum()), float(np.abs(a.astype(np.float64)).sum())
    return abs(t - fp["abs_sum"]) <= 1e-5 * max(fp["abs_sum"], 1e-12) and abs(s - fp["sum"]) <= 1e-5 * max(t, 1e-12)


def torch_layer_fn(layer: dict, w, b, dtype=None, channels_last: bool = False):
    """The layer in PyTorch (dense weights): conv2d / linear [+ bias] [+ ReLU]."""
    import torch.nn.functional as F

    relu, a = layer["relu"], layer.get("attrs", {})

    def run(x):
        if layer["op"] == "conv2d":
            t, l, bt, r = a["padding"]
            pad = (t, l)
            if (t, l) != (bt, r):
                x = F.pad(x, (l, r, t, bt))
                pad = (0, 0)
            y = F.conv2d(x, w, b, a["strides"], pad, a["dilation"], a.get("groups", 1))
        else:
            y = F.linear(x, w, b)
        return F.relu(y) if relu else y

    return run


def emulate_sparse(layer: dict, packed: dict, x: np.ndarray, batch: int) -> np.ndarray:
    """numpy model of what the kernel computes from the packed arrays (dry run: checks packing + geometry)."""
    arr = dict(packed["arrays"])
    if arr["data"].ndim == 3:  # grouped rows (vellV): data [G, L, V], off [G, L] -> V rows per group
        g, l, v = arr["data"].shape
        arr["data"] = arr["data"].transpose(0, 2, 1).reshape(g * v, l)
        arr["off"] = np.repeat(arr["off"], v, axis=0)

    def rows_sum(data, off, flat, q_extent):
        out = np.zeros((flat.shape[0], data.shape[0], q_extent), np.float64)
        for j in range(data.shape[1]):
            idx = off[:, j][:, None] + np.arange(q_extent)[None, :]
            out += data[:, j][None, :, None] * flat[:, idx]
        return out

    if layer["op"] == "conv2d":
        geo = geometry(layer, batch)
        (sh, sw), (pt, pl, _, _) = geo.stride, geo.padding
        xp = np.zeros((geo.n, geo.pad_channels, geo.hq * sh, geo.wq * sw), np.float64)
        xp[:, : geo.c, pt: pt + geo.h, pl: pl + geo.w] = x
        # phases: padded pixel (h, w) -> phase (h % sh, w % sw), position (h // sh, w // sw)
        ph = xp.reshape(geo.n, geo.pad_channels, geo.hq, sh, geo.wq, sw).transpose(0, 1, 3, 5, 2, 4)
        flat = np.ascontiguousarray(ph).reshape(geo.n, -1)
        acc = rows_sum(arr["data"], arr["off"], flat, geo.q_extent)
        if "ovf_data" in arr:
            extra = rows_sum(arr["ovf_data"], arr["ovf_off"], flat, geo.q_extent)
            slot = arr["ovf_slot"]
            acc += np.where(slot[None, :, None] >= 0, extra[:, np.maximum(slot, 0)], 0.0)
        y = acc[:, :, : geo.oh * geo.wq].reshape(geo.n, geo.k, geo.oh, geo.wq)[:, :, :, : geo.ow]
        bshape = (1, -1, 1, 1)
    else:
        def dense_rows(data, off):
            return np.einsum("kj,nkj->nk", data.astype(np.float64), x.astype(np.float64)[:, off])
        y = dense_rows(arr["data"], arr["off"])
        if "ovf_data" in arr:
            extra = dense_rows(arr["ovf_data"], arr["ovf_off"])
            slot = arr["ovf_slot"]
            y = y + np.where(slot[None, :] >= 0, extra[:, np.maximum(slot, 0)], 0.0)
        bshape = (1, -1)
    if "bias" in arr:
        y = y + arr["bias"].reshape(bshape)
    if layer["relu"]:
        y = np.maximum(y, 0)
    return y.astype(np.float32)
