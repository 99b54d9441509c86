"""Additions beyond treex 0.6.12, in treex style: ``RMSNorm``, ``InstanceNorm``, ``SpectralNorm``, ``WeightNorm``.

treex never had these. They follow treex's conventions (keyword-only
constructors, lazy ``init``, kinds, ``dtype=float32`` as the output dtype,
``epsilon=1e-5`` like treex's LayerNorm/GroupNorm, ``training and not frozen and
initialized`` deciding whether state is updated) and compute exactly what
``flax.linen``'s layer of the same name computes when configured the same way
(the way treex configured flax); every number comes from :mod:`normbridge.core`.

* ``RMSNorm``: :math:`y = x\\,\\mathrm{rsqrt}(E[x^2]+\\epsilon)\\,\\gamma` over the
  last axis; ``scale`` Parameter ``(C,)``; no bias (as flax).
* ``InstanceNorm``: statistics per example and channel over every axis but 0
  (batch) and -1 (channels); ``scale``/``bias`` Parameters ``(C,)``.
* ``SpectralNorm(layer)``: wraps a module with a ``kernel`` leaf (e.g. ``Linear``)
  and calls it with :math:`W/\\sigma(W)`; flax's power iteration from the stored
  ``u`` ``(1, out)`` (BatchStat), ``sigma`` ``()`` (BatchStat). ``u`` and ``sigma``
  are stored only when training (or ``update_stats=True``); in eval the
  iteration still runs from the stored ``u`` (flax's rule).
* ``WeightNorm(layer)``: calls the wrapped module with
  :math:`W \\cdot \\mathrm{rsqrt}(\\sum_{red} W^2 + \\epsilon)\\cdot g`, ``scale``
  (``g``, Parameter, shape of the kept ``feature_axes``, default ``-1``, init ones).
  The wrapped layer's stored ``kernel`` stays raw (linen writes the normalized
  kernel into ``params`` at init; outputs are the same).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from normbridge import core
from normbridge.adapters.treex.module import BatchStat, Module, Parameter, initializing, next_key, param_key, to
from normbridge.adapters.treex.norm import Initializer, _affine, _check_dtype, _init_affine

__all__ = ["InstanceNorm", "RMSNorm", "SpectralNorm", "WeightNorm"]


class RMSNorm(Module):
    """Root-mean-square normalization over the last axis (an addition; flax ``RMSNorm`` math)."""

    scale: jax.Array | None = Parameter.node()

    def __init__(
        self,
        *,
        epsilon: float = 1e-5,
        dtype: Any = jnp.float32,
        use_scale: bool = True,
        scale_init: Initializer = jax.nn.initializers.ones,
    ) -> None:
        _check_dtype("RMSNorm", dtype)
        self._set_name()
        self.epsilon = epsilon
        self.dtype = dtype
        self.use_scale = use_scale
        self.scale_init = scale_init
        self.use_bias = False  # flax RMSNorm has no bias
        self.scale = None

    def __call__(self, x: jax.Array) -> jax.Array:
        self._check_ready()
        x = jnp.asarray(x)
        last = (x.ndim - 1,)
        pshape, bshape = core.feature_shapes(x.shape, last)
        if initializing():
            key = next_key()  # treex style: one key per layer, flax's fold-in per parameter
            if self.use_scale:
                self.scale = jnp.asarray(self.scale_init(param_key(key, 1), pshape, jnp.float32))
        _, var = core.moments(x, last, use_mean=False)
        scale = self.scale.reshape(bshape) if self.use_scale else None
        y = core.normalize(x, None, jnp.expand_dims(var, last), self.epsilon, scale, None)
        return jnp.asarray(y, self.dtype)


class InstanceNorm(Module):
    """Per-example, per-channel normalization over the spatial axes (an addition; flax ``InstanceNorm`` math)."""

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
        _check_dtype("InstanceNorm", dtype)
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
        self._check_ready()
        x = jnp.asarray(x)
        if x.ndim < 2:
            raise ValueError(f"InstanceNorm: expected an input of rank >= 2 (batch, ..., channels), got {x.shape}")
        feature = (x.ndim - 1,)
        red = tuple(range(1, x.ndim - 1))
        pshape, bshape = core.feature_shapes(x.shape, feature)
        if initializing():
            _init_affine(self, pshape)
        mean, var = core.moments(x, red)
        mean = jnp.expand_dims(mean, red)
        var = jnp.expand_dims(var, red)
        scale, bias = _affine(self, bshape)
        y = core.normalize(x, mean, var, self.epsilon, scale, bias)
        return jnp.asarray(y, self.dtype)


def _with_kernel(layer: Module, kernel: jax.Array) -> Module:
    """A shallow copy of ``layer`` whose ``kernel`` is replaced (the stored one is left alone)."""
    new = object.__new__(type(layer))
    new.__dict__.update(vars(layer))
    new.__dict__["kernel"] = kernel
    return new


def _kernel(wrapper: str, layer: Module) -> jax.Array:
    kernel = getattr(layer, "kernel", None)
    if kernel is None:
        raise ValueError(f"{wrapper}: the wrapped {type(layer).__name__} has no initialized `kernel`")
    return kernel


class SpectralNorm(Module):
    """Spectral normalization of a wrapped layer's ``kernel`` (an addition; flax ``SpectralNorm`` math)."""

    layer: Module = to.node()
    u: jax.Array | None = BatchStat.node()
    sigma: jax.Array | None = BatchStat.node()

    def __init__(
        self,
        layer: Module,
        *,
        n_steps: int = 1,
        epsilon: float = 1e-12,
        error_on_non_matrix: bool = False,
    ) -> None:
        if not isinstance(layer, Module):
            raise TypeError(f"SpectralNorm: `layer` must be a treex Module, got {type(layer).__name__}")
        self._set_name()
        self.layer = layer
        self.n_steps = n_steps
        self.epsilon = epsilon
        self.error_on_non_matrix = error_on_non_matrix
        self.u = None
        self.sigma = None

    def __call__(self, x: jax.Array, update_stats: bool | None = None) -> jax.Array:
        self._check_ready()
        if initializing():
            self.layer(x)  # creates the kernel
        kernel = _kernel("SpectralNorm", self.layer)
        if kernel.ndim <= 1 or self.n_steps < 1:
            return self.layer(x)
        if kernel.ndim > 2 and self.error_on_non_matrix:
            raise ValueError(f"SpectralNorm: kernel is {kernel.ndim}D but error_on_non_matrix is True")
        w = core.as_matrix(kernel, -1)
        if initializing():
            self.u = jax.random.normal(param_key(next_key(), 1), (1, w.shape[-1]), jnp.float32)
            self.sigma = jnp.ones((), jnp.float32)
        update = update_stats if update_stats is not None else self._training and not self._frozen and self._initialized
        u, v = core.power_iteration_flax(w, self.u, self.n_steps, self.epsilon)
        sigma = core.sigma_flax(w, u, v)
        w_bar = core.divide_by_sigma(w, sigma).reshape(kernel.shape)
        if update:
            self.u = u
            self.sigma = sigma
        return _with_kernel(self.layer, w_bar)(x)


class WeightNorm(Module):
    """Weight normalization of a wrapped layer's ``kernel`` (an addition; flax ``WeightNorm`` math)."""

    layer: Module = to.node()
    scale: jax.Array | None = Parameter.node()

    def __init__(
        self,
        layer: Module,
        *,
        epsilon: float = 1e-12,
        use_scale: bool = True,
        scale_init: Callable[..., jax.Array] = jax.nn.initializers.ones,
        feature_axes: int | tuple[int, ...] | None = -1,
    ) -> None:
        if not isinstance(layer, Module):
            raise TypeError(f"WeightNorm: `layer` must be a treex Module, got {type(layer).__name__}")
        self._set_name()
        self.layer = layer
        self.epsilon = epsilon
        self.use_scale = use_scale
        self.scale_init = scale_init
        self.feature_axes = feature_axes
        self.scale = None

    def __call__(self, x: jax.Array) -> jax.Array:
        self._check_ready()
        if initializing():
            self.layer(x)
        kernel = _kernel("WeightNorm", self.layer)
        if initializing():
            key = next_key()
            if self.use_scale:
                shape = core.weight_norm_scale_shape(kernel.shape, self.feature_axes)
                self.scale = jnp.asarray(self.scale_init(param_key(key, 1), shape, jnp.float32))
        scale = self.scale if self.use_scale else None
        w = core.weight_norm_flax(kernel, self.feature_axes, self.epsilon, scale)
        return _with_kernel(self.layer, w)(x)
