"""Every real treex 0.6.12 fixture, in every format present, reproduced by the facade."""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import pytest

from normbridge.adapters import treex as tx
from normbridge.conformance import treex_fixtures as tf

FOLDER = tf.fixtures_dir()
FILES = list(tf.fixture_files(FOLDER))
FIXTURES = tf.manifest(FOLDER)


def _ids(item: tuple[dict, dict]) -> str:
    return item[1]["file"]


def test_every_fixture_has_files(treex_fixtures: pathlib.Path) -> None:
    assert treex_fixtures.resolve() == FOLDER.resolve()
    assert len(FIXTURES) == 8
    # 7 single layers x 6 files + the Sequential's msgpack and npz
    assert len(FILES) == 7 * 6 + 2


@pytest.mark.parametrize("item", FILES, ids=_ids)
def test_fixture_reproduced(item: tuple[dict, dict]) -> None:
    fx, fl = item
    exp = tf.expected(FOLDER, fx)
    module = tf.load_file(FOLDER, fx, fl)
    assert isinstance(module, tx.Module)
    assert tf.layout(fx, fl, module) == []  # leaves-only formats: config and flags from the template
    cases = tf.reproduce(fx, module, exp)
    assert len(cases) >= 4
    bad = [f"{name}: {d.text()} (tol {tol})" for name, d, tol in cases if not d.within(tol)]
    assert not bad, bad


@pytest.mark.parametrize("fx", [f for f in FIXTURES if f.get("static_fields")], ids=lambda f: f["name"])
def test_fresh_init_and_training_history(fx: dict) -> None:
    """A new facade layer initializes the recorded leaves bitwise and 3 training calls give the saved statistics."""
    exp = tf.expected(FOLDER, fx)
    cases = tf.reproduce_init(fx, exp)
    assert cases
    bad = [f"{name}: {d.text()}" for name, d, tol in cases if not d.within(tol)]
    assert not bad, bad


@pytest.mark.parametrize("item", [i for i in FILES if i[1]["format"] in tf.LEAF_FORMATS], ids=_ids)
def test_leaves_only_without_template_warns_and_returns_dict(item: tuple[dict, dict]) -> None:
    fx, fl = item
    with pytest.warns(UserWarning, match="template="):
        state = tx.load(FOLDER / fl["file"])
    assert isinstance(state, dict)
    keys = fl.get("top_level_keys") or sorted({k.split("/")[0] for k in fl["keys"]})
    assert sorted(state) == sorted(keys)
    for leaf in fx["leaves"]:
        node = state
        for part in leaf["path"].split("/"):
            node = node.get(part) if isinstance(node, dict) else None
        if "value" in leaf:
            assert node is None
        else:
            assert isinstance(node, np.ndarray)
            assert list(node.shape) == leaf["shape"] and str(node.dtype) == leaf["dtype"]


@pytest.mark.parametrize("fmt", ["pickle", "cloudpickle_np"])
def test_pickle_matches_leaves_only_formats_bitwise(fmt: str) -> None:
    """The same checkpoint in pickle, msgpack and npz gives identical leaves."""
    for fx in FIXTURES:
        names = {fl["format"]: fl["file"] for fl in fx["files"]}
        if fmt not in names or not (FOLDER / names[fmt]).is_file():
            continue  # the Sequential has no plain pickle (its cloudpickles embed code)
        from_pickle = tx.load(FOLDER / names[fmt])
        for leaf_fmt in tf.LEAF_FORMATS:
            filled = tx.load(FOLDER / names[leaf_fmt], template=from_pickle)
            a, b = tx.state_dict(from_pickle), tx.state_dict(filled)
            pa = jax.tree_util.tree_leaves_with_path(a)
            pb = jax.tree_util.tree_leaves_with_path(b)
            assert [p for p, _ in pa] == [p for p, _ in pb]
            for (_, x), (_, y) in zip(pa, pb):
                assert x.dtype == y.dtype and x.shape == y.shape and x.weak_type == y.weak_type
                assert np.array_equal(np.asarray(x), np.asarray(y))


def test_rows_fail_loudly_without_fixtures(monkeypatch: pytest.MonkeyPatch) -> None:
    """``normbridge check`` must not pass the treex rows when the fixtures are missing."""
    from normbridge.conformance import treex as T

    def missing(explicit=None, *, name="treex"):
        raise tf.FixturesNotFound("treex fixtures not found (test)")

    monkeypatch.setattr(tf, "fixtures_dir", missing)
    row = T._row_sequential()
    assert not row.ok
    assert any("fixtures not found" in cell.text for cell in row.cells.values())


def test_fixtures_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.setenv("NORMBRIDGE_TREEX_FIXTURES", str(FOLDER))
    monkeypatch.chdir(tmp_path)
    assert tf.fixtures_dir() == FOLDER
