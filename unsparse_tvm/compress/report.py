"""What a .pt2 holds: per-layer shape, sparsity, sparsity pattern (detected from the weights), quantisation,
and the weight footprint of dense and sparse storage. `describe_program` backs `unsparse-tvm inspect`;
`weight_report` the layer tables of the prune/quantize reports.
"""

from __future__ import annotations

import json
import math

import torch
import torch.nn as nn

from ..errors import UnsparseError
from ..frontend import dynamic_dims, load_pt2, program_input_shape, read_model_meta, read_quantization
from ..outputs import check_output, write_text
from .masks import prunable_parameters


PATTERN_BLOCKS = (32, 16, 8, 4, 2)


PATTERN_VECTORS = (8, 4, 2)


def _tiles(mat: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(nonzeros per tile, elements per tile) for rows x cols tiles of a [O,K] matrix (edge tiles partial)."""
    o, k = mat.shape
    gr, gc = math.ceil(o / rows), math.ceil(k / cols)
    nz = torch.zeros(gr * rows, gc * cols)
    nz[:o, :k] = (mat != 0).float()
    inside = torch.zeros_like(nz)
    inside[:o, :k] = 1
    fold = lambda t: t.reshape(gr, rows, gc, cols).sum((1, 3))  # [gr,gc]
    return fold(nz), fold(inside)


def _whole(mat: torch.Tensor, rows: int, cols: int) -> bool:
    """Every tile all zero or all nonzero, and at least one tile zero."""
    nz, size = _tiles(mat, rows, cols)
    return bool(((nz == 0) | (nz == size)).all()) and bool((nz == 0).any())


def _zero_tile_fraction(mat: torch.Tensor, b: int) -> float:
    nz, size = _tiles(mat, b, b)
    full = size == b * b  # partial edge tiles would skew the count
    return float(((nz == 0) & full).sum()) / max(1, int(full.sum()))


def _mixed_block(mat: torch.Tensor, v: int, s: float) -> int | None:
    """Block size of a coarse block mask on top of a vector-v pattern, or None.

    A block mask of size B zeroes a fraction z of the B x B tiles; tiles of 2B are then zero only about z^4
    of the time, tiles of B/2 at least z. So B is the largest size whose zero-tile fraction is a real share
    of the sparsity (>= 0.3 s, far above the s^(B*B/v) of independently pruned vectors) and not much below
    the fraction at B/2. Vector pruning alone stays well below 0.3 s on trained CNNs.
    """
    best = None
    for b in sorted(PATTERN_BLOCKS):
        if b < 2 * v or b > min(mat.shape):
            continue
        z = _zero_tile_fraction(mat, b)
        if z >= 0.3 * s and z >= 3 * s ** (b * b / v) and (best is None or z >= 0.6 * _zero_tile_fraction(mat, b // 2)):
            best = b
    return best


def detect_pattern(w: torch.Tensor) -> str:
    """dense | empty | block-B | mixed-V/B | vector-V | channel-4 | unstructured, from where the zeros are.

    block-B: every B x B tile of [O, C*R*S] whole. vector-V: every group of V output channels at one input
    position whole. mixed-V/B: vector-V, and many more all-zero B x B tiles (B >= 2V) than vector groups
    pruned independently would leave (a coarse block mask on top of the fine one).
    """
    mat = w.detach().reshape(w.shape[0], -1)  # [O,K]
    zeros = int((mat == 0).sum())
    if zeros == 0:
        return "dense"
    if zeros == mat.numel():
        return "empty"
    for b in PATTERN_BLOCKS:
        if b <= min(mat.shape) and _whole(mat, b, b):
            return f"block-{b}"
    for v in PATTERN_VECTORS:
        if v <= mat.shape[0] and _whole(mat, v, 1):
            block = _mixed_block(mat, v, zeros / mat.numel())
            return f"mixed-{v}/{block}" if block else f"vector-{v}"
    if w.dim() in (2, 4) and w.shape[1] >= 4:  # channel-4: quads of input channels at one tap (prune channel4)
        taps = w.detach().permute(0, 2, 3, 1).reshape(-1, w.shape[1]) if w.dim() == 4 else mat
        if _whole(taps, 1, 4):
            return "channel-4"
    return "unstructured"


def footprint(w: torch.Tensor, pattern: str, quant: dict | None = None, est_bits: int = 8) -> dict:
    """Bytes to store one weight: dense fp32; sparse fp32 (values + index, CSR-like); sparse quantised.

    Sparse storage is CSR over units: single weights (unstructured), V-vectors (vector/mixed: one column
    index per V outputs) or B x B blocks (block: one index per block). Stored units hold their values, an
    int16 column index (int32 when there are more than 65535 columns) and an int32 pointer per unit row.
    Quantised: the values at the scheme's bits plus its scales/codebook; without a scheme, int8 estimated.
    """
    mat = w.detach().reshape(w.shape[0], -1)  # [O,K]
    rows, cols = (1, 1)
    if pattern.startswith(("vector-", "mixed-")):
        rows = int(pattern.split("-")[1].split("/")[0])
    elif pattern.startswith("block-"):
        rows = cols = int(pattern.split("-")[1])
    nz, _ = _tiles(mat, rows, cols)
    units = int((nz > 0).sum())
    unit_rows, unit_cols = nz.shape
    index_bytes = 2 if unit_cols <= 65535 else 4
    stored = units * rows * cols  # values kept, explicit zeros inside a unit included
    overhead = units * index_bytes + (unit_rows + 1) * 4
    bits = quant["bits"] if quant else est_bits
    params = 0
    if quant and quant.get("kind") == "linear":
        params = 4 * len(quant.get("scales", []))
    elif quant and quant.get("kind") == "kmeans":
        params = 4 * len(quant.get("codebook", []))
    elif quant and quant.get("kind") == "pow2":
        params = 4
    elif not quant:
        params = 4 * mat.shape[0]  # int8 estimate: per-channel scales
    return {
        "dense_fp32_bytes": 4 * mat.numel(),
        "sparse_fp32_bytes": 4 * stored + overhead,
        "sparse_quant_bytes": math.ceil(stored * bits / 8) + overhead + params,
        "quant_bits": bits,
    }


def _quant_label(entry: dict | None) -> str:
    if not entry:
        return "-"
    kind, bits = entry.get("kind"), entry.get("bits")
    if kind == "linear":
        return f"int{bits}/channel"
    if kind == "kmeans":
        return f"kmeans{bits} ({len(entry.get('codebook', []))} values)"
    if kind == "pow2":
        return f"pow2 (2^{entry.get('min_exponent')}..2^0)"
    return str(kind)


def weight_report(module: nn.Module, ep: torch.export.ExportedProgram | None = None, quant: dict | None = None,
                  targets: dict[str, float] | None = None) -> dict:
    """{"layers": [...], "overall_sparsity", "footprint"} for every conv/linear weight of `module`."""
    layers, totals, zeros, count = [], {}, 0, 0
    for fqn, owner, pname in prunable_parameters(module, ep):
        w = getattr(owner, pname).detach()
        pattern = detect_pattern(w)
        entry = (quant or {}).get("layers", {}).get(fqn)
        fp = footprint(w, pattern, entry)
        nz = int((w == 0).sum())
        row = {"name": fqn, "shape": list(w.shape), "params": w.numel(), "sparsity": round(nz / w.numel(), 4),
               "pattern": pattern, "quant": _quant_label(entry), **fp}
        if targets is not None:
            row["target_sparsity"] = round(targets.get(fqn, 0.0), 4)
        layers.append(row)
        zeros, count = zeros + nz, count + w.numel()
        for key in ("dense_fp32_bytes", "sparse_fp32_bytes", "sparse_quant_bytes"):
            totals[key] = totals.get(key, 0) + fp[key]
    totals["quant_scheme"] = quant["scheme"] if quant else "int8 (estimate)"
    return {"layers": layers, "overall_sparsity": round(zeros / max(1, count), 4), "footprint": totals}


def format_layers(layers: list[dict]) -> str:
    lines = [f"  {'layer':28s} {'shape':18s} {'sparsity':>8s}  {'pattern':13s} {'quant':22s} "
             f"{'dense fp32':>11s} {'sparse fp32':>11s} {'sparse q':>10s}"]
    for r in layers:
        target = f" (target {r['target_sparsity']:.3f})" if "target_sparsity" in r else ""
        lines.append(f"  {r['name']:28s} {str(r['shape']):18s} {r['sparsity']:8.3f}  {r['pattern']:13s} "
                     f"{r['quant']:22s} {r['dense_fp32_bytes']:11,d} {r['sparse_fp32_bytes']:11,d} "
                     f"{r['sparse_quant_bytes']:10,d}{target}")
    return "\n".join(lines)


def format_summary(report: dict) -> str:
    """The human-readable summary `prune`/`quantize` print."""
    out = [format_layers(report["layers"])]
    fp = report["footprint"]
    out.append(f"  overall sparsity {report['overall_sparsity']:.3f}; weights: dense fp32 {fp['dense_fp32_bytes']:,d} B, "
               f"sparse fp32 {fp['sparse_fp32_bytes']:,d} B, sparse {fp['quant_scheme']} {fp['sparse_quant_bytes']:,d} B")
    if report.get("accuracy_before") is not None:
        out.append(f"  accuracy on {report['dataset']} test set: {report['accuracy_before']:.2f}% before, "
                   f"{report['accuracy_after']:.2f}% after ({report['accuracy_after'] - report['accuracy_before']:+.2f} points)")
        if report.get("untrained_hint"):
            out.append(f"  note: {report['untrained_hint']}")
    out += [f"  note: {note}" for note in report.get("notes", [])]
    return "\n".join(out)


def describe_program(path: str) -> str:
    """Per-layer shape, sparsity, pattern and quantisation of a .pt2 written by torch.export.save."""
    if not path.endswith(".pt2"):
        raise UnsparseError(f"{path} is not a .pt2 or .so file: inspect reads torch.export programs and compiled modules")
    ep = load_pt2(path)
    quant = read_quantization(path)
    meta = read_model_meta(path)
    try:
        shape, dyn = list(program_input_shape(ep)), dynamic_dims(ep)
    except UnsparseError:
        shape, dyn = "?", []
    head = [f"{path}: torch.export program, input {shape}"
            + (f" (dynamic axes {', '.join(map(str, dyn))}: example sizes shown; compile specialises them)" if dyn else "")]
    if meta.get("model"):
        trained = (f"trained on {meta['dataset']}, test accuracy {meta['accuracy']:.2f}%" if meta.get("accuracy") is not None
                   else "trained" if meta.get("trained") else "random weights")
        head.append(f"  model: {meta['model']} ({trained})")
    if meta.get("pruning"):
        p = meta["pruning"]
        sizes = {"vector": f" V={p.get('vector_size')}", "block": f" B={p.get('block_size')}",
                 "mixed": f" V={p.get('vector_size')} B={p.get('block_size')}"}.get(p.get("method"), "")
        head.append(f"  pruned: {p.get('method')}{sizes} to {p.get('sparsity')}"
                    + (f", gradual over {p['epochs']} epochs" if p.get("epochs") else ", one-shot"))
    head.append(f"  quantisation: {quant['scheme']} ({quant['bits']} bits, zeros kept)" if quant else "  quantisation: none (fp32)")
    if quant and quant.get("activations"):  # quantize --activations int8: compile runs these layers int8
        acts = quant["activations"]
        head.append(f"  activations: int8, {len(acts['layers'])} layer input ranges calibrated ({acts.get('method', 'minmax')}, "
                    f"{acts.get('batches', '?')} batches of {acts.get('dataset', '?')})")
    gm = ep.module()
    params = dict(ep.state_dict)
    layers = []
    for fqn, _, _ in prunable_parameters(gm, ep):
        w = params[fqn] if fqn in params else dict(gm.named_parameters())[fqn]
        pattern = detect_pattern(w)
        entry = (quant or {}).get("layers", {}).get(fqn)
        layers.append({"name": fqn, "shape": list(w.shape), "params": w.numel(),
                       "sparsity": float((w == 0).sum()) / w.numel(), "pattern": pattern,
                       "quant": _quant_label(entry), **footprint(w, pattern, entry)})
    if not layers:
        return "\n".join(head + ["  no conv2d or linear weights"])
    zeros = sum(r["sparsity"] * r["params"] for r in layers)
    count = sum(r["params"] for r in layers)
    tot = {k: sum(r[k] for r in layers) for k in ("dense_fp32_bytes", "sparse_fp32_bytes", "sparse_quant_bytes")}
    qname = quant["scheme"] if quant else "int8 (estimate)"
    return "\n".join(head + [format_layers(layers),
                             f"  total {count:,d} weights, sparsity {zeros / count:.3f}; dense fp32 {tot['dense_fp32_bytes']:,d} B, "
                             f"sparse fp32 {tot['sparse_fp32_bytes']:,d} B, sparse {qname} {tot['sparse_quant_bytes']:,d} B"])


def check_report_path(path: str | None, overwrite: bool) -> None:
    if path is not None:
        check_output(path, overwrite=overwrite, suffixes=(".json",), what="report")


def write_report(report: dict, path: str | None) -> None:
    if path:
        write_text(path, json.dumps(report, indent=2) + "\n")
