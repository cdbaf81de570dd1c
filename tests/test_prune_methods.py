"""Pruning masks keep their shape guarantees; per-layer targets, schedule and errors behave."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as tprune

from unsparse_tvm.errors import UnsparseError
from unsparse_tvm.compress.report import detect_pattern
from unsparse_tvm.models import build_model
from unsparse_tvm.compress.masks import (BlockPruning, MixedPruning, VectorPruning, block_mask, layer_sparsity,
                                        magnitude_prune, mixed_masks, prunable_parameters, vector_mask)
from unsparse_tvm.compress.prune import prune_model, prune_to_program
from unsparse_tvm.compress.schedule import cubic_sparsity
from unsparse_tvm.compress.config import PruneConfig, _allocate_by_sensitivity, layer_targets


def tiles_whole(mask: torch.Tensor, rows: int, cols: int) -> bool:
    """Every rows x cols tile of the [O, K] matrix (edge tiles partial) is all ones or all zeros."""
    m = mask.reshape(mask.shape[0], -1)
    for i in range(0, m.shape[0], rows):
        for j in range(0, m.shape[1], cols):
            tile = m[i : i + rows, j : j + cols]
            if not (bool((tile == 0).all()) or bool((tile == 1).all())):
                return False
    return True


def sparsity(t: torch.Tensor) -> float:
    return float((t == 0).sum()) / t.numel()


def test_vector_groups_are_whole_along_output_channels_with_partial_tail():
    w = torch.randn(10, 3, 3, 3, generator=torch.Generator().manual_seed(0))  # O=10: groups 4, 4, 2
    mask = vector_mask(w, 0.6, 4)
    assert mask.shape == w.shape
    assert tiles_whole(mask, 4, 1)
    # same input position (c, r, s) for the V outputs of a group
    for o0, o1 in [(0, 4), (4, 8), (8, 10)]:
        assert torch.equal(mask[o0:o1], mask[o0:o0 + 1].expand(o1 - o0, -1, -1, -1))
    assert not tiles_whole(mask, 8, 1)  # not accidentally coarser
    assert abs(sparsity(mask) - 0.6) <= 4 / w.numel()
    tail = mask[8:].reshape(2, -1)  # the partial group is pruned as often as a fair share, not always
    assert 0 < float((tail == 0).float().mean()) < 1


def test_vector_pruning_removes_the_lowest_norm_groups():
    w = torch.ones(8, 2, 1, 1)
    w[4:8, 1] = 0.01  # group (rows 4..7, column 1) has by far the lowest norm
    mask = vector_mask(w, 0.25, 4)
    assert float(mask[4:8, 1].sum()) == 0 and float(mask.sum()) == 12


def test_block_masks_are_whole_tiles():
    w = torch.randn(20, 6, 3, 3, generator=torch.Generator().manual_seed(1))  # [20, 54]: partial tiles both ways
    for b in (2, 4, 8):
        mask = block_mask(w, 0.7, b)
        assert tiles_whole(mask, b, b), b
        assert abs(sparsity(mask) - 0.7) <= b * b / w.numel()
    lin = torch.randn(64, 256)
    assert tiles_whole(block_mask(lin, 0.5, 16), 16, 16) and sparsity(block_mask(lin, 0.5, 16)) == 0.5


def test_mixed_is_the_and_of_a_vector_and_a_block_mask():
    w = torch.randn(32, 16, 3, 3, generator=torch.Generator().manual_seed(2))
    vec, blk = mixed_masks(w, 0.8, 4, 8, block_share=0.5)
    assert tiles_whole(vec, 4, 1) and tiles_whole(blk, 8, 8)
    assert not tiles_whole(vec, 8, 8)
    assert abs(sparsity(blk) - 0.4) < 0.02  # the coarse part of the target
    mixed = MixedPruning(0.8, 4, 8, 0.5).compute_mask(w, torch.ones_like(w))
    assert torch.equal(mixed, vec * blk)
    assert abs(sparsity(mixed) - 0.8) < 0.01
    assert detect_pattern(w * mixed) == "mixed-4/8"


def test_methods_work_through_torch_prune_and_compose_with_an_existing_mask():
    conv = nn.Conv2d(16, 32, 3)
    VectorPruning.apply(conv, "weight", amount=0.5, vector_size=4)
    assert hasattr(conv, "weight_orig") and hasattr(conv, "weight_mask")
    first = conv.weight_mask.clone()
    BlockPruning.apply(conv, "weight", amount=0.8, block_size=4)  # torch stacks it in a PruningContainer
    assert bool((conv.weight_mask <= first).all())  # what was pruned stays pruned
    tprune.remove(conv, "weight")
    assert not hasattr(conv, "weight_orig") and sparsity(conv.weight) >= 0.5


@pytest.mark.parametrize("method, pattern", [
    ("unstructured", "unstructured"), ("vector", "vector-4"), ("block", "block-4"), ("mixed", "mixed-4/8"),
])
def test_one_shot_smallcnn_reaches_the_sparsity_with_the_pattern(method, pattern):
    net = build_model("smallcnn")
    info = prune_model(net, PruneConfig(sparsity=0.8, method=method))
    weights = [owner.weight for _, owner, _ in prunable_parameters(net)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert abs(zeros / sum(w.numel() for w in weights) - 0.8) < 0.01
    assert not any(hasattr(m, "weight_orig") for m in net.modules())  # masks made permanent
    patterns = {detect_pattern(w) for w in weights[1:4]}  # the big layers
    assert patterns == {pattern}, patterns
    assert set(info["targets"].values()) == {0.8}


def test_global_scope_ranks_all_layers_together():
    net = build_model("smallcnn")
    with torch.no_grad():
        net.classifier[0].weight.mul_(10)  # one layer with much larger weights keeps more of them
    prune_model(net, PruneConfig(sparsity=0.7, scope="global"))
    per_layer = {n: sparsity(o.weight) for n, o, _ in prunable_parameters(net)}
    total = sum(sparsity(o.weight) * o.weight.numel() for _, o, _ in prunable_parameters(net))
    assert abs(total / sum(o.weight.numel() for _, o, _ in prunable_parameters(net)) - 0.7) < 1e-3
    assert per_layer["classifier.0.weight"] < 0.5 < per_layer["features.5.weight"]
    assert max(per_layer.values()) < 0.995  # capped at 0.99 (+ rounding): no layer cut out, however small


def test_existing_zeros_stay_pruned():
    net = magnitude_prune(build_model("smallcnn"), 0.5)
    before = {n: (o.weight == 0).clone() for n, o, _ in prunable_parameters(net)}
    prune_model(net, PruneConfig(sparsity=0.3, method="vector"))  # lower target than what is already there
    for n, o, _ in prunable_parameters(net):
        assert bool((o.weight[before[n]] == 0).all())


def test_first_and_last_layer_overrides_keep_the_overall_sparsity():
    sizes = {"first": 144, "mid": 4608, "big": 18432, "last": 640}
    cfg = PruneConfig(sparsity=0.9, first_layer_sparsity=0.5, last_layer_sparsity=0.6)
    t = layer_targets(sizes, cfg)
    assert t["first"] == 0.5 and t["last"] == 0.6 and t["mid"] == t["big"] > 0.9
    assert math.isclose(sum(t[n] * sizes[n] for n in sizes) / sum(sizes.values()), 0.9)
    with pytest.raises(UnsparseError, match="lower --sparsity"):
        layer_targets({"first": 1000, "last": 1000, "mid": 10}, PruneConfig(sparsity=0.9, first_layer_sparsity=0.0))


def test_sensitivity_allocation_spares_the_sensitive_layer():
    grid = [0.5, 0.7, 0.9, 0.95]
    curves = {"robust": [(s, 0.0) for s in grid], "fragile": [(0.5, 1.0), (0.7, 5.0), (0.9, 20.0), (0.95, 40.0)]}
    alloc = _allocate_by_sensitivity({"robust": 1000, "fragile": 1000}, curves, 0.7)
    assert alloc["fragile"] < 0.7 < alloc["robust"]
    assert math.isclose((alloc["robust"] + alloc["fragile"]) / 2, 0.7, rel_tol=1e-6)


def test_cubic_schedule():
    assert cubic_sparsity(0, 100, 0.0, 0.9) == 0.0
    assert math.isclose(cubic_sparsity(50, 100, 0.0, 0.9), 0.9 - 0.9 / 8)
    assert cubic_sparsity(100, 100, 0.0, 0.9) == cubic_sparsity(150, 100, 0.0, 0.9) == 0.9
    values = [cubic_sparsity(t, 100, 0.2, 0.9) for t in range(101)]
    assert values == sorted(values)


def test_legacy_one_shot_api_still_works():
    ep = prune_to_program("smallcnn", 0.6)
    assert all(abs(s - 0.6) < 0.01 for _, _, s in layer_sparsity(ep))


@pytest.mark.parametrize("kwargs, message", [
    (dict(sparsity=1.0), r"\[0, 0.99\]"),
    (dict(sparsity=-0.1), r"\[0, 0.99\]"),
    (dict(method="channel"), "unknown pruning method"),
    (dict(method="vector", vector_size=3), "vector size"),
    (dict(method="block", block_size=5), "block size"),
    (dict(method="mixed", vector_size=8, block_size=4), "multiple of the vector size"),
    (dict(method="vector", scope="global"), "unstructured"),
    (dict(scope="model"), "unknown scope"),
    (dict(first_layer_sparsity=1.5), "first layer sparsity"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(UnsparseError, match=message):
        PruneConfig(**kwargs).validate()


def test_model_without_prunable_layer_is_an_error():
    with pytest.raises(UnsparseError, match="no conv2d or linear layer"):
        prune_model(nn.Sequential(nn.ReLU(), nn.MaxPool2d(2)), PruneConfig(sparsity=0.5))


def test_gradual_pruning_needs_data():
    with pytest.raises(UnsparseError, match="need a data set"):
        prune_model(build_model("smallcnn"), PruneConfig(sparsity=0.5, epochs=2))
