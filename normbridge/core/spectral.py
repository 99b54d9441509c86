r"""Spectral normalization: power iteration and :math:`W/\sigma(W)`.

Two power-iteration formulas exist in the wild and round differently:

* flax (linen/nnx), kernel viewed as ``(-1, out)`` (last axis kept), ``u`` of shape
  ``(1, out)``: ``v = l2n(u Wᵀ)``, ``u = l2n(v W)`` with
  ``l2n(z) = z * rsqrt(Σz² + eps)``; :math:`\sigma = v W u^T`.
* equinox, weight viewed as ``(out, -1)`` (first axis kept), ``u`` of shape
  ``(out,)`` and ``v`` of shape ``(in,)``: ``u = Wv / max(eps, ‖Wv‖)``,
  ``v = Wᵀu / max(eps, ‖Wᵀu‖)``; :math:`\sigma = u^T W v`.

In both, ``u`` lives in the output space of the layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def as_matrix(w: jax.Array, kept_axis: int) -> jax.Array:
    """View ``w`` as a matrix keeping ``kept_axis``: ``-1`` → ``(-1, out)``, ``0`` → ``(out, -1)``."""
    if kept_axis in (-1, w.ndim - 1):
        return w.reshape(-1, w.shape[-1])
    if kept_axis == 0:
        return w.reshape(w.shape[0], -1)
    raise ValueError(f"as_matrix: kept_axis must be 0 or -1, got {kept_axis}")


def l2_normalize(x: jax.Array, axis=None, eps: float = 1e-12) -> jax.Array:
    """``x * rsqrt(Σ x² + eps)`` over ``axis`` (flax; eps inside the rsqrt)."""
    return x * lax.rsqrt((x * x).sum(axis=axis, keepdims=True) + eps)


def power_iteration_flax(
    w: jax.Array, u: jax.Array, n_steps: int, eps: float
) -> tuple[jax.Array, jax.Array]:
    """``n_steps ≥ 1`` flax steps from ``u`` ``(1, out)`` on ``w`` ``(in, out)``; returns stop-gradiented ``(u, v)``."""
    if n_steps < 1:
        raise ValueError(f"power_iteration_flax: n_steps must be >= 1, got {n_steps}")
    v = u
    for _ in range(n_steps):
        v = l2_normalize(jnp.matmul(u, w.transpose([1, 0])), eps=eps)
        u = l2_normalize(jnp.matmul(v, w), eps=eps)
    return lax.stop_gradient(u), lax.stop_gradient(v)


def sigma_flax(w: jax.Array, u: jax.Array, v: jax.Array) -> jax.Array:
    """:math:`\\sigma = v W u^T` as a scalar (gradient flows through ``w`` only if ``u, v`` are stopped)."""
    return jnp.matmul(jnp.matmul(v, w), jnp.transpose(u))[0, 0]


def divide_by_sigma(w: jax.Array, sigma: jax.Array, *, guard_zero: bool = True) -> jax.Array:
    """``w / sigma``, leaving ``w`` unchanged where ``sigma == 0`` (flax).

    ``guard_zero=False`` is the plain ``w / sigma`` of equinox (``sigma == 0`` gives inf/NaN).
    """
    if not guard_zero:
        return w / sigma
    return w / jnp.where(sigma != 0, sigma, 1)


def power_iteration_step_eqx(
    w: jax.Array, u: jax.Array, v: jax.Array, eps: float
) -> tuple[jax.Array, jax.Array]:
    """One equinox step on ``w`` ``(out, in)``: ``u = Wv/max(eps,‖Wv‖)``, ``v = Wᵀu/max(eps,‖Wᵀu‖)``."""
    del u  # the step restarts from v, as equinox does
    u = w @ v
    u = u / jnp.maximum(eps, jnp.sqrt(jnp.sum(u**2)))
    v = w.T @ u
    v = v / jnp.maximum(eps, jnp.sqrt(jnp.sum(v**2)))
    return u, v


def power_iteration_eqx(
    w: jax.Array, u: jax.Array, v: jax.Array, n_steps: int, eps: float
) -> tuple[jax.Array, jax.Array]:
    """``n_steps`` equinox steps (no stop-gradient here; equinox stops ``w`` itself)."""
    for _ in range(n_steps):
        u, v = power_iteration_step_eqx(w, u, v, eps)
    return u, v


def sigma_eqx(w: jax.Array, u: jax.Array, v: jax.Array) -> jax.Array:
    """:math:`\\sigma = u^T W v` (equinox's einsum)."""
    return jnp.einsum("i,ij,j->", u, w, v)
