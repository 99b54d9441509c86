"""normbridge's named Equinox format (:mod:`normbridge.adapters.equinox.checkpoint`), read and
written through that module; this one only checks the archive first (member paths, index, sizes)."""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any

import numpy as np

from normbridge.adapters.equinox import checkpoint as eqx_ckpt
from normbridge.checkpoint._common import MAX_HEADER_BYTES, Checkpoint, guard, refuse_existing
from normbridge.checkpoint._zip import check_npy_member, safe_members
from normbridge.errors import CorruptCheckpointError

FORMAT = "equinox"
INDEX = eqx_ckpt._INDEX


def is_named(zf: zipfile.ZipFile) -> bool:
    return INDEX in zf.namelist()


def validate(file: str) -> None:
    """Everything :func:`eqx_ckpt._read_named` relies on, checked without allocating any array."""
    with guard(file, f"{eqx_ckpt.FORMAT} checkpoint"), zipfile.ZipFile(file) as zf:
        members = safe_members(zf, file, os.path.getsize(file))
        if INDEX not in members:
            raise CorruptCheckpointError("no index", file=file, expected=INDEX, found=sorted(members)[:5].__repr__())
        if members[INDEX].file_size > MAX_HEADER_BYTES:
            raise CorruptCheckpointError("index too large", file=file, path=INDEX,
                                         expected=f"<= {MAX_HEADER_BYTES} bytes", found=str(members[INDEX].file_size))
        index = json.loads(zf.read(INDEX))
        if not isinstance(index, dict) or index.get("format") != eqx_ckpt.FORMAT:
            raise CorruptCheckpointError("not this format", file=file, path=INDEX,
                                         expected=f"format {eqx_ckpt.FORMAT!r}",
                                         found=repr(index.get("format") if isinstance(index, dict) else index))
        entries = index.get("entries")
        if not isinstance(entries, list):
            raise CorruptCheckpointError("bad index", file=file, path=INDEX, expected="a list of entries")
        for e in entries:
            if not (isinstance(e, dict) and isinstance(e.get("path"), str) and e.get("file") in members
                    and isinstance(e.get("shape"), list) and isinstance(e.get("dtype"), str)):
                raise CorruptCheckpointError("bad index entry", file=file, path=INDEX,
                                             expected="{path, file (a member), shape, dtype}", found=repr(e)[:200])
            shape, dtype = check_npy_member(zf, members[e["file"]], file)
            try:
                want = np.dtype(e["dtype"]) if e["dtype"] != "bfloat16" else np.dtype("uint16")
            except TypeError as err:
                raise CorruptCheckpointError("unknown dtype", file=file, path=e["path"], found=e["dtype"]) from err
            if list(shape) != e["shape"] or dtype.itemsize != want.itemsize:
                raise CorruptCheckpointError(
                    "array disagrees with the index", file=file, path=e["path"],
                    expected=f"{e['dtype']}{e['shape']}", found=f"{dtype.name}{list(shape)}",
                )


def read(file: str) -> Checkpoint:
    validate(file)
    with guard(file, f"{eqx_ckpt.FORMAT} checkpoint"):
        stored = eqx_ckpt._read_named(file)
    leaves = {name: arr for name, (arr, _, _) in stored.items()}
    return Checkpoint(file, FORMAT, leaves, leaves, "equinox")


def write(dst: str, model: Any, state: Any = None, *, overwrite: bool = False) -> None:
    """:func:`normbridge.adapters.equinox.save` (already atomic: temporary file, fsync, rename)."""
    refuse_existing(dst, overwrite)
    eqx_ckpt.save(dst, model, state)
