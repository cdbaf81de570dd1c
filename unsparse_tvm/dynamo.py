"""`torch.compile(model, backend="unsparse")`: each graph Dynamo captures, compiled by `unsparse_tvm.compile`.

Registered through the `torch_dynamo_backends` entry point (pyproject.toml), so the name works once the
package is installed. Inference only, float32, static shapes: the graph's parameters and buffers are
bound as constants (what the sparsify passes need to see the zeros), so weights changed after the first
call need `torch._dynamo.reset()`. A graph break gives several graphs, each compiled on its own. Anything
this backend cannot take (training mode, several inputs, dynamic shapes, non-float32 tensors, an
operator the compiler refuses) runs eagerly instead, with one warning naming the reason.

Options: `torch.compile(m, backend="unsparse", options={"target": "llvm", "threshold": 0.5, ...})`,
the fields of unsparse_tvm.CompileOptions.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from .errors import UnsparseError

TRAINING_OPS = {"batch_norm", "dropout", "dropout1d", "dropout2d", "alpha_dropout", "feature_alpha_dropout"}


class UnsparseFallback(UserWarning):
    """A graph torch.compile(backend="unsparse") runs eagerly, and why."""


def _is_constant(node, example) -> bool:
    """A parameter or buffer of the compiled module (lifted into the graph by Dynamo), not a call input."""
    if isinstance(example, nn.Parameter):
        return True
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return False
    gs = source.guard_source
    return gs.is_specialized_nn_module() or gs.is_unspecialized_nn_module() or not gs.is_local()


def _training_reason(gm: torch.fx.GraphModule) -> str | None:
    for node in gm.graph.nodes:
        name = getattr(node.target, "__name__", str(node.target))
        if node.op == "call_function" and name in TRAINING_OPS:
            training = node.kwargs.get("training", node.args[5] if name == "batch_norm" and len(node.args) > 5
                                       else node.args[2] if name != "batch_norm" and len(node.args) > 2 else False)
            if training:
                return f"the model is in training mode ({name}): call model.eval() first (inference only)"
    return None


class _Bound(nn.Module):
    """The graph with its constants as buffers and only the real inputs as arguments (what torch.export takes)."""

    def __init__(self, gm: torch.fx.GraphModule, constants: dict[int, torch.Tensor], arity: int):
        super().__init__()
        self.gm, self.arity, self.slots = gm, arity, sorted(constants)
        for i, t in constants.items():
            self.register_buffer(f"c{i}", t.detach())

    def forward(self, *inputs):
        it = iter(inputs)
        args = [getattr(self, f"c{i}") if i in self.slots else next(it) for i in range(self.arity)]
        return self.gm(*args)


def _compile(gm: torch.fx.GraphModule, example_inputs: list, options: dict):
    from .api import CompileOptions, compile

    why = _training_reason(gm)
    if why:
        raise UnsparseError(why)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    constants, inputs = {}, []
    for i, (node, ex) in enumerate(zip(placeholders, example_inputs)):
        if not isinstance(ex, torch.Tensor):
            raise UnsparseError(f"input {node.name} is not a tensor ({type(ex).__name__}: dynamic shapes are not "
                                "supported; torch.compile(..., dynamic=False))")
        (constants.__setitem__(i, ex) if _is_constant(node, ex) else inputs.append(i))
    if len(inputs) != 1:
        raise UnsparseError(f"the graph has {len(inputs)} tensor inputs; unsparse compiles graphs with one")
    x = example_inputs[inputs[0]]
    bad = [str(t.dtype) for t in (x, *constants.values()) if t.is_floating_point() and t.dtype != torch.float32]
    if bad or x.dtype != torch.float32:
        raise UnsparseError(f"the graph holds {bad[0] if bad else x.dtype} tensors; unsparse compiles float32 only")
    bound = _Bound(gm, constants, len(placeholders)).eval()
    with torch.no_grad():
        ep = torch.export.export(bound, (x.detach(),))
    try:
        opts = CompileOptions(**options)
    except TypeError as err:
        raise UnsparseError(f"unknown option: {err}") from None
    model = compile(ep, options=opts)
    _drop_weight_guards()
    slot = inputs[0]

    def run(*args):
        outs = model(args[slot])
        return list(outs) if isinstance(outs, tuple) else [outs]

    return run


def _on_weights(guard) -> bool:
    """A guard on a parameter or buffer (its shape and dtype) or on a `_parameters`/`_buffers` dict's type."""
    kind = guard.inner_create_fn().__name__
    where = type(guard.originating_source).__name__
    return kind == "TENSOR_MATCH" or (kind == "TYPE_MATCH" and where == "UnspecializedParamBufferSource")


def _drop_weight_guards() -> int:
    """Drop Dynamo's shape/dtype guards on the module's parameters and buffers for a graph compiled here.

    The compiled graph holds the weights as constants and never reads the tensors Dynamo passes it, so a
    guard on them protects nothing (a weight replaced by one of the same shape was never caught either: the
    module docstring's "weights are frozen at the first call"), yet checking ~100 of them is most of
    Dynamo's per-call cost: on vgg16-cifar at 90%, 1.115x -> 1.077x the API call with a no-op backend.
    Guards on the modules' other attributes (`training`, hooks, submodule types) stay, so model.train()
    still recompiles and falls back to eager. Uses Dynamo's tracing context (torch._guards), so on a torch
    that lays it out otherwise nothing is dropped and calls are only slower. Returns how many were dropped."""
    try:
        from torch._guards import TracingContext

        guards = TracingContext.get().guards_context.dynamo_guards
        frozen = [g for g in guards.inner if g.source.is_unspecialized_nn_module() and _on_weights(g)]
        for g in frozen:
            guards.inner.remove(g)
        return len(frozen)
    except (AttributeError, AssertionError, RuntimeError):  # not inside Dynamo, or another torch's layout
        return 0


def backend(gm: torch.fx.GraphModule, example_inputs: list, options: dict | None = None, mode: str | None = None):
    """The torch.compile backend: a callable running the compiled graph, or the graph itself (eager) with one
    UnsparseFallback warning saying why."""
    try:
        return _compile(gm, example_inputs, dict(options or {}))
    except UnsparseError as err:
        warnings.warn(f"unsparse backend: {err}; this graph runs eagerly", UnsparseFallback, stacklevel=2)
        return gm.forward
