"""DeepSparse (Neural Magic's sparse CPU runtime) as a `bench --peers` contender, in a virtual environment of
its own: deepsparse 1.8.0 pins onnx 1.14 and numpy < 2, which must not pin this project. The environment is
built once, on first use, in the cache folder (about 500 MB; DEEPSPARSE_VENV names another), and the model
runs in a worker process there (deepsparse_worker.py), which times `number` calls when asked, so DeepSparse
takes its turn in bench's alternating rounds like the in-process runtimes. Where it cannot run (no wheel for
this Python, no network to install it, an ISA it refuses), the peer is skipped with one line.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

from .errors import UnsparseError

VERSION = "1.8.0"
PYTHONS = ((3, 8), (3, 9), (3, 10), (3, 11))  # the CPython versions deepsparse 1.8.0 has wheels for
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "deepsparse_worker.py")


def venv_dir() -> str:
    from .cost.calibration import cache_dir

    return os.environ.get("DEEPSPARSE_VENV") or os.path.join(os.path.dirname(cache_dir()), f"deepsparse-{VERSION}")


def ready() -> bool:
    """Whether DeepSparse's environment is built (bench includes it by default only then)."""
    return os.path.exists(os.path.join(venv_dir(), "bin", "python"))


def python(log=print) -> str:
    """The interpreter of DeepSparse's environment, built first if missing."""
    exe = os.path.join(venv_dir(), "bin", "python")
    if os.path.exists(exe):
        return exe
    if sys.version_info[:2] not in PYTHONS:
        raise UnsparseError(f"deepsparse {VERSION} has no wheel for Python {sys.version_info[0]}.{sys.version_info[1]}")
    log(f"building DeepSparse's own environment in {venv_dir()} (once; pip install deepsparse=={VERSION}) ...")
    tmp = venv_dir() + ".partial"
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", tmp], check=True, capture_output=True)
        proc = subprocess.run([os.path.join(tmp, "bin", "python"), "-m", "pip", "install", "-q", f"deepsparse=={VERSION}"],
                              capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise UnsparseError(f"pip could not install deepsparse {VERSION}: {last[:200]}")
        os.replace(tmp, venv_dir())  # venvs hold absolute paths: scripts in bin/ still say .partial, python runs
    finally:
        if os.path.exists(tmp):
            subprocess.run(["rm", "-rf", tmp])
    return exe


class Worker:
    """DeepSparse running one ONNX file on one input in its own process: calling it returns the output;
    `measure(number)` returns milliseconds per call of `number` calls timed in the worker."""

    def __init__(self, onnx_path: str, x: np.ndarray, threads: int):
        self.dir = tempfile.mkdtemp(prefix="unsparse-deepsparse-")
        np.save(os.path.join(self.dir, "x.npy"), x)
        self.proc = subprocess.Popen([python(), WORKER, onnx_path, os.path.join(self.dir, "x.npy"), str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(20):  # deepsparse may print a banner first
            ready = self.proc.stdout.readline().strip()
            if ready in ("ready", ""):
                break
        if ready != "ready":
            err = self.proc.stderr.read().strip().splitlines()
            raise UnsparseError(f"deepsparse could not run the model: {(err or ['no answer'])[-1][:200]}")

    def _ask(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        if not answer:
            raise UnsparseError(f"the deepsparse worker stopped: {self.proc.stderr.read().strip()[-200:]}")
        return answer

    def measure(self, number: int) -> float:
        return float(self._ask(f"time {number}"))

    def __call__(self) -> np.ndarray:
        out = os.path.join(self.dir, "y.npy")
        self._ask(f"out {out}")
        return np.load(out)

    def __del__(self):
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if getattr(self, "dir", None):  # the input and output files exchanged with the worker
            shutil.rmtree(self.dir, ignore_errors=True)
