"""treex ``to_canonical`` / ``from_canonical``: every layer kind, bit-exact round trips, validation before writing."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from normbridge import core
from normbridge.adapters import treex as tx

# the module (the package attribute `to_equinox` is the function of that name)
CONVERT = importlib.import_module("normbridge.adapters.treex.to_equinox")

X = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3, 6)).astype(np.float32) * 2 + 1)


def _layers() -> dict[str, tx.Module]:
    return {
        "BatchNorm": tx.BatchNorm(momentum=0.9),
        "LayerNorm": tx.LayerNorm(),
        "RMSNorm": tx.RMSNorm(),
        "GroupNorm": tx.GroupNorm(num_groups=2),
        "InstanceNorm": tx.InstanceNorm(),
        "SpectralNorm": tx.SpectralNorm(tx.Linear(5)),
        "WeightNorm": tx.WeightNorm(tx.Linear(5)),
    }


def _trained(name: str, seed: int = 0) -> tx.Module:
    """An initialized layer whose every record array is random (not its init value)."""
    m = _layers()[name].init(seed, X)
    if name == "SpectralNorm":
        m(X, update_stats=True)
    elif name == "BatchNorm":
        m(X)
    rec = tx.to_canonical(m)
    keys = jax.random.split(jax.random.key(seed + 1), len(rec.arrays()))
    flat, treedef = jax.tree_util.tree_flatten(rec)
    flat = [a + jax.random.uniform(k, a.shape, a.dtype) for a, k in zip(flat, keys)]
    return tx.from_canonical(jax.tree_util.tree_unflatten(treedef, flat), m)


def _same(a: core.NormRecord, b: core.NormRecord) -> bool:
    fa, fb = a.arrays(), b.arrays()
    return fa.keys() == fb.keys() and all(
        np.asarray(fa[k]).dtype == np.asarray(fb[k]).dtype and np.array_equal(fa[k], fb[k]) for k in fa
    )


def test_exported() -> None:
    assert "from_canonical" in tx.__all__ and tx.from_canonical is CONVERT.from_canonical
    assert tx.from_canonical.__doc__ and "layout" in CONVERT.__doc__.lower()


@pytest.mark.parametrize("name", list(_layers()))
def test_round_trip_is_bit_exact_and_returns_a_copy(name: str) -> None:
    src = _trained(name)
    rec = tx.to_canonical(src)
    like = _layers()[name].init(0, X)  # same seed: a wrapper's own kernel is not in the record
    before = jax.tree_util.tree_leaves(like)
    out = tx.from_canonical(rec, like)
    assert out is not like and type(out) is type(like)
    assert all(a is b for a, b in zip(before, jax.tree_util.tree_leaves(like))), "`like` was modified"
    assert _same(tx.to_canonical(out), rec)
    assert not _same(tx.to_canonical(like), rec), "the target must start from other values"
    # the loaded layer computes what the source computes, bit for bit
    run = (lambda m: m.eval()(X)) if name != "SpectralNorm" else (lambda m: m(X, update_stats=False))
    np.testing.assert_array_equal(run(src), run(out))


def test_layouts() -> None:
    sn = _trained("SpectralNorm")
    rec = tx.to_canonical(sn)
    assert list(rec.spectral) == ["kernel"] and rec.spectral["kernel"].u.shape == (5,)
    assert tx.from_canonical(rec, sn).u.shape == (1, 5)
    assert rec.spectral["kernel"].sigma.shape == () and rec.epsilon == 1e-12 and rec.option("n_steps") == 1
    wn = tx.WeightNorm(tx.Linear(5), feature_axes=None).init(0, X)
    rec = tx.to_canonical(wn)
    assert rec.weight_scales["kernel"].shape == () and rec.feature_axes is None
    assert tx.to_canonical(_trained("RMSNorm")).kind == "rms_norm" and tx.to_canonical(_trained("RMSNorm")).bias is None
    inst = tx.to_canonical(_trained("InstanceNorm"))
    assert inst.kind == "instance_norm" and inst.scale.shape == (6,) and inst.bias.shape == (6,)
    bn = tx.to_canonical(_trained("BatchNorm"))
    assert bn.stats_convention == "ema" and bn.momentum == float(np.float32(0.9))


def test_refusals_name_the_layer_and_every_path_before_writing() -> None:
    bn = _trained("BatchNorm")
    rec = tx.to_canonical(bn)
    like = tx.BatchNorm(momentum=0.9).init(3, X)
    with pytest.raises(ValueError, match=r"from_canonical\(LayerNorm\): record kind 'batch_norm'"):
        tx.from_canonical(rec, tx.LayerNorm().init(0, X))
    bad = rec.replace(scale=jnp.ones((5,)), var=jnp.ones((6,), jnp.bfloat16), bias=None)
    with pytest.raises(ValueError, match=r"from_canonical\(BatchNorm\)") as info:
        tx.from_canonical(bad, like)
    msg = str(info.value)
    assert "'scale' has shape (5,)" in msg and "'var' has dtype bfloat16" in msg and "'bias'" in msg
    with pytest.raises(ValueError, match=r"from_canonical\(BatchNorm\): epsilon is 1e-05 but the record has 0.001"):
        tx.from_canonical(rec.replace(epsilon=1e-3), like)
    with pytest.raises(ValueError, match=r"from_canonical\(BatchNorm\): momentum \(float32\)"):
        tx.from_canonical(rec.replace(momentum=0.99), like)
    with pytest.raises(ValueError, match=r"'bias' but the layer does not use it"):
        tx.from_canonical(rec, tx.BatchNorm(momentum=0.9, use_bias=False).init(0, X))
    with pytest.raises(ValueError, match=r"from_canonical\(LayerNorm\): the record has 'mean'"):
        ln = tx.to_canonical(_trained("LayerNorm"))
        tx.from_canonical(ln.replace(mean=jnp.zeros(6)), tx.LayerNorm().init(0, X))
    with pytest.raises(ValueError, match=r"from_canonical\(GroupNorm\): num_groups is 2 but the record has 3"):
        gn = tx.to_canonical(_trained("GroupNorm")).replace(num_groups=3)
        tx.from_canonical(gn, tx.GroupNorm(num_groups=2).init(0, X))
    with pytest.raises(ValueError, match=r"not initialized"):
        tx.from_canonical(rec, tx.BatchNorm(momentum=0.9))
    with pytest.raises(TypeError, match="not a treex normalization layer"):
        tx.from_canonical(rec, tx.Linear(3).init(0, X))
    # nothing was written into `like` by any refused call
    np.testing.assert_array_equal(like.mean, np.zeros(6, np.float32))


def test_wrapper_refusals() -> None:
    sn = _trained("SpectralNorm")
    rec = tx.to_canonical(sn)
    vec = rec.spectral["kernel"]
    with pytest.raises(ValueError, match=r"from_canonical\(SpectralNorm\): .*'spectral/kernel/v'"):
        tx.from_canonical(rec.replace(spectral={"kernel": core.SpectralVectors(vec.u, jnp.ones(6), vec.sigma)}), sn)
    with pytest.raises(ValueError, match=r"'spectral/weight' but the layer normalizes only 'kernel'"):
        tx.from_canonical(rec.replace(spectral={"weight": vec}), sn)
    with pytest.raises(ValueError, match=r"'spectral/kernel/u' has shape \(4,\)"):
        tx.from_canonical(rec.replace(spectral={"kernel": core.SpectralVectors(jnp.ones(4), None, vec.sigma)}), sn)
    wn = _trained("WeightNorm")
    wrec = tx.to_canonical(wn)
    with pytest.raises(ValueError, match=r"from_canonical\(WeightNorm\): .*'weight_scales/kernel' has shape \(\)"):
        tx.from_canonical(wrec.replace(weight_scales={"kernel": jnp.ones(())}), wn)
    with pytest.raises(ValueError, match=r"but the layer does not use it"):
        tx.from_canonical(wrec, tx.WeightNorm(tx.Linear(5), use_scale=False).init(0, X))


def test_zero_debiased_statistics_are_debiased_with_core() -> None:
    like = tx.BatchNorm(momentum=0.9).init(0, X)
    hidden = (jnp.linspace(0.1, 0.6, 6, dtype=jnp.float32), jnp.linspace(0.5, 1.5, 6, dtype=jnp.float32))
    rec = tx.to_canonical(like).replace(
        mean=hidden[0], var=hidden[1], count=jnp.asarray(3), stats_convention="zero_debiased"
    )
    out = tx.from_canonical(rec, like)
    mean, var = core.debias(hidden, rec.momentum, jnp.asarray(3))
    np.testing.assert_array_equal(out.mean, mean)
    np.testing.assert_array_equal(out.var, var)
    with pytest.raises(ValueError, match="needs count and momentum"):
        tx.from_canonical(rec.replace(count=None), like)


def _eqx_run(model, state, x):
    import jax

    return jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)[0]


def test_embed_flatten_linear_to_equinox() -> None:
    import jax
    import numpy as np

    ids = np.random.default_rng(1).integers(0, 11, size=(3, 5)).astype(np.int32)
    model = tx.Sequential(tx.Embed(11, 4), tx.Flatten(), jax.nn.gelu, tx.Linear(3)).init(0, ids)
    eqx_model, state = tx.to_equinox(model)
    np.testing.assert_allclose(_eqx_run(eqx_model, state, ids), model.eval()(ids), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("padding", ["SAME", "CIRCULAR", [(2, 0)]])
def test_conv1d_groups_flatten_to_equinox(padding) -> None:
    """After a Conv the Equinox activation is channels first; Flatten keeps treex's channels-last order."""
    import numpy as np

    x = np.random.default_rng(2).normal(size=(3, 9, 4)).astype(np.float32)
    model = tx.Sequential(
        tx.Conv(6, [3], strides=[2], padding=padding, feature_group_count=2, kernel_dilation=[1]),
        tx.BatchNorm(), tx.Dropout(0.3), tx.Flatten(), tx.Linear(2),
    ).init(0, x)  # fmt: skip
    model(x)  # one training step: non-trivial statistics
    eqx_model, state = tx.to_equinox(model)
    y = _eqx_run(eqx_model, state, np.moveaxis(x, -1, 1))
    np.testing.assert_allclose(y, model.eval()(x), rtol=1e-5, atol=1e-6)


def test_linear_on_a_spatial_activation_is_refused() -> None:
    import numpy as np

    x = np.zeros((2, 5, 5, 3), np.float32)
    model = tx.Sequential(tx.Conv(4, [3, 3]), tx.Linear(2)).init(0, x)
    with pytest.raises(ValueError, match="Linear on a spatial activation"):
        tx.to_equinox(model)
    with pytest.raises(TypeError, match="ConvTranspose is not converted"):
        tx.to_equinox(tx.Sequential(tx.ConvTranspose(2, [3, 3])).init(0, x))


def test_to_equinox_is_normbridge_convert_verified_with_a_probe() -> None:
    """to_equinox builds only the architecture; normbridge.convert pairs (by the builder's mapping), writes and,
    given a probe, verifies: the report lists every pair, the skipped Dropout key and the measured difference."""
    import jax
    import numpy as np

    x = np.random.default_rng(3).normal(size=(3, 8, 8, 2)).astype(np.float32)
    model = tx.Sequential(
        tx.Conv(4, [3, 3]), tx.BatchNorm(use_scale=False), tx.Dropout(0.2), jax.nn.relu,
        tx.GroupNorm(num_groups=2, use_bias=False), tx.Flatten(), tx.MLP([5, 3]),
    ).init(0, x)  # fmt: skip
    model(x)  # one training step: non-trivial statistics
    eqx_model, state, report = tx.to_equinox(model, probe=x, return_report=True)
    assert report.verified and report.verification.max_rel <= 1e-5, str(report)
    assert report.source_framework == "treex" and report.target_framework == "equinox"
    pairs = {p.source: (p.target, p.how) for p in report.pairs}
    assert pairs == {
        "layers/0": ("layers/0", "mapping"), "layers/1": ("layers/1", "mapping"), "layers/4": ("layers/4", "mapping"),
        "layers/6/linear": ("layers/6/layers/0", "mapping"), "layers/6/linear2": ("layers/6/layers/2", "mapping"),
    }  # fmt: skip
    bn = next(p for p in report.pairs if p.source == "layers/1")
    assert any("scale -> ones" in t for t in bn.transform)
    assert report.skipped_state == ("source layers/2/next_key/key",)
    y = _eqx_run(eqx_model, state, np.moveaxis(x, -1, 1))  # independently of the report
    np.testing.assert_allclose(y, model.eval()(x), rtol=1e-5, atol=1e-6)
    # a pair of probes is accepted as is; without a probe the same model, unverified and saying so
    _, _, report = tx.to_equinox(model, probe=(x, np.moveaxis(x, -1, 1)), return_report=True)
    assert report.verified
    same, same_state, report = tx.to_equinox(model, return_report=True)
    assert report.verification is None and not report.verified and "unverified" in str(report)
    np.testing.assert_array_equal(_eqx_run(same, same_state, np.moveaxis(x, -1, 1)), y)


def test_to_equinox_with_a_wrong_probe_layout_is_refused_not_accepted() -> None:
    import numpy as np

    import normbridge

    x = np.random.default_rng(4).normal(size=(3, 6, 6, 2)).astype(np.float32)
    model = tx.Sequential(tx.Conv(3, [3, 3]), tx.Flatten(), tx.Linear(2)).init(0, x)
    with pytest.raises(normbridge.ConversionError):
        tx.to_equinox(model, probe=(x, np.moveaxis(x, -1, 1)[:, :, ::-1]))  # the Equinox probe is another input


def test_bare_layer_converts_through_normbridge_convert() -> None:
    """A model that is one layer (path ""): treex BatchNorm -> Equinox BatchNorm and back, verified."""
    import equinox as eqx
    import numpy as np

    import normbridge

    x = np.asarray(X[:, 0])
    bn = tx.BatchNorm(momentum=0.9).init(0, x)
    bn(x)
    like = eqx.nn.make_with_state(eqx.nn.BatchNorm)(6, "batch", momentum=0.9, mode="ema")
    (model, state), report = normbridge.convert(bn, like, probe=x)
    assert report.verified and [(p.source, p.target, p.how) for p in report.pairs] == [("", "", "name")]
    mean, var = state.get(model.ema_state_index)
    np.testing.assert_array_equal(mean, bn.mean)
    np.testing.assert_array_equal(var, bn.var)
    back, report = normbridge.convert((model, state), tx.BatchNorm(momentum=0.9).init(1, x), probe=x)
    assert report.verified
    np.testing.assert_array_equal(back.mean, bn.mean)
    np.testing.assert_array_equal(back.scale, bn.scale)
