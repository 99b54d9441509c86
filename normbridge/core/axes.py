"""Axis bookkeeping shared by every layer: canonical axes and feature shapes."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Union

Axes = Union[int, Sequence[int]]


def canonicalize_axes(ndim: int, axes: Axes) -> tuple[int, ...]:
    """Deduplicated, non-negative axes (flax's ``_canonicalize_axes``).

    The order follows a Python ``set`` of the non-negative axes, exactly as flax
    does, because the order of reduction axes can change the bits of a sum.
    """
    if not isinstance(axes, Iterable):
        axes = (axes,)
    return tuple({ndim + axis if axis < 0 else axis for axis in axes})


def complement_axes(ndim: int, axes: Axes) -> tuple[int, ...]:
    """Axes of an ``ndim`` array that are not in ``axes``, ascending."""
    kept = canonicalize_axes(ndim, axes)
    return tuple(i for i in range(ndim) if i not in kept)


def feature_shapes(shape: Sequence[int], feature_axes: Axes) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(param_shape, broadcast_shape)`` for parameters over ``feature_axes``.

    ``param_shape`` holds the sizes of the feature axes in canonical order (the
    shape flax stores); ``broadcast_shape`` is ``shape`` with every other axis set
    to 1, ready to multiply into an input of ``shape``.
    """
    axes = canonicalize_axes(len(shape), feature_axes)
    broadcast = [1] * len(shape)
    param = []
    for ax in axes:
        broadcast[ax] = shape[ax]
        param.append(shape[ax])
    return tuple(param), tuple(broadcast)
