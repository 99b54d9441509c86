"""Unit tests of the equinox facade: warnings, errors (same type as native), InstanceNorm, canonical records."""

from __future__ import annotations

import importlib
import sys
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normbridge.adapters.equinox as nb
from normbridge.adapters.equinox import from_canonical, to_canonical
from normbridge.conformance import equinox_measure as em
from normbridge.core import NormRecord


def raised(fn):
    try:
        fn()
    except Exception as err:
        return err
    return None


def same_error(native_fn, facade_fn) -> Exception:
    """Both raise, with the same exception type; returns the facade's error."""
    n, f = raised(native_fn), raised(facade_fn)
    assert n is not None and f is not None, (n, f)
    assert type(n) is type(f), (n, f)
    return f


def test_batch_norm_legacy_mode_warns_like_native() -> None:
    with pytest.warns(UserWarning, match="defaults to 'ema'") as rec_f:
        f = nb.BatchNorm(3, "batch")
    with pytest.warns(UserWarning, match="defaults to 'ema'") as rec_n:
        eqx.nn.BatchNorm(3, "batch")
    assert str(rec_f[0].message) == str(rec_n[0].message)
    assert f.mode == "ema"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nb.BatchNorm(3, "batch", mode="batch")  # explicit mode: no warning


def test_layer_norm_elementwise_affine_is_deprecated_like_native() -> None:
    with pytest.warns(UserWarning, match="elementwise_affine"):
        f = nb.LayerNorm(3, elementwise_affine=False)
    with pytest.warns(UserWarning, match="elementwise_affine"):
        n = eqx.nn.LayerNorm(3, elementwise_affine=False)
    assert (f.use_weight, f.use_bias, f.weight, f.bias) == (n.use_weight, n.use_bias, None, None)


@pytest.mark.parametrize(
    "make",
    [
        lambda ns: ns.BatchNorm(3, "batch", mode="bogus"),
        lambda ns: ns.GroupNorm(4, 6),
        lambda ns: ns.GroupNorm(2, None),
        lambda ns: ns.SpectralNorm(ns.LayerNorm(3), "weight", key=jax.random.PRNGKey(0)),
    ],
    ids=["bn-mode", "gn-divide", "gn-channels", "sn-1d-weight"],
)
def test_constructor_errors_match_native(make) -> None:
    err = same_error(lambda: make(eqx.nn), lambda: make(nb))
    assert type(err).__name__ in str(type(err))  # a real exception instance
    assert err.args and err.args[0]


def test_batch_norm_without_named_axis_raises_name_error() -> None:
    """Native raises NameError outside vmap or under a vmap with another axis name; so does the facade."""
    x = jnp.ones((4, 3))
    for cls in (eqx.nn.BatchNorm, nb.BatchNorm):
        model, state = em.make(cls, 3, "batch", mode="batch")
        with pytest.raises(NameError):
            model(x[0], state)
        with pytest.raises(NameError):
            jax.vmap(model, axis_name="other", in_axes=(0, None), out_axes=(0, None))(x, state)


def test_layer_norm_shape_error_names_layer_and_shapes() -> None:
    x = jnp.ones((4, 2, 3))
    err = same_error(lambda: eqx.nn.LayerNorm((2, 3))(x), lambda: nb.LayerNorm((2, 3))(x))
    assert "LayerNorm" in str(err) and "(2, 3)" in str(err) and "(4, 2, 3)" in str(err)
    err = same_error(lambda: eqx.nn.RMSNorm(3)(jnp.ones((2, 3))), lambda: nb.RMSNorm(3)(jnp.ones((2, 3))))
    assert "RMSNorm" in str(err)


def test_batch_norm_ema_bf16_input_f32_state_type_error_reproduced() -> None:
    """equinox: mode='ema' with bf16 input and the default f32 state raises TypeError (lax.select); reproduced."""
    x = jnp.ones((4, 3), jnp.bfloat16)
    for cls in (eqx.nn.BatchNorm, nb.BatchNorm):
        model, state = em.make(cls, 3, "batch", mode="ema")
        with pytest.raises(TypeError, match=r"lax\.select"):
            jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)


def test_instance_norm_equals_facade_group_norm_c_c() -> None:
    x = em.data((3,), (5, 4, 3, 2), jnp.float32)
    inorm, gnorm = em.randomize(nb.GroupNorm(4, 4), nb.InstanceNorm(4), (1,))
    np.testing.assert_array_equal(jax.vmap(inorm)(x), jax.vmap(gnorm)(x))
    with pytest.raises(ValueError, match="InstanceNorm"):
        nb.InstanceNorm(4)(jnp.ones((3, 2)))


def test_stateless_norms_pass_state_through() -> None:
    _, state = em.make(nb.BatchNorm, 3, "batch", mode="batch")
    for layer in (nb.LayerNorm(3), nb.RMSNorm(3), nb.GroupNorm(3, 3), nb.InstanceNorm(3)):
        out, same = layer(jnp.arange(3.0), state)
        assert same is state and out.shape == (3,)


def test_markers_equal_native() -> None:
    for mode in ("ema", "batch"):
        args = (3, "batch", 1e-5, True, 0.99, False, None, mode)
        (_, ns), (_, fs) = em.make(eqx.nn.BatchNorm, *args), em.make(nb.BatchNorm, *args)
        assert list(em.state_dict(ns)) == list(em.state_dict(fs))
    lin = eqx.nn.Linear(3, 2, key=jax.random.PRNGKey(0))
    key = jax.random.PRNGKey(1)
    (_, ns), (_, fs) = (em.make(c, lin, "weight", key=key) for c in (eqx.nn.SpectralNorm, nb.SpectralNorm))
    assert list(em.state_dict(ns)) == list(em.state_dict(fs)) == ["SpectralNorm.uv_index"]


def test_canonical_refuses_changes_of_math() -> None:
    model, state = em.make(nb.BatchNorm, 3, "batch", mode="batch")
    rec = to_canonical(model, state)
    assert rec.stats_convention == "zero_debiased" and int(rec.count) == 0
    with pytest.raises(ValueError, match="eps"):
        from_canonical(rec.replace(epsilon=1e-3), model, em.clone(state))
    ema_model, ema_state = em.make(nb.BatchNorm, 3, "batch", mode="ema")
    with pytest.raises(ValueError, match="statistics convention"):
        from_canonical(rec, ema_model, ema_state)
    with pytest.raises(ValueError, match="kind"):
        from_canonical(rec, nb.LayerNorm(3))
    with pytest.raises(ValueError, match="shape"):
        from_canonical(to_canonical(nb.LayerNorm(4)), nb.LayerNorm(3))
    with pytest.raises(ValueError, match="state"):
        to_canonical(model)
    with pytest.raises(TypeError, match="equinox normalization layer"):
        to_canonical(eqx.nn.Linear(2, 2, key=jax.random.PRNGKey(0)))


def test_canonical_native_to_facade_batch_norm_statistics() -> None:
    """A trained native BatchNorm's record loads into the facade, which then infers identically."""
    native, facade = em.make(eqx.nn.BatchNorm, 3, "batch", mode="ema"), em.make(nb.BatchNorm, 3, "batch", mode="ema")
    (nm, ns), (fm, fs) = native, facade
    nm, _ = em.randomize(nm, nm, (4,))
    x = em.data((5,), (6, 3), jnp.float32)
    _, ns = jax.vmap(nm, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, ns)
    rec = to_canonical(nm, ns)
    assert rec.stats_convention == "ema_blend" and int(rec.count) == 1
    fm, fs = from_canonical(rec, fm, fs)
    run = jax.vmap(lambda m, s, x: m(x, s, inference=True), in_axes=(None, None, 0), out_axes=(0, None),
                   axis_name="batch")
    np.testing.assert_array_equal(run(nm, ns, x)[0], run(fm, fs, x)[0])


def test_weight_norm_record_uses_kept_axis_shape() -> None:
    conv = eqx.nn.Conv2d(2, 5, 3, key=jax.random.PRNGKey(0))
    rec = to_canonical(nb.WeightNorm(conv))
    assert isinstance(rec, NormRecord) and rec.weight_scales["weight"].shape == (5,)
    rec_none = to_canonical(eqx.nn.WeightNorm(conv, axis=None))
    assert rec_none.weight_scales["weight"].shape == ()


def test_missing_equinox_names_the_extra(monkeypatch) -> None:
    """With equinox not importable, importing the facade raises ImportError naming the pip extra."""
    for name in list(sys.modules):
        if name == "equinox" or name.startswith(("equinox.", "normbridge.adapters.equinox")):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "equinox", None)  # makes `import equinox` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'normbridge\[equinox\]'"):
        importlib.import_module("normbridge.adapters.equinox")
