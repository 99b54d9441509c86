"""``flax.serialization`` msgpack (``to_bytes`` / ``msgpack_serialize``): linen variables, treex
``to_dict`` states, any nested dict of arrays. Read with ``flax.serialization.msgpack_restore``, whose
arrays are views of the bytes read (``np.frombuffer``), so a lying shape cannot allocate."""

from __future__ import annotations

from typing import Any

import numpy as np

from normbridge.checkpoint._common import Checkpoint, atomic_file, flatten, guard
from normbridge.errors import CorruptCheckpointError

FORMAT = "msgpack"


def guess_framework(tree: Any) -> str | None:
    if isinstance(tree, dict) and ("params" in tree or "batch_stats" in tree):
        return "linen"
    return "treex" if isinstance(tree, dict) else None


def read(file: str) -> Checkpoint:
    from flax import serialization

    with open(file, "rb") as fh:
        data = fh.read()
    with guard(file, "flax.serialization msgpack"):
        tree = serialization.msgpack_restore(data)
    if not isinstance(tree, dict):
        raise CorruptCheckpointError("not a state dict", file=file, expected="a msgpack map of arrays",
                                     found=type(tree).__name__)
    leaves = {}
    for k, v in flatten(tree).items():
        if not isinstance(v, np.ndarray | np.generic | int | float | complex | bool):
            raise CorruptCheckpointError("leaf is not an array", file=file, path=k,
                                         expected="an array or number", found=type(v).__name__)
        leaves[k] = np.asarray(v)
    return Checkpoint(file, FORMAT, leaves, tree, guess_framework(tree))


def write(dst: str, tree: Any, *, overwrite: bool = False) -> None:
    from flax import serialization

    data = serialization.msgpack_serialize(serialization.to_state_dict(tree))
    atomic_file(dst, lambda fh: fh.write(data), overwrite=overwrite)
