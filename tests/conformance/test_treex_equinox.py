"""treex → Equinox: a model loaded from a real treex fixture, converted, gives the fixture's eval outputs."""

from __future__ import annotations

import equinox as eqx
import jax
import numpy as np
import pytest

from normbridge import core
from normbridge.adapters import treex as tx
from normbridge.adapters.treex.to_equinox import to_canonical, to_equinox
from normbridge.conformance import treex_fixtures as tf

FOLDER = tf.fixtures_dir()
FIXTURES = tf.manifest(FOLDER)
BACKENDS = ["equinox", "normbridge"]


def _loaded(fx: dict, fmt: str) -> tx.Module:
    fl = next(f for f in fx["files"] if f["format"] == fmt)
    return tf.load_file(FOLDER, fx, fl)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fx", FIXTURES, ids=lambda f: f["name"])
def test_equinox_reproduces_fixture_eval(fx: dict, backend: str) -> None:
    fmt = "pickle" if (FOLDER / f"{fx['name']}.pickle.pkl").is_file() else "flax_msgpack_state_dict"
    module = _loaded(fx, fmt)
    name, d, tol = tf.equinox_eval(fx, module, tf.expected(FOLDER, fx), backend)
    assert d.within(tol), f"{name}: {d.text()}"


def test_sequential_structure_and_state() -> None:
    fx = next(f for f in FIXTURES if f["name"].startswith("sequential"))
    module = _loaded(fx, "npz_state_dict")
    model, state = to_equinox(module, backend="equinox")
    layers = model.layers
    assert [type(layer).__name__ for layer in layers] == ["Linear", "BatchNorm", "Lambda", "Linear", "LayerNorm"]
    # Linear kernel (in, out) -> Equinox weight (out, in)
    np.testing.assert_array_equal(np.asarray(layers[0].weight), np.asarray(module.layers[0].kernel).T)
    np.testing.assert_array_equal(np.asarray(layers[3].bias), np.asarray(module.layers[3].bias))
    bn = layers[1]
    assert bn.mode == "ema" and bn.inference and bn.momentum == pytest.approx(0.9) and bn.eps == 1e-5
    mean, var = state.get(bn.ema_state_index)
    np.testing.assert_array_equal(np.asarray(mean), np.asarray(module.layers[1].mean))
    np.testing.assert_array_equal(np.asarray(var), np.asarray(module.layers[1].var))
    assert not bool(state.get(bn.ema_first_time_index))
    assert layers[2].fn is jax.nn.relu


def test_canonical_record_of_loaded_layers() -> None:
    fx = next(f for f in FIXTURES if f["name"] == "batchnorm_axis1_nobias_frozensaved")
    bn = _loaded(fx, "pickle")
    rec = to_canonical(bn)
    assert isinstance(rec, core.NormRecord)
    assert rec.kind == "batch_norm" and rec.stats_convention == "ema" and rec.feature_axes == (1,)
    assert rec.bias is None and rec.scale is bn.scale and rec.mean is bn.mean
    assert rec.epsilon == 1e-4 and rec.momentum == pytest.approx(0.8)
    gn = _loaded(next(f for f in FIXTURES if f["name"] == "groupnorm_gs3_eps1e-3_nobias"), "pickle")
    assert to_canonical(gn).num_groups == 2


def test_equinox_batchnorm_can_keep_training_in_ema_mode() -> None:
    """The converted BatchNorm is a real Equinox layer: training mode updates the copied statistics."""
    fx = next(f for f in FIXTURES if f["name"] == "batchnorm_default")
    model, state = to_equinox(_loaded(fx, "pickle"), backend="equinox")
    model = eqx.nn.inference_mode(model, False)
    x = tf.expected(FOLDER, fx)["x"]
    _, new_state = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)
    mean, _ = new_state.get(model.ema_state_index)
    batch_mean = x.mean(0)
    blended = 0.99 * np.asarray(_loaded(fx, "pickle").mean) + 0.01 * batch_mean
    np.testing.assert_allclose(np.asarray(mean), blended, rtol=1e-5, atol=1e-6)


def test_unsupported_layer_is_a_type_error() -> None:
    class Custom(tx.Module):
        def __call__(self, x):
            return x

    with pytest.raises(TypeError, match="no Equinox equivalent for Custom"):
        to_equinox(Custom())
