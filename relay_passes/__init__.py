"""Relax passes (the directory keeps the name `relay_passes`: Relay was removed from TVM in 0.20 and
Relax is its successor). One pass per file, named for what it rewrites; `pipeline.py` composes them."""

from .fold_batchnorm import FoldBatchNormIntoConv
from .lower_dense_conv2d import LowerDenseConv2d
from .pipeline import build_pipeline
from .schedule_ops import ScheduleUnsparseOps
from .sparsify_conv2d import SparsifyConv2d
from .sparsify_dense import SparsifyDense

__all__ = [
    "FoldBatchNormIntoConv",
    "LowerDenseConv2d",
    "ScheduleUnsparseOps",
    "SparsifyConv2d",
    "SparsifyDense",
    "build_pipeline",
]
