"""Linen → NNX migration of a whole model's checkpoint: :func:`migrate_linen_checkpoint`, a thin
wrapper over :func:`normbridge.convert` (one engine: its pairing, layouts and verification).

A linen ``variables`` dict (``{'params': ..., 'batch_stats': ...}``, as ``model.init`` returns it
and as ``flax.serialization`` msgpack or Orbax save it, read with :func:`normbridge.checkpoint.read`)
fills an NNX model (facade or native layers), in place.

* With the linen ``module=`` and a ``probe=`` input: ``convert((module, variables), model)``, layers
  paired by mapping, names, then execution order, and verified by running both models.
* Without them (deprecated: use :func:`normbridge.convert`): ``convert(variables, model,
  verify=False)``, variables without their module, paired by ``mapping`` and equal names only (never
  by order), each layer read in the layout of its NNX layer's kind; unverified.

Either way a :class:`MigrationError` lists every problem and nothing is written.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

from normbridge import errors
from normbridge._optional import require

__all__ = ["MigrationError", "load_linen_variables", "migrate_linen_checkpoint"]


class MigrationError(errors.CheckpointMismatchError):
    """A linen checkpoint does not fit the NNX model; the message lists every problem."""


def load_linen_variables(source: Any) -> dict[str, Any]:
    """A linen ``variables`` dict from a dict, a msgpack file (``flax.serialization``) or an Orbax directory."""
    if isinstance(source, Mapping):
        return _plain(source)
    from normbridge import checkpoint

    return _plain(checkpoint.read(os.fspath(source)).tree)


def _plain(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {str(k): _plain(v) for k, v in tree.items()}
    return tree


def migrate_linen_checkpoint(
    source: Any,
    model: Any,
    *,
    mapping: Mapping[str, str] | None = None,
    module: Any = None,
    probe: Any = None,
) -> Any:
    """Fill ``model`` (an NNX module) from a linen checkpoint, in place; returns ``model``.

    ``source``: a linen ``variables`` dict, a msgpack file written with
    ``flax.serialization.msgpack_serialize(variables)`` or an Orbax directory of ``variables``.
    ``mapping``: ``{nnx path: linen path}`` (paths ``/``-joined, e.g. ``{'blocks/0/bn': 'Block_0/BatchNorm_1'}``).

    With the linen ``module`` and a ``probe`` input this is ``normbridge.convert((module, variables),
    model, probe=probe)``: paired by mapping, names, then execution order, and verified. Without them
    (deprecated) it is ``normbridge.convert(variables, model, verify=False)``: paired by ``mapping`` and
    equal names only, unverified. Nothing is written unless everything fits (:class:`MigrationError`).
    """
    nnx = require("flax.nnx", facade="nnx", extra="nnx")
    from normbridge.conversion import convert

    if (module is None) != (probe is None):
        raise TypeError("migrate_linen_checkpoint: pass both module= (the linen module) and probe= (an input batch)")
    variables = load_linen_variables(source)
    inverted = {linen: ours for ours, linen in (mapping or {}).items()}  # convert's mapping is source -> target
    if module is None:
        warnings.warn(
            "migrate_linen_checkpoint without module= and probe= is deprecated: it pairs the checkpoint's layers "
            "by mapping and names only and cannot verify; use normbridge.convert((module, variables), model, "
            "probe=x), which also pairs by execution order and verifies outputs",
            DeprecationWarning,
            stacklevel=2,
        )
    try:
        if module is None:
            target, _ = convert(variables, model, mapping=inverted, verify=False)
        else:
            target, _ = convert((module, variables), model, mapping=inverted, probe=probe)
    except errors.ConversionError as err:
        raise MigrationError(f"migrate_linen_checkpoint: {err}") from err
    nnx.update(model, nnx.state(target))
    return model
