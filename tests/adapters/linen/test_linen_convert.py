"""to_canonical / from_canonical of the linen facade: layouts, round trips, refusals.

The hypothesis-driven bit-exact round trip of every layer runs in
``tests/conformance/test_linen_layers.py`` (``measure_case`` → ``roundtrip``); these tests pin
the canonical layout and the errors.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import freeze

from normbridge.adapters import linen as F
from normbridge.conformance.linen import compare
from normbridge.conformance.measure import Accumulator
from normbridge.core import NormRecord, SpectralVectors

KEY = jax.random.key(0)
X = jax.random.normal(jax.random.key(1), (3, 4))


def assert_exact(a, b) -> None:
    acc = Accumulator()
    compare(acc, "round trip", a, b, exact=True)
    assert acc.ok, acc.text()


@pytest.mark.parametrize("ns", [nn, F], ids=["native", "facade"])
def test_batch_norm_record_layout(ns) -> None:
    bn = ns.BatchNorm(momentum=0.9, axis=-1)
    v = bn.init(KEY, X, use_running_average=False)
    _, upd = bn.apply(v, X, use_running_average=False, mutable=["batch_stats"])
    v = {**v, **upd}
    rec = F.to_canonical(v, bn)
    assert rec.kind == "batch_norm" and rec.stats_convention == "ema" and rec.momentum == 0.9
    assert rec.feature_axes == (-1,) and rec.option("use_fast_variance") is True
    assert rec.mean.shape == (4,) and rec.scale.shape == (4,)
    assert_exact(v, F.from_canonical(rec, F.BatchNorm()))


def test_frozen_dict_input_and_absent_params() -> None:
    ln = F.LayerNorm(use_scale=False, use_bias=False)
    v = ln.init(KEY, X)
    assert v == {}
    rec = F.to_canonical(freeze(v), ln)
    assert rec.scale is None and rec.bias is None
    assert F.from_canonical(rec, ln) == {}


def test_spectral_norm_u_is_output_space_vector_and_keys_come_back() -> None:
    sn = F.SpectralNorm(nn.Dense(5))
    v = sn.init(KEY, X, update_stats=True)
    stats = v["batch_stats"]
    assert set(stats) == {"layer_instance/kernel/u", "layer_instance/kernel/sigma"}
    rec = F.to_canonical(stats, sn)
    assert rec.spectral["kernel"].u.shape == (5,) and rec.spectral["kernel"].sigma.shape == ()
    assert rec.option("layer_name") == "layer_instance"
    assert_exact(dict(stats), F.from_canonical(rec, sn))
    # the wrapped form {collection: {...}} is accepted too
    assert_exact(dict(stats), F.from_canonical(F.to_canonical(v, sn), sn))
    # an explicit layer name renames the keys (a layer inside a parent module is 'Dense_1', ...)
    assert set(F.from_canonical(rec, sn, layer_name="Dense_1")) == {"Dense_1/kernel/u", "Dense_1/kernel/sigma"}


def test_spectral_norm_inside_a_parent_keeps_the_layer_name() -> None:
    class Model(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.Dense(3)(x)
            return F.SpectralNorm(nn.Dense(2))(x, update_stats=train)

    v = Model().init(KEY, X, train=True)
    sub = v["batch_stats"]["SpectralNorm_0"]
    assert set(sub) == {"Dense_1/kernel/u", "Dense_1/kernel/sigma"}
    rec = F.to_canonical(sub, F.SpectralNorm(nn.Dense(2)))
    assert list(rec.spectral) == ["kernel"] and rec.option("layer_name") == "Dense_1"
    assert_exact(dict(sub), F.from_canonical(rec, F.SpectralNorm(nn.Dense(2))))


def test_weight_norm_scales_round_trip() -> None:
    wn = F.WeightNorm(nn.Dense(5), variable_filter=None)
    v = wn.init(KEY, X)
    sub = {k: val for k, val in v["params"].items() if k != "layer_instance"}
    assert set(sub) == {"layer_instance/kernel/scale", "layer_instance/bias/scale"}
    rec = F.to_canonical(sub, wn)
    assert set(rec.weight_scales) == {"kernel", "bias"} and rec.weight_scales["kernel"].shape == (5,)
    assert_exact(sub, F.from_canonical(rec, wn))


def test_refusals_name_the_layer_and_path() -> None:
    bn = F.BatchNorm()
    rec = F.to_canonical(bn.init(KEY, X, use_running_average=False), bn)
    with pytest.raises(ValueError, match=r"from_canonical\(LayerNorm\).*kind 'batch_norm'"):
        F.from_canonical(rec, F.LayerNorm())
    with pytest.raises(ValueError, match=r"from_canonical\(BatchNorm\).*'params/scale'.*does not use it"):
        F.from_canonical(rec, F.BatchNorm(use_scale=False))
    with pytest.raises(ValueError, match=r"from_canonical\(BatchNorm\).*disagree in shape"):
        F.from_canonical(rec.replace(var=jnp.ones((3,))), bn)
    with pytest.raises(ValueError, match=r"from_canonical\(BatchNorm\).*'batch_stats/mean'"):
        F.from_canonical(rec.replace(mean=None), bn)
    sn = F.SpectralNorm(nn.Dense(2))
    bad = NormRecord(kind="spectral_norm", spectral={"kernel": SpectralVectors(u=jnp.ones((1, 2)))})
    with pytest.raises(ValueError, match=r"from_canonical\(SpectralNorm\).*spectral/kernel/u"):
        F.from_canonical(bad, sn)
    with pytest.raises(ValueError, match=r"to_canonical\(LayerNorm\).*params/mean"):
        F.to_canonical({"params": {"scale": jnp.ones(4), "mean": jnp.ones(4)}}, F.LayerNorm())
    with pytest.raises(TypeError, match="unsupported module Dense"):
        F.to_canonical({}, nn.Dense(3))


def test_zero_debiased_record_becomes_linen_eval_statistics() -> None:
    """An equinox mode='batch' record (hidden EMA + count) loads as the statistics linen uses as is."""
    hidden_mean, hidden_var = jnp.asarray([0.1, 0.2]), jnp.asarray([0.5, 1.5])
    rec = NormRecord(
        kind="batch_norm", scale=jnp.ones(2), bias=jnp.zeros(2), mean=hidden_mean, var=hidden_var,
        count=jnp.asarray(3), momentum=0.9, stats_convention="zero_debiased",
    )
    out = F.from_canonical(rec, F.BatchNorm())
    denom = 1 - 0.9**3
    np.testing.assert_allclose(out["batch_stats"]["mean"], np.asarray(hidden_mean) / denom, rtol=1e-6)
    np.testing.assert_allclose(out["batch_stats"]["var"], np.asarray(hidden_var) / denom, rtol=1e-6)
