"""What the rewrite passes report per layer: its PyTorch name (LayerNames, found from the weight's bytes,
since Relax constants carry no names) and what was done with it (LayerDecision); `compile`, `bench`
and `inspect` print these."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field

import numpy as np


def fingerprint(arr: np.ndarray) -> str:
    arr = np.ascontiguousarray(arr)
    h = hashlib.blake2b(arr.tobytes(), digest_size=16)
    return f"{arr.shape}:{arr.dtype}:{h.hexdigest()}"


class LayerNames:
    """Maps weight arrays to the PyTorch parameter names they came from (constants carry no names)."""

    def __init__(self, named: dict[str, np.ndarray] | None = None):
        self._names: dict[str, str] = {}
        # DropDeadChannels: depthwise layer -> (channels dropped, channels), from the whole block / from the expand only
        self.dropped: dict[str, tuple[int, int]] = {}
        self.gathered: dict[str, tuple[int, int]] = {}
        # QuantizeInt8Conv2d/Dense: layers with a calibrated int8 range left to the fp32 passes (SCATTERED_FP32) ->
        # the nonzeros their int8 quads would have held
        self.fp32_int8: dict[str, float] = {}
        # and those left fp32 because a ReLU6 (clip) or a SiLU follows them (CAPPED_FP32) -> which
        self.capped_int8: dict[str, str] = {}
        for name, arr in (named or {}).items():
            self.add(name, arr)
        self._count = 0

    def add(self, name: str, arr: np.ndarray) -> None:
        """Name a weight after its layer; a 2-D one also as its transpose, the way a matmul against a
        stored [in, out] matrix (ONNX MatMul, Gemm transB=0, x @ W in PyTorch) reaches SparsifyDense."""
        self._names[fingerprint(arr)] = name.removesuffix(".weight")
        if arr.ndim == 2:  # never instead of another weight's own name (all-zero weights look alike)
            self._names.setdefault(fingerprint(arr.T), name.removesuffix(".weight"))

    def alias(self, new: np.ndarray, old: np.ndarray) -> None:
        name = self._names.get(fingerprint(old))
        if name is not None:
            self._names[fingerprint(new)] = name

    def left_fp32(self) -> set[str]:
        """The layers with an int8 range that the int8 passes left to the fp32 ones (either reason)."""
        return set(self.fp32_int8) | set(self.capped_int8)

    def rank(self) -> dict[str, int]:
        """Each layer name's place in the order the weights were named (the model's parameter order: for the
        models here, the order its layers run in)."""
        return {name: i for i, name in enumerate(dict.fromkeys(self._names.values()))}

    def known(self, arr: np.ndarray) -> str | None:
        """The layer's PyTorch name if the weight is known, else None (name_of would number an unknown one,
        and a pass that sees the layer later would number it again)."""
        return self._names.get(fingerprint(arr))

    def name_of(self, arr: np.ndarray, kind: str) -> str:
        name = self._names.get(fingerprint(arr))
        if name is None:
            self._count += 1
            name = f"{kind}{self._count}"
        return name


@dataclass
class LayerDecision:
    """What a rewrite pass did with one layer; `compile` and `bench` print these."""

    name: str
    op: str                      # conv2d or dense
    shape: list[int]             # weight shape
    sparsity: float
    decision: str                # "sparse" or "dense"
    format: str = "-"            # ell / hyb / vellV for sparse layers
    nnz: int = 0
    padded: int = 0              # stored entries including padding
    input_shape: list[int] = field(default_factory=list)
    fused: str = ""              # epilogue fused into the kernel, e.g. "bias+relu"
    dense_us: float = 0.0        # predicted time of the dense kernel (unsparse_tvm.cost.model; 0: not predicted)
    sparse_us: float = 0.0       # predicted time of the sparse kernel in `format`
    precision: str = "fp32"      # stored weight precision: fp32, or the quantised coding (relay_passes/_quant.py)
    weight_bytes: int = 0        # bytes of the layer's weight operands as compiled (values, offsets, scales)
    reason: str = ""             # why a layer stayed dense ("predicted faster", "grouped conv, groups=2", ...)

    def keep_dense(self, reason: str) -> None:
        self.decision, self.reason = "dense", reason

    @property
    def label(self) -> str:
        """The decision as printed: "sparse", or "dense (why)"."""
        return f"{self.decision} ({self.reason})" if self.reason else self.decision

    def as_dict(self) -> dict:
        return asdict(self)
