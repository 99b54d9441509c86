"""Plumbing shared by the NNX facade: dtype promotion, the flag rule, reshaping for :func:`core.normalize`.

Nothing here computes a statistic or a normalization: those come from :mod:`normbridge.core`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp

from normbridge import core

T = TypeVar("T", bound=tuple)


def promote_dtype(args: T, /, *, dtype: Any = None, inexact: bool = True) -> T:
    """Cast every non-``None`` array of ``args`` to one dtype (nnx's ``promote_dtype`` contract).

    The dtype is ``dtype`` if given, else the promotion of the arguments
    (:func:`normbridge.core.result_dtype`); ``None`` entries stay ``None``.
    With ``inexact=False`` a non-float result dtype is allowed.
    """
    if inexact:
        target = core.result_dtype(*args, dtype=dtype)
    else:
        target = dtype if dtype is not None else jnp.result_type(*[jnp.asarray(a) for a in args if a is not None])
    return tuple(jnp.asarray(a, target) if a is not None else None for a in args)  # type: ignore[return-value]


def first_from(*args: Any, error_msg: str) -> Any:
    """The first argument that is not ``None`` (the call flag wins over the attribute); ``ValueError`` if none."""
    for arg in args:
        if arg is not None:
            return arg
    raise ValueError(error_msg)


def value_or_none(var: Any) -> jax.Array | None:
    """The array of an optional Variable."""
    return None if var is None else var[...]


def normalize_flax(
    x: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    reduction_axes: Any,
    feature_axes: Any,
    dtype: Any,
    epsilon: float,
    groups: int | None = None,
) -> jax.Array:
    """:func:`core.normalize` (flax order) on nnx's 1-D parameters and reduced statistics
    (``groups``: GroupNorm's repeated group statistics, see :func:`core.normalize`).

    ``mean``/``var`` are reshaped to ``x.shape`` with the reduction axes set to 1, the
    ``(num_features,)`` parameters to the feature-axes broadcast shape (that reshape is
    nnx's storage convention); the result dtype is :func:`core.result_dtype` of ``x``
    and the present parameters, or ``dtype``.
    """
    red = core.canonicalize_axes(x.ndim, reduction_axes)
    stats_shape = [1 if i in red else d for i, d in enumerate(x.shape)]
    _, bshape = core.feature_shapes(x.shape, feature_axes)
    mean = mean.reshape(stats_shape)
    var = var.reshape(stats_shape)
    args: list[Any] = [x]
    # a list, as nnx passes it: a parameter of the wrong size then fails with nnx's reshape message
    if scale is not None:
        scale = scale.reshape(list(bshape))
        args.append(scale)
    if bias is not None:
        bias = bias.reshape(list(bshape))
        args.append(bias)
    y = core.normalize(x, mean, var, epsilon, scale, bias, order="flax", groups=groups)
    return jnp.asarray(y, core.result_dtype(*args, dtype=dtype))


def path_str(path: Sequence[Any]) -> str:
    """``('inner', 'kernel')`` → ``"inner/kernel"`` (record keys and error messages)."""
    return "/".join(str(p) for p in path)
