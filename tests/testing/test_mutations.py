"""Mutation tests: inject one fault (and all of them) into one of two equal models; the report must name
exactly the injected paths and nothing else, and pass on the unmodified pair.

The pair is a linen model on normbridge's linen facade layers (Dense, BatchNorm, LayerNorm) with random
statistics, so that swapping two same-shaped statistics is visible. Compared bitwise (``rtol=0, atol=0``):
the models are equal, so every difference is the fault's.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normbridge.adapters.linen as nbl
from normbridge.testing import assert_equivalent, check_equivalent, tree_diff


class Net(nn.Module):
    eps: float = 1e-5  # of LayerNorm_1
    momentum: float = 0.9  # of BatchNorm_1

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(8)(x)
        x = nbl.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nbl.LayerNorm()(nn.relu(x))
        x = nn.Dense(8)(x)
        x = nbl.BatchNorm(use_running_average=not train, momentum=self.momentum)(x)
        x = nbl.LayerNorm(epsilon=self.eps)(x)
        return nn.Dense(2)(x)


def _variables():
    x = jnp.ones((4, 5))
    v = Net().init(jax.random.key(0), x)
    v = jax.tree_util.tree_map(np.asarray, dict(v))
    rng = np.random.default_rng(1)
    for name in ("BatchNorm_0", "BatchNorm_1"):
        stats = v["batch_stats"][name]
        v["batch_stats"][name] = {
            "mean": rng.normal(size=8).astype(np.float32),
            "var": rng.uniform(0.5, 2.0, size=8).astype(np.float32),
        }
        assert stats["mean"].shape == (8,)
    return v


BATCHES = [jnp.asarray(np.random.default_rng(k).normal(size=(4, 5)), jnp.float32) for k in range(3)]


def _copy(v):
    return jax.tree_util.tree_map(np.copy, v)


def ulp(v):
    k = v["params"]["Dense_1"]["kernel"]
    k[2, 3] = np.nextafter(k[2, 3], np.float32(np.inf))
    return {"params/Dense_1/kernel"}


def swap(v):
    s = v["batch_stats"]
    s["BatchNorm_0"]["mean"], s["BatchNorm_1"]["mean"] = s["BatchNorm_1"]["mean"], s["BatchNorm_0"]["mean"]
    return {"batch_stats/BatchNorm_0/mean", "batch_stats/BatchNorm_1/mean"}


def nan(v):
    v["batch_stats"]["BatchNorm_1"]["var"][0] = np.nan
    return {"batch_stats/BatchNorm_1/var"}


def missing(v):
    del v["params"]["Dense_2"]["bias"]
    return {"params/Dense_2/bias"}


def dtype(v):
    v["params"]["LayerNorm_0"]["scale"] = v["params"]["LayerNorm_0"]["scale"].astype(jnp.bfloat16)
    return {"params/LayerNorm_0/scale"}


VALUE_FAULTS = [ulp, swap, nan, missing, dtype]


def _pair(faults=(), eps=1e-5, momentum=0.9):
    va = _variables()
    vb = _copy(va)
    injected = set()
    for fault in faults:
        injected |= fault(vb)
    return (Net(), va), (Net(eps=eps, momentum=momentum), vb), injected


def test_unmodified_pair_passes_bitwise_with_training():
    a, b, _ = _pair()
    report = assert_equivalent(a, b, BATCHES, train_steps=3, rtol=0, atol=0)
    assert [c.title for c in report.checks] == [
        "models: values and layers",
        "eval outputs",
        "gradients",
        "training step 1/3",
        "training step 2/3",
        "training step 3/3",
    ]
    assert report.ok and all(c.bitwise for c in report.checks)


@pytest.mark.parametrize("fault", VALUE_FAULTS, ids=lambda f: f.__name__)
def test_value_fault_named_exactly(fault):
    a, b, injected = _pair([fault])
    report = check_equivalent(a, b, BATCHES, rtol=0, atol=0)
    assert set(report.failing_paths) == injected, report.render()
    assert report.failed.title == "models: values and layers"
    assert set(tree_diff(a[1], b[1], rtol=0, atol=0).failing_paths) == injected  # the same on the bare trees
    with pytest.raises(AssertionError) as info:
        assert_equivalent(a, b, BATCHES, rtol=0, atol=0)
    for path in injected:
        assert path in str(info.value)


def test_wrong_eps_names_the_layer():
    a, b, _ = _pair(eps=1e-3)
    report = check_equivalent(a, b, BATCHES, rtol=0, atol=0)
    assert report.failing_paths == ("LayerNorm_1",), report.render()
    assert report.failed["LayerNorm_1"].mismatched > 0


def test_momentum_difference_shows_only_in_training():
    a, b, _ = _pair(momentum=0.8)
    assert check_equivalent(a, b, BATCHES, train_steps=0, rtol=0, atol=0)
    report = check_equivalent(a, b, BATCHES, train_steps=3, rtol=0, atol=0)
    assert report.failed.title == "training step 1/3", report.render()
    assert set(report.failing_paths) == {
        "after step: batch_stats/BatchNorm_1/mean",
        "after step: batch_stats/BatchNorm_1/var",
    }, report.render()
    assert report.not_run == ("training step 2/3", "training step 3/3")


def test_all_value_faults_and_wrong_eps_combined():
    a, b, injected = _pair(VALUE_FAULTS, eps=1e-3)
    report = check_equivalent(a, b, BATCHES, train_steps=3, rtol=0, atol=0)
    assert set(report.failing_paths) == injected | {"LayerNorm_1"}, report.render()


def test_default_tolerance_admits_the_one_ulp_change():
    a, b, _ = _pair([ulp])
    assert check_equivalent(a, b, BATCHES, train_steps=3)
