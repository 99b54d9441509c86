"""Checkpoint files of every framework normbridge bridges, read and written through each
ecosystem's own library, with normbridge's errors and atomic writes.

=================  ==========================================  =====================================
format             what                                        through
=================  ==========================================  =====================================
``orbax``          an Orbax directory (linen variables,        ``orbax.checkpoint``
                   ``nnx.State``, any pytree)
``msgpack``        ``flax.serialization`` bytes (linen,        ``flax.serialization``
                   treex ``to_dict``)
``eqx-leaves``     ``eqx.tree_serialise_leaves`` (no names)    equinox / numpy ``.npy``
``equinox``        normbridge's named Equinox zip              :mod:`normbridge.adapters.equinox`
``safetensors``    safetensors                                 ``safetensors``
``pickle``         a pickled treex module (protocols 0–5)      :func:`normbridge.adapters.treex.load`
``npz``            an npz of ``/``-named arrays (treex)        :func:`normbridge.adapters.treex.load`
=================  ==========================================  =====================================

:func:`read` detects the format from the content (never the name); ``format=`` overrides.
Every failure is a :class:`normbridge.CheckpointError` naming the file (and the path inside it,
what was expected and what was found), the library's exception chained.
"""

from __future__ import annotations

import os

from normbridge.checkpoint import equinox_named, eqx_leaves, flax_msgpack, orbax_format, safetensors_format, treex
from normbridge.checkpoint._common import Checkpoint, flatten, release, unflatten
from normbridge.errors import CheckpointError, CorruptCheckpointError

FORMATS = ("orbax", "msgpack", "eqx-leaves", "equinox", "safetensors", "pickle", "npz")

#: The format a destination gets from its extension (``--format`` overrides).
EXTENSIONS = {
    ".msgpack": "msgpack",
    ".eqx": "eqx-leaves",
    ".nbeqx": "equinox",
    ".safetensors": "safetensors",
    ".pkl": "pickle",
    ".pickle": "pickle",
    ".npz": "npz",
    ".orbax": "orbax",
    "": "orbax",
}

_PICKLE0_FIRST = b"(]}cdlI"  # opcodes a protocol 0/1 pickle of a module starts with


def format_for_path(path: str) -> str:
    ext = os.path.splitext(os.fspath(path).rstrip("/"))[1].lower()
    if ext not in EXTENSIONS:
        raise CheckpointError(f"{path}: no format for the extension {ext!r}; pass --format one of {list(FORMATS)}")
    return EXTENSIONS[ext]


def detect_format(path: str) -> str:
    """The format of ``path`` from its content."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if orbax_format.looks_like(path):
            return "orbax"
        raise CorruptCheckpointError("a directory that is not an Orbax checkpoint", file=path,
                                     expected=f"one of {list(orbax_format.MARKERS)} inside",
                                     found=f"{sorted(os.listdir(path))[:5]}")
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(16)
            fh.seek(max(size - 1, 0))
            last = fh.read(1)
    except OSError as err:
        raise CheckpointError(f"cannot be opened ({err.strerror})", file=path) from err
    if head == b"" or head.startswith(eqx_leaves.MAGIC):
        return "eqx-leaves"
    if head.startswith(b"PK"):
        import zipfile

        try:
            with zipfile.ZipFile(path) as zf:
                return "equinox" if equinox_named.is_named(zf) else "npz"
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
            raise CorruptCheckpointError("damaged zip archive", file=path, expected="a zip (npz or Equinox)",
                                         found=f"{type(err).__name__}: {err}") from err
    if safetensors_format.looks_like(head, size):  # before pickle: a u64 length can start 80 02
        return "safetensors"
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if head[0] in range(0x80, 0x90) or head[0] in (0xDE, 0xDF):
        return "msgpack"
    if head[:1] in [bytes([b]) for b in _PICKLE0_FIRST] and last == b".":
        return "pickle"
    raise CorruptCheckpointError(
        "not a checkpoint of any format normbridge reads", file=path,
        expected="Orbax, msgpack, eqx.tree_serialise_leaves, Equinox zip, safetensors, pickle or npz",
        found=f"first bytes {head[:8].hex(' ')}",
    )


_READERS = {
    "orbax": orbax_format.read,
    "msgpack": flax_msgpack.read,
    "eqx-leaves": eqx_leaves.read,
    "equinox": equinox_named.read,
    "safetensors": safetensors_format.read,
    "pickle": treex.read_pickle,
    "npz": treex.read_npz,
}


def read(path: str | os.PathLike, format: str | None = None) -> Checkpoint:
    """Read a checkpoint of any format into a :class:`Checkpoint` (arrays by path)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError("no such file or directory", file=path)
    fmt = format or detect_format(path)
    if fmt not in _READERS:
        raise CheckpointError(f"unknown format {fmt!r}; expected one of {list(FORMATS)}", file=path)
    return _READERS[fmt](path)


def write_tree(path: str | os.PathLike, tree: object, format: str, *, overwrite: bool = False) -> None:
    """Write a nested dict (or pytree) of arrays as ``format``, atomically; an existing ``path`` is
    refused (``FileExistsError``) unless ``overwrite``."""
    path = os.fspath(path)
    if format == "orbax":
        orbax_format.write(path, tree, overwrite=overwrite)
    elif format == "msgpack":
        flax_msgpack.write(path, tree, overwrite=overwrite)
    elif format == "safetensors":
        safetensors_format.write(path, flatten(tree), overwrite=overwrite)
    elif format == "npz":
        treex.write_npz(path, flatten(tree), overwrite=overwrite)
    elif format == "eqx-leaves":
        eqx_leaves.write(path, tree, overwrite=overwrite)
    elif format == "equinox":
        equinox_named.write(path, tree, overwrite=overwrite)
    else:
        raise CheckpointError(f"cannot write a plain tree as {format!r} (pickle holds a treex module)", file=path)


__all__ = [
    "EXTENSIONS",
    "FORMATS",
    "Checkpoint",
    "detect_format",
    "flatten",
    "format_for_path",
    "read",
    "release",
    "unflatten",
    "write_tree",
]
