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


@pytest.mark.parametrize("name", ["cnn_mnist_trainsaved", "cnn_mnist_byref_gelu_evalsaved"])
@pytest.mark.parametrize("backend", ["equinox", "normbridge"])
def test_cnn_fixture_to_equinox_reproduces_eval_outputs(name: str, backend: str) -> None:
    """Conv (HWIO → OIHW, bias (out, 1, 1)), BatchNorm, Dropout (inference), relu/gelu, the channels-last
    global mean pool and Linear, run as Equinox on channels-first examples: treex's eval outputs within 1e-5."""
    fx = next(f for f in FIXTURES if f["name"] == name)
    fl = next(f for f in fx["files"] if f["format"] == "cloudpickle")
    _, d, tol = tf.equinox_model_eval(tx.load(FOLDER / fl["file"]), tf.expected(FOLDER, fx), backend)
    assert tol == 1e-5 and d.within(tol), d.text()


def test_mlp_fixture_to_equinox_reproduces_eval_outputs() -> None:
    import equinox as eqx
    import jax
    import numpy as np

    fx = next(f for f in FIXTURES if f["name"] == "mlp_flatten_ln")
    exp = tf.expected(FOLDER, fx)
    model, state = tx.to_equinox(tx.load(FOLDER / "mlp_flatten_ln.cloudpickle.pkl"))
    assert isinstance(model.layers[1], eqx.nn.Sequential)  # the MLP
    y, _ = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(exp["x"], state)
    _, d, tol = tf._case("equinox y_eval", exp["y_eval"], np.asarray(y), 1e-5)
    assert d.within(tol), d.text()


def test_static_fields_and_defaults_are_real_treex(treex_model_fixtures: pathlib.Path) -> None:
    """Loaded (pickles) and freshly built modules have real treex's static fields (configuration, defaults)."""
    from normbridge.conformance import treex as tc

    for fx in FIXTURES:
        exp = tf.expected(FOLDER, fx)
        fresh = tf.build_model(fx).init(tf.init_seed(fx), exp["x"])
        assert tc._static_problems(fx["module_tree"], fresh) == [], fx["name"]
        for fl in fx["files"]:
            if fl["format"] in tf.PICKLE_FORMATS:
                assert tc._static_problems(fx["module_tree"], tx.load(FOLDER / fl["file"])) == [], fl["file"]


def test_cnn_fixture_through_normbridge_convert() -> None:
    """``normbridge.convert`` (the conversion engine) on the loaded CNN, verified by running both models.

    The Dropout keys (``Rng`` leaves) are skipped by mapping: the engine's treex spoke does not yet
    treat them as layer-free state (reported to its owner)."""
    import numpy as np

    import normbridge

    fx = next(f for f in FIXTURES if f["name"] == "cnn_mnist_evalsaved")
    x = tf.expected(FOLDER, fx)["x"]
    model = tx.load(FOLDER / "cnn_mnist_evalsaved.cloudpickle.pkl")
    mapping = {f"layers/{i}": f"layers/{i}" for i in (0, 1, 4, 5, 8)}
    mapping.update({"layers/10": "layers/11", "layers/2/next_key/key": None, "layers/6/next_key/key": None})
    _, report = normbridge.convert(model, tx.to_equinox(model), probe=(x, np.moveaxis(x, -1, 1)), mapping=mapping)
    assert "passed" in str(report)
