"""One conv2d or linear layer on its own, as a Relax module: what `bench` times layer by layer, what
`calibrate` measures the cost model's rates on, and what the kernel tests compile."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import relax

from .frontend import import_program
from .relay_passes import FoldBatchNormIntoConv, find_layers, shape_of


@dataclass
class LayerSpec:
    """One conv2d / linear layer as it appears in the imported graph (after batch-norm folding)."""

    op: str                   # conv2d or dense
    input_shape: tuple
    weight: np.ndarray        # OIHW or [out, in]
    bias: np.ndarray | None
    relu: bool
    attrs: dict               # conv2d: strides, padding (t, l, b, r), dilation, groups


def layer_module(spec: LayerSpec):
    """A one-layer Relax module: conv2d/linear [+ bias] [+ ReLU]."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(spec.input_shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            if spec.op == "conv2d":
                a = spec.attrs
                y = bb.emit(relax.op.nn.conv2d(x, relax.const(spec.weight), strides=a["strides"],
                                               padding=a["padding"], dilation=a["dilation"], groups=a["groups"]))
                if spec.bias is not None:
                    y = bb.emit(relax.op.add(y, relax.const(spec.bias.reshape(1, -1, 1, 1))))
            else:
                y = bb.emit(relax.op.matmul(x, relax.const(np.ascontiguousarray(spec.weight.T))))
                if spec.bias is not None:
                    y = bb.emit(relax.op.add(y, relax.const(spec.bias)))
            if spec.relu:
                y = bb.emit(relax.op.nn.relu(y))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def extract_layers(ep) -> tuple[list[LayerSpec], object]:
    """Every conv2d and linear with a constant weight (relay_passes.find_layers, after batch-norm folding),
    with the bias and ReLU that follow it, and the LayerNames that name their (folded) weights."""
    mod, names = import_program(ep)
    mod = FoldBatchNormIntoConv(names)(mod)  # constants folded first (FoldConstantArrays), then batch norms
    layers = []
    for kind, call, weight, ep_ in find_layers(mod["main"]):
        attrs = {}
        if kind == "conv2d":
            a = call.attrs
            attrs = {"strides": [int(v) for v in a.strides], "padding": [int(v) for v in a.padding],
                     "dilation": [int(v) for v in a.dilation], "groups": int(a.groups)}
        layers.append(LayerSpec(kind, shape_of(call.args[0]), weight, ep_.bias, ep_.relu, attrs))
    return layers, names


def layer_flops(spec: LayerSpec) -> tuple[float, float]:
    """(dense FLOPs, useful FLOPs) of one layer: 2 per multiply-add of the whole weight, and of its nonzeros
    only (what a sparse kernel must do at least)."""
    nnz = int(np.count_nonzero(spec.weight))
    if spec.op == "dense":
        return 2.0 * spec.input_shape[0] * spec.weight.size, 2.0 * spec.input_shape[0] * nnz
    from .ops.geometry import ConvGeometry

    n, c, h, w = spec.input_shape
    k, _, r, s = spec.weight.shape
    a = spec.attrs
    geo = ConvGeometry(n, c, h, w, k, r, s, tuple(a["strides"]), tuple(a["padding"]), tuple(a["dilation"]))
    positions = n * geo.oh * geo.ow
    return 2.0 * spec.weight.size * positions, 2.0 * nnz * positions

