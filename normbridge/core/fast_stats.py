"""Fast formulations of :func:`normbridge.core.moments`: the same statistics, cheaper programs.

Selected by :func:`normbridge.core.moments` when :func:`normbridge.core.config.use_fast` is true
(``normbridge.fast()``); exact mode never reaches this module. Two changes, both exact in real
arithmetic, so outputs stay within float32 rounding of exact mode (the accuracy contract is
measured in ``tests/core/test_fast_*.py`` and :mod:`normbridge.conformance.fast`):

* **Layout-aware reductions.** A reduction over axes on both sides of a kept axis, e.g. flax's
  channels-last GroupNorm reducing ``(N, H, W, G, C/G)`` over ``(H, W, C/G)``, compiles on XLA:CPU
  to a slow strided loop (about 8-19× the bandwidth limit of ``x * 2``) that also sums less
  accurately. :func:`layout_mean` first reduces the axes before the last kept one, a column
  reduction that keeps the minor axes contiguous (as BatchNorm does), then the small remainder.
  The division between the two keeps XLA from merging them back into one strided reduction.
* **Two-pass variance with its exact derivative.** Autodiff of ``mean(|x − mean(x)|²)`` also
  differentiates through the inner mean, a term that is zero in exact arithmetic (it carries the
  rounding error of the mean) but costs one more x-sized reduction in the backward pass.
  :func:`centered_moments` computes that correction in the forward pass, fused with the second
  pass (the corrected two-pass algorithm), and is a ``jax.custom_jvp`` whose rule is the exact
  derivative, ``dσ² = 2·E[(x − μ)·dx]``; it is linear in ``dx``, so reverse mode, ``vmap`` and
  higher derivatives all follow from it (no ``custom_vjp``, which would forbid forward mode).

The variance *formula* is never changed (the one-pass ``E[x²] − E[x]²`` of flax stays one-pass,
equinox's two-pass stays two-pass), so ill-conditioned inputs (large mean, tiny variance) are no
further from a float64 reference than the native formula. (A shifted one-pass form, ``E[(x−s)²] −
E[x−s]²`` with ``s`` one sample, was tried: it fixes large means but loses up to ``1 + (s−μ)²/σ²``
digits on centred data, and XLA:CPU materialized ``x − s``.) Masked and complex statistics keep
the exact path.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax


def _split_axes(ndim: int, red: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """``(leading, trailing)`` reduced axes around the last kept axis, or ``None`` if one side is empty."""
    kept = [i for i in range(ndim) if i not in red]
    if not kept:
        return None
    last_kept = max(kept)
    leading = tuple(sorted(a for a in red if a < last_kept))
    trailing = tuple(sorted(a for a in red if a > last_kept))
    if not leading or not trailing:
        return None
    return leading, trailing


def layout_mean(x: jax.Array, red: tuple[int, ...]) -> jax.Array:
    """``x.mean(red)`` computed as a column reduction, then a reduction of the (small) rest."""
    split = _split_axes(x.ndim, red)
    if split is None or not jnp.issubdtype(x.dtype, jnp.floating) or jnp.finfo(x.dtype).bits < 32:
        return x.mean(red)
    leading, trailing = split
    partial_mean = x.mean(leading)
    # Axes of ``partial_mean`` that were ``trailing`` in ``x``: every leading axis before them is gone.
    return partial_mean.mean(tuple(a - len(leading) for a in trailing))


def _pmean(xs: tuple[jax.Array, ...], axis_name: Any, axis_index_groups: Any) -> tuple[jax.Array, ...]:
    """Average several same-shaped arrays across ``axis_name`` in one collective."""
    if axis_name is None:
        return xs
    if len(xs) > 1:
        reduced = lax.pmean(jnp.stack(xs, axis=0), axis_name, axis_index_groups=axis_index_groups)
        return tuple(reduced[i] for i in range(len(xs)))
    return (lax.pmean(xs[0], axis_name, axis_index_groups=axis_index_groups),)


def means(
    xs: tuple[jax.Array, ...], red: tuple[int, ...], axis_name: Any, axis_index_groups: Any
) -> tuple[jax.Array, ...]:
    """Layout-aware means of same-shaped arrays, synced across ``axis_name`` in one ``pmean``."""
    return _pmean(tuple(layout_mean(x, red) for x in xs), axis_name, axis_index_groups)


@partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def centered_moments(x: jax.Array, red: tuple[int, ...], axis_name: Any = None,
                     axis_index_groups: Any = None) -> tuple[jax.Array, jax.Array]:
    r"""Corrected two-pass mean and biased variance over ``red`` (real ``x``).

    With :math:`\hat\mu = E[x]` rounded and :math:`d = x - \hat\mu`: :math:`\delta = E[d]`,
    :math:`\mu = \hat\mu + \delta` and :math:`\sigma^2 = E[d^2] - \delta^2` (Björck's corrected
    two-pass algorithm). The second pass sums ``d`` and ``d²`` together, so it reads ``x`` no more
    often than the plain two-pass form; ``δ`` is the rounding error of ``μ̂``, which autodiff of the
    plain form also recovers (through the inner mean, at the price of one more backward pass) and
    which matters where the mean is large next to the spread (e.g. groups of two elements).
    """
    mu, delta, var = _corrected_two_pass(x, red, axis_name, axis_index_groups)
    return mu + delta, var


def _corrected_two_pass(x: jax.Array, red: tuple[int, ...], axis_name: Any,
                        axis_index_groups: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(μ̂, δ, σ²)`` of :func:`centered_moments`, the correction ``δ`` kept apart from ``μ̂``."""
    (mu,) = means((x,), red, axis_name, axis_index_groups)
    d = x - jnp.expand_dims(mu, red)
    delta, mean_sq = means((d, lax.square(d)), red, axis_name, axis_index_groups)
    return mu, delta, jnp.maximum(0.0, mean_sq - lax.square(delta))


@centered_moments.defjvp
def _centered_moments_jvp(red, axis_name, axis_index_groups, primals, tangents):
    r"""The exact derivative: :math:`d\mu = E[dx]`, :math:`d\sigma^2 = 2E[(x-\mu)dx]` (linear in ``dx``).

    ``x − μ`` is formed as ``(x − μ̂) − δ`` from the corrected two-pass pieces, so it needs no
    further correction term (autodiff of the plain two-pass form gets that term from one more
    x-sized reduction).
    """
    (x,), (dx,) = primals, tangents
    mu, delta, var = _corrected_two_pass(x, red, axis_name, axis_index_groups)
    # (x − μ̂) − δ, not x − (μ̂ + δ): δ is far below one ulp of μ̂ and would round away.
    centered = (x - jnp.expand_dims(mu, red)) - jnp.expand_dims(delta, red)
    dmu, dvar_half = means((dx, centered * dx), red, axis_name, axis_index_groups)
    return (mu + delta, var), (dmu, 2 * dvar_half)


def reduced_moments(
    x: jax.Array,
    red: tuple[int, ...],
    use_mean: bool,
    use_fast_variance: bool,
    axis_name: Any,
    axis_index_groups: Any,
    clip_two_pass: bool,
) -> tuple[jax.Array, jax.Array]:
    """Fast :func:`normbridge.core.moments` for real, unmasked ``x`` (already in the statistics dtype)."""
    if not use_mean:
        (var,) = means((lax.square(x),), red, axis_name, axis_index_groups)
        return jnp.zeros_like(var), var
    if use_fast_variance:
        mu, mu2 = means((x, lax.square(x)), red, axis_name, axis_index_groups)
        # E[x²] − E[x]² can round below zero.
        return mu, jnp.maximum(0.0, mu2 - lax.square(mu))
    mu, var = centered_moments(x, red, axis_name, axis_index_groups)
    if clip_two_pass:
        var = jnp.maximum(0.0, var)
    return mu, var
