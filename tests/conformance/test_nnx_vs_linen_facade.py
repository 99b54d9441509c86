"""Facade vs facade: the linen and NNX facades, given the same parameters (moved with
``to_canonical``/``from_canonical``), produce bitwise-identical outputs and statistics — as
native linen and NNX do (layouts §10: "linen and nnx are bitwise identical when dtype=None")."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import normbridge.adapters.linen as L
import normbridge.adapters.nnx as F
from normbridge.conformance.measure import diff
from normbridge.conformance.nnx_cases import failures, make_input, randomize_params, wrapper_deviation


@st.composite
def configs(draw):
    layer = draw(st.sampled_from(["BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm"]))
    ndim = draw(st.integers(2, 4))
    shape = (*[draw(st.sampled_from([2, 3])) for _ in range(ndim - 1)], draw(st.sampled_from([4, 6])))
    kw = {"use_fast_variance": draw(st.booleans())}
    if layer == "GroupNorm":
        kw["num_groups"] = 2
    if layer in ("LayerNorm", "RMSNorm") and ndim >= 3 and draw(st.booleans()):
        kw["reduction_axes"] = kw["feature_axes"] = (ndim - 2, ndim - 1)
    if layer in ("LayerNorm", "GroupNorm", "InstanceNorm"):
        kw["use_bias"] = draw(st.booleans())
    return layer, shape, kw, draw(st.sampled_from(["float32", "bfloat16", "float16"])), draw(st.integers(0, 20))


@settings(max_examples=max(2, settings().max_examples // 2))
@given(configs())
def test_same_parameters_same_bits(config) -> None:
    layer, shape, kw, dtype, seed = config
    feats = kw.get("feature_axes", (-1,))
    feature_shape = tuple(shape[a] for a in feats)
    n = 1
    for s in feature_shape:
        n *= s
    ours = getattr(F, layer)(n, **kw, rngs=nnx.Rngs(seed))
    randomize_params([ours], jax.random.key(seed))
    record = F.to_canonical(ours, feature_shape=feature_shape)
    lin = getattr(L, layer)(**kw)
    variables = L.from_canonical(record, lin)
    for step in range(3 if layer == "BatchNorm" else 1):
        x = make_input(shape, dtype, seed + step)
        if layer == "BatchNorm":
            y_lin, upd = lin.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
            variables = {**variables, **upd}
            y_nnx = ours(x, use_running_average=False)
            stats = F.to_canonical(ours)
            assert diff(variables["batch_stats"]["mean"], stats.mean).bitwise
            assert diff(variables["batch_stats"]["var"], stats.var).bitwise
        else:
            y_lin, y_nnx = lin.apply(variables, x), ours(x)
        assert diff(y_lin, y_nnx).bitwise, (step, diff(y_lin, y_nnx).text())
    if layer == "BatchNorm":
        x = make_input(shape, dtype, seed + 9)
        assert diff(lin.apply(variables, x, use_running_average=True), ours(x, use_running_average=True)).bitwise


@pytest.mark.parametrize("layer", ["SpectralNorm", "WeightNorm"])
def test_wrappers_same_bits_as_linen_facade(layer: str) -> None:
    _, follows = wrapper_deviation(layer, linen_ns=L)
    bad = failures(follows)
    assert follows and not bad, "\n".join(bad)


def test_nnx_record_round_trips_through_linen_facade() -> None:
    ours = F.BatchNorm(6, rngs=nnx.Rngs(0))
    randomize_params([ours], jax.random.key(1))
    ours(make_input((4, 6), "float32", 0))
    rec = F.to_canonical(ours)
    back = L.to_canonical(L.from_canonical(rec, L.BatchNorm()), L.BatchNorm())
    again = F.BatchNorm(6, rngs=nnx.Rngs(5))
    F.from_canonical(back, again)
    for name in ("scale", "bias", "mean", "var"):
        assert jnp.array_equal(getattr(ours, name).get_value(), getattr(again, name).get_value())
