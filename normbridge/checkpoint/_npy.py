"""``.npy`` records read with their declared size checked against the bytes present before allocating."""

from __future__ import annotations

from typing import IO

import numpy as np
from numpy.lib import format as npformat

from normbridge.checkpoint._common import check_size
from normbridge.errors import CorruptCheckpointError, UnsafeCheckpointError


def read_header(fh: IO[bytes], file: str, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """``(shape, fortran_order, dtype)`` of the ``.npy`` record at ``fh``'s position (header only)."""
    try:
        major, minor = npformat.read_magic(fh)
        if (major, minor) == (1, 0):
            shape, fortran, dtype = npformat.read_array_header_1_0(fh)
        elif major in (2, 3):
            shape, fortran, dtype = npformat.read_array_header_2_0(fh)
        else:
            raise ValueError(f"unknown .npy version {major}.{minor}")
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as err:
        raise CorruptCheckpointError("bad .npy header", file=file, path=where, expected="a .npy record",
                                     found=f"{type(err).__name__}: {str(err)[:200]}") from err
    if dtype.hasobject:
        raise UnsafeCheckpointError("an object array (a pickle) is not read", file=file, path=where,
                                    expected="a numeric dtype", found=str(dtype))
    return tuple(shape), bool(fortran), dtype


def read_record(fh: IO[bytes], file: str, where: str, available: int) -> np.ndarray:
    """One ``.npy`` record from ``fh``, ``available`` bytes being what is left from its start."""
    start = fh.tell()
    shape, fortran, dtype = read_header(fh, file, where)
    body = available - (fh.tell() - start)
    nbytes = check_size(file, where, shape, dtype, body)
    data = fh.read(nbytes)
    if len(data) != nbytes:
        raise CorruptCheckpointError("truncated array", file=file, path=where, expected=f"{nbytes} bytes",
                                     found=f"{len(data)} bytes")
    arr = np.frombuffer(data, dtype=dtype)
    return arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)
