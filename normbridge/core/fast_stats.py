"""Fast formulations of :func:`normbridge.core.moments`: the same statistics, cheaper programs.

Selected by :func:`normbridge.core.moments` when :func:`normbridge.core.config.use_fast` is true
(``normbridge.fast()``) *and* :func:`applies` (the reduction has a faster layout); everywhere else
fast mode traces exactly the native program, so it is never slower than exact mode. Exact mode
never reaches this module. The accuracy contract is measured in ``tests/core/test_fast_*.py`` and
:mod:`normbridge.conformance.fast`.

**Layout-aware reductions.** A reduction over axes on both sides of a kept axis, e.g. flax's
channels-last GroupNorm reducing ``(N, H, W, G, C/G)`` over ``(H, W, C/G)``, compiles on XLA:CPU to
a slow strided loop (8-19× the time of ``x * 2`` on the same array) that also sums less accurately.
:func:`layout_mean` first reduces the axes before the last kept one, a column reduction that keeps
the minor axes contiguous (as BatchNorm does; XLA runs the sums of ``x`` and ``x²`` in about half an
anchor), then the small remainder. The division between the two keeps XLA from merging them back
into one strided reduction. The variance *formula* is the native one (flax's one-pass
``E[x²] − E[x]²``, or two-pass ``E[|x − E[x]|²]``), so no input is further from a float64 reference
than native; only the summation order changes (and the two-level sums round better).

Measured and rejected (``benchmarks/bench.py --versus``, ``docs/fast.md``): a ``custom_jvp`` two-pass
variance that skips autodiff's extra backward reduction through the inner mean (equinox layers:
backward 9 → 12-13 x-sized kernels, up to 1.26× slower, because its residuals materialize the
float32 input), a variadic one-pass ``lax.reduce`` (3× slower than two fused column reductions,
and a sequential sum), and a one-pass variance about one sample (cures large means, loses up to
``1 + (s − μ)²/σ²`` digits on centred data, and XLA materialized ``x − s``).
"""

from __future__ import annotations

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


def pmean_many(xs: tuple[jax.Array, ...], axis_name: Any, axis_index_groups: Any) -> tuple[jax.Array, ...]:
    """Average several same-shaped arrays across ``axis_name`` in one collective (used by the exact
    path in :mod:`normbridge.core.stats` too)."""
    if axis_name is None:
        return xs
    if len(xs) > 1:
        # One collective for all moments: stacking saves a round trip.
        reduced = lax.pmean(jnp.stack(xs, axis=0), axis_name, axis_index_groups=axis_index_groups)
        return tuple(reduced[i] for i in range(len(xs)))
    return (lax.pmean(xs[0], axis_name, axis_index_groups=axis_index_groups),)


def means(
    xs: tuple[jax.Array, ...], red: tuple[int, ...], axis_name: Any, axis_index_groups: Any
) -> tuple[jax.Array, ...]:
    """Layout-aware means of same-shaped arrays, synced across ``axis_name`` in one ``pmean``."""
    return pmean_many(tuple(layout_mean(x, red) for x in xs), axis_name, axis_index_groups)


def applies(ndim: int, red: tuple[int, ...]) -> bool:
    """Whether fast mode has a faster program for a reduction of an ``ndim`` array over ``red``."""
    return _split_axes(ndim, red) is not None


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
    (mu,) = means((x,), red, axis_name, axis_index_groups)
    (var,) = means((lax.square(x - jnp.expand_dims(mu, red)),), red, axis_name, axis_index_groups)
    if clip_two_pass:
        var = jnp.maximum(0.0, var)
    return mu, var
