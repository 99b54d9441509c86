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


def _equinox_cnn(key: int) -> tuple:
    """The fixture CNN written by hand in Equinox (channels first, one example per call), random weights."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    k = jax.random.split(jax.random.PRNGKey(key), 4)
    conv = lambda i, o, kk: eqx.nn.Conv2d(i, o, 3, stride=2, padding="SAME", key=kk)  # noqa: E731
    bn = lambda c: eqx.nn.BatchNorm(c, "batch", momentum=0.99, mode="ema")  # noqa: E731
    model, state = eqx.nn.make_with_state(eqx.nn.Sequential)([
        conv(1, 8, k[0]), bn(8), eqx.nn.Dropout(0.05), eqx.nn.Lambda(jax.nn.relu),
        conv(8, 16, k[1]), bn(16), eqx.nn.Dropout(0.1), eqx.nn.Lambda(jax.nn.relu),
        conv(16, 32, k[2]), eqx.nn.Lambda(lambda x: jnp.mean(x, axis=(1, 2))), eqx.nn.Linear(32, 10, key=k[3]),
    ])  # fmt: skip
    return model, state


def test_cnn_fixture_through_normbridge_convert_without_mapping() -> None:
    """``normbridge.convert`` of the loaded real-treex CNN into a hand-written Equinox CNN, no mapping: the
    Dropout keys (treex ``Rng`` leaves of their ``KeySeq``) are RNG state, skipped and reported; the
    Equinox model reproduces the fixture's ``y_eval`` (recorded by real treex) within 1e-5 relative."""
    import equinox as eqx
    import jax
    import numpy as np

    import normbridge

    fx = next(f for f in FIXTURES if f["name"] == "cnn_mnist_evalsaved")
    exp = tf.expected(FOLDER, fx)
    x, xe = exp["x"], np.moveaxis(exp["x"], -1, 1)
    model = tx.load(FOLDER / "cnn_mnist_evalsaved.cloudpickle.pkl")
    keys = [np.asarray(model.layers[i].next_key.key) for i in (2, 6)]
    like = _equinox_cnn(3)
    (emodel, estate), report = normbridge.convert(model, like, probe=(x, xe))
    assert report.verified, str(report)
    assert report.skipped_state == ("source layers/2/next_key/key", "source layers/6/next_key/key")
    assert {"source layers/2", "source layers/6"} <= set(report.skipped)  # the Dropouts: stateless
    assert {(p.source, p.target) for p in report.pairs} == {(f"layers/{i}", f"layers/{i}") for i in (0, 1, 4, 5, 8, 10)}
    assert "RNG state, not converted" in str(report) and "skipped_state" in report.to_json()
    emodel = eqx.nn.inference_mode(emodel)
    y, _ = jax.vmap(emodel, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(xe, estate)
    _, d, tol = tf._case("convert y_eval", exp["y_eval"], np.asarray(y), 1e-5)
    assert d.within(tol), d.text()
    assert not np.array_equal(np.asarray(like[0].layers[0].weight), np.asarray(emodel.layers[0].weight))
    for i, key in zip((2, 6), keys):  # the source is untouched
        np.testing.assert_array_equal(model.layers[i].next_key.key, key)
