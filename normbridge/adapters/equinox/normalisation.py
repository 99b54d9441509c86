r"""``LayerNorm``, ``RMSNorm``, ``GroupNorm`` (drop-ins for ``equinox.nn``) and an equinox-style ``InstanceNorm``.

All four see one example (no batch axis; use ``jax.vmap``), compute in
:func:`normbridge.core.upcast_dtype` (at least float32) and return the **input
dtype**, like equinox. Statistics are two-pass in equinox's form
(:func:`normbridge.core.moments` with ``use_fast_variance=False, clip_two_pass=True,
jnp_var=True``); normalization uses core
order ``"rsqrt_then_affine"``: ``weight * ((x - mean) * rsqrt(var + eps)) + bias``
(RMSNorm: ``weight * (rsqrt(mean(x²) + eps) * x) + bias``).

* LayerNorm / RMSNorm: statistics over the whole input, whose shape must equal
  ``shape``; ``weight``/``bias`` have the full ``shape``.
* GroupNorm: ``x`` is ``(C, ...)``; channels are cut into ``groups`` contiguous
  blocks and each block is normalized over all its elements; ``weight``/``bias``
  are ``(C,)``, broadcast from the left.
* InstanceNorm (not in equinox): ``GroupNorm(channels, channels)``, i.e. each
  channel normalized over its own spatial positions.

Each accepts an optional ``state`` and then returns ``(out, state)`` unchanged,
so that it can sit in ``eqx.nn.Sequential`` next to stateful layers.

Operation order vs the flax facades (why equinox and linen differ in the last bits
for equal eps and equivalent axes, ≤ ~1e-6 relative in float32): equinox uses the
two-pass variance ``E[(x−μ)²]`` where flax defaults to ``E[x²]−E[x]²``, and
multiplies ``γ·((x−μ)·rsqrt(σ²+ε))`` where flax folds the scale first,
``(x−μ)·(rsqrt(σ²+ε)·γ)``; for half-precision inputs equinox also rounds the
result back to the input dtype while flax returns ``result_type(x, γ, β)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from normbridge import core
from normbridge.adapters.equinox._common import default_floating_dtype, eqx, left_broadcast, named_errors, sentinel

State = eqx.nn.State


def _finish(out: jax.Array, orig_dtype: Any, state: Any) -> Any:
    out = out.astype(orig_dtype)
    return out if state is sentinel else (out, state)


#: Equinox's messages for an input whose shape is not ``shape``, word for word (spacing and backticks included).
_SHAPE_MESSAGES = {
    "LayerNorm": (
        "`LayerNorm(shape)(x)` must satisfy the invariant `shape == x.shape`"
        "Received `shape={shape} and `x.shape={x_shape}`. You might need "
        "to replace `layer_norm(x)` with `jax.vmap(layer_norm)(x)`.\n"
        "\n"
        "If this is a new error for you, it might be because this became "
        "stricter in Equinox v0.11.0. Previously all that was required is that "
        "`x.shape` ended with `shape`. However, this turned out to be a "
        "frequent source of bugs, so we made the check stricter!"
    ),
    "RMSNorm": (
        "`RMSNorm(shape)(x)` must satisfy the invariant `shape == x.shape`"
        "Received `shape={shape} and `x.shape={x_shape}`. You might need "
        "to replace `rms_norm(x)` with `jax.vmap(rms_norm)(x)`.\n"
    ),
}


def _check_shape(layer: str, shape: tuple[int, ...], x: jax.Array) -> None:
    if x.shape != shape:
        raise ValueError(_SHAPE_MESSAGES[layer].format(shape=shape, x_shape=x.shape))


def _as_shape(shape: int | Sequence[int]) -> tuple[int, ...]:
    return (shape,) if isinstance(shape, int) else tuple(shape)


class LayerNorm(eqx.Module):
    """Normalizes the whole (unbatched) input; elementwise ``weight``/``bias`` of the full ``shape``."""

    shape: tuple[int, ...] = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    use_weight: bool = eqx.field(static=True)
    use_bias: bool = eqx.field(static=True)
    weight: jax.Array | None
    bias: jax.Array | None

    def __init__(
        self,
        shape: int | Sequence[int],
        eps: float = 1e-5,
        use_weight: bool = True,
        use_bias: bool = True,
        dtype=None,
        *,
        elementwise_affine: bool | None = None,
    ):
        """Same arguments as ``equinox.nn.LayerNorm``; ``elementwise_affine`` is deprecated (warns, sets both)."""
        shape = _as_shape(shape)
        self.shape = shape
        self.eps = eps
        if elementwise_affine is not None:
            use_weight = elementwise_affine
            use_bias = elementwise_affine
            warnings.warn(
                "LayerNorm(elementwise_affine=...) is deprecated "
                "in favour of LayerNorm(use_weight=...) and LayerNorm(use_bias=...)",
                stacklevel=2,
            )
        self.use_weight = use_weight
        self.use_bias = use_bias
        self.weight = jnp.ones(shape, dtype=dtype) if use_weight else None
        self.bias = jnp.zeros(shape, dtype=dtype) if use_bias else None

    def __call__(self, x: jax.Array, state: State = sentinel, *, key: Any = None) -> Any:
        """``x`` of shape ``shape`` → same shape and dtype (``(out, state)`` if a state is passed)."""
        del key
        _check_shape("LayerNorm", self.shape, x)
        orig_dtype = x.dtype
        cd = core.upcast_dtype(x.dtype)
        x = x.astype(cd)
        mean, var = core.moments(x, None, use_fast_variance=False, clip_two_pass=True, jnp_var=True, keepdims=True)
        w = self.weight.astype(cd) if self.use_weight else None
        b = self.bias.astype(cd) if self.use_bias else None
        out = core.normalize(x, mean, var, self.eps, w, b, order="rsqrt_then_affine")
        return _finish(out, orig_dtype, state)


class RMSNorm(eqx.Module):
    """``weight * x / sqrt(mean(x²) + eps) + bias`` over the whole input (bias on by default, as in equinox)."""

    shape: tuple[int, ...] = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    use_weight: bool = eqx.field(static=True)
    use_bias: bool = eqx.field(static=True)
    weight: jax.Array | None
    bias: jax.Array | None

    def __init__(
        self,
        shape: int | Sequence[int],
        eps: float = 1e-5,
        use_weight: bool = True,
        use_bias: bool = True,
        dtype=None,
    ):
        """Same arguments and defaults as ``equinox.nn.RMSNorm``."""
        dtype = default_floating_dtype() if dtype is None else dtype
        shape = _as_shape(shape)
        self.shape = shape
        self.eps = eps
        self.use_weight = use_weight
        self.use_bias = use_bias
        self.weight = jnp.ones(shape, dtype=dtype) if use_weight else None
        self.bias = jnp.zeros(shape, dtype=dtype) if use_bias else None

    def __call__(self, x: jax.Array, state: State = sentinel, *, key: Any = None) -> Any:
        """``x`` of shape ``shape`` → same shape and dtype (``(out, state)`` if a state is passed)."""
        del key
        _check_shape("RMSNorm", self.shape, x)
        orig_dtype = x.dtype
        cd = core.upcast_dtype(x.dtype)
        x = x.astype(cd)
        _, ms = core.moments(x, None, use_mean=False)
        w = self.weight.astype(cd) if self.use_weight else None
        b = self.bias.astype(cd) if self.use_bias else None
        out = core.normalize(x, None, ms, self.eps, w, b, order="rsqrt_then_affine")
        return _finish(out, orig_dtype, state)


def _group_norm(
    x: jax.Array, groups: int, eps: float, weight: jax.Array | None, bias: jax.Array | None, layer: str = "GroupNorm"
) -> jax.Array:
    """Equinox GroupNorm on one ``(C, ...)`` example, computed in the upcast dtype (not cast back)."""
    cd = core.upcast_dtype(x.dtype)
    x = x.astype(cd)
    # equinox's own failure on a bad input (IndexError for a 0-d x, TypeError from the reshape when the
    # channels do not split into ``groups``): the same operation, so the same error, after the layer name
    with named_errors(layer):
        y = core.split_groups(x, groups, channels_first=True)  # (G, C/G, ...)
    red = tuple(range(1, y.ndim))
    mean, var = core.moments(y, red, use_fast_variance=False, clip_two_pass=True, jnp_var=True, keepdims=True)
    out = core.merge_groups(core.normalize(y, mean, var, eps, order="rsqrt_then_affine"), channels_first=True)
    # Like equinox, weight/bias (C,) are broadcast to the merged output's shape in their own dtype and
    # upcast afterwards: the gradient's sum over positions then runs in the parameter dtype.
    def full(p: jax.Array | None) -> jax.Array | None:
        return None if p is None else jnp.broadcast_to(left_broadcast(p, x.ndim), x.shape).astype(cd)

    with named_errors(layer):  # (C,) parameters that do not fit x: equinox's broadcasting error
        return core.affine(out, full(weight), full(bias))


class GroupNorm(eqx.Module):
    """Group normalization of one channels-first example ``(C, ...)``; ``weight``/``bias`` ``(C,)``."""

    groups: int = eqx.field(static=True)
    channels: int | None = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    channelwise_affine: bool = eqx.field(static=True)
    weight: jax.Array | None
    bias: jax.Array | None

    def __init__(
        self,
        groups: int,
        channels: int | None = None,
        eps: float = 1e-5,
        channelwise_affine: bool = True,
        dtype=None,
    ):
        """Same arguments as ``equinox.nn.GroupNorm`` (groups first; channels optional without affine)."""
        if (channels is not None) and (channels % groups != 0):
            raise ValueError(
                f"GroupNorm: The number of groups must divide the number of channels. "
                f"(groups={groups}, channels={channels})"
            )
        if (channels is None) and channelwise_affine:
            raise ValueError("GroupNorm: The number of channels should be specified if `channelwise_affine=True`")
        self.groups = groups
        self.channels = channels
        self.eps = eps
        self.channelwise_affine = channelwise_affine
        self.weight = jnp.ones(channels, dtype=dtype) if channelwise_affine else None
        self.bias = jnp.zeros(channels, dtype=dtype) if channelwise_affine else None

    def __call__(self, x: jax.Array, state: State = sentinel, *, key: Any = None) -> Any:
        """``x`` ``(channels, ...)`` → same shape and dtype (``(out, state)`` if a state is passed)."""
        del key
        out = _group_norm(x, self.groups, self.eps, self.weight, self.bias)
        return _finish(out, x.dtype, state)


class InstanceNorm(eqx.Module):
    """Instance normalization of one channels-first example ``(C, ...)``, equal to ``GroupNorm(C, C)``.

    Not part of equinox (users write ``GroupNorm(C, C)``); same dtype rules and
    ``(x, state=..., *, key)`` call convention as the equinox norms.
    """

    channels: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    channelwise_affine: bool = eqx.field(static=True)
    weight: jax.Array | None
    bias: jax.Array | None

    def __init__(self, channels: int, eps: float = 1e-5, channelwise_affine: bool = True, dtype=None):
        """``channels``: size of axis 0; ``dtype``: dtype of ``weight``/``bias`` (default float32/float64)."""
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"InstanceNorm: channels must be a positive int, got {channels!r}")
        self.channels = channels
        self.eps = eps
        self.channelwise_affine = channelwise_affine
        self.weight = jnp.ones(channels, dtype=dtype) if channelwise_affine else None
        self.bias = jnp.zeros(channels, dtype=dtype) if channelwise_affine else None

    def __call__(self, x: jax.Array, state: State = sentinel, *, key: Any = None) -> Any:
        """``x`` ``(channels, ...)`` → same shape and dtype (``(out, state)`` if a state is passed)."""
        del key
        if x.ndim < 1 or x.shape[0] != self.channels:
            raise ValueError(f"InstanceNorm: x must have shape (channels={self.channels}, ...), got {x.shape}")
        out = _group_norm(x, self.channels, self.eps, self.weight, self.bias, layer="InstanceNorm")
        return _finish(out, x.dtype, state)
