"""treex checkpoints (pickle / cloudpickle of any protocol 0–5, the msgpack of ``to_dict``, npz)
through :func:`normbridge.adapters.treex.load`, the restricted loader that executes nothing."""

from __future__ import annotations

import os
import warnings
import zipfile
from typing import Any

import numpy as np

from normbridge.checkpoint._common import Checkpoint, atomic_file, flatten, guard, refuse_existing
from normbridge.checkpoint._zip import check_npy_member, safe_members


def _treex() -> Any:
    from normbridge.adapters import treex

    return treex


def read_pickle(file: str) -> Checkpoint:
    """A pickled treex module: the module itself is in ``obj``."""
    treex = _treex()
    with guard(file, "treex pickle"):
        module = treex.load(file, format="pickle")
        leaves = {k: np.asarray(v) for k, v in flatten(treex.state_dict(module)).items()}
    return Checkpoint(file, "pickle", leaves, treex.state_dict(module), "treex", obj=module)


def check_npz(file: str) -> None:
    with guard(file, "numpy npz"), zipfile.ZipFile(file) as zf:
        for info in safe_members(zf, file, os.path.getsize(file)).values():
            check_npy_member(zf, info, file)


def read_npz(file: str) -> Checkpoint:
    """An npz of arrays named by ``/`` paths (treex's ``format="npz"``, or any ``np.savez``)."""
    check_npz(file)
    with guard(file, "numpy npz"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "holds only leaves": we know
        tree = _treex().load(file, format="npz")
        leaves = {k: np.asarray(v) for k, v in flatten(tree).items()}
    return Checkpoint(file, "npz", leaves, tree, "treex")


def write_module(dst: str, module: Any, format: str, *, overwrite: bool = False) -> None:
    """A treex module in ``format`` ("pickle", "cloudpickle", "msgpack", "npz"): ``treex.save``'s bytes,
    written atomically here."""
    refuse_existing(dst, overwrite)
    data = _treex().serialization.dumps(module, format=format)
    atomic_file(dst, lambda fh: fh.write(data), overwrite=overwrite)


def write_npz(dst: str, leaves: dict[str, Any], *, overwrite: bool = False) -> None:
    atomic_file(dst, lambda fh: np.savez(fh, **{k: np.asarray(v) for k, v in leaves.items()}), overwrite=overwrite)
