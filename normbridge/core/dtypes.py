"""Dtype rules: the compute dtype of statistics and the result dtype of a layer."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

DTypeLike = Any


def stats_dtype(x_dtype: DTypeLike, dtype: DTypeLike | None = None, *, force_float32: bool = True) -> Any:
    """Dtype in which statistics are reduced.

    ``dtype or x_dtype``, promoted to at least float32 when ``force_float32``
    (half precision is upcast; float64 and complex are kept).
    """
    out = jnp.dtype(x_dtype) if dtype is None else jnp.dtype(dtype)
    if force_float32:
        out = jnp.promote_types(out, jnp.float32)
    return out


def result_dtype(*args: Any, dtype: DTypeLike | None = None) -> Any:
    """Result dtype of a flax layer: ``dtype`` if given, else the promotion of ``args``.

    ``None`` arguments are ignored and a non-inexact result is promoted to float32;
    a non-inexact explicit ``dtype`` is an error.
    """
    if dtype is None:
        present = [jnp.asarray(a) for a in args if a is not None]
        dtype = jnp.result_type(*present)
        if not jnp.issubdtype(dtype, jnp.inexact):
            dtype = jnp.promote_types(jnp.float32, dtype)
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise ValueError(f"Dtype must be inexact: {dtype}")
    return dtype


def upcast_dtype(x_dtype: DTypeLike) -> Any:
    """``result_type(x_dtype, float32)`` under standard promotion (equinox's rule).

    Equinox computes this inside ``jax.numpy_dtype_promotion("standard")``, so the
    upcast works (bfloat16 → float32) even when the user enables strict promotion;
    the same scope here keeps the facade's behaviour identical under either setting.
    """
    with jax.numpy_dtype_promotion("standard"):
        return jnp.result_type(jnp.dtype(x_dtype), jnp.float32)
