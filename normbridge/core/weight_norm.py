r"""Weight normalization :math:`W = g \cdot V/\lVert V\rVert`, norm over all axes but the kept ones.

* flax: ``V * rsqrt(Σ_red V² + eps) * scale`` (eps inside the rsqrt, default 1e-12),
  feature axes kept (default ``-1``), ``scale`` initialized to ones;
* equinox: ``V * g / ‖V‖`` with ``jnp.linalg.norm`` per kept axis (default ``0``)
  and **no eps**, ``g`` initialized to ``‖V‖`` (so the layer is unchanged at init).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from normbridge.core.axes import Axes, canonicalize_axes, complement_axes, feature_shapes
from normbridge.core.spectral import l2_normalize


def weight_norm_axes(ndim: int, feature_axes: Axes | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(feature_axes, reduction_axes)``; ``feature_axes=None`` reduces every axis."""
    if feature_axes is None:
        return (), tuple(range(ndim))
    feats = canonicalize_axes(ndim, feature_axes)
    return feats, complement_axes(ndim, feats)


def weight_norm_flax(
    v: jax.Array, feature_axes: Axes | None, eps: float, scale: jax.Array | None
) -> jax.Array:
    """flax WeightNorm on one variable; ``scale`` has the feature shape (or is ``None``)."""
    feats, red = weight_norm_axes(v.ndim, feature_axes)
    out = l2_normalize(v, axis=red, eps=eps)
    if scale is not None:
        _, bshape = feature_shapes(v.shape, feats) if feats else ((), (1,) * v.ndim)
        out = out * scale.reshape(bshape)
    return out


def weight_norm_scale_shape(shape: tuple[int, ...], feature_axes: Axes | None) -> tuple[int, ...]:
    """Shape of flax's WeightNorm ``scale`` for a variable of ``shape``."""
    feats, _ = weight_norm_axes(len(shape), feature_axes)
    return feature_shapes(shape, feats)[0] if feats else ()


def norm_except_axis(v: jax.Array, axis: int | None) -> jax.Array:
    """L2 norm over every axis but ``axis`` (keepdims), or of the whole tensor for ``None`` (equinox)."""
    norm = functools.partial(jnp.linalg.norm, keepdims=True)
    if axis is None:
        return norm(v)
    return jax.vmap(norm, in_axes=axis, out_axes=axis)(v)


def weight_norm_eqx(v: jax.Array, g: jax.Array, axis: int | None) -> jax.Array:
    """equinox WeightNorm: ``v * g / ‖v‖``."""
    return v * g / norm_except_axis(v, axis)
