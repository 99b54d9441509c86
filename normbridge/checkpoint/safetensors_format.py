"""safetensors, through the ``safetensors`` package (the interchange format of PyTorch → JAX loaders).

The Rust reader validates the header (length, offsets inside the file, no overlaps) before any
tensor is read; tensors are read one at a time. Keys are ``/`` paths when normbridge wrote them;
``.``-separated keys (PyTorch's ``layer.0.weight``) are split on ``.``.
"""

from __future__ import annotations

import os
import struct
from typing import Any

import numpy as np

from normbridge._optional import require
from normbridge.checkpoint._common import MAX_HEADER_BYTES, Checkpoint, atomic_file, check_size, guard, map_file
from normbridge.errors import CorruptCheckpointError

FORMAT = "safetensors"


def looks_like(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and n <= size - 8


_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
           "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16",
           "U8": "uint8", "BOOL": "bool", "C64": "complex64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def read(file: str) -> Checkpoint:
    """The header is validated by ``safetensors.safe_open`` (length, offsets inside the file, no
    overlaps, dtypes); each tensor is then an ``np.frombuffer`` view of its bytes in the memory-mapped
    file (:func:`~normbridge.checkpoint._common.map_file`: no copy; its size checked against the
    bytes present first)."""
    st = require("safetensors", facade="checkpoint", extra="checkpoint")
    import json

    import ml_dtypes  # noqa: F401  (bfloat16, float8 numpy dtypes; a jax dependency)

    size = os.path.getsize(file)
    with open(file, "rb") as fh:
        head = fh.read(8)
    if len(head) == 8 and struct.unpack("<Q", head)[0] > MAX_HEADER_BYTES:
        raise CorruptCheckpointError("header too large", file=file, expected=f"<= {MAX_HEADER_BYTES} bytes",
                                     found=f"{struct.unpack('<Q', head)[0]} bytes")
    leaves: dict[str, np.ndarray] = {}
    with guard(file, "safetensors file"):
        with st.safe_open(file, framework="numpy") as f:  # validates the whole header
            keys = list(f.keys())
        with open(file, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
            mm = map_file(fh)
            split = "/" if any("/" in k for k in keys) else "."
            for k in keys:
                entry = header[k]
                dtype = np.dtype(_DTYPES[entry["dtype"]])
                begin, end = entry["data_offsets"]
                shape = tuple(entry["shape"])
                nbytes = check_size(file, k, shape, dtype, size - 8 - n - begin)
                if nbytes != end - begin:
                    raise CorruptCheckpointError("tensor size disagrees with its offsets", file=file, path=k,
                                                 expected=f"{nbytes} bytes", found=f"{end - begin} bytes")
                if nbytes == 0:
                    arr = np.empty(shape, dtype)
                else:
                    arr = np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=8 + n + begin)
                leaves[k.replace(split, "/")] = arr.view(dtype).reshape(shape)
    return Checkpoint(file, FORMAT, leaves, leaves, None)


def write(dst: str, leaves: dict[str, Any], *, overwrite: bool = False) -> None:
    require("safetensors", facade="checkpoint", extra="checkpoint")
    from safetensors.numpy import save_file

    # safetensors wants C-contiguous ndarrays, 0-d included; it writes straight to the temporary file
    arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in leaves.items()}
    atomic_file(dst, lambda fh: save_file(arrays, fh.name), overwrite=overwrite)
