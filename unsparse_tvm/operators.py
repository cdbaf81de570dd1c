"""Which operators a program may use: the ones whose lowering (TVM's PyTorch importer, then our passes)
is checked against PyTorch by this project's tests. Anything else is refused by name at import time,
because an operator nobody checked can compile, run and return a wrong answer without any error.

`check_operators(ep)` is the check (frontend calls it for every program it loads or imports);
`importer_fixes()` are conversions we give TVM's importer where its own is wrong.
"""

from __future__ import annotations

import operator

import torch

from .errors import UnsparseError

# Operator (torch.export's name, both as exported and after PyTorch's core-ATen decomposition, which TVM's
# importer runs first) -> where its lowering is checked against PyTorch.
_CNN = "built-in models, tests/test_models.py, test_passes.py, test_depthwise.py, test_fallback.py"
_TV = "tests/test_architectures.py (torchvision networks)"
_ENC = "tests/test_bad_inputs.py (a transformer encoder layer)"
VERIFIED: dict[str, str] = {
    **dict.fromkeys([
        "aten.conv2d.default", "aten.convolution.default", "aten.linear.default", "aten.addmm.default",
        "aten.mm.default", "aten.batch_norm.default", "aten._native_batch_norm_legit_no_training.default",
        "aten.relu.default", "aten.relu_.default", "aten.relu6.default", "aten.hardtanh.default",
        "aten.hardtanh_.default", "aten.clamp.default", "aten.silu.default", "aten.silu_.default",
        "aten.sigmoid.default", "aten.hardsigmoid.default", "aten.hardswish.default", "aten.hardswish_.default",
        "aten.add.Tensor", "aten.add_.Tensor", "aten.sub.Tensor", "aten.mul.Tensor", "aten.div.Tensor",
        "aten.max_pool2d.default", "aten.max_pool2d_with_indices.default", "aten.mean.dim",
        "aten.adaptive_avg_pool2d.default", "aten.flatten.using_ints", "aten.view.default",
    ], _CNN),
    **dict.fromkeys([
        "aten.avg_pool2d.default", "aten.cat.default", "aten.chunk.default", "aten.split_with_sizes.default",
        "aten.transpose.int", "aten.contiguous.default", "aten.clone.default", "aten.permute.default",
        "aten.dropout.default", "aten.dropout_.default", "aten.upsample_bilinear2d.vec",
    ], _TV),
    **dict.fromkeys([
        "aten.layer_norm.default", "aten.native_layer_norm.default", "aten.scaled_dot_product_attention.default",
        "aten._softmax.default", "aten.bmm.default", "aten.mul.Scalar", "aten.reshape.default",
        "aten.select.int", "aten.unflatten.int", "aten.unsqueeze.default", "aten.squeeze.dim", "aten.squeeze.dims",
        "aten.expand.default", "aten.any.dim", "aten.eq.Scalar", "aten.logical_not.default", "aten.where.self",
        "aten.full_like.default",
    ], _ENC),
    # a classifier's softmax: PyTorch decomposes it to aten._softmax, the attention's
    "aten.softmax.int": "tests/test_bad_inputs.py (a softmax head), and aten._softmax above",
}

# Shape bookkeeping of programs with dynamic dimensions (no tensor computed): nothing to verify.
_SHAPE_OPS = {"aten.sym_size.int", "aten.sym_numel.default", "aten.sym_stride.int", "aten._assert_scalar.default",
              "aten._assert_tensor_metadata.default", "aten.sym_constrain_range_for_size.default"}

_PYTHON_OPS = {v for v in vars(operator).values() if callable(v)}

# What users wrote, for the operators a refusal most often names.
_WRITTEN_AS = {
    "aten.lstm": "nn.LSTM", "aten.gru": "nn.GRU", "aten.rnn_tanh": "nn.RNN", "aten.rnn_relu": "nn.RNN",
    "aten.embedding": "nn.Embedding", "aten.gelu": "nn.GELU", "aten.log_softmax": "log_softmax",
    "aten.matmul": "a matmul of two activations", "aten.index": "tensor indexing", "aten.pad": "F.pad",
}
_RECURRENT = ("aten.lstm", "aten.gru", "aten.rnn_tanh", "aten.rnn_relu")


def op_name(target) -> str:
    """'aten.lstm.input' for an ATen overload; 'cond' and the like for torch's higher-order operators."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    name = getattr(target, "name", None)
    return name() if callable(name) else getattr(target, "__name__", type(target).__name__)


def unverified_operators(ep: torch.export.ExportedProgram) -> list[str]:
    """The program's operators outside VERIFIED, in graph order, each once."""
    found: dict[str, None] = {}
    for node in ep.graph.nodes:
        if node.op != "call_function" or node.target in _PYTHON_OPS or op_name(node.target).startswith("sym_"):
            continue  # operator.getitem on a tuple output, arithmetic on symbolic sizes (torch.sym_max, ...)
        name = op_name(node.target)
        if name not in VERIFIED and name not in _SHAPE_OPS and not _weight_matmul(ep, node, name):
            found[name] = None
    return list(found)


def _weight_matmul(ep: torch.export.ExportedProgram, node, name: str) -> bool:
    """`x @ W` with W a 2-D parameter or buffer is a linear layer (SparsifyDense takes it; checked against
    PyTorch and ONNX Runtime in tests/test_onnx.py); a matmul of two activations stays unverified."""
    if name != "aten.matmul.default" or len(node.args) < 2:
        return False
    w = node.args[1]
    sig = ep.graph_signature
    weights = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **getattr(sig, "inputs_to_lifted_tensor_constants", {})}
    val = getattr(w, "meta", {}).get("val")
    return getattr(w, "name", None) in weights and val is not None and len(val.shape) == 2


def check_operators(ep: torch.export.ExportedProgram) -> None:
    """Refuse a program that uses an operator whose lowering nobody here has checked, naming it."""
    bad = [_packet(name) for name in unverified_operators(ep)]
    if not bad:
        return
    bad = sorted(dict.fromkeys(bad), key=lambda p: p not in _WRITTEN_AS)  # the layer the user wrote first
    first, rest = bad[0], bad[1:]
    written = f" ({_WRITTEN_AS[first]})" if first in _WRITTEN_AS else ""
    why = ("recurrent layers are outside what it compiles (CNNs)" if first in _RECURRENT
           else "its tests cover CNN layers and a transformer encoder layer")
    also = f"; also unverified: {', '.join(rest[:3])}{', ...' if len(rest) > 3 else ''}" if rest else ""
    raise UnsparseError(f"the model uses {first}{written}, which unsparse-tvm does not verify: {why}{also}; "
                        "such operators are refused rather than risk a silently wrong result")


def _packet(name: str) -> str:
    """'aten.lstm.input' -> 'aten.lstm' (the overload says nothing to a user)."""
    return name.rsplit(".", 1)[0] if name.startswith("aten.") and name.count(".") >= 2 else name


def importer_fixes() -> dict:
    """Conversions for TVM's importer (its `custom_convert_map`) where its own is wrong.

    select.int: TVM writes x[:, i] as take(x, i), whose default "fast" mode does not wrap a negative
    index: x[:, -1] (the last time step after an LSTM, the class token) read memory before the tensor,
    a different garbage on every run. The index is made non-negative first."""
    from tvm import relax  # deferred: TVM's compiler

    def select(node, importer):
        x = importer.env[node.args[0]]
        dim, index = node.args[1], node.args[2]
        if index < 0:
            size = node.args[0].meta["val"].shape[dim]
            if not isinstance(size, int):
                raise UnsparseError(f"the model indexes a dynamic dimension from its end ({node.name}); "
                                    "export it with a static shape")
            index += size
        return importer.block_builder.emit(relax.op.take(x, relax.const(index, "int64"), dim))

    return {"select.int": select}
