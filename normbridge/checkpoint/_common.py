"""What every reader and writer shares: the :class:`Checkpoint` record, path flattening, atomic writes,
and the guard that turns a library's exception into normbridge's own."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import mmap
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from normbridge.errors import CheckpointError, CorruptCheckpointError

#: Refuse a header or index larger than this before parsing it (a real one is kilobytes).
MAX_HEADER_BYTES = 64 * 2**20


@dataclasses.dataclass
class Checkpoint:
    """One checkpoint file (or Orbax directory) as read: its arrays by path, nothing else assumed.

    ``leaves`` maps ``"a/b/c"`` paths (in the file's order) to numpy arrays (bfloat16 through
    ``ml_dtypes``); ``tree`` is the same nested as the file stores it; ``framework`` is a guess
    from the paths (``"linen"``, ``"nnx"``, ``"equinox"``, ``"treex"`` or ``None``); ``obj`` is the
    object a self-describing format holds (a treex pickle's module), else ``None``.
    """

    file: str
    format: str
    leaves: dict[str, np.ndarray]
    tree: Any
    framework: str | None = None
    obj: Any = None
    notes: tuple[str, ...] = ()

    @property
    def nbytes(self) -> int:
        return sum(int(np.asarray(v).nbytes) for v in self.leaves.values())


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a/b/0": leaf}`` for nested mappings, lists and tuples; ``None`` entries are dropped."""
    out: dict[str, Any] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{path}/{k}" if path else str(k))
        elif isinstance(node, list | tuple):
            for i, v in enumerate(node):
                walk(v, f"{path}/{i}" if path else str(i))
        elif node is not None:
            out[path] = node

    walk(tree, prefix)
    return out


def unflatten(leaves: Mapping[str, Any]) -> dict[str, Any]:
    """The nested dict of ``"a/b"`` paths (lists stay dicts with ``"0"``, ``"1"``... keys)."""
    root: dict[str, Any] = {}
    for key, value in leaves.items():
        node = root
        parts = key.split("/")
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise CheckpointError(f"path {key!r} runs through the leaf {part!r}")
            node = nxt
        if parts[-1] in node:
            raise CheckpointError(f"path {key!r} appears twice")
        node[parts[-1]] = value
    return root


def as_numpy(x: Any) -> np.ndarray:
    """A numpy array of any leaf (jax array, numpy scalar, Python number)."""
    return np.asarray(x)


def describe(x: Any) -> str:
    """``float32[3, 4]`` of an array or a ``jax.ShapeDtypeStruct``."""
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is None or dtype is None:
        a = np.asarray(x)
        shape, dtype = a.shape, a.dtype
    return f"{np.dtype(dtype).name}{list(shape)}"


# ------------------------------------------------------------------ guarding foreign exceptions
@contextlib.contextmanager
def guard(file: str, what: str) -> Iterator[None]:
    """Run a library's reader: normbridge's own errors pass, anything else becomes a
    :class:`CorruptCheckpointError` naming the file and the format expected, the original chained."""
    try:
        yield
    except CheckpointError as err:
        if file in str(err):
            if getattr(err, "file", None) is None:
                err.file = file  # named in the message by a loader that takes a path: keep it for scripts too
            raise
        # an error from a wrapped loader that forgot the file: the same error, the file named first
        named = copy.copy(err)
        named.args = (f"{file}: {err}",)
        if getattr(named, "file", None) is None:
            named.file = file
        raise named from err
    except MemoryError as err:
        raise CorruptCheckpointError(
            "declares more data than can be allocated", file=file, expected=f"{_a(what)} {what}", found="MemoryError"
        ) from err
    except (Exception, RecursionError) as err:  # a damaged file can make a library raise anything
        found = f"{type(err).__name__}: {str(err)[:300]}"
        raise CorruptCheckpointError("cannot be read", file=file, expected=f"{_a(what)} {what}", found=found) from err


def _a(noun: str) -> str:
    return "an" if noun[:1].lower() in "aeiou" else "a"


def check_size(file: str, path: str, shape: tuple[int, ...], dtype: np.dtype, available: int) -> int:
    """The byte count of ``shape``×``dtype``; refuses before allocation when the file holds fewer bytes."""
    if any((not isinstance(d, int | np.integer)) or d < 0 for d in shape):
        raise CorruptCheckpointError("bad array shape", file=file, path=path, expected="non-negative ints",
                                     found=repr(shape))
    count = 1
    for d in shape:
        count *= int(d)
    nbytes = count * np.dtype(dtype).itemsize
    if nbytes > available:
        raise CorruptCheckpointError(
            "array larger than the bytes present", file=file, path=path,
            expected=f"{nbytes} bytes for {np.dtype(dtype).name}{list(shape)}", found=f"{available} bytes",
        )
    return nbytes


def map_file(fh: Any) -> mmap.mmap | None:
    """A read-only memory map of the open file ``fh``, ``None`` for an empty file.

    Arrays read as ``np.frombuffer`` views of it are not copied: their pages come from the page cache
    as they are touched, and they are read-only (as ``flax.serialization.msgpack_restore``'s arrays,
    views of a ``bytes``, always were; ``np.array(a)`` for a writable copy). The map lives as long as
    an array viewing it (``munmap`` when the last one is freed).
    """
    if os.fstat(fh.fileno()).st_size == 0:
        return None
    return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)


def release(arr: Any) -> bool:
    """Drop this process's resident pages of ``arr`` if it is a view of a :func:`map_file` map
    (``madvise(MADV_DONTNEED)``: the map is read-only, so nothing is lost; touching the array again
    faults its pages back in from the page cache). ``True`` if pages were dropped; any other array
    is left alone. Lets a pass over a large memory-mapped checkpoint hold one array's pages at a time."""
    base = arr
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    if not isinstance(base, mmap.mmap) or not isinstance(arr, np.ndarray) or arr.nbytes == 0:
        return False
    if not hasattr(mmap, "MADV_DONTNEED"):  # Windows: no madvise (the pages go when the map does)
        return False
    from numpy.lib.array_utils import byte_bounds

    low, high = byte_bounds(arr)
    origin = np.frombuffer(base, np.uint8, count=1).ctypes.data
    begin = (low - origin) // mmap.PAGESIZE * mmap.PAGESIZE
    end = min(high - origin, len(base))
    base.madvise(mmap.MADV_DONTNEED, begin, end - begin)
    return True


# ------------------------------------------------------------------ atomic writes
def refuse_existing(dst: str, overwrite: bool) -> None:
    if os.path.lexists(dst) and not overwrite:
        raise FileExistsError(f"{dst}: exists; pass overwrite=True (--overwrite) to replace it")


def _fsync_dir(folder: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_file(dst: str, write: Callable[[Any], None], *, overwrite: bool = False) -> None:
    """Call ``write(fh)`` on a temporary file in ``dst``'s folder, fsync it, then rename it over ``dst``.

    A failure or ``kill -9`` at any moment leaves ``dst`` as it was (absent or the old file) and at most
    a ``.tmp-*`` file in the folder, never a partial ``dst``.
    """
    dst = os.fspath(dst)
    refuse_existing(dst, overwrite)
    folder = os.path.dirname(os.path.abspath(dst))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(dst), dir=folder)
    os.close(fd)
    try:
        with open(tmp, "wb") as fh:  # reopened by name: fh.name is the path (safetensors writes to it)
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if not overwrite and os.path.lexists(dst):  # appeared while we wrote
            raise FileExistsError(f"{dst}: exists; pass overwrite=True (--overwrite) to replace it")
        os.replace(tmp, dst)
        _fsync_dir(folder)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def atomic_directory(dst: str, write: Callable[[str], None], *, overwrite: bool = False) -> None:
    """``write(tmp_dir)`` (a path that does not exist yet, in ``dst``'s folder; Orbax commits it
    atomically itself), then move it to ``dst``. Replacing an existing directory is two renames
    (old aside, new in place), then the old one is deleted."""
    dst = os.fspath(dst).rstrip("/")
    refuse_existing(dst, overwrite)
    folder = os.path.dirname(os.path.abspath(dst))
    tmp = tempfile.mkdtemp(prefix=".tmp-", suffix="-" + os.path.basename(dst), dir=folder)
    os.rmdir(tmp)  # Orbax wants to create the directory itself
    try:
        write(tmp)
        _fsync_dir(folder)
        if os.path.lexists(dst):
            if not overwrite:
                raise FileExistsError(f"{dst}: exists; pass overwrite=True (--overwrite) to replace it")
            old = tempfile.mkdtemp(prefix=".old-", suffix="-" + os.path.basename(dst), dir=folder)
            os.rmdir(old)
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
        _fsync_dir(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
