"""Fast-mode statistics under every transform: jvp, vjp, vmap, higher derivatives, named axes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normbridge
from normbridge import core


def _x(shape, seed=0, offset=0.5):
    return jnp.asarray(offset + np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


FORMS = {
    "one-pass": {"use_fast_variance": True},
    "two-pass": {"use_fast_variance": False},
    "equinox jnp_var": {"use_fast_variance": False, "jnp_var": True, "clip_two_pass": True},
    "rms": {"use_mean": False},
}
AXES = {"channels-last groups": ((2, 3, 2, 2, 2), (1, 2, 4)), "rows": ((3, 8), (1,)), "columns": ((4, 3, 2), (0, 1))}


def _loss(kw, axes):
    def f(x):
        mu, var = core.moments(x, axes, **kw)
        return jnp.sum(jnp.sin(mu)) + jnp.sum(jnp.sqrt(var + 1e-3))

    return f


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("layout", sorted(AXES))
def test_derivatives_match_exact(form, layout):
    shape, axes = AXES[layout]
    x = _x(shape)
    f = _loss(FORMS[form], axes)
    t = _x(shape, seed=1)
    run = jax.jit(lambda x, t: (jax.grad(f)(x), jax.jvp(f, (x,), (t,))[1], jax.hessian(f)(x).reshape(x.size, -1)))
    exact = run(x, t)
    with normbridge.fast():
        fast = run(x, t)
    for e, a in zip(exact, fast):
        e, a = np.asarray(e, np.float64), np.asarray(a, np.float64)
        assert np.abs(a - e).max() <= 1e-5 * max(np.abs(e).max(), 1.0)


@pytest.mark.parametrize("form", sorted(f for f in FORMS if not FORMS[f].get("jnp_var")))  # jnp_var: no axis_name
def test_vmap_and_axis_name_match_exact(form):
    kw = FORMS[form]
    x = _x((4, 3, 5, 6))

    def per_example(xi):  # statistics over the vmapped batch and the spatial axes, like a sharded BatchNorm
        return core.moments(xi, (0,), axis_name="b", **kw)

    @jax.jit
    def run_jit(x):
        stats = jax.vmap(per_example, axis_name="b")(x)
        grads = jax.grad(lambda x: sum(jnp.sum(s) for s in jax.vmap(per_example, axis_name="b")(x)))(x)
        return stats, grads

    def run():
        return run_jit(x)

    exact = run()
    with normbridge.fast():
        fast = run()
    for e, a in zip(jax.tree_util.tree_leaves(exact), jax.tree_util.tree_leaves(fast)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=2e-6, atol=2e-6)


def test_mask_and_complex_keep_the_exact_path():
    x = _x((3, 4, 4, 2, 2))
    mask = jnp.asarray(np.random.default_rng(2).random(x.shape) > 0.3)
    exact = core.moments(x, (1, 2, 4), mask=mask)
    z = x.astype(jnp.complex64) * (1 + 1j)
    exact_c = core.moments(z, (1, 2, 4))
    with normbridge.fast():
        fast = core.moments(x, (1, 2, 4), mask=mask)
        fast_c = core.moments(z, (1, 2, 4))
    for e, a in zip((*exact, *exact_c), (*fast, *fast_c)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def test_fast_jnp_var_still_refuses_what_exact_refuses():
    with normbridge.fast(), pytest.raises(ValueError, match="jnp_var=True is a two-pass form"):
        core.moments(_x((2, 3)), None, jnp_var=True)
