"""Whole models written by the real treex 0.6.12 (CNN, MLP, Dropout), in every format present, reproduced."""

from __future__ import annotations

import pathlib

import pytest

from normbridge.adapters import treex as tx
from normbridge.conformance import treex_fixtures as tf

FOLDER = tf.fixtures_dir(name="treex-models")
FILES = list(tf.fixture_files(FOLDER))
FIXTURES = tf.manifest(FOLDER)


def test_every_model_fixture_has_files(treex_model_fixtures: pathlib.Path) -> None:
    assert treex_model_fixtures.resolve() == FOLDER.resolve()
    assert len(FIXTURES) == 6
    listed = [fl for fx in FIXTURES for fl in fx["files"] if fl["format"] != "expected_npz"]
    assert len(FILES) == len(listed) == 30  # every listed file ships in the repository


@pytest.mark.parametrize("item", FILES, ids=lambda i: i[1]["file"])
def test_model_fixture_reproduced(item: tuple[dict, dict]) -> None:
    """Loads in its saved mode; saved state bitwise; every recorded output and statistic within 1e-6."""
    fx, fl = item
    exp = tf.expected(FOLDER, fx)
    module = tf.load_model_file(FOLDER, fx, fl)
    assert isinstance(module, tx.Sequential)
    flags = fx["saved_flags"]
    assert (module.training, module.frozen, module.initialized) == (
        flags["training"], flags["frozen"], flags["initialized"],
    )  # fmt: skip
    assert tf.state_problems(FOLDER, fx, module) == []
    cases = tf.reproduce_model(FOLDER, fx, module, exp)
    names = {name for name, _, _ in cases}
    assert "y_eval" in names and len(cases) >= 10
    assert ("y_train_dropout_off" in names) == ("y_train_dropout_off" in exp)
    bad = [f"{name}: {d.text()} (tol {tol})" for name, d, tol in cases if not d.within(tol)]
    assert not bad, bad


@pytest.mark.parametrize("fx", [f for f in FIXTURES if "init/layers/0/bias" in tf.expected(FOLDER, f)
                                and "byref" not in f["name"]], ids=lambda f: f["name"])  # fmt: skip
def test_fresh_model_init_is_real_treex_init(fx: dict) -> None:
    """``build(...).init(seed, x)`` gives the parameters and Dropout keys real treex's init gave."""
    cases = tf.reproduce_model_init(fx, tf.expected(FOLDER, fx))
    assert len(cases) >= 8
    bad = [f"{name}: {d.text()}" for name, d, tol in cases if not d.within(tol)]
    assert not bad, bad


def test_loaded_modules_types() -> None:
    fx = next(f for f in FIXTURES if f["name"] == "cnn_mnist_trainsaved")
    module = tx.load(FOLDER / "cnn_mnist_trainsaved.cloudpickle.pkl")
    kinds = [type(layer).__name__ for layer in module.layers]
    assert kinds == ["Conv", "BatchNorm", "Dropout", "Lambda", "Conv", "BatchNorm", "Dropout", "Lambda",
                     "Conv", "Lambda", "Linear"]  # fmt: skip
    import jax

    assert module.layers[3].f is jax.nn.relu  # resolved by name from the code-by-value pickle
    assert module.layers[2].next_key.key.dtype == "uint32"
    assert isinstance(module.layers[2].next_key, tx.KeySeq)
    with pytest.raises(RuntimeError, match="not rebuilt"):
        module.layers[0].kernel_init(jax.random.PRNGKey(0), (3, 3, 1, 8))
    assert fx["saved_flags"]["training"] is module.training
