"""No extra work per call: under tracing (what nnx.jit compiles) the facade emits the same
primitives as native nnx, layer by layer (order of independent reshapes aside)."""

from __future__ import annotations

from collections import Counter

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import normbridge.adapters.nnx as F


def _primitives(module, *args) -> Counter:
    graphdef, state = nnx.split(module)

    def f(state, *a):
        m = nnx.merge(graphdef, state)
        return m(*a), nnx.state(m)

    return Counter(e.primitive.name for e in jax.make_jaxpr(f)(state, *args).eqns)


def _make(ns, layer: str):
    rngs = nnx.Rngs(0)
    if layer in ("SpectralNorm", "WeightNorm"):
        return getattr(ns, layer)(nnx.Linear(6, 4, rngs=rngs), rngs=rngs)
    kw = {"num_groups": 3} if layer == "GroupNorm" else {}
    return getattr(ns, layer)(6, **kw, rngs=rngs)


@pytest.mark.parametrize(
    "layer", ["BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm", "SpectralNorm", "WeightNorm"]
)
def test_same_primitives_as_native(layer: str) -> None:
    x = jnp.ones((4, 3, 6))
    native, ours = _primitives(_make(nnx, layer), x), _primitives(_make(F, layer), x)
    assert ours == native, (ours - native, native - ours)
