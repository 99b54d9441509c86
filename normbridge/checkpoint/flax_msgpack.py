"""``flax.serialization`` msgpack (``to_bytes`` / ``msgpack_serialize``): linen variables, treex
``to_dict`` states, any nested dict of arrays. Read with ``flax.serialization.msgpack_restore``, whose
arrays are views of the bytes read (``np.frombuffer``), so a lying shape cannot allocate."""

from __future__ import annotations

import os
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
    """``flax.serialization.msgpack_restore``'s result, unpacked from the open file by msgpack's
    streaming ``Unpacker`` with flax's own ext hook and un-chunking (so the file's bytes and the
    arrays are not both in memory: peak ≈ the arrays plus the largest one)."""
    import msgpack
    from flax import serialization

    with guard(file, "flax.serialization msgpack"), open(file, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        unpacker = msgpack.Unpacker(fh, ext_hook=serialization._msgpack_ext_unpack, raw=False,
                                    strict_map_key=False, max_buffer_size=max(size, 1 << 20),
                                    read_size=1 << 20)
        try:
            tree = unpacker.unpack()
        except msgpack.OutOfData as err:
            raise CorruptCheckpointError("truncated", file=file, expected="a complete flax.serialization msgpack",
                                         found=f"the file ends inside it after {size} bytes (msgpack: {err})") from err
        try:  # a checkpoint is one msgpack object: anything after it is damage
            unpacker.unpack()
        except msgpack.OutOfData:
            pass
        else:
            raise CorruptCheckpointError("data after the state dict", file=file,
                                         expected="one msgpack map", found="more objects after it")
        tree = serialization._unchunk_array_leaves_in_place(tree)
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
    """The bytes of ``flax.serialization.msgpack_serialize(to_state_dict(tree))``, written one array at a
    time (same preparation, chunking and ext encoding as flax; a map is a header then its entries), so
    the whole file is never in memory."""
    import jax
    import msgpack
    from flax import serialization

    state = jax.tree_util.tree_map(lambda x: x, serialization.to_state_dict(tree))
    state = serialization._chunk_array_leaves_in_place(serialization._np_convert_in_place(state))
    packer = msgpack.Packer(default=serialization._msgpack_ext_pack, strict_types=True)

    def emit(fh: Any, node: Any) -> None:
        if type(node) is dict:  # strict_types: exactly what packb would write as a map
            fh.write(packer.pack_map_header(len(node)))
            for k, v in node.items():
                fh.write(packer.pack(k))
                emit(fh, v)
        else:
            fh.write(packer.pack(node))

    atomic_file(dst, lambda fh: emit(fh, state), overwrite=overwrite)
