"""Deliberate deviations from nnx 0.12.8 bugs: each test shows the native behaviour next to the facade's.

The facade follows linen (measured against flax.linen) where native nnx crashes, contradicts
its docstring or silently loses training signal (layouts §0 items 11, 14, 16; google/flax#5576).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import normbridge.adapters.nnx as F
from normbridge.conformance.nnx_cases import (
    WrapperCase,
    build_wrapper,
    failures,
    groupnorm_deviation,
    make_input,
    mask_deviation,
    randomize_params,
    wrapper_deviation,
)


def _shown_and_followed(quirk, follows) -> None:
    not_shown = [c.name for c in quirk if not c.ok()]
    assert quirk and not not_shown, f"native quirk no longer reproduces: {not_shown}"
    bad = failures(follows)
    assert follows and not bad, "\n".join(bad)


def test_group_norm_axis1_broadcast_native_vs_facade() -> None:
    # native: crash on 1-D and reduction_axes=(0,1,2), wrong numbers for (2,3); facade == linen bitwise.
    _shown_and_followed(*groupnorm_deviation())


def test_group_norm_requires_last_axis_like_linen() -> None:
    x = make_input((2, 3, 6), "float32", 0)
    native = nnx.GroupNorm(6, num_groups=3, reduction_axes=(1,), rngs=nnx.Rngs(0))
    native(x)  # native accepts it silently (and reduces the last axis anyway)
    import flax.linen as nn
    import jax

    with pytest.raises(ValueError) as linen_err:
        nn.GroupNorm(num_groups=3, reduction_axes=(1,)).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="GroupNorm: ") as facade_err:
        F.GroupNorm(6, num_groups=3, reduction_axes=(1,), rngs=nnx.Rngs(0))(x)
    assert str(linen_err.value) in str(facade_err.value)  # linen's check, linen's message verbatim


@pytest.mark.parametrize("layer", ["SpectralNorm", "WeightNorm"])
def test_wrapped_kernel_not_overwritten_and_linen_reproduced(layer: str) -> None:
    _shown_and_followed(*wrapper_deviation(layer))


def test_weight_norm_gains_are_params_and_train() -> None:
    case = WrapperCase("WeightNorm")
    native, fac = build_wrapper(nnx.WeightNorm, case), build_wrapper(F.WeightNorm, case)
    randomize_params([native, fac], jax.random.key(0))
    x = make_input((2, 3), "float32", 1)

    def loss(m):
        return jnp.sum(m(x) ** 2)

    for m in (native, fac):
        opt = nnx.Optimizer(m, optax.sgd(0.1), wrt=nnx.Param)
        opt.update(m, nnx.grad(loss)(m))
    # native gains never move; the facade's do
    init = build_wrapper(F.WeightNorm, case)
    randomize_params([init], jax.random.key(0))
    assert not bool(jnp.all(fac.scales[("kernel",)].get_value() == init.scales[("kernel",)].get_value()))
    native_init = build_wrapper(nnx.WeightNorm, case)
    randomize_params([native_init], jax.random.key(0))
    assert bool(jnp.all(native.scales[("kernel",)] == native_init.scales[("kernel",)]))


def test_weight_norm_param_dtype_and_random_scale_init() -> None:
    inner = lambda: nnx.Linear(3, 4, rngs=nnx.Rngs(0))  # noqa: E731
    native = nnx.WeightNorm(inner(), param_dtype=jnp.bfloat16, rngs=nnx.Rngs(1))
    assert native.scales[("kernel",)].dtype == jnp.float32  # native ignores param_dtype
    fac = F.WeightNorm(inner(), param_dtype=jnp.bfloat16, rngs=nnx.Rngs(1))
    assert fac.scales[("kernel",)].get_value().dtype == jnp.bfloat16
    init = nnx.initializers.normal(1.0)
    with pytest.raises(TypeError):
        nnx.WeightNorm(inner(), scale_init=init, rngs=nnx.Rngs(1))
    rngs = nnx.Rngs(1)
    fac = F.WeightNorm(inner(), scale_init=init, rngs=rngs)
    assert fac.scales[("kernel",)].get_value().std() > 0.1
    # like native, the rng stream is not advanced: later layers get the same keys as with native
    native_rngs = nnx.Rngs(1)
    nnx.WeightNorm(inner(), rngs=native_rngs)
    assert int(rngs.params.count[...]) == int(native_rngs.params.count[...])


def test_float_mask_native_raises_facade_casts_like_linen() -> None:
    _shown_and_followed(*mask_deviation())


def test_native_checkpoint_with_quirky_layout_loads_into_facade() -> None:
    # native WeightNorm state: gains are plain arrays, kernel already overwritten by a call
    case = WrapperCase("WeightNorm")
    native, fac = build_wrapper(nnx.WeightNorm, case), build_wrapper(F.WeightNorm, case)
    randomize_params([native], jax.random.key(3))
    x = make_input((2, 3), "float32", 2)
    y_native = native(x)
    F.load_native_state(fac, nnx.to_pure_dict(nnx.state(native)))
    assert bool(jnp.all(fac.scales[("kernel",)].get_value() == native.scales[("kernel",)]))
    # the loaded (already normalized) kernel renormalizes to the same weights: same output up to rounding
    assert jnp.allclose(fac(x), y_native, rtol=1e-6, atol=1e-6)
