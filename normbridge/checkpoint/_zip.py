"""Zip archives (npz, normbridge's Equinox format) checked before any member is read."""

from __future__ import annotations

import io
import posixpath
import zipfile

import numpy as np

from normbridge.checkpoint._npy import read_header
from normbridge.errors import CorruptCheckpointError, UnsafeCheckpointError


def safe_members(zf: zipfile.ZipFile, file: str, archive_size: int) -> dict[str, zipfile.ZipInfo]:
    """Every member, refusing absolute or ``..`` paths, duplicates and sizes the archive cannot hold."""
    out: dict[str, zipfile.ZipInfo] = {}
    for info in zf.infolist():
        name = info.filename
        norm = posixpath.normpath(name.replace("\\", "/"))
        if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or norm.startswith("..") \
                or "/../" in f"/{name.replace(chr(92), '/')}/":
            raise UnsafeCheckpointError("zip member outside the archive", file=file, path=name,
                                        expected="a relative path inside the archive", found=repr(name))
        if name in out:
            raise CorruptCheckpointError("zip member twice", file=file, path=name)
        if info.compress_type == zipfile.ZIP_STORED and info.file_size > archive_size:
            raise CorruptCheckpointError("zip member larger than the archive", file=file, path=name,
                                         expected=f"at most {archive_size} bytes", found=f"{info.file_size} bytes")
        if info.compress_type != zipfile.ZIP_STORED and info.file_size > 1100 * max(info.compress_size, 1):
            raise UnsafeCheckpointError("zip member expands more than deflate can (zip bomb)", file=file, path=name,
                                        expected="ratio <= 1100", found=f"{info.file_size}/{info.compress_size}")
        out[name] = info
    return out


def check_npy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, file: str) -> tuple[tuple[int, ...], np.dtype]:
    """The declared shape and dtype of a ``.npy`` member, refused when its data cannot be that large."""
    with zf.open(info) as fh:
        head = io.BytesIO(fh.read(65536 + 16))
    shape, _, dtype = read_header(head, file, info.filename)
    count = 1
    for d in shape:
        count *= int(d)
    need = count * dtype.itemsize + head.tell()
    if need > info.file_size:
        raise CorruptCheckpointError("array larger than its zip member", file=file, path=info.filename,
                                     expected=f"{need} bytes for {dtype.name}{list(shape)}",
                                     found=f"{info.file_size} bytes")
    return shape, dtype
