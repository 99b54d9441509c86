"""``flax.serialization`` msgpack (``to_bytes`` / ``msgpack_serialize``): linen variables, treex
``to_dict`` states, any nested dict of arrays. Read as ``flax.serialization.msgpack_restore`` reads it,
its arrays views (``np.frombuffer``) of the memory-mapped file, so a lying shape cannot allocate and a
large checkpoint is not copied."""

from __future__ import annotations

import os
import struct
from typing import Any

import numpy as np

from normbridge.checkpoint._common import Checkpoint, atomic_file, check_size, flatten, guard, map_file
from normbridge.errors import CorruptCheckpointError

FORMAT = "msgpack"


def guess_framework(tree: Any) -> str | None:
    if isinstance(tree, dict) and ("params" in tree or "batch_stats" in tree):
        return "linen"
    return "treex" if isinstance(tree, dict) else None


def read(file: str) -> Checkpoint:
    """``flax.serialization.msgpack_restore``'s result, without a copy of the arrays: the file is
    memory-mapped (:func:`~normbridge.checkpoint._common.map_file`) and walked by :class:`_Walker`,
    each ndarray record becoming an ``np.frombuffer`` view of its bytes in the map (what flax's
    ``_ndarray_from_bytes`` returns, a view of the bytes it was given); anything else (numbers,
    lists, other ext types) is decoded by msgpack with flax's own ext hook, and chunked arrays are
    joined by flax's ``_unchunk_array_leaves_in_place``. Every declared length is checked against the
    bytes present before it is used."""
    from flax import serialization

    with guard(file, "flax.serialization msgpack"), open(file, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        mm = map_file(fh)
        if mm is None:
            raise CorruptCheckpointError("empty file", file=file, expected="a flax.serialization msgpack map",
                                         found="0 bytes")
        walker = _Walker(file, fh, mm, size)
        tree, end = walker.value(0, "")
        if end != size:  # a checkpoint is one msgpack object: anything after it is damage
            raise CorruptCheckpointError("data after the state dict", file=file, expected="one msgpack map",
                                         found=f"{size - end} more bytes after it")
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


_EXT_NDARRAY = 1  # flax.serialization._MsgpackExtType.ndarray
_FIXEXT = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}
_EXT = {0xC7: ">B", 0xC8: ">H", 0xC9: ">I"}  # ext 8/16/32: length, then the type byte
_STR = {0xD9: ">B", 0xDA: ">H", 0xDB: ">I"}
_BIN = {0xC4: ">B", 0xC5: ">H", 0xC6: ">I"}
_HEADER_PEEK = 4096  # an ndarray record's (shape, dtype) prefix is a few dozen bytes


class _Walker:
    """A msgpack reader over a memory map for the shape of ``flax.serialization`` files: maps are
    walked here, ndarray ext records become views of the map, and any other value is handed to
    ``msgpack.Unpacker`` reading the file from its offset (``tell()`` says where it ends)."""

    def __init__(self, file: str, fh: Any, mm: Any, size: int) -> None:
        self.file, self.fh, self.mm, self.size = file, fh, mm, size

    def need(self, off: int, n: int, path: str) -> None:
        if n < 0 or off + n > self.size:
            self.truncated(path, off, off + n - self.size)

    def truncated(self, path: str, off: int, missing: int | None) -> None:
        """Raise the truncation error, with msgpack's own words (its ``Unpacker`` run on the file) chained."""
        import msgpack

        where = f" at {path}" if path else ""
        short = f"{missing} bytes missing of " if missing else ""
        self.fh.seek(0)
        try:
            msgpack.Unpacker(self.fh, raw=False, strict_map_key=False, max_buffer_size=max(self.size, 1 << 20),
                             read_size=1 << 20).unpack()
            cause: BaseException | None = None
        except Exception as library_err:  # OutOfData, or what a damaged file makes msgpack raise
            cause = library_err
        words = f"; msgpack: {type(cause).__name__}: {str(cause)[:200]}" if cause is not None else ""
        err = CorruptCheckpointError(
            "truncated", file=self.file, expected="a complete flax.serialization msgpack",
            found=f"the file ends inside it ({short}a record{where} at byte {off}, "
                  f"file size {self.size}{words})")
        err.path = path or None
        raise err from cause

    def length(self, fmt: str, off: int, path: str) -> int:
        self.need(off, struct.calcsize(fmt), path)
        return struct.unpack_from(fmt, self.mm, off)[0]

    def value(self, off: int, path: str) -> tuple[Any, int]:
        self.need(off, 1, path)
        b = self.mm[off]
        if 0x80 <= b <= 0x8F:
            n, off = b & 0x0F, off + 1
        elif b in (0xDE, 0xDF):
            fmt = ">H" if b == 0xDE else ">I"
            n, off = self.length(fmt, off + 1, path), off + 1 + struct.calcsize(fmt)
        else:
            return self.leaf(off, path)
        out: dict[Any, Any] = {}
        for _ in range(n):
            key, off = self.key(off, path)
            out[key], off = self.value(off, f"{path}/{key}" if path else str(key))
        return out, off

    def key(self, off: int, path: str) -> tuple[Any, int]:
        self.need(off, 1, path)
        b = self.mm[off]
        if 0xA0 <= b <= 0xBF:
            n, start = b & 0x1F, off + 1
        elif b in _STR:
            n, start = self.length(_STR[b], off + 1, path), off + 1 + struct.calcsize(_STR[b])
        else:
            return self.generic(off, path)
        self.need(start, n, path)
        return str(self.mm[start:start + n], "utf-8"), start + n

    def leaf(self, off: int, path: str) -> tuple[Any, int]:
        b = self.mm[off]
        if b in _FIXEXT:
            n, head = _FIXEXT[b], off + 1
        elif b in _EXT:
            n, head = self.length(_EXT[b], off + 1, path), off + 1 + struct.calcsize(_EXT[b])
        else:
            return self.generic(off, path)
        self.need(head, 1 + n, path)
        if struct.unpack_from(">b", self.mm, head)[0] == _EXT_NDARRAY:
            arr = self.ndarray(head + 1, n, path)
            if arr is not None:
                return arr, head + 1 + n
        return self.generic(off, path)

    def ndarray(self, start: int, n: int, path: str) -> np.ndarray | None:
        """The view of an ndarray record ``(shape, dtype name, bytes)`` of ``n`` bytes at ``start``;
        ``None`` for a record of another shape (then flax's own decoder reads it)."""
        import msgpack
        from flax import serialization

        unpacker = msgpack.Unpacker(raw=True)
        unpacker.feed(self.mm[start:start + min(n, _HEADER_PEEK)])
        try:
            if unpacker.read_array_header() != 3:
                return None
            shape, dtype_name = unpacker.unpack(), unpacker.unpack()
        except (msgpack.OutOfData, ValueError):
            return None
        pos = start + unpacker.tell()
        self.need(pos, 1, path)
        b = self.mm[pos]
        if b not in _BIN or not isinstance(dtype_name, bytes) or not isinstance(shape, list | tuple):
            return None
        nbytes = self.length(_BIN[b], pos + 1, path)
        data = pos + 1 + struct.calcsize(_BIN[b])
        if data + nbytes != start + n:
            raise CorruptCheckpointError("ndarray record size disagrees with its ext length", file=self.file,
                                         path=path or None, expected=f"{start + n - data} bytes of data",
                                         found=f"{nbytes} declared")
        dtype = np.dtype(serialization._dtype_from_name(dtype_name))
        if dtype.hasobject or dtype.itemsize == 0:
            return None  # flax's decoder refuses these (or reads an empty array) as it always did
        want = check_size(self.file, path, tuple(shape), dtype, nbytes)
        if want != nbytes:
            raise CorruptCheckpointError("array size disagrees with its shape", file=self.file, path=path or None,
                                         expected=f"{want} bytes for {dtype.name}{list(shape)}",
                                         found=f"{nbytes} bytes")
        if nbytes == 0:
            return np.empty(tuple(shape), dtype)
        return np.frombuffer(self.mm, dtype=dtype, count=nbytes // dtype.itemsize, offset=data).reshape(shape)

    def generic(self, off: int, path: str) -> tuple[Any, int]:
        """One msgpack object at ``off`` decoded by msgpack itself (flax's ext hook), and where it ends."""
        import msgpack
        from flax import serialization

        self.fh.seek(off)
        unpacker = msgpack.Unpacker(self.fh, ext_hook=serialization._msgpack_ext_unpack, raw=False,
                                    strict_map_key=False, max_buffer_size=max(self.size, 1 << 20),
                                    read_size=1 << 16)
        try:
            obj = unpacker.unpack()
        except msgpack.OutOfData:
            self.truncated(path, off, None)
        return obj, off + unpacker.tell()


def write(dst: str, tree: Any, *, overwrite: bool = False) -> None:
    """The bytes of ``flax.serialization.msgpack_serialize(to_state_dict(tree))``, written one array at a
    time (same preparation, chunking and ext encoding as flax; a map is a header then its entries; an
    ndarray record is its headers then the array's own buffer, :func:`_write_ndarray`), so neither the
    file nor a copy of an array is ever in memory."""
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
        elif type(node) is np.ndarray and not (node.dtype.hasobject or node.dtype.isalignedstruct):
            _write_ndarray(fh, node)
        else:
            fh.write(packer.pack(node))

    atomic_file(dst, lambda fh: emit(fh, state), overwrite=overwrite)


def _write_ndarray(fh: Any, arr: np.ndarray) -> None:
    """What ``packer.pack(ExtType(1, flax.serialization._ndarray_to_bytes(arr)))`` writes, byte for
    byte, without building either bytes object: the ext header, ``packb((shape, dtype name))``'s items
    as a 3-array, the bin header, then ``arr``'s C-order buffer itself."""
    import msgpack

    if not arr.flags.c_contiguous:
        arr = arr.copy(order="C")  # what tobytes("C") copies (np.ascontiguousarray would make a 0-d array 1-d)
    prefix = bytearray(msgpack.packb((arr.shape, arr.dtype.name), use_bin_type=True))
    prefix[0] = 0x93  # (shape, name, bytes): a fixarray of 3
    n = arr.nbytes
    prefix += (struct.pack(">BB", 0xC4, n) if n <= 0xFF else struct.pack(">BH", 0xC5, n) if n <= 0xFFFF
               else struct.pack(">BI", 0xC6, n))
    size = len(prefix) + n
    fixext = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
    head = (bytes([fixext[size]]) if size in fixext else struct.pack(">BB", 0xC7, size) if size <= 0xFF
            else struct.pack(">BH", 0xC8, size) if size <= 0xFFFF else struct.pack(">BI", 0xC9, size))
    fh.write(head + bytes([_EXT_NDARRAY]) + bytes(prefix))
    if n:
        fh.write(memoryview(arr.reshape(-1).view(np.uint8)))
