"""The GPU kit builder's parts (benchmarks/gpu_kit.py is the command): knobs (the CUDA rules' knob grids),
scaffold (the runner's files and the TVM runtime), kernels (the compiled layer and model modules)."""

import time


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
