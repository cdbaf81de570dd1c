"""Pruning: masks through `torch.nn.utils.prune`, made permanent before export.

This is the minimal, one-shot layer-wise magnitude pruning of every conv and linear weight; the pruning
and quantisation toolbox grows from here (same verbs as torch.nn.utils.prune: prune, then remove).
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.utils.prune as tprune

from .errors import UnsparseError, check_fraction
from .models import BUILTIN_MODELS, build_model, export, load_pt2, program_input_shape

# aten ops whose second argument is a weight worth pruning
_WEIGHT_OPS = {"aten.conv2d.default", "aten.convolution.default", "aten.linear.default"}


def prunable_parameters(module: nn.Module, ep: torch.export.ExportedProgram | None = None) -> list[tuple[str, nn.Module, str]]:
    """(qualified name, owning module, parameter name) of every conv2d / linear weight.

    Ordinary modules are recognised by type; a program loaded from .pt2 (whose `module()` has no
    nn.Conv2d left) by the graph: the weight operand of each conv/linear call.
    """
    found = [
        (f"{name}.weight", m, "weight")
        for name, m in module.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    if found or ep is None:
        return found
    params = ep.graph_signature.inputs_to_parameters
    for node in ep.graph.nodes:
        if node.op == "call_function" and str(node.target) in _WEIGHT_OPS:
            weight = node.args[1]
            fqn = params.get(getattr(weight, "name", ""))
            if fqn is not None and fqn not in {f for f, _, _ in found}:
                owner_name, _, pname = fqn.rpartition(".")
                found.append((fqn, module.get_submodule(owner_name), pname))
    return found


def magnitude_prune(module: nn.Module, sparsity: float, ep: torch.export.ExportedProgram | None = None) -> nn.Module:
    """One-shot layer-wise L1 magnitude pruning to `sparsity` of every conv/linear weight, in place."""
    check_fraction("sparsity", sparsity)
    layers = prunable_parameters(module, ep)
    if not layers:
        raise UnsparseError("the model has no conv2d or linear layer to prune")
    for _, owner, pname in layers:
        tprune.l1_unstructured(owner, pname, amount=float(sparsity))
        tprune.remove(owner, pname)  # permanent: the zeros are now in the weight itself
    return module


def prune_to_program(model: str, sparsity: float, batch: int = 1) -> torch.export.ExportedProgram:
    """Prune a built-in model or a .pt2 file and return the exported program."""
    check_fraction("sparsity", sparsity)
    if model in BUILTIN_MODELS:
        net = magnitude_prune(build_model(model), sparsity)
        return export(net, (batch, *BUILTIN_MODELS[model].input_shape))
    ep = load_pt2(model)
    gm = ep.module()
    magnitude_prune(gm, sparsity, ep)
    shape = program_input_shape(ep)
    with torch.no_grad():
        return torch.export.export(gm, (torch.randn(*shape),))


def save_program(ep: torch.export.ExportedProgram, path: str, overwrite: bool = False) -> None:
    if not path.endswith(".pt2"):
        raise UnsparseError(f"output {path} must end in .pt2")
    if os.path.exists(path) and not overwrite:
        raise UnsparseError(f"{path} exists; pass --force to overwrite it")
    torch.export.save(ep, path)


def layer_sparsity(ep: torch.export.ExportedProgram) -> list[tuple[str, tuple[int, ...], float]]:
    """(name, shape, fraction of zeros) for every conv/linear weight of a program."""
    sd = ep.state_dict
    out = []
    for fqn, _, _ in prunable_parameters(ep.module(), ep):
        w = sd[fqn] if fqn in sd else dict(ep.module().named_parameters())[fqn]
        out.append((fqn, tuple(w.shape), float((w == 0).sum()) / w.numel()))
    return out
