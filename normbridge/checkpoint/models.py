"""Checkpoints in and out of models: which framework a model belongs to, loading a
:class:`~normbridge.checkpoint.Checkpoint` into a model by path (every problem in one error, a whole
missing collection as one line), and writing a model in any format.

Models are what :func:`normbridge.convert` takes: linen ``(module, variables)``, an NNX module,
Equinox ``(model, state)`` (or a bare model), a treex facade module.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from normbridge.checkpoint import equinox_named, eqx_leaves, flax_msgpack, orbax_format, treex
from normbridge.checkpoint._common import Checkpoint, describe, flatten
from normbridge.errors import CheckpointError, CheckpointMismatchError


def framework_of(model: Any) -> str:
    """``"linen"``, ``"nnx"``, ``"equinox"`` or ``"treex"``; ``TypeError`` for anything else.

    A framework whose module is not imported yet cannot have made ``model``, so it is not imported
    to test it (importing treex's facade and Equinox costs seconds in a ``convert`` of linen files)."""
    import sys

    def loaded(name: str) -> bool:
        return name in sys.modules

    if loaded("normbridge.adapters.treex.module"):
        from normbridge.adapters.treex.module import Module as TreexModule

        if isinstance(model, TreexModule):
            return "treex"
    if loaded("flax.nnx"):
        from flax import nnx

        if isinstance(model, nnx.Module):
            return "nnx"
    if isinstance(model, tuple) and len(model) == 2 and loaded("flax.linen"):
        import flax.linen as nn

        if isinstance(model[0], nn.Module) and isinstance(model[1], Mapping):
            return "linen"
    if loaded("equinox"):
        import equinox as eqx

        if isinstance(model, eqx.Module) or (
            isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], eqx.Module)
        ):
            return "equinox"
    raise TypeError(
        f"not a model of a framework normbridge knows: {type(model).__name__}; expected linen "
        "(module, variables), an NNX module, Equinox (model, state) or a treex module"
    )


def _strip_value(path: str) -> str:
    return path[: -len("/value")] if path.endswith("/value") else path


def mismatch(file: str, expected: Mapping[str, Any], found: Mapping[str, Any], what: str) -> list[str]:
    """Every difference between the paths a model expects and those a file holds, one line each;
    a subtree missing entirely (e.g. the ``batch_stats`` collection) is one line, not one per leaf."""
    problems: list[str] = []
    missing = [p for p in expected if p not in found]
    extra = [p for p in found if p not in expected]
    found_prefixes = {"/".join(p.split("/")[:i]) for p in found for i in range(1, p.count("/") + 1)} | set(found)

    def absent_root(path: str) -> str:
        parts = path.split("/")
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if prefix not in found_prefixes:
                return prefix
        return path

    grouped: dict[str, list[str]] = {}
    for p in missing:
        grouped.setdefault(absent_root(p), []).append(p)
    for root, paths in grouped.items():
        if len(paths) > 1 or root != paths[0]:
            kind = "collection" if "/" not in root else "subtree"
            problems.append(f"the checkpoint has no {root} {kind} ({len(paths)} arrays the {what} expects there)")
        else:
            problems.append(f"{root}: missing from the checkpoint (the {what} expects {describe(expected[root])})")
    if extra:
        problems.append(f"not in the {what}: {', '.join(extra[:20])}" + (f" and {len(extra) - 20} more"
                                                                        if len(extra) > 20 else ""))
    for p in expected:
        if p in found:
            a, b = np.asarray(found[p]), expected[p]
            b_shape = tuple(getattr(b, "shape", np.shape(b)))  # arrays or jax.ShapeDtypeStruct
            b_dtype = np.dtype(getattr(b, "dtype", None) or np.asarray(b).dtype)
            if tuple(a.shape) != b_shape:
                problems.append(f"{p}: shape {list(a.shape)} in the file, {list(b_shape)} in the {what}")
            elif a.dtype != b_dtype:
                problems.append(f"{p}: dtype {a.dtype} in the file, {b_dtype} in the {what}")
    return problems


def _raise(file: str, problems: list[str], what: str) -> None:
    if problems:
        raise CheckpointMismatchError(
            f"does not fit the {what} ({len(problems)} problem{'s' if len(problems) > 1 else ''}):\n  "
            + "\n  ".join(problems),
            file=file,
        )


def _fill_by_path(file: str, tree: Any, leaves: Mapping[str, Any], what: str) -> Any:
    """A copy of the pytree ``tree`` whose leaves are taken from ``leaves`` by ``/`` path."""
    import jax

    from normbridge.testing import tree_paths

    want = tree_paths(tree)
    _raise(file, mismatch(file, want, leaves, what), what)
    flat, treedef = jax.tree_util.tree_flatten(tree)
    assert len(flat) == len(want)
    # numpy views of what was read: no second copy of a large checkpoint (jax takes them as they are)
    return jax.tree_util.tree_unflatten(treedef, [np.asarray(leaves[p]) for p in want])


def load_into(ckpt: Checkpoint, model: Any) -> Any:
    """``model`` (see the module docstring) with every array from ``ckpt``; raises
    :class:`CheckpointMismatchError` listing every problem, nothing half-loaded."""
    fw = framework_of(model)
    file = ckpt.file
    if fw == "linen":
        module, variables = model
        return module, _fill_by_path(file, dict(variables), ckpt.leaves, "linen model")
    if fw == "nnx":
        from flax import nnx

        from normbridge.adapters.nnx.convert import load_native_state

        state = nnx.state(model)
        want = {_strip_value(k): v for k, v in flatten(nnx.to_pure_dict(state)).items()}
        found = {_strip_value(k): v for k, v in ckpt.leaves.items()}
        _raise(file, mismatch(file, want, found, "NNX model"), "NNX model")
        import copy

        target = copy.deepcopy(model)
        try:
            return load_native_state(target, ckpt.tree)
        except ValueError as err:
            raise CheckpointMismatchError(str(err), file=file) from err
    if fw == "equinox":
        from normbridge.adapters.equinox import checkpoint as eqx_ckpt

        like, state = model if isinstance(model, tuple) else (model, None)
        if ckpt.format in (equinox_named.FORMAT, eqx_leaves.FORMAT):
            try:
                new, new_state, _ = eqx_ckpt.load(file, like, state)
            except eqx_ckpt.CheckpointMismatchError as err:
                raise CheckpointMismatchError(str(err), file=file) from err
            return (new, new_state) if isinstance(model, tuple) else new
        raise CheckpointError(f"an Equinox model is read from {equinox_named.FORMAT!r} or {eqx_leaves.FORMAT!r} "
                              f"files, not {ckpt.format!r}", file=file)
    # treex
    from normbridge.adapters import treex as tx

    if ckpt.obj is not None:
        problems = mismatch(file, flatten(tx.state_dict(model)), ckpt.leaves, "treex model")
        _raise(file, problems, "treex model")
        return ckpt.obj
    problems = mismatch(file, {k: v for k, v in flatten(tx.state_dict(model)).items()}, ckpt.leaves, "treex model")
    _raise(file, problems, "treex model")
    fmt = "npz" if ckpt.format == "npz" else "msgpack"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            return tx.load(file, template=model, format=fmt)
        except CheckpointError:
            raise
        except ValueError as err:  # pragma: no cover - the loader's own errors are CheckpointErrors
            raise CheckpointMismatchError(str(err), file=file) from err


def write_model(dst: str, model: Any, fmt: str, *, overwrite: bool = False) -> dict[str, np.ndarray]:
    """Write ``model``'s arrays to ``dst`` as ``fmt``, atomically (see :func:`framework_of`); returns
    ``{path: array}`` as reading ``dst`` back must give it (to check the write)."""
    written = _write_model(dst, model, fmt, overwrite=overwrite)
    return {k: np.asarray(v) for k, v in written.items()}


def _write_model(dst: str, model: Any, fmt: str, *, overwrite: bool) -> dict[str, Any]:
    from normbridge import checkpoint as ck

    dst = os.fspath(dst)
    fw = framework_of(model)
    if fw == "treex":
        from normbridge.adapters import treex as tx

        if fmt in ("pickle", "cloudpickle", "msgpack", "npz"):
            treex.write_module(dst, model, fmt, overwrite=overwrite)
        else:
            ck.write_tree(dst, tx.state_dict(model), fmt, overwrite=overwrite)
        return flatten(tx.state_dict(model))
    if fw == "equinox":
        like, state = model if isinstance(model, tuple) else (model, None)
        from normbridge.adapters.equinox import checkpoint as eqx_ckpt

        named = eqx_ckpt._named_leaves(like, state)
        if fmt == equinox_named.FORMAT:
            equinox_named.write(dst, like, state, overwrite=overwrite)
            return dict(named)
        if fmt == eqx_leaves.FORMAT:
            eqx_leaves.write(dst, like if state is None else (like, state), overwrite=overwrite)
            return {str(i): leaf for i, (_, leaf) in enumerate(named)}
        raise CheckpointError(f"an Equinox model is written as {equinox_named.FORMAT!r} (.nbeqx) or "
                              f"{eqx_leaves.FORMAT!r} (.eqx), not {fmt!r}", file=dst)
    if fw == "nnx":
        from flax import nnx

        state = nnx.state(model)
        if fmt == orbax_format.FORMAT:
            orbax_format.write(dst, state, overwrite=overwrite)
            return {f"{k}/value": v for k, v in flatten(nnx.to_pure_dict(state)).items()}
        ck.write_tree(dst, nnx.to_pure_dict(state), fmt, overwrite=overwrite)
        return flatten(nnx.to_pure_dict(state))
    _, variables = model
    if fmt == "pickle":
        raise CheckpointError("a pickle holds a treex module; write linen variables as msgpack or orbax", file=dst)
    if fmt == flax_msgpack.FORMAT:
        flax_msgpack.write(dst, dict(variables), overwrite=overwrite)
    else:
        ck.write_tree(dst, dict(variables), fmt, overwrite=overwrite)
    return flatten(dict(variables))
