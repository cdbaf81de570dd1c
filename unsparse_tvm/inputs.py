"""Every file or folder a command reads is checked here first, in one line each: it exists, it is a file
(or a folder, where one is read), it can be read, it is not empty, its name ends as it must. The
readers after these checks can then treat any other failure as a damaged file. (Torch-free: `run` uses it.)"""

from __future__ import annotations

import os

from .errors import UnsparseError


def check_input_file(path: str, what: str = "", suffixes: tuple[str, ...] = (), hint: str = "") -> str:
    """Refuse a missing, unreadable, empty or wrongly named input file; returns the path."""
    label = f"{what} {path}" if what else path
    if not os.path.exists(path):
        raise UnsparseError(f"no such {what or 'file'}: {path}")
    if os.path.isdir(path):
        raise UnsparseError(f"{label} is a directory, not a file" + (f": {hint}" if hint else ""))
    if suffixes and not path.endswith(suffixes):
        raise UnsparseError(f"{label} must end in {' or '.join(suffixes)}" + (f": {hint}" if hint else ""))
    try:
        with open(path, "rb") as f:
            empty = not f.read(1)
    except OSError as err:
        raise UnsparseError(f"cannot read {label}: {err.strerror or err}") from None
    if empty:
        raise UnsparseError(f"{label} is empty (0 bytes): an interrupted copy or download?")
    return path


def check_input_dir(path: str, what: str) -> str:
    """Refuse a missing folder, or a file where a folder is read; returns the path."""
    if not os.path.exists(path):
        raise UnsparseError(f"{what} {path} does not exist")
    if not os.path.isdir(path):
        raise UnsparseError(f"{what} {path} is a file, not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise UnsparseError(f"cannot read {what} {path}")
    return path
