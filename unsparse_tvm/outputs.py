"""Every file a command writes goes through here: checked before any work, written to a temp file, renamed.

`check_output(path, ...)` refuses a bad output before the model is even loaded (wrong suffix, a directory,
one of the command's inputs, an existing file without --force, a missing or unwritable folder).
`writing(path)` yields a temp path inside a private work folder next to the output
(`.NAME.unsparse-tmpPID/`), which also holds every temp file TVM makes meanwhile (`tempfile.tempdir`
points there); the result is renamed over `path` only when complete, and the work folder is removed on
any exit: success, an error, Ctrl-C or SIGTERM (turned into KeyboardInterrupt while writing), and
`kill -9` too: a small guard process removes the folder when this one dies. Should the guard die with it
(a whole process group killed), the next command writing to that folder removes it (it belongs to a
process that no longer exists).
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from typing import Iterator

from .errors import UnsparseError

_TMP_TAG = ".unsparse-tmp"


def check_output(path: str, *, overwrite: bool, suffixes: tuple[str, ...] = (), inputs: tuple[str | None, ...] = (),
                 what: str = "output") -> str:
    """One clear error for an output that cannot or must not be written; returns the path."""
    if suffixes and not path.endswith(tuple(suffixes)):
        raise UnsparseError(f"{what} {path} must end in {' or '.join(suffixes)}")
    if os.path.isdir(path):
        raise UnsparseError(f"{what} {path} is a directory: name a file")
    if os.path.exists(path) and not os.path.isfile(path):  # /dev/null, a fifo: the rename would replace it
        raise UnsparseError(f"{what} {path} is not a regular file (a device, pipe or socket): name a file")
    for src in inputs:
        if src and os.path.exists(src) and os.path.exists(path) and os.path.samefile(src, path):
            raise UnsparseError(f"{what} {path} is the input; write to another file (inputs are never modified)")
    if os.path.exists(path) and not overwrite:
        raise UnsparseError(f"{path} exists; pass --force to overwrite it")
    check_folder(os.path.dirname(os.path.abspath(path)), path, what)
    sweep_stale(os.path.dirname(os.path.abspath(path)))  # what a killed (kill -9) earlier run left there
    return path


def check_output_dir(path: str, *, overwrite: bool = True, holds: tuple[str, ...] = (),
                     inputs: tuple[str, ...] = (), what: str = "output directory") -> str:
    """A directory output (a tuning log): not a file, not one of the inputs, and, without `overwrite`, none of
    `holds` non-empty in it; created if missing, and probed for writing. Returns the path."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UnsparseError(f"{what} {path} is a file, not a directory")
    for src in inputs:
        if src and os.path.exists(src) and os.path.exists(path) and os.path.samefile(src, path):
            raise UnsparseError(f"{what} {path} is one of the inputs; write to another directory (inputs are never "
                                "modified)")
    if not overwrite and any(os.path.isfile(os.path.join(path, f)) and os.path.getsize(os.path.join(path, f))
                             for f in holds):
        raise UnsparseError(f"{path} already holds {', '.join(holds)}; pass --force to overwrite it")
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=path, prefix=".write-test", delete=True).close()
    except OSError as err:
        raise UnsparseError(f"cannot write to {what} {path}: {err.strerror or err}") from None
    return path


def check_folder(folder: str, path: str, what: str = "output") -> None:
    """The output's folder exists and takes a file: probed by writing one, since permission bits say
    nothing to root, nor about read-only mounts or /proc and /sys."""
    if not os.path.isdir(folder):
        if os.path.exists(folder):
            raise UnsparseError(f"{folder} (in {what} {path}) is a file, not a folder")
        raise UnsparseError(f"folder {folder} of {what} {path} does not exist")
    try:
        tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test", delete=True).close()
    except OSError as err:
        raise UnsparseError(f"cannot write {what} {path}: folder {folder} is not writable "
                            f"({err.strerror or type(err).__name__})") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(folder: str) -> None:
    """Remove work folders left by killed (kill -9) writers in `folder`."""
    for stale in glob.glob(os.path.join(glob.escape(folder), f".*{_TMP_TAG}*")):
        m = re.search(re.escape(_TMP_TAG) + r"(\d+)$", stale)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt meanwhile, so `finally` blocks run (Python's default is to die)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(_sig, _frame):
        raise KeyboardInterrupt

    previous = signal.getsignal(signal.SIGTERM)
    if previous not in (signal.SIG_DFL, None):  # someone (e.g. tune) handles it already
        yield
        return
    signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def work_folder(path: str) -> Iterator[str]:
    """A private folder next to `path` for temp files (TVM's too), removed on any exit."""
    folder = os.path.dirname(os.path.abspath(path))
    sweep_stale(folder)
    work = os.path.join(folder, f".{os.path.basename(path)}{_TMP_TAG}{os.getpid()}")
    old_tempdir = tempfile.tempdir
    with _sigterm_as_interrupt():
        guard = None
        try:
            os.makedirs(work, exist_ok=True)
            guard = _guard(work)
            tempfile.tempdir = work
            yield work
        finally:
            tempfile.tempdir = old_tempdir
            shutil.rmtree(work, ignore_errors=True)
            if guard is not None:
                guard.stdin.close()  # the guard sees EOF, finds the folder gone, and exits
                guard.wait()


# The guard: a small process that waits for this one to end (its stdin closes when this process dies,
# whatever kills it) and then removes the work folder if it is still there; kill -9 leaves nothing.
_GUARD = ("import os, shutil, signal, sys\n"
          "signal.signal(signal.SIGINT, signal.SIG_IGN); signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
          "sys.stdin.buffer.read()\n"
          "shutil.rmtree(sys.argv[1], ignore_errors=True)\n")


def _guard(work: str):
    try:
        return subprocess.Popen([sys.executable, "-I", "-S", "-c", _GUARD, work], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True)
    except OSError:  # no guard: a kill -9 leftover is then swept by the next command (sweep_stale)
        return None


@contextlib.contextmanager
def writing(path: str, *, overwrite: bool = True) -> Iterator[str]:
    """Yield a temp path (same name, same suffix) to write to; it replaces `path` only on success."""
    with work_folder(path) as work:
        tmp = os.path.join(work, os.path.basename(path))
        try:
            yield tmp
        except OSError as err:  # a full disk, a quota, an I/O error: the folder was writable when checked
            raise UnsparseError(f"cannot write {path}: {err.strerror or err}") from None
        if not os.path.exists(tmp):
            raise UnsparseError(f"internal error: nothing was written for {path}")
        if os.path.exists(path) and not overwrite:  # appeared meanwhile
            raise UnsparseError(f"{path} exists; pass --force to overwrite it")
        os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
    with writing(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
