"""One conv2d or linear layer on its own, as a Relax module: what `bench` times layer by layer, what
`calibrate` measures the cost model's rates on, and what the kernel tests compile."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import relax


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
