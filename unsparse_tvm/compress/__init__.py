"""Compression before compiling: masks (what to prune), targets (how far, per layer), schedule (when,
while fine-tuning), prune and quantize (the commands), train (training and evaluation), data (data
sets), report (what a model holds: sparsity, pattern, quantisation, footprint)."""
