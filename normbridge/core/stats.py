"""Statistics over reduction axes: mean, variance (fast or two-pass), mean square.

One implementation serves every framework:

* flax's ``_compute_stats`` is :func:`moments` with its defaults;
* equinox's LayerNorm/GroupNorm are :func:`moments` with ``use_fast_variance=False``
  over all axes of one example (then clipped at 0, which is a no-op for two-pass);
* equinox's BatchNorm is :func:`moments` with ``use_fast_variance=False``,
  ``force_float32=False`` (statistics in the input dtype) and the vmapped batch as
  ``axis_name``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from normbridge.core import fast_stats as _fast
from normbridge.core.axes import Axes, canonicalize_axes
from normbridge.core.config import use_fast
from normbridge.core.dtypes import stats_dtype


def abs_sq(x: jax.Array) -> jax.Array:
    """``|x|²`` elementwise, real for complex input."""
    if jnp.iscomplexobj(x):
        return lax.square(lax.real(x)) + lax.square(lax.imag(x))
    return lax.square(x)


def _means(
    xs: tuple[jax.Array, ...],
    axes: tuple[int, ...],
    mask: jax.Array | None,
    axis_name: Any,
    axis_index_groups: Any,
) -> tuple[jax.Array, ...]:
    """Means of several same-shaped arrays, synced across devices in one ``pmean``."""
    if mask is not None:
        mask = jnp.asarray(mask, dtype=bool)
    mus = tuple(x.mean(axes, where=mask) for x in xs)
    return _fast.pmean_many(mus, axis_name, axis_index_groups)


def moments(
    x: jax.Array,
    axes: Axes | None,
    *,
    dtype: Any = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    use_mean: bool = True,
    use_fast_variance: bool = True,
    mask: jax.Array | None = None,
    force_float32: bool = True,
    clip_two_pass: bool = False,
    conj_product: bool = False,
    jnp_var: bool = False,
    keepdims: bool = False,
) -> tuple[jax.Array, jax.Array]:
    r"""Mean and biased variance of ``x`` over ``axes`` (all axes if ``None``).

    * fast: :math:`\mathrm{var} = \max(0, E[|x|^2] - |E[x]|^2)`, one fused pass;
    * two-pass: :math:`\mathrm{var} = E[|x - E[x]|^2]` (optionally clipped at 0,
      which equinox does and which never changes the value);
    * ``use_mean=False`` (RMS): ``mean = 0`` and ``var = E[|x|^2]``.

    ``conj_product=True`` forms the two-pass deviation term as ``(x−μ) * conj(x−μ)``
    instead of ``|x−μ|²`` (equinox BatchNorm's ``_stats``): the same values for real
    input, but its gradient rounds like equinox's in half precision.

    ``jnp_var=True`` is equinox LayerNorm/GroupNorm's form: ``jnp.mean`` then
    :func:`jax.numpy.var`, which derives its own mean. The values equal the plain
    two-pass ones, but the backward pass runs through that second mean too, so only
    this form gives equinox's gradients bit for bit (the difference shows in
    ill-conditioned cases, e.g. groups of two elements).

    ``keepdims=True`` keeps the reduced axes with size 1, so that the statistics
    broadcast against ``x`` (equinox computes them so; with ``jnp_var`` the program is
    then op for op equinox's).

    ``mask`` selects the positions that enter the statistics. With ``axis_name``
    every mean is averaged across that named axis, so the result is the global
    mean and biased variance of the whole (sharded) batch. Statistics are computed
    in :func:`~normbridge.core.dtypes.stats_dtype`.
    """
    cd = stats_dtype(x.dtype if hasattr(x, "dtype") else jnp.result_type(x), dtype, force_float32=force_float32)
    x = x.astype(cd) if isinstance(x, jax.Array) else jnp.asarray(x, cd)
    red = tuple(range(x.ndim)) if axes is None else canonicalize_axes(x.ndim, axes)
    if jnp_var:
        if mask is not None or axis_name is not None:
            raise ValueError("moments: jnp_var=True supports neither mask nor axis_name")
        if use_fast_variance or not use_mean or conj_product:
            raise ValueError(
                "moments: jnp_var=True is a two-pass form; it needs use_fast_variance=False, use_mean=True "
                f"and conj_product=False (got {use_fast_variance=}, {use_mean=}, {conj_product=})"
            )
    if use_fast() and mask is None and not jnp.iscomplexobj(x) and _fast.applies(x.ndim, red):
        # The one place fast mode is selected (normbridge.fast()): the same statistics, cheaper program.
        # Where no cheaper program is known, fast mode traces the exact one.
        mu, var = _fast.reduced_moments(x, red, use_mean, use_fast_variance, axis_name, axis_index_groups,
                                        clip_two_pass)
        if keepdims:
            return jnp.expand_dims(mu, red), jnp.expand_dims(var, red)
        return mu, var
    if jnp_var:
        # mean first, as equinox writes it: the order of the ops fixes the order in which the
        # backward pass accumulates x's cotangent.
        mu = jnp.mean(x, axis=red, keepdims=keepdims)
        var = jnp.var(x, axis=red, keepdims=keepdims)
        return mu, (jnp.maximum(0.0, var) if clip_two_pass else var)
    mu, var = _reduced_moments(x, red, use_mean, use_fast_variance, mask, axis_name, axis_index_groups,
                               clip_two_pass, conj_product)
    if keepdims:
        return jnp.expand_dims(mu, red), jnp.expand_dims(var, red)
    return mu, var


def _reduced_moments(
    x: jax.Array,
    red: tuple[int, ...],
    use_mean: bool,
    use_fast_variance: bool,
    mask: jax.Array | None,
    axis_name: Any,
    axis_index_groups: Any,
    clip_two_pass: bool,
    conj_product: bool,
) -> tuple[jax.Array, jax.Array]:
    """:func:`moments` with the reduced axes dropped, for every form but ``jnp_var``."""
    if not use_mean:
        (var,) = _means((abs_sq(x),), red, mask, axis_name, axis_index_groups)
        return jnp.zeros_like(var), var
    if use_fast_variance:
        mu, mu2 = _means((x, abs_sq(x)), red, mask, axis_name, axis_index_groups)
        # E[x²] - E[x]² can round below zero.
        return mu, jnp.maximum(0.0, mu2 - abs_sq(mu))
    (mu,) = _means((x,), red, mask, axis_name, axis_index_groups)
    if conj_product:
        # Equinox's form, exactly as it writes it (deviation formed twice, the 0-d mean of a whole-example
        # reduction broadcast as is): the backward pass then sums x's cotangent in the same order.
        m = mu if len(red) == x.ndim else jnp.expand_dims(mu, red)
        sq = (x - m) * jnp.conj(x - m)
    else:
        sq = abs_sq(x - jnp.expand_dims(mu, red))
    (var,) = _means((sq,), red, mask, axis_name, axis_index_groups)
    if clip_two_pass:
        var = jnp.maximum(0.0, var)
    return mu, var
