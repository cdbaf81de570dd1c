"""Runs inside DeepSparse's own environment (peers_deepsparse.py): numpy and deepsparse only, no unsparse_tvm.

    python deepsparse_worker.py MODEL.onnx X.npy THREADS
Prints "ready" once the engine is compiled, then answers one line per command on stdin:
"time N" -> milliseconds per call of N calls; "out PATH" -> writes the output as .npy, answers "ok".
"""

import sys
import time

import numpy as np
from deepsparse import compile_model


def main() -> None:
    model, x_path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    x = [np.load(x_path)]
    engine = compile_model(model, batch_size=x[0].shape[0], num_cores=threads)
    engine(x)
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "time":
            n = int(arg)
            start = time.perf_counter()
            for _ in range(n):
                engine(x)
            print((time.perf_counter() - start) / n * 1e3, flush=True)
        elif cmd == "out":
            np.save(arg, engine(x)[0])
            print("ok", flush=True)


if __name__ == "__main__":
    main()
