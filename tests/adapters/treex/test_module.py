"""The treex module system: lazy init, flags, kinds, filter, to_dict, jit, and BatchNorm's mode rule."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import treeo as to
from hypothesis import given
from hypothesis import strategies as st

from normbridge.adapters import treex as tx
from normbridge.conformance.measure import diff

X = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32) * 2 + 1


def _model() -> tx.Sequential:
    return tx.Sequential(tx.Linear(3), tx.BatchNorm(), jax.nn.relu, tx.LayerNorm())


def test_init_is_lazy_and_returns_a_copy() -> None:
    bn = tx.BatchNorm()
    assert not bn.initialized and bn.mean is None
    with pytest.raises(RuntimeError, match="BatchNorm: module is not initialized"):
        bn(X)
    ready = bn.init(0, X)
    assert ready is not bn and ready.initialized and not bn.initialized and bn.mean is None
    assert ready.training and not ready.frozen
    same = bn.init(jax.random.PRNGKey(1), X, inplace=True)
    assert same is bn and bn.initialized


def test_batchnorm_fields_kinds_and_dtypes() -> None:
    bn = tx.BatchNorm(momentum=0.9).init(0, X)
    meta = bn._field_metadata
    assert meta["mean"].kind is tx.BatchStat and meta["var"].kind is tx.BatchStat
    assert meta["scale"].kind is tx.Parameter and meta["bias"].kind is tx.Parameter
    assert meta["momentum"].node and meta["momentum"].kind is type(None)
    assert bn.momentum.shape == () and bn.momentum.dtype == jnp.float32 and bn.momentum.weak_type
    assert sorted(bn.to_dict(static_fields=False)) == ["bias", "mean", "momentum", "scale", "var"]
    assert bn.name == "batch_norm" and tx.LayerNorm().name == "layer_norm" and tx.Lambda(abs).name == "lambda"
    np.testing.assert_array_equal(bn.mean, np.zeros(4, np.float32))
    np.testing.assert_array_equal(bn.var, np.ones(4, np.float32))


def test_flag_methods_copy_or_inplace_and_recurse() -> None:
    m = _model().init(0, X)
    e = m.eval()
    assert e is not m and not e.training and m.training
    assert all(not layer.training for layer in e.layers)
    f = m.freeze()
    assert f.frozen and all(layer.frozen for layer in f.layers) and not m.frozen
    assert not f.unfreeze().frozen
    r = m.eval(inplace=True)
    assert r is m and not m.training and not m.layers[1].training
    assert m.train().training


def test_filter_parameters_batch_stats() -> None:
    m = _model().init(0, X)
    params = jax.tree_util.tree_leaves(m.parameters())
    stats = jax.tree_util.tree_leaves(m.batch_stats())
    assert len(params) == 2 + 2 + 2  # Linear kernel/bias, BN scale/bias, LN scale/bias
    assert len(stats) == 2
    p = m.parameters()
    assert isinstance(p.layers[1].mean, to.Nothing) and isinstance(p.layers[1].momentum, to.Nothing)
    assert isinstance(m.batch_stats().layers[0].kernel, to.Nothing)
    assert len(jax.tree_util.tree_leaves(m.filter(tx.State))) == 2  # BatchStat is a State
    merged = m.merge(m.batch_stats())
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(m)


def test_to_dict_matches_treex_layout() -> None:
    m = _model().init(0, X)
    d = m.to_dict(static_fields=False)
    shapes = jax.tree_util.tree_map(jnp.shape, d)
    assert shapes == {
        "layers": [
            {"kernel": (4, 3), "bias": (3,)},
            {"mean": (3,), "var": (3,), "scale": (3,), "bias": (3,), "momentum": ()},
            {},
            {"scale": (3,), "bias": (3,)},
        ]
    }


def test_module_goes_through_jit_with_state() -> None:
    m = _model().init(0, X)
    step = jax.jit(lambda mod, x: (mod(x), mod))
    y, m2 = step(m, X)
    y_eager = m.copy()(X)
    assert diff(y_eager, y).within()
    assert not np.array_equal(m2.layers[1].mean, m.layers[1].mean)  # training updated the statistics
    _, m3 = step(m2.eval(), X)
    np.testing.assert_array_equal(m3.layers[1].mean, m2.layers[1].mean)


@given(
    training=st.booleans(),
    frozen=st.booleans(),
    explicit=st.sampled_from([None, True, False]),
    momentum=st.sampled_from([0.99, 0.9, 0.5]),
)
def test_batchnorm_mode_rule_against_linen(
    training: bool, frozen: bool, explicit: bool | None, momentum: float
) -> None:
    """Batch statistics iff ``training and not frozen and initialized``; an explicit ``use_running_average`` wins.

    The reference output and statistics come from native linen run in the mode the rule selects.
    """
    bn = tx.BatchNorm(momentum=momentum).init(0, X)
    bn.mean = jnp.asarray([0.5, -1.0, 2.0, 0.0], jnp.float32)
    bn.var = jnp.asarray([2.0, 0.5, 1.0, 3.0], jnp.float32)
    bn = bn.train(training).freeze(frozen)
    use_batch = (not explicit) if explicit is not None else (training and not frozen)
    native = nn.BatchNorm(momentum=bn.momentum, epsilon=1e-5, dtype=jnp.float32)
    variables = {"params": {"scale": bn.scale, "bias": bn.bias}, "batch_stats": {"mean": bn.mean, "var": bn.var}}
    want, upd = native.apply(variables, X, use_running_average=not use_batch, mutable=["batch_stats"])
    m = bn.copy()
    got = m(X) if explicit is None else m(X, use_running_average=explicit)
    assert diff(want, got).bitwise
    assert diff(upd["batch_stats"]["mean"], m.mean).bitwise and diff(upd["batch_stats"]["var"], m.var).bitwise
    assert np.array_equal(m.mean, bn.mean) == (not use_batch)


def test_no_update_during_init() -> None:
    bn = tx.BatchNorm().init(0, X + 5)
    np.testing.assert_array_equal(bn.mean, np.zeros(4, np.float32))


def test_errors_name_layer_and_argument() -> None:
    with pytest.raises(ValueError, match="BatchNorm: Dtype must be inexact"):  # linen's type and message
        tx.BatchNorm(dtype=jnp.int32)
    with pytest.raises(TypeError, match="BatchNorm: `dtype` must be a floating dtype"):
        tx.BatchNorm(dtype="not a dtype")
    with pytest.raises(TypeError):
        tx.BatchNorm(-1)  # keyword-only, as treex
    with pytest.raises(ValueError, match="Number of groups"):
        tx.GroupNorm(num_groups=3).init(0, np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match="Either `num_groups` or `group_size`"):
        tx.GroupNorm(num_groups=2, group_size=2).init(0, np.ones((2, 4), np.float32))
    bn = tx.BatchNorm().init(0, X)
    with pytest.raises(ValueError, match="does not match the stored statistics"):
        bn(np.ones((2, 5), np.float32))
    with pytest.raises(ValueError, match="Linear: input has 5 features"):
        tx.Linear(2).init(0, X)(np.ones((1, 5), np.float32))
    with pytest.raises(TypeError, match="Lambda: `f` must be callable"):
        tx.Lambda(3)


def test_additions_are_treex_style() -> None:
    sn = tx.SpectralNorm(tx.Linear(3)).init(0, X)
    assert sn._field_metadata["u"].kind is tx.BatchStat and sn.u.shape == (1, 3) and sn.sigma.shape == ()
    before = (sn.u, sn.sigma)
    sn.eval()(X)
    trained = sn.copy()
    trained(X)
    assert not np.array_equal(trained.u, before[0])  # training stores u and sigma
    frozen = sn.freeze()
    frozen(X)
    np.testing.assert_array_equal(frozen.u, before[0])
    wn = tx.WeightNorm(tx.Linear(3)).init(0, X)
    assert wn.scale.shape == (3,) and wn._field_metadata["scale"].kind is tx.Parameter
    assert len(jax.tree_util.tree_leaves(wn.parameters())) == 3
    assert tx.RMSNorm().init(0, X).scale.shape == (4,)
    assert tx.InstanceNorm().init(0, X[:, None, :]).bias.shape == (4,)


def _flatten_with(method, tree):
    """Flatten a treeo module level by level with ``method`` (treeo's own or the facade's)."""
    children, static = method(tree)
    out = []
    for field, value in children[0].items():
        if isinstance(value, to.Tree):
            out.append((field, _flatten_with(method, value)))
        elif isinstance(value, (list, tuple)):
            out.append((field, [_flatten_with(method, v) if isinstance(v, to.Tree) else v for v in value]))
        else:
            out.append((field, value))
    return out, sorted(static)


def test_fast_flatten_equals_treeo_flatten() -> None:
    """Module.tree_flatten skips treeo's per-call copy; children and static fields stay the same."""
    x = jnp.ones((4, 3, 8))
    models = [
        tx.BatchNorm().init(0, x),
        tx.LayerNorm().init(0, x).eval(),
        tx.GroupNorm(num_groups=2).init(0, x).freeze(),
        tx.Sequential(tx.Linear(6), tx.BatchNorm(), jax.nn.relu, tx.Linear(2)).init(1, x),
        tx.Sequential(tx.Linear(6)),  # not initialized: leaves are None
    ]
    for model in models:
        fast = _flatten_with(type(model).tree_flatten, model)
        ref = _flatten_with(to.Tree.tree_flatten, model)
        assert repr(fast) == repr(ref)
        leaves, treedef = jax.tree_util.tree_flatten(model)
        again = jax.tree_util.tree_unflatten(treedef, leaves)
        assert jax.tree_util.tree_structure(again) == treedef
        assert (again.training, again.frozen, again.initialized) == (model.training, model.frozen, model.initialized)


def test_fast_flatten_annotates_new_fields_like_treeo() -> None:
    """A field added after construction goes through treeo's path, which records its metadata."""
    bn = tx.BatchNorm().init(0, jnp.ones((2, 3)))
    bn.extra = tx.LayerNorm()
    leaves, treedef = jax.tree_util.tree_flatten(bn)
    assert "extra" in bn._field_metadata and bn._field_metadata["extra"].node
    assert isinstance(jax.tree_util.tree_unflatten(treedef, leaves).extra, tx.LayerNorm)
