"""Signatures, misuse errors, cross-device statistics and composite training: facade vs real flax.linen."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import errors as flax_errors

from normbridge.adapters import linen as F
from normbridge.conformance import linen as L


@pytest.mark.parametrize("layer", L.LAYERS)
def test_signature_equals_native(layer: str) -> None:
    """``inspect.signature`` of the class and of ``__call__`` and the dataclass fields equal native."""
    acc = L.measure_signature(layer)
    assert acc.ok, acc.text()
    assert acc.cases == 4


@pytest.mark.parametrize("layer", L.LAYERS)
def test_misuse_raises_like_native(layer: str) -> None:
    acc = L.measure_errors(layer)
    assert acc.ok, acc.text()


def test_required_errors_name_layer_and_argument() -> None:
    x = jnp.ones((2, 3, 6))
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"BatchNorm.*use_running_average.*constructor and at call time"):
        F.BatchNorm(use_running_average=True).init(key, x, use_running_average=True)
    with pytest.raises(ValueError, match=r"BatchNorm.*use_running_average.*constructor or at call time"):
        F.BatchNorm().init(key, x)
    bn = F.BatchNorm()
    v = bn.init(key, x, use_running_average=False)
    with pytest.raises(flax_errors.ModifyScopeVariableError, match="batch_stats"):
        bn.apply(v, x, use_running_average=False)
    with pytest.raises(TypeError, match="update_stats"):
        F.SpectralNorm(nn.Dense(2)).init(key, x)
    with pytest.raises(ValueError, match=r"GroupNorm.*num_groups"):
        F.GroupNorm(num_groups=4).init(key, x)
    with pytest.raises(ValueError, match=r"GroupNorm.*group_size"):
        F.GroupNorm(num_groups=None, group_size=4).init(key, x)
    with pytest.raises(ValueError, match=r"GroupNorm.*reduction_axes"):
        F.GroupNorm(num_groups=2, reduction_axes=(1,)).init(key, x)
    with pytest.raises(ValueError, match=r"InstanceNorm.*feature_axes"):
        F.InstanceNorm(feature_axes=0).init(key, x)
    with pytest.raises(ValueError, match=r"SpectralNorm.*kernel.*error_on_non_matrix"):
        sn = F.SpectralNorm(nn.Conv(2, (2, 2)), error_on_non_matrix=True)
        sn.init(key, jnp.ones((1, 3, 3, 2)), update_stats=False)


def test_batch_norm_init_neither_syncs_nor_updates() -> None:
    """linen skips the pmean and the running-average update during init: the facade too."""
    x = jnp.arange(12.0).reshape(4, 3)
    for ns in (nn, F):
        v = ns.BatchNorm(axis_name="absent").init(jax.random.key(0), x, use_running_average=False)
        np.testing.assert_array_equal(v["batch_stats"]["mean"], np.zeros(3, np.float32))
        np.testing.assert_array_equal(v["batch_stats"]["var"], np.ones(3, np.float32))


@pytest.mark.parametrize(("how", "fast"), [("pmap", True), ("pmap", False), ("shard_map", True)])
def test_axis_name_stats_equal_whole_batch(how: str, fast: bool) -> None:
    """8 devices, 2 examples each: synced statistics == whole-batch statistics; facade == native exactly."""
    acc = L.measure_axis_name(how=how, use_fast_variance=fast)
    assert acc.ok, acc.text()


def test_axis_index_groups_under_pmap() -> None:
    acc = L.measure_axis_index_groups()
    assert acc.ok, acc.text()


@pytest.mark.parametrize("layer", ["LayerNorm", "RMSNorm"])
def test_features_sharded_across_devices(layer: str) -> None:
    acc = L.measure_sharded_features(layer=layer)
    assert acc.ok, acc.text()


@pytest.mark.parametrize(("model", "use_jit"), [("mlp", True), ("conv", False)])
def test_composite_model_trains_identically(model: str, use_jit: bool) -> None:
    """3 SGD steps of Dense→BN→relu→Dense→LN (jitted) and Conv→GN→SN(Dense)→WN(Dense) (eager): identical variables."""
    acc = L.measure_composite(model, use_jit=use_jit)
    assert acc.ok, acc.text()
    # 4 variable snapshots (init + 3 steps) and the eval output were compared.
    assert acc.cases >= 5


def test_composite_model_detects_a_difference() -> None:
    """The composite comparison is not vacuous: a different momentum in one BatchNorm shows up."""
    (tn, _), (tf, _) = (L.train_composite("mlp", impl) for impl in L.IMPLS)
    acc = L.Accumulator()
    bumped = jax.tree_util.tree_map(lambda a: a, tf[-1])
    bumped["batch_stats"]["BatchNorm_0"]["mean"] = bumped["batch_stats"]["BatchNorm_0"]["mean"] * 1.001
    L.compare(acc, "bumped", tn[-1], bumped, exact=True)
    assert not acc.ok


def test_group_norm_broadcastable_mask_native_crash_facade_follows_docs() -> None:
    """linen documents ``mask`` as "broadcastable to inputs", but GroupNorm reshapes the raw mask to
    ``(..., G, C/G)`` and crashes when its channel axis is 1. The facade follows the documentation:
    the result equals native's with the mask broadcast explicitly (bitwise)."""
    x = jax.random.normal(jax.random.key(0), (2, 3, 4))
    mask = jnp.asarray([True, False]).reshape(2, 1, 1)
    with pytest.raises(TypeError, match="cannot reshape"):
        nn.GroupNorm(num_groups=2).init(jax.random.key(0), x, mask=mask)
    native, _ = nn.GroupNorm(num_groups=2).init_with_output(jax.random.key(0), x, mask=jnp.broadcast_to(mask, x.shape))
    facade, _ = F.GroupNorm(num_groups=2).init_with_output(jax.random.key(0), x, mask=mask)
    np.testing.assert_array_equal(np.asarray(facade), np.asarray(native))
    # the other layers accept a broadcastable mask natively, and the facade matches them
    for layer in ("LayerNorm", "RMSNorm", "InstanceNorm"):
        n_out, _ = getattr(nn, layer)().init_with_output(jax.random.key(0), x, mask=mask)
        f_out, _ = getattr(F, layer)().init_with_output(jax.random.key(0), x, mask=mask)
        np.testing.assert_array_equal(np.asarray(f_out), np.asarray(n_out))
