"""Static activation calibration for int8 execution: the range of the input of every conv2d / linear layer
over a few batches, per tensor.

Ranges (min, max), not scales, are stored: the compiler picks the scale and zero point for its CPU
(unsigned 8 bits with VNNI, 7 bits on AVX2; see int8_rows.ActQuant.from_range). They travel in the .pt2's
`unsparse_quant.json` under "activations", keyed by layer name (the weight's name without ".weight", as
`compile` reports layers).

Min/max, not a percentile: with a handful of batches a percentile mostly clips the values the
calibration did not see; for ReLU networks on digits min/max keeps accuracy (see tests/test_int8.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import UnsparseError
from .masks import WEIGHT_OPS, prunable_parameters

RANDOM = "random"          # --dataset random: seeded standard-normal inputs (speed work without data)
CALIBRATION_BATCHES = 4


def calibration_batches(input_shape: tuple[int, ...], data=None, batches: int = CALIBRATION_BATCHES,
                        batch_size: int = 64, seed: int = 0) -> list[torch.Tensor]:
    """`batches` input batches: from the data set's training split, or seeded normal inputs (data None)."""
    if batches < 1:
        raise UnsparseError(f"calibration needs at least one batch, got {batches}")
    if data is None:
        gen = torch.Generator().manual_seed(seed)
        return [torch.randn(batch_size, *input_shape[1:], generator=gen) for _ in range(batches)]
    x = data.x_train
    return [x[i * batch_size:(i + 1) * batch_size] for i in range(batches) if i * batch_size < len(x)]


def _merge(ranges: dict, name: str, t: torch.Tensor) -> None:
    lo, hi = float(t.min()), float(t.max())
    old = ranges.get(name)
    ranges[name] = [lo, hi] if old is None else [min(old[0], lo), max(old[1], hi)]


def _module_ranges(module: nn.Module, batches: list[torch.Tensor]) -> dict:
    """Forward pre-hooks on the nn.Conv2d / nn.Linear modules (built-in models)."""
    ranges: dict = {}
    hooks = []
    for fqn, owner, _ in prunable_parameters(module):
        name = fqn.removesuffix(".weight")
        hooks.append(owner.register_forward_pre_hook(lambda _m, args, _n=name: _merge(ranges, _n, args[0])))
    try:
        with torch.no_grad():
            for x in batches:
                module(x)
    finally:
        for h in hooks:
            h.remove()
    return ranges


def _graph_ranges(ep: torch.export.ExportedProgram, batches: list[torch.Tensor]) -> dict:
    """A foreign .pt2: interpret its graph and record the first argument of every conv/linear call."""
    gm = ep.module()
    ranges: dict = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node):
            if node.op == "call_function" and str(node.target) in WEIGHT_OPS:
                weight = node.args[1]
                if getattr(weight, "op", None) == "get_attr":
                    _merge(ranges, str(weight.target).removesuffix(".weight"), self.env[node.args[0]])
            return super().run_node(node)

    from ..frontend import program_input_shape

    size = program_input_shape(ep)[0]  # a program takes the batch it was exported with: run it in slices
    with torch.no_grad():
        for x in batches:
            for start in range(0, len(x) - size + 1, size):
                Recorder(gm).run(x[start:start + size])
    return ranges


def _set_mode(module: nn.Module, training: bool) -> None:
    try:
        module.train(training)
    except NotImplementedError:  # a reloaded program's module is always in eval mode and refuses both
        pass


def calibrate(module: nn.Module, batches: list[torch.Tensor], ep: torch.export.ExportedProgram | None = None) -> dict:
    """The "activations" entry of unsparse_quant.json: {"scheme", "granularity", "batches", "layers":
    {layer name: [min, max]}} over the inputs of every conv2d / linear layer."""
    was_training = module.training
    _set_mode(module, False)
    try:
        use_hooks = ep is None or prunable_parameters(module)
        ranges = _module_ranges(module, batches) if use_hooks else _graph_ranges(ep, batches)
    finally:
        _set_mode(module, was_training)
    if not ranges:
        raise UnsparseError("calibration found no conv2d or linear layer")
    return {"scheme": "int8", "granularity": "per-tensor", "method": "minmax", "batches": len(batches),
            "layers": ranges}
