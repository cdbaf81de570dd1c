"""The ONNX door: an `.onnx` file, checked, into a Relax module with its weights as constants.

`import_onnx(path, batch)` is to ONNX what `frontend.load_program` + `import_program` are to a .pt2: one
float32 tensor input (name, shape and dtype from the graph; a dynamic batch specialised and said), the
layers named by their ONNX initializers (`features.0.weight` -> `features.0`; the TorchScript exporter's
`onnx::Conv_145` by the node's scope `/features/features.0/Conv`), and every defect of the file one
`UnsparseError` line, before TVM's importer sees it (its messages are tracebacks and IR dumps).

QDQ models (QuantizeLinear/DequantizeLinear) are taken as fp32: the weights' DequantizeLinear fold into
float constants (the pruned zeros stay zero where the zero point is 0) and the activations' Q/DQ pairs
run as written, so the result is the graph's own arithmetic; `notes` says so. (Running them on our int8
kernels would need the graph's scales mapped onto our quantisation scheme exactly, or the answer would
no longer be ONNX Runtime's.)
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field

import numpy as np

from .errors import UnsparseError
from .frontend import check_batch

# Opset 7 brought numpy-style broadcasting to Add/Mul/Gemm/BatchNormalization, which every converter of
# TVM's importer assumes (the older `broadcast`/`axis` attributes are ignored, silently wrong).
MIN_OPSET = 7

# The ONNX ops whose conversion tests/test_onnx.py checks against ONNX Runtime (the built-in models and
# the torchvision architectures from both exporters, the epilogue and QDQ models, the op sweep). An op
# TVM converts but nobody checked here is refused by name: a wrong answer is worse than an error.
VERIFIED_OPS = frozenset({
    "Add", "AveragePool", "BatchNormalization", "Clip", "Concat", "Constant", "Conv", "DequantizeLinear",
    "Div", "Flatten", "Gather", "Gemm", "GlobalAveragePool", "GlobalMaxPool", "HardSigmoid", "HardSwish",
    "Identity", "MatMul", "MaxPool", "Mul", "QuantizeLinear", "ReduceMean", "Relu", "Reshape", "Resize",
    "Sigmoid", "Slice", "Softmax", "Split", "Squeeze", "Sub", "Transpose", "Unsqueeze",
})

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
WEIGHT_INPUT = {"Conv": 1, "Gemm": 1, "MatMul": 1}  # which input of a layer op holds its weight


@dataclass
class ImportedOnnx:
    """An ONNX model as the compiler takes it."""

    mod: object                          # tvm.ir.IRModule, weights as constants
    names: object                        # relay_passes.layers.LayerNames: reports name layers by their ONNX names
    input: dict                          # {"name", "shape", "dtype"}: the graph's input, shape made static
    outputs: list[dict] = field(default_factory=list)  # {"name", "shape", "dtype"} of every output, in order
    notes: list[str] = field(default_factory=list)     # what was decided for the user (dynamic batch, QDQ)
    qdq: bool = False                    # QuantizeLinear/DequantizeLinear in the graph (run as fp32)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.input["shape"])


def _onnx():
    try:
        import onnx
    except ImportError:
        raise UnsparseError('ONNX models need the onnx package: pip install -e ".[peers]" (or pip install onnx)') from None
    return onnx


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]


def load_onnx(path: str):
    """The ModelProto (external data loaded), or one line saying why the file is not a usable ONNX model."""
    if not os.path.exists(path):
        raise UnsparseError(f"no such file: {path}")
    if os.path.isdir(path):
        raise UnsparseError(f"{path} is a directory, not an ONNX file")
    onnx = _onnx()
    try:
        model = onnx.load(path)
    except Exception as err:  # protobuf's DecodeError for a truncated or foreign file, OSError for external data
        raise UnsparseError(f"{path} could not be read as an ONNX model ({type(err).__name__}: "
                            f"{_first_line(err)}); is the file complete?") from None
    if model.ir_version < 3 or not model.graph.node:  # protobuf parses some foreign bytes into an empty model
        raise UnsparseError(f"{path} is not an ONNX model (no graph in it)")
    return model


def check_opset(model, path: str) -> int:
    onnx = _onnx()
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    newest = onnx.defs.onnx_opset_version()
    if opset is None:
        raise UnsparseError(f"{path} declares no ai.onnx opset; re-export it with torch.onnx.export")
    if not MIN_OPSET <= opset <= newest:
        raise UnsparseError(f"{path} uses ONNX opset {opset}; unsparse-tvm takes opsets {MIN_OPSET} (the numpy-style "
                            f"broadcasting TVM's importer assumes) to {newest} (the newest the onnx package knows): "
                            "re-export with torch.onnx.export(..., opset_version=18)")
    return opset


def check_convertible(model, path: str) -> None:
    """Refuse ops of other domains and ops TVM's importer has no converter for, by name."""
    foreign = sorted({f"{n.domain}:{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if foreign:
        raise UnsparseError(f"{path} uses op{'s' if len(foreign) > 1 else ''} outside the standard ONNX domain "
                            f"({', '.join(foreign)}); export the model with standard ONNX ops only")
    ops = sorted({n.op_type for n in model.graph.node})
    try:
        from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map  # TVM's own list of converters
        converts = set(_get_convert_map()) | {"Constant", "If"}
    except ImportError:  # moved in a later TVM: the allow-list below still holds
        converts = set(ops)
    missing = [op for op in ops if op not in converts]
    if missing:
        raise UnsparseError(f"{path} uses ONNX op{'s' if len(missing) > 1 else ''} {', '.join(missing)}, which TVM's "
                            "ONNX importer cannot convert")


def check_verified(model, path: str) -> None:
    """Refuse ops not among VERIFIED_OPS (after normalise: shape arithmetic folded away needs no checking)."""
    ops = sorted({n.op_type for n in model.graph.node})
    unverified = [op for op in ops if op not in VERIFIED_OPS]
    if unverified:
        raise UnsparseError(f"{path} uses ONNX op{'s' if len(unverified) > 1 else ''} {', '.join(unverified)}, not "
                            f"among those unsparse-tvm checks against ONNX Runtime ({len(VERIFIED_OPS)} ops: "
                            "conv nets' Conv/Gemm/pooling/activations/Q-DQ)")


def check_float32(model, path: str) -> None:
    """Float weights other than float32 are refused, as for a .pt2 (frontend.check_dtypes): TVM would import
    them, and our passes would leave every such layer dense."""
    onnx = _onnx()
    for init in model.graph.initializer:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type))
        if dtype.kind == "f" and dtype != np.float32:
            raise UnsparseError(f"{path} holds {dtype} weights ({init.name}); unsparse-tvm compiles float32 models "
                                "only: export model.float() instead")


def input_spec(model, path: str, batch: int | None, input_shape=None, log=print) -> dict:
    """{"name", "shape", "dtype"} of the one graph input, every dimension static (a dynamic batch takes
    `batch`, default 1, and `log` says so; other dynamic ones need `input_shape`)."""
    onnx = _onnx()
    weights = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in weights]  # old exporters list weights as inputs
    if len(inputs) != 1:
        listed = ", ".join(i.name for i in inputs[:4]) + (", ..." if len(inputs) > 4 else "")
        raise UnsparseError(f"{path} has {len(inputs)} inputs ({listed}); unsparse-tvm compiles models with one input")
    inp = inputs[0]
    if not inp.type.HasField("tensor_type"):
        raise UnsparseError(f"the input '{inp.name}' of {path} is not a tensor; unsparse-tvm compiles CNNs on one tensor")
    tt = inp.type.tensor_type
    dtype = str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))) if tt.elem_type else "undefined"
    if dtype != "float32":
        raise UnsparseError(f"the input '{inp.name}' of {path} is {dtype}; unsparse-tvm compiles models whose input "
                            "is float32")
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim] \
        if tt.HasField("shape") else None
    if input_shape is not None:
        shape = [int(d) for d in input_shape]
        if dims is not None and (len(shape) != len(dims) or any(d is not None and d != s for d, s in zip(dims, shape))):
            raise UnsparseError(f"input shape {shape} does not fit the input '{inp.name}' of {path} "
                                f"({['?' if d is None else d for d in dims]})")
        return {"name": inp.name, "shape": shape, "dtype": dtype}
    if dims is None:
        raise UnsparseError(f"the input '{inp.name}' of {path} has no shape; export the model with a static input shape")
    dynamic = [i for i, d in enumerate(dims) if d is None]
    if [i for i in dynamic if i != 0]:
        names = [tt.shape.dim[i].dim_param or "?" for i in dynamic]
        raise UnsparseError(f"the input '{inp.name}' of {path} has dynamic dimensions ({', '.join(names)} at axes "
                            f"{', '.join(map(str, dynamic))}) and no shape is given; export the model with a static "
                            "input shape (only the batch may be dynamic: --batch)")
    if batch is not None and not dynamic and batch != dims[0]:
        raise UnsparseError(f"--batch {batch}: the batch of {path} is fixed at {dims[0]} (export it with a dynamic "
                            "batch dimension to compile other batch sizes)")
    shape = [batch or 1 if d is None else d for d in dims]
    if dynamic:
        log(f"note: {path} has a dynamic input (axes 0); compiled for the static shape {shape}"
            + (" (--batch N picks another batch)" if batch is None else ""))
    return {"name": inp.name, "shape": shape, "dtype": dtype}


def normalise(model, spec: dict):
    """The graph with the input's static shape written in, shape computations folded to constants and
    Constant nodes as initializers (onnxscript, which the dynamo exporter itself runs): the TorchScript
    exporter computes slice bounds from Shape at run time (ShuffleNet's channel split), which TVM's importer
    keeps as dynamic slices of unknown shape, and writes constants as value_float/value_ints, which it
    cannot read. Q/DQ nodes are left as they are (the QDQ note and the layer names read them)."""
    onnx = _onnx()
    inp = next(i for i in model.graph.input if i.name == spec["name"])
    dims = inp.type.tensor_type.shape.dim
    while len(dims) < len(spec["shape"]):
        dims.add()
    for d, n in zip(dims, spec["shape"]):
        d.Clear()
        d.dim_value = n
    try:
        import onnxscript.optimizer as optimizer
        from onnxscript import ir
        from onnxscript.ir.passes.common import LiftConstantsToInitializersPass
    except ImportError:  # optional (the peers extra): TVM's importer copes with most graphs without it
        return model
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        graph = ir.serde.deserialize_model(inferred)
        optimizer.fold_constants(graph, onnx_shape_inference=True,
                                 should_fold=lambda node: False if node.op_type in QDQ_OPS else None)
        LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(graph)
        optimizer.remove_unused_nodes(graph)
        return ir.serde.serialize_model(graph)
    except Exception:  # noqa: BLE001 (a graph the optimiser cannot handle: TVM's importer gets it as written)
        return model


def _scope_name(node_name: str) -> str | None:
    """The module path in a TorchScript-exported node name: '/layer2/layer2.0/downsample/downsample.0/Conv'
    -> 'layer2.0.downsample.0' (each scope repeats its parent's name before '.index'); None otherwise."""
    if not node_name.startswith("/"):
        return None
    parts: list[str] = []
    for seg in node_name.strip("/").split("/")[:-1]:  # the last segment is the op's own name
        if parts and seg.startswith(parts[-1] + "."):
            parts[-1] = seg
        else:
            parts.append(seg)
    return ".".join(parts) or None


_GENERATED = re.compile(r"^(onnx::|val_|_val_|/)|^\d+$")  # exporters' names for folded or unnamed tensors


def _dequantized(node, arrays: dict) -> np.ndarray | None:
    """The float weight a DequantizeLinear of a constant gives, computed as TVM's legalisation does
    ((int32(q) - zp) as float32, times scale), so its fingerprint is the Relax constant's."""
    q, scale = (arrays.get(n) for n in node.input[:2])
    if q is None or scale is None:
        return None
    zp = arrays.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    shape = [1] * q.ndim
    if scale.size > 1:
        shape[axis] = scale.size
    diff = q.astype(np.int32) - (0 if zp is None else zp.astype(np.int32).reshape(shape if zp.size > 1 else ()))
    return (diff.astype(np.float32) * scale.astype(np.float32).reshape(shape if scale.size > 1 else ())).astype(np.float32)


def layer_names(model):
    """LayerNames from the initializers feeding a Conv/Gemm/MatMul weight (directly or through a
    DequantizeLinear), named as the .pt2 path names them."""
    from onnx import numpy_helper

    from .relay_passes.layers import LayerNames  # deferred: relay_passes imports TVM

    arrays = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producers = {out: n for n in model.graph.node for out in n.output}
    names = LayerNames()
    for node in model.graph.node:
        idx = WEIGHT_INPUT.get(node.op_type)
        if idx is None or len(node.input) <= idx:
            continue
        src = node.input[idx]
        arr, init = arrays.get(src), src
        if arr is None and src in producers and producers[src].op_type == "DequantizeLinear":
            init = producers[src].input[0]
            arr = _dequantized(producers[src], arrays)
        if arr is None or arr.ndim < 2 or arr.dtype != np.float32:
            continue
        name = init.removesuffix("_quantized").removesuffix("_DequantizeLinear")
        if _GENERATED.match(name):
            name = _scope_name(node.name)
        if name is None:
            continue
        names.add(name, arr)
    return names


def check_static(mod, path: str) -> None:
    """Every tensor in main has a static shape (TVM's passes crash on the others, our matchers skip them)."""
    from tvm import relax

    for block in mod["main"].body.blocks:
        for b in block.bindings:
            ty = b.var.ty
            if isinstance(ty, relax.TensorType) and (ty.shape is None or not all(
                    isinstance(v, int) or hasattr(v, "value") for v in getattr(ty.shape, "values", [None]))):
                op = getattr(getattr(b.value, "op", None), "name", type(b.value).__name__)
                raise UnsparseError(f"{path} computes a tensor of run-time shape ({op}); unsparse-tvm compiles "
                                    "graphs whose shapes are known at compile time")


def output_specs(mod, model) -> list[dict]:
    """{"name", "shape", "dtype"} of every output of the imported main (static after the input is)."""
    from tvm import relax

    ret = mod["main"].ret_ty
    tys = list(ret.fields) if isinstance(ret, relax.TupleType) else [ret]
    names = [o.name for o in model.graph.output]
    outs = []
    for i, ty in enumerate(tys):
        try:
            shape = [int(v) for v in ty.shape.values]
        except (TypeError, AttributeError):
            raise UnsparseError(f"the output '{names[i] if i < len(names) else i}' has a shape that depends on the "
                                "input's values; unsparse-tvm compiles models with static output shapes") from None
        outs.append({"name": names[i] if i < len(names) else f"out{i}", "shape": shape, "dtype": str(ty.dtype)})
    return outs


def import_onnx(path: str, batch: int | None = None, *, input_shape=None, log=print) -> ImportedOnnx:
    """An .onnx file -> ImportedOnnx (Relax module with constant weights, layer names, input/output specs),
    or one UnsparseError line. `batch` fills a dynamic batch dimension (default 1); `input_shape` gives the
    whole input shape where other dimensions are dynamic."""
    check_batch(batch)
    model = load_onnx(path)
    opset = check_opset(model, path)
    check_convertible(model, path)
    check_float32(model, path)
    notes: list[str] = []

    def note(text: str) -> None:
        notes.append(text)
        log(text)

    spec = input_spec(model, path, batch, input_shape, log=note)
    onnx = _onnx()
    try:
        onnx.checker.check_model(model)
    except Exception as err:  # onnx.checker.ValidationError: a damaged or hand-edited graph
        raise UnsparseError(f"{path} is not a valid ONNX model: {_first_line(err)}") from None
    model = normalise(model, spec)
    check_verified(model, path)
    qdq = any(n.op_type in QDQ_OPS for n in model.graph.node)
    if qdq:
        note(f"note: {path} is a QDQ-quantised model; its weights are dequantised and it runs as fp32 "
             "(activation QuantizeLinear/DequantizeLinear computed as written)")

    from tvm.relax.frontend.onnx import from_onnx  # deferred: TVM's compiler, ~3 s to import

    from .relay_passes import FoldConstantArrays

    try:
        with warnings.catch_warnings():  # the checker's and the renaming warnings: said above, or harmless
            warnings.simplefilter("ignore")
            mod = from_onnx(model, shape_dict={spec["name"]: spec["shape"]}, dtype_dict={spec["name"]: "float32"},
                            opset=opset, keep_params_in_input=False)
    except UnsparseError:
        raise
    except Exception as err:  # the importer raises assorted errors; the first line says what
        raise UnsparseError(f"TVM's ONNX importer cannot convert {path}: {_first_line(err)}") from None
    check_static(mod, path)
    mod = FoldConstantArrays()(mod)  # reshaped biases: constants (DequantizeLinear of weights: FoldConstant)
    return ImportedOnnx(mod, layer_names(model), spec, output_specs(mod, model), notes, qdq)
