"""Weight quantisation of conv/linear weights, keeping the sparsity pattern exactly.

Schemes: `intB` (B = 2..8; int8 and int4 are the usual ones) linear symmetric per output channel;
`kmeansB` (B = 2..8) a per-layer codebook of at most 2^B values found by k-means (Han et al., 2016);
`pow2` signed powers of two times a per-layer scale (sign + 3-bit exponent: +-scale * 2^e, e = -7..0).
Only nonzero weights are quantised and no weight changes between zero and nonzero, so a pruned model keeps
its pattern for the sparse kernels. The model stays an ordinary float model (weights hold the dequantised
values); the scheme, scales or codebooks travel in the .pt2 as `unsparse_quant.json` (see `read_quantization`).
Optional fine-tuning uses a straight-through estimator: the forward pass sees quantised weights, gradients
update the float weights.
"""

from __future__ import annotations

import re
import time

import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize

from ..errors import UnsparseError
from ..frontend import eval_mode, load_model, save_model
from ..outputs import check_output
from .calibrate import RANDOM, calibrate, calibration_batches
from .data import load_dataset
from .masks import prunable_parameters
from .report import check_report_path, weight_report, write_report
from .train import compute_threads, evaluated_around, train, untrained_hint


SCHEME_HELP = "int8, int4 (any intB, B=2..8: linear per output channel), kmeansB (B=2..8, e.g. kmeans4), pow2"


POW2_BITS = 4


KMEANS_SAMPLES = 50_000  # k-means is fitted on at most this many weights, then every weight is assigned


def parse_scheme(scheme: str) -> tuple[str, int]:
    """('linear' | 'kmeans' | 'pow2', bits); UnsparseError for an unknown scheme or bits outside 2..8."""
    if scheme == "pow2":
        return "pow2", POW2_BITS
    m = re.fullmatch(r"(int|kmeans)(\d+)", scheme)
    if not m:
        raise UnsparseError(f"unknown quantisation scheme '{scheme}': use {SCHEME_HELP}")
    bits = int(m.group(2))
    if not 2 <= bits <= 8:
        raise UnsparseError(f"{scheme}: bits must be between 2 and 8, got {bits}")
    return ("linear" if m.group(1) == "int" else "kmeans"), bits


def linear_quantize(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dequantised weight, per-output-channel scales [O]): w ~ q * scale, q in [-(2^(B-1)-1), 2^(B-1)-1]."""
    qmax = 2 ** (bits - 1) - 1
    amax = w.detach().abs().reshape(w.shape[0], -1).amax(1)                   # [O]
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))         # [O]; empty channel: any scale
    s = scale.view(-1, *([1] * (w.dim() - 1)))                                 # [O,1,1,1]
    q = torch.clamp(torch.round(w / s), -qmax, qmax)
    q = torch.where((q == 0) & (w != 0), torch.sign(w), q)  # a kept weight stays nonzero: the pattern holds
    return q * s, scale


def pow2_quantize(w: torch.Tensor, bits: int = POW2_BITS) -> tuple[torch.Tensor, float, int]:
    """(dequantised weight, scale, min exponent): nonzero w -> sign(w) * scale * 2^e, e in [min exponent, 0]."""
    emin = -(2 ** (bits - 1) - 1)
    scale = float(w.detach().abs().max()) or 1.0
    r = (w.abs() / scale).clamp_min(2.0 ** (emin - 1))                          # magnitudes in (0, 1]
    lo = torch.floor(torch.log2(r))                                            # 2^lo <= r < 2^(lo+1)
    e = torch.where(r - 2.0 ** lo < 2.0 ** (lo + 1) - r, lo, lo + 1)           # nearest in the linear domain
    e = e.clamp(emin, 0)
    wq = torch.sign(w) * torch.exp2(e) * torch.tensor(scale, dtype=w.dtype)    # exact: scale times 2^e
    return torch.where(w != 0, wq, torch.zeros_like(w)), scale, emin


def fit_codebook(w: torch.Tensor, bits: int, seed: int = 0) -> torch.Tensor:
    """At most 2^bits sorted values from 1-D k-means over the nonzero weights (linear initialisation)."""
    from sklearn.cluster import KMeans  # deferred: scikit-learn, for kmeans schemes only

    values = w.detach().flatten()
    values = values[values != 0].double()
    uniq = torch.unique(values)
    k = min(2**bits, len(uniq))
    if len(uniq) <= k:
        return uniq.float()
    if len(values) > KMEANS_SAMPLES:
        gen = torch.Generator().manual_seed(seed)
        values = values[torch.randperm(len(values), generator=gen)[:KMEANS_SAMPLES]]
    init = torch.linspace(float(values.min()), float(values.max()), k).reshape(-1, 1).numpy()  # [k,1]
    km = KMeans(n_clusters=k, init=init, n_init=1, max_iter=300, random_state=seed)
    km.fit(values.reshape(-1, 1).numpy())
    return torch.unique(torch.from_numpy(km.cluster_centers_[:, 0]).float())  # sorted, no duplicates


def codebook_quantize(w: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Each nonzero weight replaced by its nearest codebook value; zeros stay zero."""
    if codebook.numel() == 0:  # an all-zero layer has no codebook
        return torch.zeros_like(w)
    mids = (codebook[1:] + codebook[:-1]) / 2                                   # [k-1] decision boundaries
    idx = torch.bucketize(w.detach(), mids)                                     # shape of w
    return torch.where(w != 0, codebook[idx].to(w.dtype), torch.zeros_like(w))


class _Quantizer:
    """One layer's quantiser for a scheme; k-means keeps its codebook until `refit`."""

    def __init__(self, kind: str, bits: int, seed: int = 0):
        self.kind, self.bits, self.seed = kind, bits, seed
        self.codebook: torch.Tensor | None = None

    def refit(self, w: torch.Tensor) -> None:
        if self.kind == "kmeans":
            self.codebook = fit_codebook(w, self.bits, self.seed)

    def __call__(self, w: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(dequantised weight, the layer's JSON entry)."""
        if self.kind == "linear":
            wq, scale = linear_quantize(w, self.bits)
            return wq, {"kind": "linear", "bits": self.bits, "axis": 0, "scales": scale.tolist()}
        if self.kind == "pow2":
            wq, scale, emin = pow2_quantize(w, self.bits)
            return wq, {"kind": "pow2", "bits": self.bits, "scale": scale, "min_exponent": emin, "max_exponent": 0}
        if self.codebook is None:
            self.refit(w)
        return codebook_quantize(w, self.codebook), {"kind": "kmeans", "bits": self.bits,
                                                     "codebook": self.codebook.tolist()}

    def values(self, w: torch.Tensor) -> torch.Tensor:
        """Dequantised weight only (the per-step path of fine-tuning: no JSON)."""
        if self.kind == "linear":
            return linear_quantize(w, self.bits)[0]
        if self.kind == "pow2":
            return pow2_quantize(w, self.bits)[0]
        return codebook_quantize(w, self.codebook)


class _StraightThrough(nn.Module):
    """Parametrisation: forward sees mask * Q(w); the gradient passes to w as if Q were the identity."""

    def __init__(self, quantizer: _Quantizer, mask: torch.Tensor):
        super().__init__()
        self.quantizer = quantizer
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        kept = w * self.mask  # pruned weights stay zero and get no gradient
        return kept + (self.quantizer.values(kept) - kept).detach()


def quantize_model(module: nn.Module, scheme: str, data=None, epochs: int = 0, lr: float = 1e-4,
                   batch_size: int = 64, seed: int = 0, ep: torch.export.ExportedProgram | None = None) -> dict:
    """Quantise every conv/linear weight of `module` in place; returns the `unsparse_quant.json` content.

    With `epochs` > 0 (needs `data`), fine-tunes with a straight-through estimator first; k-means codebooks
    are refitted at the start of each epoch and the last ones are used for the final weights.
    """

    kind, bits = parse_scheme(scheme)
    if epochs < 0:
        raise UnsparseError(f"epochs must be >= 0, got {epochs}")
    if epochs and data is None:
        raise UnsparseError("--epochs needs a data set (--dataset digits or cifar10:PATH)")
    layers = prunable_parameters(module, ep)
    if not layers:
        raise UnsparseError("the model has no conv2d or linear layer to quantise")
    quantizers = {fqn: _Quantizer(kind, bits, seed) for fqn, _, _ in layers}
    if epochs:
        for fqn, owner, pname in layers:
            w = getattr(owner, pname).detach()
            quantizers[fqn].refit(w)  # registering already runs the forward once
            parametrize.register_parametrization(owner, pname, _StraightThrough(quantizers[fqn], (w != 0).to(w.dtype)))

        def on_epoch(_: int) -> None:
            for fqn, owner, pname in layers:
                latent = owner.parametrizations[pname].original.detach()
                quantizers[fqn].refit(latent * owner.parametrizations[pname][0].mask)

        try:
            train(module, data, epochs, lr=lr, batch_size=batch_size, seed=seed, on_epoch=on_epoch, desc=f"quantize {scheme}")
        finally:
            masks = {}
            for fqn, owner, pname in layers:
                masks[fqn] = owner.parametrizations[pname][0].mask
                parametrize.remove_parametrizations(owner, pname, leave_parametrized=False)  # back to the latent
        with torch.no_grad():
            for fqn, owner, pname in layers:
                getattr(owner, pname).mul_(masks[fqn])
    entries = {}
    with torch.no_grad():
        for fqn, owner, pname in layers:
            param = getattr(owner, pname)
            wq, entries[fqn] = quantizers[fqn](param.detach())
            param.copy_(wq)
    eval_mode(module)
    return {"format": "unsparse-quant", "version": 1, "scheme": scheme, "kind": kind, "bits": bits,
            "zeros_preserved": True, "layers": entries}


def quantize_command(model: str, scheme: str, output: str, dataset: str | None = None, epochs: int = 0,
                     lr: float = 1e-4, batch_size: int = 64, weights: str | None = None, batch: int | None = None,
                     report: str | None = None, overwrite: bool = False, seed: int = 0, log=print,
                     activations: str | None = None) -> dict:
    """Load, (evaluate,) quantise, (evaluate,) export to `output` with its quantisation; returns the report.
    activations "int8": also calibrate the input range of every layer (compress.calibrate) on a few
    batches of `dataset` ("random": seeded normal inputs), for int8 execution by `compile`."""
    start = time.perf_counter()
    parse_scheme(scheme)
    if activations not in (None, "int8"):
        raise UnsparseError(f"unknown activation quantisation '{activations}': use int8")
    if activations and not dataset:
        raise UnsparseError("--activations int8 needs --dataset to calibrate on (digits, cifar10:PATH, or random)")
    random_calibration = dataset == RANDOM
    if random_calibration:
        if epochs:
            raise UnsparseError("--dataset random is for calibration only: it cannot fine-tune (--epochs 0)")
        dataset = None
    check_output(output, overwrite=overwrite, suffixes=(".pt2",), inputs=(model, weights))
    check_report_path(report, overwrite)
    if epochs and not dataset:
        raise UnsparseError("--epochs needs a data set (--dataset digits or cifar10:PATH)")
    if epochs < 0 or lr <= 0 or batch_size < 1:
        raise UnsparseError("epochs must be >= 0, the learning rate > 0 and the batch size >= 1")
    loaded = load_model(model, weights, batch)
    if epochs and not loaded.trainable:
        raise UnsparseError(f"{model} was not written by unsparse-tvm, so it cannot be fine-tuned: use --epochs 0")
    data = load_dataset(dataset) if dataset else None  # the split is fixed: --seed must not leak test samples
    with compute_threads(loaded.module):  # only idle cores: see compute_threads
        def run() -> dict:
            quant = quantize_model(loaded.module, scheme, data, epochs, lr, batch_size, seed, loaded.ep)
            if activations:  # on the quantised weights, as the compiled module will run them
                batches = calibration_batches(loaded.input_shape, data, seed=seed)
                quant["activations"] = calibrate(loaded.module, batches, loaded.ep)
                quant["activations"]["dataset"] = data.name if data else RANDOM
            return quant

        quant, acc_before, acc_after = evaluated_around(loaded, data, model, run, log)
        loaded.meta["quantization"] = {"scheme": scheme, "epochs": epochs}
        save_model(loaded, output, overwrite, quant=quant)
        result = {
            "command": "quantize", "model": model, "output": output, "scheme": scheme, "epochs": epochs,
            "activations": activations,
            "dataset": data.name if data else None,
            "accuracy_before": acc_before, "accuracy_after": acc_after, "untrained_hint": untrained_hint(loaded, data),
            **weight_report(loaded.module, loaded.ep, quant),
            "seconds": round(time.perf_counter() - start, 2),
        }
    write_report(result, report)
    return result
