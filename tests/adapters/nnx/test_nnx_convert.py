"""to_canonical / from_canonical for every layer, facade and native nnx, bit-exact both ways."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import normbridge.adapters.nnx as F
from normbridge.conformance.nnx import GRID, checkpoint_checks
from normbridge.conformance.nnx_cases import failures, randomize_params


@pytest.mark.parametrize("layer", sorted(GRID))
def test_canonical_round_trips_facade_and_native(layer: str) -> None:
    # facade→facade, facade→native, native→facade, native→native records equal bit for bit;
    # a native nnx state (pure dict) loads into the facade exactly.
    checks = checkpoint_checks(GRID[layer][0])
    bad = failures(checks)
    assert len(checks) == 5 and not bad, bad


def test_multi_axis_features_use_the_canonical_shape() -> None:
    ln = F.LayerNorm(24, reduction_axes=(1, 2), feature_axes=(1, 2), rngs=nnx.Rngs(0))
    randomize_params([ln], jax.random.key(0))
    rec = F.to_canonical(ln, feature_shape=(4, 6))
    assert rec.scale.shape == (4, 6) and rec.feature_axes == (1, 2)
    other = F.LayerNorm(24, reduction_axes=(1, 2), feature_axes=(1, 2), rngs=nnx.Rngs(1))
    F.from_canonical(rec, other)
    assert jnp.array_equal(other.scale.get_value(), ln.scale.get_value())


def test_from_canonical_validates_everything_before_writing() -> None:
    bn = F.BatchNorm(4, rngs=nnx.Rngs(0))
    rec = F.to_canonical(bn).replace(scale=jnp.ones((5,)), var=jnp.ones((4,), jnp.bfloat16))
    target = F.BatchNorm(4, rngs=nnx.Rngs(0))
    target.mean.set_value(jnp.full((4,), 3.0))
    with pytest.raises(ValueError) as err:
        F.from_canonical(rec.replace(mean=jnp.zeros((4,))), target)
    assert "'scale' has shape (5,)" in str(err.value) and "'var' has dtype bfloat16" in str(err.value)
    assert jnp.array_equal(target.mean.get_value(), jnp.full((4,), 3.0))  # nothing written
