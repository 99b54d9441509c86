"""Cross-device batch statistics: nnx.pmap / nnx.vmap with axis_name and a batch-sharded jax.jit,
facade vs native nnx (bitwise) and vs the single-device whole-batch statistics."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import normbridge.adapters.nnx as F
from normbridge.conformance.measure import diff
from normbridge.conformance.nnx_cases import make_input, state_diff

N_DEV = 4


def _pair(layer: str, **kw):
    c = 6
    args = (c, 3) if layer == "GroupNorm" else (c,)
    return getattr(nnx, layer)(*args, **kw, rngs=nnx.Rngs(0)), getattr(F, layer)(*args, **kw, rngs=nnx.Rngs(0))


def _call(layer: str, m, x):
    return m(x, use_running_average=False) if layer == "BatchNorm" else m(x)


@settings(max_examples=max(2, settings().max_examples // 2))
@given(
    layer=st.sampled_from(["BatchNorm", "LayerNorm", "GroupNorm"]),
    transform=st.sampled_from(["pmap", "vmap"]),
    fast=st.booleans(),
)
def test_named_axis_stats_synced(layer: str, transform: str, fast: bool) -> None:
    x = make_input((N_DEV, 2, 3, 6), "float32", 4)
    kw = dict(axis_name="dev", use_fast_variance=fast)
    native, fac = _pair(layer, **kw)
    if transform == "pmap":
        f = nnx.pmap(lambda m, x: _call(layer, m, x), in_axes=(None, 0), axis_name="dev", devices=jax.devices()[:N_DEV])
    else:
        f = nnx.vmap(lambda m, x: _call(layer, m, x), in_axes=(None, 0), axis_name="dev")
    yn, yf = f(native, x), f(fac, x)
    assert diff(yn, yf).bitwise
    assert state_diff(native, fac).exact()
    if layer == "BatchNorm":
        # global statistics of the whole batch: equal to one device seeing everything
        single = F.BatchNorm(6, use_fast_variance=fast, rngs=nnx.Rngs(0))
        y1 = single(x.reshape(-1, 3, 6)).reshape(x.shape)
        np.testing.assert_allclose(np.asarray(yf), np.asarray(y1), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(fac.mean.get_value()), np.asarray(single.mean.get_value()), atol=1e-6)


@pytest.mark.parametrize("layer", ["BatchNorm", "LayerNorm"])
def test_batch_sharded_jit(layer: str) -> None:
    mesh = Mesh(np.array(jax.devices()[:N_DEV]), ("data",))
    x = jax.device_put(make_input((8, 3, 6), "float32", 5), NamedSharding(mesh, PartitionSpec("data")))
    native, fac = _pair(layer)
    outs = []
    for m in (native, fac):
        graphdef, state = nnx.split(m)

        @jax.jit
        def step(state, x, graphdef=graphdef):
            mod = nnx.merge(graphdef, state)
            y = _call(layer, mod, x)
            return y, nnx.state(mod)

        y, new_state = step(state, x)
        nnx.update(m, new_state)
        outs.append(y)
    assert outs[1].sharding.spec == outs[0].sharding.spec
    assert diff(outs[0], outs[1]).bitwise
    assert state_diff(native, fac).exact()
    ref = _pair(layer)[1]
    y_ref = _call(layer, ref, jax.device_get(x))
    np.testing.assert_allclose(np.asarray(outs[1]), np.asarray(y_ref), rtol=1e-5, atol=1e-5)
