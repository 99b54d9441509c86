"""treex's non-norm layers (Conv, ConvTranspose, Embed, Dropout/KeySeq, Flatten, MLP) against flax.linen.

treex 0.6.12 wrapped flax 0.4.1's modules; flax.linen's Conv/ConvTranspose/Embed/Dense/Dropout
compute the same thing with the same ``lax`` calls, so with the same parameters the facade must agree
bitwise (same operation order), and ``init`` with the same key must give flax's parameters for the
key treex handed to flax (``split(key)[0]``, jax's non-partitionable threefry as in jax 0.4).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from normbridge.adapters import treex as tx

RNG = np.random.default_rng(0)


def _flax_init(module: nn.Module, key: int, x: np.ndarray):
    with jax.threefry_partitionable(False):
        return module.init(jax.random.split(jax.random.PRNGKey(key))[0], x)["params"]


CONV_CASES = [
    ("1d", dict(features_out=4, kernel_size=[3]), (2, 9, 3)),
    ("2d", dict(features_out=5, kernel_size=[3, 3], strides=[2, 2]), (2, 9, 8, 3)),
    ("3d", dict(features_out=2, kernel_size=[2, 2, 2], padding="VALID"), (1, 4, 5, 6, 2)),
    ("groups", dict(features_out=6, kernel_size=[3, 3], feature_group_count=3), (2, 7, 7, 6)),
    ("dilation", dict(features_out=3, kernel_size=[3, 3], kernel_dilation=[2, 1], input_dilation=[1, 2],
                      padding=[(1, 1), (0, 0)]), (2, 8, 8, 2)),
    ("pairs", dict(features_out=3, kernel_size=[3, 2], padding=[(1, 2), (0, 1)], use_bias=False), (2, 6, 6, 2)),
    ("circular", dict(features_out=3, kernel_size=[3, 3], padding="CIRCULAR"), (2, 5, 5, 2)),
    ("unbatched", dict(features_out=3, kernel_size=[3, 3]), (6, 6, 2)),
]  # fmt: skip


@pytest.mark.parametrize(("name", "cfg", "shape"), CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv_matches_flax(name: str, cfg: dict, shape: tuple) -> None:
    x = RNG.normal(size=shape).astype(np.float32)
    conv = tx.Conv(**cfg).init(3, x)
    flax_cfg = {k: v for k, v in cfg.items() if k != "features_out"}
    native = nn.Conv(cfg["features_out"], **flax_cfg)
    params = _flax_init(native, 3, x)
    np.testing.assert_array_equal(conv.kernel, params["kernel"])  # same key → same parameters
    if cfg.get("use_bias", True):
        np.testing.assert_array_equal(conv.bias, params["bias"])
    y = native.apply({"params": params}, x)
    np.testing.assert_array_equal(conv(x), y)
    assert conv.kernel.shape == params["kernel"].shape and conv(x).dtype == y.dtype


def test_conv_int_kernel_size_refused_as_flax_0_4_did() -> None:
    with pytest.raises(TypeError, match="must be specified as a tuple/list"):
        tx.Conv(3, 3).init(0, np.zeros((1, 5, 2), np.float32))


@pytest.mark.parametrize("padding", ["SAME", "VALID", [(1, 0), (2, 1)]])
def test_conv_transpose_matches_flax(padding) -> None:
    x = RNG.normal(size=(2, 5, 4, 3)).astype(np.float32)
    layer = tx.ConvTranspose(4, [3, 2], strides=[2, 1], padding=padding).init(1, x)
    native = nn.ConvTranspose(4, (3, 2), strides=(2, 1), padding=padding)
    params = _flax_init(native, 1, x)
    np.testing.assert_array_equal(layer.kernel, params["kernel"])
    np.testing.assert_array_equal(layer(x), native.apply({"params": params}, x))


def test_embed_matches_flax() -> None:
    ids = RNG.integers(0, 11, size=(3, 5)).astype(np.int32)
    layer = tx.Embed(11, 4).init(2, ids)
    native = nn.Embed(11, 4)
    params = _flax_init(native, 2, ids)
    np.testing.assert_array_equal(layer.embedding, params["embedding"])
    np.testing.assert_array_equal(layer(ids), native.apply({"params": params}, ids))
    q = RNG.normal(size=(2, 4)).astype(np.float32)
    np.testing.assert_allclose(layer.attend(q), native.apply({"params": params}, q, method=native.attend), 1e-6)
    with pytest.raises(ValueError, match="Input type must be an integer"):
        layer(np.zeros((2,), np.float32))


def test_dropout_mask_is_flax_mask_from_the_stored_key() -> None:
    x = RNG.normal(size=(4, 6)).astype(np.float32) + 3.0
    layer = tx.Dropout(0.5, broadcast_dims=(0,)).init(0, x)
    key0 = layer.next_key.key
    y = layer(x)
    mask_key, new_key = jax.random.split(key0) if False else (None, None)
    with jax.threefry_partitionable(False):
        mask_key, new_key = jax.random.split(key0)
        ref = nn.Dropout(0.5, broadcast_dims=(0,), deterministic=False).apply({}, x, rngs={"dropout": mask_key})
    np.testing.assert_array_equal(y, ref)
    np.testing.assert_array_equal(layer.next_key.key, new_key)  # the stored key advanced
    assert (np.asarray(y) == 0).any() and np.all((np.asarray(y) == 0).all(0) | (np.asarray(y) != 0).all(0))
    frozen = layer.freeze()
    np.testing.assert_array_equal(frozen(x), x)  # inactive: identity, key unchanged
    np.testing.assert_array_equal(frozen.next_key.key, layer.next_key.key)
    np.testing.assert_array_equal(layer.eval()(x), x)
    assert tx.Dropout(0.5).next_key.key is None
    assert issubclass(layer._field_metadata["next_key"].kind, type(None))
    assert layer.next_key._field_metadata["key"].kind is tx.Rng


def test_keyseq_seed_and_split() -> None:
    seq = tx.KeySeq(7)
    first = seq()
    with jax.threefry_partitionable(False):
        want_first, want_next = jax.random.split(jax.random.PRNGKey(7))
    np.testing.assert_array_equal(first, want_first)
    np.testing.assert_array_equal(seq.key, want_next)


def test_mlp_and_flatten_match_flax_dense_chain() -> None:
    x = RNG.normal(size=(3, 2, 5)).astype(np.float32)
    model = tx.Sequential(tx.Flatten(), tx.MLP([6, 4], activation=jax.nn.tanh)).init(5, x)
    mlp = model.layers[1]
    assert mlp._subtrees == ("linear", "linear2") and mlp.name == "mlp" and mlp.linear.name == "linear"
    flat = x.reshape(3, -1)
    ref = jnp.tanh(flat @ mlp.linear.kernel + mlp.linear.bias) @ mlp.linear2.kernel + mlp.linear2.bias
    np.testing.assert_allclose(model(x), ref, rtol=1e-6, atol=1e-6)
    with jax.threefry_partitionable(False):  # treex's @compact spends a key on each child first
        k = jax.random.PRNGKey(5)
        keys = []
        for _ in range(4):
            a, k = jax.random.split(k)
            keys.append(a)
    params = nn.Dense(6).init(keys[1], flat)["params"]
    with jax.threefry_partitionable(False):
        params = nn.Dense(6).init(keys[1], flat)["params"]
    np.testing.assert_array_equal(mlp.linear.kernel, params["kernel"])
    assert tx.Flatten()(np.zeros((2, 3, 4))).shape == (2, 12)


def test_norm_layer_init_is_flax_init_with_treex_key() -> None:
    """issue 11 item 5: random scale/bias initializers give real treex's values (flax with split(key)[0])."""
    x = RNG.normal(size=(4, 6)).astype(np.float32)
    normal = jax.nn.initializers.normal(1.0)
    both = {"bias_init": normal, "scale_init": normal}
    for layer, native in [
        (tx.LayerNorm(**both), nn.LayerNorm(epsilon=1e-5, **both)),
        (tx.BatchNorm(**both), nn.BatchNorm(use_running_average=True, **both)),
        (tx.GroupNorm(num_groups=2, bias_init=normal), nn.GroupNorm(num_groups=2, bias_init=normal)),
        (tx.Linear(3, kernel_init=normal, bias_init=normal), nn.Dense(3, kernel_init=normal, bias_init=normal)),
    ]:  # fmt: skip
        got = layer.init(11, x)
        want = _flax_init(native, 11, x)
        for name, value in want.items():
            np.testing.assert_array_equal(getattr(got, name), value, err_msg=f"{type(layer).__name__}.{name}")


def test_sequential_init_takes_one_key_per_layer_in_order() -> None:
    x = RNG.normal(size=(4, 6)).astype(np.float32)
    normal = jax.nn.initializers.normal(1.0)
    model = tx.Sequential(tx.Linear(5, bias_init=normal), tx.LayerNorm(bias_init=normal), jax.nn.relu,
                          tx.Linear(2, bias_init=normal)).init(3, x)  # fmt: skip
    with jax.threefry_partitionable(False):
        k = jax.random.PRNGKey(3)
        keys = []
        for _ in range(3):
            a, k = jax.random.split(k)
            keys.append(a)
        p0 = nn.Dense(5, bias_init=normal).init(keys[0], x)["params"]
        h = x @ p0["kernel"] + p0["bias"]
        p1 = nn.LayerNorm(bias_init=normal).init(keys[1], h)["params"]
        p3 = nn.Dense(2, bias_init=normal).init(keys[2], h)["params"]
    np.testing.assert_array_equal(model.layers[0].bias, p0["bias"])
    np.testing.assert_array_equal(model.layers[1].bias, p1["bias"])
    np.testing.assert_array_equal(model.layers[3].kernel, p3["kernel"])


def test_new_layers_save_and_load_round_trip(tmp_path) -> None:
    x = RNG.normal(size=(2, 8, 8, 3)).astype(np.float32)
    model = tx.Sequential(
        tx.Conv(4, [3, 3], kernel_init=jax.nn.initializers.zeros), tx.Dropout(0.2), jax.nn.relu,
        functools.partial(jnp.mean, axis=(1, 2)), tx.MLP([5, 2], kernel_init=jax.nn.initializers.zeros),
    ).init(0, x)  # fmt: skip
    for fmt in ("pickle", "cloudpickle"):
        path = tmp_path / f"m.{fmt}.pkl"
        tx.save(model, path, format=fmt)
        loaded = tx.load(path)
        np.testing.assert_array_equal(loaded.eval()(x), model.eval()(x))
        np.testing.assert_array_equal(loaded.layers[1].next_key.key, model.layers[1].next_key.key)
    for fmt in ("msgpack", "npz"):
        path = tmp_path / f"m.{fmt}"
        tx.save(model, path, format=fmt)
        np.testing.assert_array_equal(tx.load(path, template=model).eval()(x), model.eval()(x))


try:
    from hypothesis import given
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    given = None


@st.composite
def _conv_configs(draw):
    n = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2]))
    cin = groups * draw(st.integers(1, 2))
    features = groups * draw(st.integers(1, 3))
    kernel = [draw(st.integers(1, 3)) for _ in range(n)]
    strides = draw(st.one_of(st.none(), st.integers(1, 2), st.lists(st.integers(1, 2), min_size=n, max_size=n)))
    dilation = draw(st.one_of(st.none(), st.lists(st.integers(1, 2), min_size=n, max_size=n)))
    pairs = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2)), min_size=n, max_size=n)
    padding = draw(st.one_of(st.sampled_from(["SAME", "VALID", "CIRCULAR"]), pairs))
    spatial = [draw(st.integers(4, 7)) for _ in range(n)]
    cfg = dict(features_out=features, kernel_size=kernel, strides=strides, kernel_dilation=dilation,
               padding=padding, feature_group_count=groups, use_bias=draw(st.booleans()))  # fmt: skip
    return cfg, (2, *spatial, cin), draw(st.integers(0, 2**16))


@given(_conv_configs())
def test_conv_property_matches_flax(case) -> None:
    """Any rank, strides, dilation, groups and padding form: init and outputs bitwise equal to flax.linen.Conv."""
    cfg, shape, seed = case
    x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    layer = tx.Conv(**cfg).init(seed, x)
    flax_cfg = {k: v for k, v in cfg.items() if k != "features_out"}
    native = nn.Conv(cfg["features_out"], **flax_cfg)
    params = _flax_init(native, seed, x)
    np.testing.assert_array_equal(layer.kernel, params["kernel"])
    np.testing.assert_array_equal(layer(x), native.apply({"params": params}, x))


def test_sequence_composes_callables() -> None:
    x = RNG.normal(size=(2, 3)).astype(np.float32)
    lin = tx.Linear(4).init(0, x)
    np.testing.assert_array_equal(tx.sequence(lin, jax.nn.relu)(x), jax.nn.relu(lin(x)))
