r"""``SpectralNorm`` and ``WeightNorm``: drop-ins for the ``equinox.nn`` weight wrappers.

Both leave the wrapped layer's stored weight raw and call the layer on a
temporary copy (``eqx.tree_at``) whose weight is replaced by the normalized one.

* SpectralNorm: the weight viewed as ``(out, -1)`` (:func:`normbridge.core.as_matrix`
  with ``kept_axis=0``); ``(u, v)`` live in the ``State``. At construction
  ``u, v ~ N(0, 1)`` then 15 power iterations; in training
  ``num_power_iterations`` steps of :func:`~normbridge.core.power_iteration_step_eqx`
  on ``stop_gradient(W)`` are stored; always :math:`\sigma = u^T W v`
  (:func:`~normbridge.core.sigma_eqx`, gradient through ``W``) and ``W / σ``.
* WeightNorm: ``W = v * g / ‖v‖`` with the norm over every axis but ``axis``
  (:func:`~normbridge.core.weight_norm_eqx`), ``g`` initialized to ``‖v‖`` so the
  layer is unchanged at init; no eps (a zero row gives NaN, as in equinox).
"""

from __future__ import annotations

import functools as ft
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import jax
import jax.numpy as jnp
import jax.random as jr
from jax import lax

from normbridge import core
from normbridge.adapters.equinox._common import eqx, named_errors

StateIndex = eqx.nn.StateIndex
State = eqx.nn.State
_Layer = TypeVar("_Layer")

#: equinox builds its u, v and runs this many power iterations in ``SpectralNorm.__init__``.
INIT_POWER_ITERATIONS = 15


class SpectralNorm(eqx.nn.StatefulLayer, Generic[_Layer]):
    """Spectral normalization of ``getattr(layer, weight_name)``; ``(u, v)`` in the ``State`` (``uv_index``)."""

    layer: _Layer
    weight_name: str = eqx.field(static=True)
    uv_index: StateIndex
    num_power_iterations: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    inference: bool

    def __init__(
        self,
        layer: _Layer,
        weight_name: str,
        num_power_iterations: int = 1,
        eps: float = 1e-12,
        inference: bool = False,
        *,
        key: Any,
    ):
        """Same arguments as ``equinox.nn.SpectralNorm``; ``u, v`` take the weight's dtype."""
        self.layer = layer
        self.weight_name = weight_name
        self.num_power_iterations = num_power_iterations
        self.eps = eps
        self.inference = inference
        weight = getattr(layer, weight_name)
        if weight.ndim < 2:
            raise ValueError(
                f"SpectralNorm: `weight` must be at least two-dimensional "
                f"({type(layer).__name__}.{weight_name} has shape {weight.shape})"
            )
        weight = core.as_matrix(weight, 0)
        u_len, v_len = weight.shape
        ukey, vkey = jr.split(key)
        u0 = jr.normal(ukey, (u_len,), dtype=weight.dtype)
        v0 = jr.normal(vkey, (v_len,), dtype=weight.dtype)
        u0, v0 = core.power_iteration_eqx(weight, u0, v0, INIT_POWER_ITERATIONS, eps)
        self.uv_index = StateIndex((u0, v0))

    def __call__(
        self,
        x: jax.Array,
        state: State,
        *,
        key: Any = None,
        inference: bool | None = None,
    ) -> tuple[Any, State]:
        """``(layer(x) with W/σ, new_state)``; ``inference`` overrides the field when not None."""
        del key  # as in equinox, the key is not forwarded to the wrapped layer
        u, v = state.get(self.uv_index)
        weight = getattr(self.layer, self.weight_name)
        weight_shape = weight.shape
        weight = core.as_matrix(weight, 0)
        if inference is None:
            inference = self.inference
        if not inference:
            u, v = core.power_iteration_eqx(lax.stop_gradient(weight), u, v, self.num_power_iterations, self.eps)
            state = state.set(self.uv_index, (u, v))
        sigma = core.sigma_eqx(weight, u, v)
        # equinox divides without a zero guard; keep its exact semantics.
        normalized = jnp.reshape(core.divide_by_sigma(weight, sigma, guard_zero=False), weight_shape)
        layer = eqx.tree_at(lambda l: getattr(l, self.weight_name), self.layer, normalized)
        return layer(x), state


def _norm_except_axis(v: jax.Array, norm: Callable[[jax.Array], jax.Array], axis: int | None) -> jax.Array:
    """``‖v‖`` over every axis but ``axis`` (keepdims), via :func:`normbridge.core.norm_except_axis`.

    ``norm`` is kept only so that the ``_norm`` field has equinox's pytree leaves
    (``axis`` and ``keepdims=True``), hence equinox's checkpoint leaf order.
    """
    del norm
    return core.norm_except_axis(v, axis)


class WeightNorm(eqx.Module, Generic[_Layer]):
    """Weight normalization of ``getattr(layer, weight_name)`` with trainable magnitude ``g``."""

    layer: _Layer
    g: jax.Array
    weight_name: str = eqx.field(static=True)
    axis: int | None = eqx.field(static=True)
    _norm: Callable[[jax.Array], jax.Array]

    def __init__(self, layer: _Layer, weight_name: str = "weight", axis: int | None = 0):
        """Same arguments as ``equinox.nn.WeightNorm``: the norm is over every axis except ``axis``."""
        self.layer = layer
        self.weight_name = weight_name
        self.axis = axis
        weight = getattr(layer, weight_name)
        self._norm = ft.partial(_norm_except_axis, norm=ft.partial(jnp.linalg.norm, keepdims=True), axis=axis)
        # an out-of-range axis fails in the same vmap as in equinox: its ValueError, after the layer name
        with named_errors(f"WeightNorm({type(layer).__name__}.{weight_name}, axis={axis})"):
            self.g = core.norm_except_axis(weight, axis)

    def __call__(self, x: jax.Array, *, key: Any = None) -> Any:
        """``layer(x)`` with its weight replaced by ``v * g / ‖v‖``."""
        del key
        v = getattr(self.layer, self.weight_name)
        weight = core.weight_norm_eqx(v, self.g, self.axis)
        layer = eqx.tree_at(lambda l: getattr(l, self.weight_name), self.layer, weight)
        return layer(x)
