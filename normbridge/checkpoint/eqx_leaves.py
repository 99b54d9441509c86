"""``eqx.tree_serialise_leaves`` files: ``.npy`` records back to back, no names.

Read without a template (``inspect``, ``diff``) the leaves are named by index: ``"0"``, ``"1"``...;
loading into a model goes through ``eqx.tree_deserialise_leaves``'s order (see
:func:`normbridge.adapters.equinox.load`, which also reports every shape/dtype disagreement).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from normbridge.checkpoint._common import Checkpoint, atomic_file, guard
from normbridge.checkpoint._npy import read_record

FORMAT = "eqx-leaves"
MAGIC = b"\x93NUMPY"


def read(file: str) -> Checkpoint:
    leaves: dict[str, np.ndarray] = {}
    with guard(file, "eqx.tree_serialise_leaves file"), open(file, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        while fh.tell() < size:
            where = f"<record {len(leaves)}>"
            leaves[str(len(leaves))] = read_record(fh, file, where, size - fh.tell())
    return Checkpoint(file, FORMAT, leaves, list(leaves.values()), "equinox",
                      notes=("no names inside: leaves by index, in the model's pytree order",))


def write(dst: str, pytree: Any, *, overwrite: bool = False) -> None:
    """``eqx.tree_serialise_leaves(dst, pytree)``, atomically (``pytree``: e.g. ``(model, state)``)."""
    from normbridge.adapters.equinox._common import eqx

    atomic_file(dst, lambda fh: eqx.tree_serialise_leaves(fh, pytree), overwrite=overwrite)
