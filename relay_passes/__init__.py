"""Relax passes (the directory keeps the name `relay_passes`: Relay was removed from TVM in 0.20 and
Relax is its successor). One pass per file, named for what it rewrites; `pipeline.py` composes them;
`layers.py` is what the passes report per layer; files starting with `_` are shared helpers."""

from ._dense_match import find_layers
from ._util import shape_of
from .apply_tuning_records import ApplyTuningRecords
from .fold_batchnorm import FoldBatchNormIntoConv
from .fold_constant_arrays import FoldConstantArrays
from .layers import LayerDecision, LayerNames
from .lower_dense_conv2d import LowerDenseConv2d
from .pipeline import build_pipeline, pipeline_phases
from .sparsify_conv2d import SparsifyConv2d
from .sparsify_dense import SparsifyDense

__all__ = [
    "ApplyTuningRecords",
    "FoldBatchNormIntoConv",
    "FoldConstantArrays",
    "LayerDecision",
    "LayerNames",
    "LowerDenseConv2d",
    "SparsifyConv2d",
    "SparsifyDense",
    "build_pipeline",
    "find_layers",
    "pipeline_phases",
    "shape_of",
]
