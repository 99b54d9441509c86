"""Normalization with optional scale and bias, in each framework's operation order.

The three orders are the same math, :math:`(x-\\mu)/\\sqrt{\\sigma^2+\\epsilon}\\cdot\\gamma+\\beta`,
but round differently, so each facade names the order its framework uses:

* ``"flax"``: ``(x - mean) * (rsqrt(var + eps) * scale) + bias`` (linen, nnx, treex);
* ``"rsqrt_then_affine"``: ``scale * ((x - mean) * rsqrt(var + eps)) + bias``
  (equinox LayerNorm / GroupNorm; with ``mean=None`` it is equinox RMSNorm's
  ``scale * (rsqrt(ms + eps) * x) + bias``);
* ``"divide_sqrt"``: ``(x - mean) / sqrt(var + eps) * scale + bias`` (equinox BatchNorm).

``mean``, ``var``, ``scale`` and ``bias`` must already broadcast against ``x``.
No dtype conversion happens here: callers choose the result dtype
(:func:`normbridge.core.dtypes.result_dtype` or the input dtype).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

Order = Literal["flax", "rsqrt_then_affine", "divide_sqrt"]


def normalize(
    x: jax.Array,
    mean: jax.Array | None,
    var: jax.Array,
    epsilon: float,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    order: Order = "flax",
) -> jax.Array:
    """Normalize ``x`` with the given statistics, then scale and shift."""
    if order == "flax":
        y = x if mean is None else x - mean
        mul = lax.rsqrt(var + epsilon)
        if scale is not None:
            # flax folds the scale into the rsqrt factor before touching x.
            mul = mul * scale
        y = y * mul
        if bias is not None:
            y = y + bias
        return y
    if order == "rsqrt_then_affine":
        inv = lax.rsqrt(var + epsilon)
        out = inv * x if mean is None else (x - mean) * inv
        return affine(out, scale, bias)
    if order == "divide_sqrt":
        out = (x if mean is None else x - mean) / jnp.sqrt(var + epsilon)
        if scale is not None:
            out = out * scale
        if bias is not None:
            out = out + bias
        return out
    raise ValueError(f"normalize: unknown order {order!r}; expected 'flax', 'rsqrt_then_affine' or 'divide_sqrt'")


def affine(y: jax.Array, scale: jax.Array | None = None, bias: jax.Array | None = None) -> jax.Array:
    """``scale * y + bias`` (either optional): the affine step of order ``"rsqrt_then_affine"``.

    On its own where a layer applies it in another layout than the statistics (equinox
    GroupNorm normalizes in groups, then scales the merged channels).
    """
    if scale is not None:
        y = scale * y
    if bias is not None:
        y = y + bias
    return y
