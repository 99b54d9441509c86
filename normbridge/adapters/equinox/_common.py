"""Shared plumbing of the equinox facade: the optional import and small helpers."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from normbridge._optional import require

eqx = require("equinox", facade="equinox")


class _Sentinel:
    """Default of the optional ``state`` argument (equinox uses its own private sentinel)."""

    def __repr__(self) -> str:
        return "sentinel"


#: Marks "no state passed" in LayerNorm/RMSNorm/GroupNorm/InstanceNorm calls.
sentinel: Any = _Sentinel()


def default_floating_dtype() -> Any:
    """float32, or float64 under ``jax_enable_x64`` (equinox's default parameter dtype)."""
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def left_broadcast(a: jax.Array, ndim: int) -> jax.Array:
    """``a`` with trailing singleton axes so that it broadcasts against an ``ndim`` array from the left."""
    return a.reshape(a.shape + (1,) * (ndim - a.ndim))
