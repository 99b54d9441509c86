"""``filter`` and ``merge`` of the treex facade against ``treeo`` (treex's own implementation of them).

treeo 0.2 calls ``jax.tree_map``, which the installed jax no longer has; the reference runs here with
``jax.tree_map`` pointed at ``jax.tree_util.tree_map`` (only inside these tests).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import treeo as to

from normbridge.adapters import treex as tx

X = np.random.default_rng(0).normal(size=(4, 6, 6, 3)).astype(np.float32)


@pytest.fixture
def treeo_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jax, "tree_map", jax.tree_util.tree_map, raising=False)


@pytest.fixture(scope="module")
def model() -> tx.Module:
    import functools

    import jax.numpy as jnp

    return tx.Sequential(
        tx.Conv(4, [3, 3]), tx.BatchNorm(), tx.Dropout(0.1), jax.nn.relu,
        functools.partial(jnp.mean, axis=(1, 2)), tx.MLP([5, 2]), tx.LayerNorm(),
    ).init(0, X)  # fmt: skip


def _leaves(tree) -> list:
    return jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, to.Nothing))


def _same(a, b) -> None:
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert isinstance(x, to.Nothing) == isinstance(y, to.Nothing)
        if not isinstance(x, to.Nothing):
            np.testing.assert_array_equal(x, y)
    _same_modules(a, b)


def _same_modules(a, b) -> None:
    """Same module classes, fields and static values (treeo rebuilds __dict__ in another order)."""
    assert type(a) is type(b)
    if isinstance(a, tx.Module):
        assert set(vars(a)) == set(vars(b))
        for k in vars(a):
            if k == "_field_metadata":
                continue
            va, vb = vars(a)[k], vars(b)[k]
            if isinstance(va, (tx.Module, list, tuple)):
                _same_modules(va, vb)
            elif not hasattr(va, "shape") and not isinstance(va, to.Nothing):
                assert va is vb or va == vb, k
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same_modules(x, y)


FILTERS = {
    "Parameter": (tx.Parameter,),
    "State": (tx.State,),
    "BatchStat": (tx.BatchStat,),
    "Rng": (tx.Rng,),
    "not TreePart (issue 11)": (lambda field: not issubclass(field.kind, tx.TreePart),),
    "by name": (lambda f: f.name in ("kernel", "mean"),),
    "by module type": (lambda f: type(f.module).__name__ == "Linear",),
    "by value": (lambda f: f.value.ndim == 1,),
    "kind and callable": (tx.Parameter, lambda f: f.name == "bias"),
    "two callables": (lambda f: f.kind is not type(None), lambda f: f.value.size > 4),
}


@pytest.mark.parametrize("filters", list(FILTERS.values()), ids=list(FILTERS))
def test_filter_matches_treeo(model, treeo_runs, filters) -> None:
    _same(model.filter(*filters), to.filter(model, *filters))


def test_callable_filter_receives_field_info(model) -> None:
    seen = []
    model.filter(lambda info: seen.append(info) or True)
    assert seen and all(isinstance(i, to.FieldInfo) for i in seen)
    names = {(type(i.module).__name__, i.name, i.kind) for i in seen}
    assert ("Conv", "kernel", tx.Parameter) in names and ("KeySeq", "key", tx.Rng) in names
    assert ("BatchNorm", "momentum", type(None)) in names


@pytest.mark.parametrize("ignore_static", [False, True])
def test_merge_matches_treeo(model, treeo_runs, ignore_static) -> None:
    params = model.filter(tx.Parameter)
    trained = jax.tree_util.tree_map(
        lambda p: p if isinstance(p, to.Nothing) else p + 1, params, is_leaf=lambda x: isinstance(x, to.Nothing)
    )
    other = model.eval()  # static flags differ: merge takes them from the last tree unless ignore_static
    ours = other.merge(trained, ignore_static=ignore_static)
    ref = to.merge(other, trained, ignore_static=ignore_static)
    _same(ours, ref)
    assert ours.training == ref.training and ours.layers[1].training == ref.layers[1].training
    three = model.merge(model.filter(tx.BatchStat), trained, ignore_static=ignore_static)
    _same(three, to.merge(model, model.filter(tx.BatchStat), trained, ignore_static=ignore_static))
