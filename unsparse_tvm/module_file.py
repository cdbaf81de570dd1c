"""The .so file `compile` writes, read without loading it: its metadata trailer, the checks that the library
image is whole and unchanged, and the CUDA device code it carries. (Torch-free and TVM-free.)

Layout: the ELF image TVM exported, then MAGIC + metadata JSON + its length (8 bytes) + MAGIC. The dynamic
loader ignores bytes after the ELF image. The metadata records the image's SHA-256, so a module damaged
after compile (a bad copy, a flipped block) is refused in one line instead of crashing the loader.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct

from .errors import UnsparseError
from .inputs import check_input_file

_MAGIC = b"UNSPARSE-TVM-META"
_FATBIN_MAGIC = bytes.fromhex("50ed55ba")  # 0xBA55ED50, little endian: a CUDA fatbin header
_NOT_OURS = "is not a module written by `unsparse-tvm compile`"
_REQUIRED = {"target": str, "inputs": list, "layers": list, "model": str}


def payload_sha256(path: str, size: int) -> str:
    """SHA-256 of the first `size` bytes of the file (the library image)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = size
        while left > 0:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def write_metadata(path: str, meta: dict) -> None:
    """Append the trailer to the exported library at `path`; records the image's checksum in `meta`."""
    meta["payload_sha256"] = payload_sha256(path, os.path.getsize(path))
    blob = json.dumps(meta).encode()
    with open(path, "ab") as f:
        f.write(_MAGIC + blob + struct.pack("<Q", len(blob)) + _MAGIC)


def trailer_size(path: str) -> int:
    with open(path, "rb") as f:
        f.seek(-(len(_MAGIC) + 8), os.SEEK_END)
        (length,) = struct.unpack("<Q", f.read(8))
    return 2 * len(_MAGIC) + 8 + length


def read_metadata(path: str) -> dict:
    """The metadata of a module; one line naming what is wrong with a file that has none, or a damaged one."""
    check_input_file(path, hint="give the .so file `unsparse-tvm compile` wrote")
    size = os.path.getsize(path)
    tail = len(_MAGIC) + 8
    with open(path, "rb") as f:
        elf = f.read(4) == b"\x7fELF"
        if size < tail:
            raise UnsparseError(f"{path} {_NOT_OURS}")
        f.seek(size - tail)
        end = f.read(tail)
        if end[8:] != _MAGIC:
            if elf and _holds_magic(f):  # the trailer began but its end is gone
                raise UnsparseError(f"{path} is truncated: the end of its metadata is missing; compile it again")
            raise UnsparseError(f"{path} {_NOT_OURS} (no metadata)" if not elf else
                                f"{path} is a shared library without unsparse-tvm metadata: not written by "
                                "`unsparse-tvm compile`, or cut short")
        (length,) = struct.unpack("<Q", end[:8])
        if length > size - 2 * tail:
            raise UnsparseError(f"{path} has a damaged metadata trailer (its length field is wrong); compile it again")
        f.seek(size - tail - length - len(_MAGIC))
        head = f.read(len(_MAGIC) + length)
    try:
        if not head.startswith(_MAGIC):
            raise ValueError
        meta = json.loads(head[len(_MAGIC):].decode("utf-8"))
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UnsparseError(f"{path} has a damaged metadata trailer (not JSON); compile it again") from None
    if not _well_formed(meta):
        raise UnsparseError(f"{path} has damaged metadata (fields missing); compile it again")
    return meta


def _well_formed(meta) -> bool:
    """The fields run and inspect rely on, of the right kinds."""
    if not isinstance(meta, dict) or any(not isinstance(meta.get(k), t) for k, t in _REQUIRED.items()):
        return False
    spec = meta["inputs"][0] if meta["inputs"] else None
    return (isinstance(spec, dict) and isinstance(spec.get("dtype"), str) and isinstance(spec.get("shape"), list)
            and all(isinstance(d, int) and d > 0 for d in spec["shape"]))


def _holds_magic(f) -> bool:
    f.seek(0)
    return f.read().rfind(_MAGIC) > 0


def check_image(path: str) -> None:
    """The ELF image must be whole: a truncated .so with an intact metadata trailer would crash the
    dynamic loader (SIGBUS) instead of failing. Its end is the furthest of the section header table and
    the program segments, read from the ELF64 header."""
    body = os.path.getsize(path) - trailer_size(path)
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            raise UnsparseError(f"{path} is not a 64-bit little-endian shared library (damaged module?)")
        phoff, shoff = struct.unpack_from("<QQ", head, 0x20)
        phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", head, 0x36)
        end = shoff + shnum * shentsize
        if phoff + phnum * phentsize > body or phentsize < 40:
            end = max(end, phoff + phnum * phentsize)
        else:
            f.seek(phoff)
            table = f.read(phnum * phentsize)
            for i in range(phnum):
                offset, _, _, filesz = struct.unpack_from("<QQQQ", table, i * phentsize + 8)
                end = max(end, offset + filesz)
    if end > body:
        raise UnsparseError(f"{path} is truncated or damaged: its library image needs {end:,d} bytes, the file holds "
                            f"{body:,d}; compile it again")


def check_payload(path: str, meta: dict) -> None:
    """The library image must be the one compile wrote (modules from before checksums: not checked)."""
    want = meta.get("payload_sha256")
    if want is not None and payload_sha256(path, os.path.getsize(path) - trailer_size(path)) != want:
        raise UnsparseError(f"{path} is damaged: its library image differs from what compile wrote (checksum "
                            "mismatch); compile it again")


def integrity(path: str, meta: dict) -> str:
    """`inspect`'s verdict on the library image: what run would find, without loading it."""
    try:
        check_image(path)
        check_payload(path, meta)
    except UnsparseError as err:
        return f"DAMAGED: {str(err).removeprefix(path + ' ')}"
    return "whole, checksum matches" if "payload_sha256" in meta else "whole (no checksum recorded)"


def fatbin_entries(data: bytes) -> list[tuple[str, int, str]]:
    """(kind, SM arch, variant) of every image in every fatbin inside `data`: ("cubin", 90, ""), ("ptx", 90, "a").

    Fatbin layout: a 16-byte header (magic, version, header size, payload size), then entries whose
    headers hold the kind (1 PTX, 2 ELF/cubin) at byte 0, their size at 4, payload size at 8, the SM arch
    at 28 and flags at 40: 0x100000 marks an arch-specific image (sm_90a), 0x200000 a family one (sm_100f).
    """
    images, start = [], data.find(_FATBIN_MAGIC)
    while start >= 0:
        end = start + 1
        try:
            _, _, hsize, fsize = struct.unpack_from("<IHHQ", data, start)
            off, end = start + hsize, min(len(data), start + hsize + fsize)
            while off + 48 <= end:
                kind, _, ehsize, size = struct.unpack_from("<HHIQ", data, off)
                arch, flags = struct.unpack_from("<I", data, off + 28)[0], struct.unpack_from("<Q", data, off + 40)[0]
                variant = "a" if flags & 0x100000 else "f" if flags & 0x200000 else ""
                images.append(({1: "ptx", 2: "cubin"}.get(kind, f"kind{kind}"), arch, variant))
                if ehsize < 48:  # a damaged entry: stop rather than loop on it
                    break
                off += ehsize + size
        except struct.error:  # bytes that only look like a fatbin header
            pass
        start = data.find(_FATBIN_MAGIC, max(end, start + 1))
    return images


def fatbin_images(data: bytes) -> list[tuple[str, int]]:
    """(kind, SM arch) of every image: ("cubin", 90), ("ptx", 90), ..."""
    return [(kind, arch) for kind, arch, _ in fatbin_entries(data)]


def device_code_summary(path: str) -> str:
    """What device code the file really carries (read from its bytes, not taken from metadata)."""
    with open(path, "rb") as f:
        data = f.read()
    parts = [f"cubin sm_{arch}{v}" if kind == "cubin" else f"{kind} compute_{arch}{v}"
             for kind, arch, v in fatbin_entries(data)]
    if b"extern \"C\" __global__" in data:
        parts.append("CUDA source (needs a compiler at load time)")
    return ", ".join(dict.fromkeys(parts)) if parts else "none"
