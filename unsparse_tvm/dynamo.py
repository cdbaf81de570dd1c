"""`torch.compile(model, backend="unsparse")`: each graph Dynamo captures, compiled by `unsparse_tvm.compile`.

Registered through the `torch_dynamo_backends` entry point (pyproject.toml), so the name works once the
package is installed. Inference only, float32, static shapes: the graph's parameters and buffers are
bound as constants (what the sparsify passes need to see the zeros): a call with other weights (another
instance of the module, a weight replaced, or written in place as `load_state_dict` does) compiles the
graph again for them, with an UnsparseRecompile warning. A graph break gives several graphs, each
compiled on its own. Anything this backend cannot take (training mode, several inputs, dynamic shapes,
non-float32 tensors, an operator the compiler refuses) runs eagerly instead, with one warning naming the
reason.

Options: `torch.compile(m, backend="unsparse", options={"target": "llvm", "threshold": 0.5, ...})`,
the fields of unsparse_tvm.CompileOptions.
"""

from __future__ import annotations

import operator
import warnings

import torch
import torch.nn as nn

from .errors import UnsparseError

_VERSION = operator.attrgetter("_version")  # a tensor's version counter, bumped by in-place writes
TRAINING_OPS = {"batch_norm", "dropout", "dropout1d", "dropout2d", "alpha_dropout", "feature_alpha_dropout"}


class UnsparseFallback(UserWarning):
    """A graph torch.compile(backend="unsparse") runs eagerly, and why."""


class UnsparseRecompile(UserWarning):
    """A compiled graph called with weights other than those compiled in: compiled again for them."""


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


def _split(gm: torch.fx.GraphModule, example_inputs: list) -> int:
    """The one real input's placeholder (every other one holds a weight of the module), or UnsparseError saying
    why not."""
    why = _training_reason(gm)
    if why:
        raise UnsparseError(why)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    constants, inputs = [], []
    for i, (node, ex) in enumerate(zip(placeholders, example_inputs)):
        if not isinstance(ex, torch.Tensor):
            raise UnsparseError(f"input {node.name} is not a tensor ({type(ex).__name__}: dynamic shapes are not "
                                "supported; torch.compile(..., dynamic=False))")
        (constants if _is_constant(node, ex) else inputs).append(i)
    if len(inputs) != 1:
        raise UnsparseError(f"the graph has {len(inputs)} tensor inputs; unsparse compiles graphs with one")
    return inputs[0]


def _build(gm: torch.fx.GraphModule, args: list, slot: int, opts):
    """unsparse_tvm.compile of the graph with every argument but args[slot] bound as a constant."""
    from .api import compile

    x, constants = args[slot], [i for i in range(len(args)) if i != slot]
    bad = [str(args[i].dtype) for i in constants if args[i].is_floating_point() and args[i].dtype != torch.float32]
    if bad or x.dtype != torch.float32:
        raise UnsparseError(f"the graph holds {bad[0] if bad else x.dtype} tensors; unsparse compiles float32 only")
    bound = _Bound(gm, {i: args[i] for i in constants}, len(args)).eval()
    with torch.no_grad():
        ep = torch.export.export(bound, (x.detach(),))
    return compile(ep, options=opts)


class _Weighted:
    """The compiled graph for each set of weights it has been called with.

    The weights are compiled in as constants, yet Dynamo shares one compiled graph between every module of the
    same class and structure (with `inline_inbuilt_nn_modules` the weights are graph arguments, not guarded by
    identity), and a user may replace or modify a weight after the first call. So each call's weights are
    known by their tensors' identity and version counter (which in-place writes bump); other weights compile
    anew, like a Dynamo recompile, at most `LIMIT` sets kept (Dynamo's own cache_size_limit is 8)."""

    LIMIT = 8

    def __init__(self, gm, slot: int, opts, model, example_inputs: list):
        self.gm, self.slot, self.opts = gm, slot, opts  # every argument but args[slot] is a weight (_split)
        weights = self._weights(example_inputs)
        self.last = self._entry(model, weights)
        self.models = {self._key(weights): self.last}

    def _weights(self, args) -> tuple:
        return tuple(args[:self.slot]) + tuple(args[self.slot + 1:])

    @staticmethod
    def _key(weights) -> tuple:
        return tuple(zip(map(id, weights), map(_VERSION, weights)))

    @staticmethod
    def _entry(model, weights) -> tuple:
        # the tensors are kept with their model, so their ids (the key) cannot be reused by new tensors
        return model, weights, list(map(_VERSION, weights))

    def __call__(self, *args):
        weights = self._weights(args)
        model, known, versions = self.last
        # the last set's tensors and versions compared in C loops (map): run cache-cold after every inference,
        # a Python loop over ~80 weights cost ~2% of vgg16-cifar's call (docs/results.md, 2026-12-06 17:40)
        if not (all(map(operator.is_, weights, known)) and list(map(_VERSION, weights)) == versions):
            key = self._key(weights)
            self.last = self.models.get(key) or self._recompile(args, weights, key)
            model = self.last[0]
        outs = model(args[self.slot])
        return list(outs) if isinstance(outs, tuple) else [outs]

    def _recompile(self, args, weights, key) -> tuple:
        warnings.warn(f"unsparse backend: the weights differ from those compiled ({len(self.models)} set(s) so far: "
                      "another instance of the module, or weights replaced or written); compiling for these",
                      UnsparseRecompile, stacklevel=3)
        try:
            model = _build(self.gm, list(args), self.slot, self.opts)
        except Exception as err:  # noqa: BLE001  as at the first compile: what cannot be compiled runs eagerly
            warnings.warn(f"unsparse backend: {err}; this graph runs eagerly", UnsparseFallback, stacklevel=3)
            def model(x, a=list(args)):  # the graph itself, eagerly
                return self.gm(*[x if i == self.slot else t for i, t in enumerate(a)])
        if len(self.models) >= self.LIMIT:
            self.models.pop(next(iter(self.models)))  # the oldest set
        self.models[key] = self._entry(model, weights)
        return self.models[key]


def _compile(gm: torch.fx.GraphModule, example_inputs: list, options: dict):
    from .api import CompileOptions

    slot = _split(gm, example_inputs)
    try:
        opts = CompileOptions(**options)
    except TypeError as err:
        raise UnsparseError(f"unknown option: {err}") from None
    model = _build(gm, list(example_inputs), slot, opts)
    _drop_weight_guards()
    return _Weighted(gm, slot, opts, model, example_inputs)


def _on_weights(guard) -> bool:
    """A guard on a parameter or buffer (its shape and dtype) or on a `_parameters`/`_buffers` dict's type."""
    kind = guard.inner_create_fn().__name__
    where = type(guard.originating_source).__name__
    return kind == "TENSOR_MATCH" or (kind == "TYPE_MATCH" and where == "UnspecializedParamBufferSource")


def _drop_weight_guards() -> int:
    """Drop Dynamo's shape/dtype guards on the module's parameters and buffers for a graph compiled here.

    The compiled graph holds the weights as constants and never reads the tensors Dynamo passes it, so a
    guard on their shape protects nothing (`_Weighted` knows the weights by identity and version instead,
    which a weight of the same shape would pass), yet checking ~100 of them is most of
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
