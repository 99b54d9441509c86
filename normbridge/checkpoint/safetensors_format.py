"""safetensors, through the ``safetensors`` package (the interchange format of PyTorch → JAX loaders).

The Rust reader validates the header (length, offsets inside the file, no overlaps) before any
tensor is read; tensors are read one at a time. Keys are ``/`` paths when normbridge wrote them;
``.``-separated keys (PyTorch's ``layer.0.weight``) are split on ``.``.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from normbridge._optional import require
from normbridge.checkpoint._common import MAX_HEADER_BYTES, Checkpoint, atomic_file, guard
from normbridge.errors import CorruptCheckpointError

FORMAT = "safetensors"


def looks_like(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and n <= size - 8


def read(file: str) -> Checkpoint:
    st = require("safetensors", facade="checkpoint", extra="checkpoint")
    import safetensors.numpy  # noqa: F401

    with open(file, "rb") as fh:
        head = fh.read(8)
    if len(head) == 8 and struct.unpack("<Q", head)[0] > MAX_HEADER_BYTES:
        raise CorruptCheckpointError("header too large", file=file, expected=f"<= {MAX_HEADER_BYTES} bytes",
                                     found=f"{struct.unpack('<Q', head)[0]} bytes")
    leaves: dict[str, np.ndarray] = {}
    with guard(file, "safetensors file"), st.safe_open(file, framework="numpy") as f:
        keys = list(f.keys())
        split = "/" if any("/" in k for k in keys) else "."
        for k in keys:
            leaves[k.replace(split, "/")] = f.get_tensor(k)
    return Checkpoint(file, FORMAT, leaves, leaves, None)


def write(dst: str, leaves: dict[str, Any], *, overwrite: bool = False) -> None:
    require("safetensors", facade="checkpoint", extra="checkpoint")
    from safetensors.numpy import save_file

    # safetensors wants C-contiguous ndarrays, 0-d included; it writes straight to the temporary file
    arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in leaves.items()}
    atomic_file(dst, lambda fh: save_file(arrays, fh.name), overwrite=overwrite)
