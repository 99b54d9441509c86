"""treex 0.6.12's ``BatchNorm``, ``LayerNorm`` and ``GroupNorm``, every number from :mod:`normbridge.core`.

treex wrapped the flax 0.4.1 modules; what that meant, and what these reproduce:

* keyword-only constructors with treex's defaults: BatchNorm ``momentum=0.99``,
  ``epsilon=1e-5``, ``axis=-1``; LayerNorm/GroupNorm ``epsilon=1e-5`` (flax: 1e-6);
  every layer ``dtype=jnp.float32``, which flax 0.4.1 used as the *output* dtype
  (``jnp.asarray(y, dtype)``) while parameters and statistics stay float32;
* statistics as flax's ``_compute_stats``: float32 (at least), fast variance
  :math:`\\max(0, E[x^2]-E[x]^2)`; normalization in flax's order
  :math:`(x-\\mu)\\cdot(\\mathrm{rsqrt}(\\sigma^2+\\epsilon)\\cdot\\gamma)+\\beta`;
* BatchNorm keeps ``momentum`` as a 0-d array leaf (``jnp.asarray(momentum)``, weak
  float32, no kind), so the update :math:`m\\,r + (1-m)\\,b` runs in float32 exactly as
  flax did with treex's array momentum; it uses batch statistics (and updates the
  running ones) only when ``training and not frozen and initialized``, unless the
  call passes ``use_running_average=`` explicitly;
* GroupNorm (flax 0.4.1): axis 0 is the batch, statistics per example and group over
  every other axis, ``num_groups=32`` xor ``group_size``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from normbridge import core
from normbridge.adapters.treex.module import BatchStat, Module, Parameter, initializing, next_key, param_key, to

Initializer = Callable[..., jax.Array]

__all__ = ["BatchNorm", "GroupNorm", "LayerNorm"]


def _check_dtype(layer: str, dtype: Any) -> None:
    try:
        ok = jnp.issubdtype(jnp.dtype(dtype), jnp.inexact)
    except TypeError:
        ok = None  # not a dtype at all
    if ok is None:
        raise TypeError(f"{layer}: `dtype` must be a floating dtype, got {dtype!r}")
    if not ok:
        raise ValueError(f"{layer}: Dtype must be inexact: {dtype}")  # linen's message (flax canonicalize_dtype)


def _param(init: Initializer, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """A float32 parameter (flax 0.4.1 ``param_dtype``) from ``init(key, shape, float32)``."""
    return jnp.asarray(init(key, shape, jnp.float32))


def _affine(layer: Module, bshape: tuple[int, ...]) -> tuple[jax.Array | None, jax.Array | None]:
    scale = layer.scale.reshape(bshape) if layer.use_scale else None
    bias = layer.bias.reshape(bshape) if layer.use_bias else None
    return scale, bias


def _init_affine(layer: Module, pshape: tuple[int, ...]) -> None:
    # treex: one next_key() per layer, the flax module's ``params`` rng; flax creates scale first,
    # then bias, each from the next ``make_rng('params')`` fold-in (statistics take no key).
    key = next_key()
    index = 0
    if layer.use_scale:
        index += 1
        layer.scale = _param(layer.scale_init, param_key(key, index), pshape)
    if layer.use_bias:
        index += 1
        layer.bias = _param(layer.bias_init, param_key(key, index), pshape)


class BatchNorm(Module):
    """treex ``BatchNorm``: flax 0.4.1 BatchNorm with treex's flags (see the module docstring)."""

    mean: jax.Array | None = BatchStat.node()
    var: jax.Array | None = BatchStat.node()
    scale: jax.Array | None = Parameter.node()
    bias: jax.Array | None = Parameter.node()
    momentum: jax.Array = to.node()

    def __init__(
        self,
        *,
        axis: int = -1,
        momentum: float | jax.Array = 0.99,
        epsilon: float = 1e-5,
        dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = jax.nn.initializers.zeros,
        scale_init: Initializer = jax.nn.initializers.ones,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
    ) -> None:
        _check_dtype("BatchNorm", dtype)
        self._set_name()
        self.axis = axis
        self.momentum = jnp.asarray(momentum)
        self.epsilon = epsilon
        self.dtype = dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.bias_init = bias_init
        self.scale_init = scale_init
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.mean = None
        self.var = None
        self.scale = None
        self.bias = None

    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        """Normalize ``x`` over every axis but ``axis``; update ``mean``/``var`` when training."""
        self._check_ready()
        x = jnp.asarray(x)
        feature_axes = core.canonicalize_axes(x.ndim, self.axis)
        reduction_axes = core.complement_axes(x.ndim, feature_axes)
        pshape, bshape = core.feature_shapes(x.shape, feature_axes)
        if initializing():
            self.mean = jnp.zeros(pshape, jnp.float32)
            self.var = jnp.ones(pshape, jnp.float32)
            _init_affine(self, pshape)
        if self.mean is None or self.var is None:
            raise RuntimeError("BatchNorm: `mean`/`var` are None; call `.init(key, inputs)` first")
        if tuple(self.mean.shape) != pshape:
            raise ValueError(
                f"BatchNorm: input feature shape {pshape} (axis={self.axis}) does not match "
                f"the stored statistics' shape {tuple(self.mean.shape)}"
            )
        # treex: explicit argument wins, else the flags decide.
        training = (
            not use_running_average
            if use_running_average is not None
            else self._training and not self._frozen and self._initialized
        )
        if training:
            mean, var = core.moments(
                x, reduction_axes, axis_name=self.axis_name, axis_index_groups=self.axis_index_groups
            )
            self.mean = core.ema(self.mean, mean, self.momentum)
            self.var = core.ema(self.var, var, self.momentum)
        else:
            mean, var = self.mean, self.var
        scale, bias = _affine(self, bshape)
        y = core.normalize(x, mean.reshape(bshape), var.reshape(bshape), self.epsilon, scale, bias, order="flax")
        return jnp.asarray(y, self.dtype)


class LayerNorm(Module):
    """treex ``LayerNorm``: flax 0.4.1 LayerNorm over the last axis, ``epsilon=1e-5``."""

    scale: jax.Array | None = Parameter.node()
    bias: jax.Array | None = Parameter.node()

    def __init__(
        self,
        *,
        epsilon: float = 1e-5,
        dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = jax.nn.initializers.zeros,
        scale_init: Initializer = jax.nn.initializers.ones,
    ) -> None:
        _check_dtype("LayerNorm", dtype)
        self._set_name()
        self.epsilon = epsilon
        self.dtype = dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.bias_init = bias_init
        self.scale_init = scale_init
        self.scale = None
        self.bias = None

    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalize ``x`` over its last axis."""
        self._check_ready()
        x = jnp.asarray(x)
        last = (x.ndim - 1,)
        pshape, bshape = core.feature_shapes(x.shape, last)
        if initializing():
            _init_affine(self, pshape)
        mean, var = core.moments(x, last)
        scale, bias = _affine(self, bshape)
        y = core.normalize(x, jnp.expand_dims(mean, last), jnp.expand_dims(var, last), self.epsilon, scale, bias)
        return jnp.asarray(y, self.dtype)


class GroupNorm(Module):
    """treex ``GroupNorm``: flax 0.4.1 GroupNorm (axis 0 = batch, channels last), ``epsilon=1e-5``."""

    scale: jax.Array | None = Parameter.node()
    bias: jax.Array | None = Parameter.node()

    def __init__(
        self,
        *,
        num_groups: int | None = 32,
        group_size: int | None = None,
        epsilon: float = 1e-5,
        dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = jax.nn.initializers.zeros,
        scale_init: Initializer = jax.nn.initializers.ones,
    ) -> None:
        _check_dtype("GroupNorm", dtype)
        self._set_name()
        self.num_groups = num_groups
        self.group_size = group_size
        self.epsilon = epsilon
        self.dtype = dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.bias_init = bias_init
        self.scale_init = scale_init
        self.scale = None
        self.bias = None

    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalize each example's channel groups (contiguous blocks of the last axis)."""
        self._check_ready()
        x = jnp.asarray(x)
        if x.ndim < 2:
            raise ValueError(f"GroupNorm: expected an input of rank >= 2 (batch, ..., channels), got shape {x.shape}")
        channels = x.shape[-1]
        num_groups, group_size = core.resolve_groups(channels, self.num_groups, self.group_size)
        pshape, bshape = core.feature_shapes(x.shape, (x.ndim - 1,))
        if initializing():
            _init_affine(self, pshape)
        grouped = core.split_groups(x, num_groups)  # (N, ..., G, C/G)
        red = (*range(1, x.ndim - 1), grouped.ndim - 1)
        mean, var = core.moments(grouped, red)  # (N, G)
        # Broadcast the per-group statistics back to every channel of the group (layout only).
        stats_shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (channels,)
        mean = jnp.repeat(mean, group_size, axis=-1).reshape(stats_shape)
        var = jnp.repeat(var, group_size, axis=-1).reshape(stats_shape)
        scale, bias = _affine(self, bshape)
        y = core.normalize(x, mean, var, self.epsilon, scale, bias, groups=num_groups)
        return jnp.asarray(y, self.dtype)
