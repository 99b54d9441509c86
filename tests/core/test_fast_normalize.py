"""Fast mode's grouped normalize pass (``core.normalize(..., groups=G)``): a different program, the same bits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normbridge
from normbridge import core


def _group_norm(x, scale, bias, groups):
    """flax's GroupNorm on channels-last ``x``: group statistics repeated to channels, flax order."""
    red = (*range(1, x.ndim - 1), x.ndim)
    with normbridge.fast(False):  # the statistics' own fast formulation is another test's subject
        mean, var = core.moments(core.split_groups(x, groups), red)
    gs = x.shape[-1] // groups
    mean = jnp.expand_dims(jnp.repeat(mean, gs, axis=-1), red[:-1])
    var = jnp.expand_dims(jnp.repeat(var, gs, axis=-1), red[:-1])
    return core.normalize(x, mean, var, 1e-6, scale, bias, order="flax", groups=groups)


@pytest.mark.parametrize(("shape", "groups"), [((6, 16), 8), ((6, 16), 4), ((5, 24), 3)])
def test_grouped_normalize_is_bitwise_exact_with_a_different_program(shape, groups):
    rng = np.random.default_rng(0)
    # large mean, small spread: the gradients cancel heavily, so any change of summation order would show
    x = jnp.asarray(30.0 + 0.1 * rng.standard_normal(shape), jnp.float32)
    scale = jnp.asarray(1.0 + 0.1 * rng.standard_normal(shape[-1]), jnp.float32)
    bias = jnp.asarray(0.1 * rng.standard_normal(shape[-1]), jnp.float32)
    cot = jnp.asarray(rng.standard_normal(shape), jnp.float32)

    def run(x, scale, bias):
        y, vjp = jax.vjp(lambda *a: _group_norm(*a, groups), x, scale, bias)
        return y, vjp(cot)

    fn = jax.jit(run)
    exact = fn(x, scale, bias)
    with normbridge.fast():
        fast = fn(x, scale, bias)
        fast_jaxpr = str(jax.make_jaxpr(run)(x, scale, bias))
    exact_jaxpr = str(jax.make_jaxpr(run)(x, scale, bias))
    assert fast_jaxpr != exact_jaxpr  # fast mode traced the grouped layout...
    for a, b in zip(jax.tree_util.tree_leaves(exact), jax.tree_util.tree_leaves(fast)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # ...and computed the same bits


def test_normalize_ignores_groups_in_exact_mode_and_where_they_do_not_split():
    x = jnp.ones((2, 6))
    m, v = jnp.zeros((2, 6)), jnp.ones((2, 6))
    plain = str(jax.make_jaxpr(lambda x: core.normalize(x, m, v, 1e-6))(x))
    assert str(jax.make_jaxpr(lambda x: core.normalize(x, m, v, 1e-6, groups=3))(x)) == plain
    with normbridge.fast():
        # 4 groups do not divide 6 channels: the plain program
        assert str(jax.make_jaxpr(lambda x: core.normalize(x, m, v, 1e-6, groups=4))(x)) == plain


def test_statistics_broadcast_over_spatial_axes_use_the_column_sum_backward():
    """Channels-last conv (statistics ``(N, 1, 1, C)``): fast mode keeps the flat layout (the grouped one's
    backward would reduce over axes on both sides of the group axis) and takes a custom JVP whose transpose (the
    backward) sums per (N, C) column. Forward bitwise exact mode's; every gradient within 1e-6 of autodiff's."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(0.3 + rng.standard_normal((3, 4, 5, 12)), jnp.float32)
    m = jnp.asarray(x.mean((1, 2), keepdims=True) + 0.01 * rng.standard_normal((3, 1, 1, 12)), jnp.float32)
    v = jnp.asarray(0.5 + rng.random((3, 1, 1, 12)), jnp.float32)
    scale = jnp.asarray(1 + 0.2 * rng.standard_normal((1, 1, 1, 12)), jnp.float32)
    bias = jnp.asarray(0.2 * rng.standard_normal((1, 1, 1, 12)), jnp.float32)
    ct = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

    def run(*args):
        y, vjp = jax.vjp(lambda *a: core.normalize(*a[:3], 1e-6, *a[3:], groups=3), *args)
        return y, vjp(ct)

    args = (x, m, v, scale, bias)
    exact = jax.jit(run)(*args)
    with normbridge.fast():
        fast = jax.jit(run)(*args)
        assert "custom_jvp" in str(jax.make_jaxpr(lambda *a: core.normalize(*a[:3], 1e-6, *a[3:], groups=3))(*args))
    np.testing.assert_array_equal(np.asarray(exact[0]), np.asarray(fast[0]))
    for e, a in zip(exact[1], fast[1]):
        e, a = np.asarray(e, np.float64), np.asarray(a, np.float64)
        assert e.shape == a.shape
        assert np.abs(a - e).max() <= 1e-6 * np.abs(e).max()
    with normbridge.fast():
        # without scale and bias
        no_params = jax.grad(lambda x: jnp.sum(core.normalize(x, m, v, 1e-6, groups=3) * ct))(x)
    exact_no_params = jax.grad(lambda x: jnp.sum(core.normalize(x, m, v, 1e-6, groups=3) * ct))(x)
    assert np.abs(np.asarray(no_params) - np.asarray(exact_no_params)).max() <= 1e-6 * np.abs(exact_no_params).max()
