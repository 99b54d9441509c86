"""Orbax checkpoint directories, through ``orbax.checkpoint`` (``StandardCheckpointer`` /
``PyTreeCheckpointer`` layouts both read). Writes use Orbax's own atomic commit (a temporary
directory renamed when complete), into a temporary name in the destination's folder first."""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np

from normbridge.checkpoint._common import Checkpoint, atomic_directory, flatten, guard
from normbridge.errors import CorruptCheckpointError

FORMAT = "orbax"
MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "checkpoint", "commit_success.txt")


def looks_like(directory: str) -> bool:
    try:
        return any(m in os.listdir(directory) for m in MARKERS)
    except OSError:
        return False


def guess_framework(leaves: dict[str, Any]) -> str | None:
    top = {k.split("/", 1)[0] for k in leaves}
    if top & {"params", "batch_stats"}:
        return "linen"
    if any(k.endswith("/value") for k in leaves):
        return "nnx"
    return None


def read(directory: str) -> Checkpoint:
    import orbax.checkpoint as ocp

    if not os.path.isdir(directory) or not looks_like(directory):
        raise CorruptCheckpointError("not an Orbax checkpoint directory", file=directory,
                                     expected=f"a directory with one of {list(MARKERS)}",
                                     found="a file" if os.path.exists(directory) else "nothing")
    with guard(directory, "Orbax checkpoint"), warnings.catch_warnings():
        # "Sharding info not provided": arrays are restored as host numpy arrays, on purpose
        warnings.filterwarnings("ignore", message="Sharding info not provided", category=UserWarning)
        tree = ocp.PyTreeCheckpointer().restore(os.path.abspath(directory))
        leaves = {k: np.asarray(v) for k, v in flatten(tree).items()}
    return Checkpoint(directory, FORMAT, leaves, tree, guess_framework(leaves))


def write(dst: str, tree: Any, *, overwrite: bool = False) -> None:
    """``StandardCheckpointer().save`` of ``tree`` (an ``nnx.State``, linen variables, any pytree): the
    same ``StandardCheckpointHandler`` and files, saved synchronously (``ocp.Checkpointer``) with numpy
    arrays written as they are. Orbax's default ``NumpyHandler`` deep-copies every host array first
    (``deepcopy_host_arrays=True``: an *async* save must not see the caller change them); nothing can
    change them while a synchronous save runs, so :func:`_handler` registers one that does not, and a
    large checkpoint is not held twice."""
    import orbax.checkpoint as ocp

    def save(tmp: str) -> None:
        with ocp.Checkpointer(_handler()) as ck:
            ck.save(os.path.abspath(tmp), args=ocp.args.StandardSave(tree))

    atomic_directory(dst, save, overwrite=overwrite)


def _handler() -> Any:
    """A ``StandardCheckpointHandler`` whose numpy arrays are serialized without Orbax's defensive copy
    (``NumpyHandler(deepcopy_host_arrays=False)``, every other type as Orbax registers it). Orbax has
    no public argument for this, so the handler's inner ``PyTreeCheckpointHandler`` (``_impl``, what
    its ``__init__`` builds) is rebuilt with the registry; an Orbax without ``_impl`` gets the plain
    handler (a copy more, same files)."""
    import orbax.checkpoint as ocp
    from orbax.checkpoint._src.serialization import type_handler_registry as registry

    handler = ocp.StandardCheckpointHandler()
    defaults = getattr(registry, "_DEFAULT_TYPE_HANDLERS", None)
    if not hasattr(handler, "_impl") or defaults is None:
        return handler
    pairs = [(ty, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)) if ty is np.ndarray else (ty, h)
             for ty, h in defaults]
    handler._impl = ocp.PyTreeCheckpointHandler(type_handler_registry=ocp.type_handlers.create_type_handler_registry(
        *pairs))
    return handler
