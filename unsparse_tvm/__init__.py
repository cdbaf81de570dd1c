"""unsparse-tvm: compile pruned and quantised CNNs with TVM into sparse direct-convolution kernels.

Data flows one way: model -> prune/quantise -> import (torch.export -> Relax) -> passes
(`unsparse_tvm.relay_passes`) -> schedules (`unsparse_tvm.schedules`) -> build -> tune/bench -> deploy.
Nothing heavy is imported here, so `unsparse-tvm run` can stay runtime-only (no torch, no compiler).
"""

__version__ = "0.1.0"
