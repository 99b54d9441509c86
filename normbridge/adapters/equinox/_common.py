"""Shared plumbing of the equinox facade: the optional import and small helpers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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


#: Exception types whose constructor takes just a message: safe to re-raise with the layer name added.
_PLAIN_ERRORS = (TypeError, ValueError, IndexError)


@contextlib.contextmanager
def named_errors(layer: str) -> Iterator[None]:
    """Re-raise a plain ``TypeError``/``ValueError``/``IndexError`` as the same type, message ``"<layer>: <native>"``.

    Used around the steps where equinox itself fails on a bad input (a reshape, a ``vmap``): the
    facade runs the same operation, so the error is equinox's, word for word, after the layer name.
    """
    try:
        yield
    except _PLAIN_ERRORS as err:
        if type(err) not in _PLAIN_ERRORS:
            raise  # a subclass (e.g. jax's TypePromotionError) may need other constructor arguments
        raise type(err)(f"{layer}: {err}") from err
