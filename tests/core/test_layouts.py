"""normbridge.core.layouts: a flax layer and the Equinox layer holding the converted arrays compute the
same function (measured on the same input, native libraries on both sides), and the round trip is bit-exact."""

from __future__ import annotations

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from normbridge.core import layouts

KEY = jax.random.key(0)


def _close(a, b, rel=1e-5):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    assert np.max(np.abs(a - b)) <= rel * max(1.0, np.max(np.abs(a))), np.max(np.abs(a - b))


def _round_trip(kind, record, **kw):
    eq = layouts.equinox_from_canonical(kind, record)
    back = layouts.equinox_to_canonical(kind, eq, **kw)
    assert back.keys() == record.keys()
    for k in record:
        assert np.array_equal(np.asarray(back[k]), np.asarray(record[k])), k


def test_dense() -> None:
    x = jax.random.normal(KEY, (3, 5))
    v = nn.Dense(4).init(KEY, x)["params"]
    eq = layouts.equinox_from_canonical("dense", v)
    lin = eqx.nn.Linear(5, 4, key=KEY)
    lin = eqx.tree_at(lambda m: (m.weight, m.bias), lin, (eq["weight"], eq["bias"]))
    _close(nn.Dense(4).apply({"params": v}, x), jax.vmap(lin)(x))
    _round_trip("dense", dict(v))


@pytest.mark.parametrize("dims,groups", [(1, 1), (2, 2), (3, 1)])
def test_conv(dims: int, groups: int) -> None:
    x = jax.random.normal(KEY, (2, *(5,) * dims, 4))
    layer = nn.Conv(6, (3,) * dims, padding="VALID", feature_group_count=groups)
    v = layer.init(KEY, x)["params"]
    eq = layouts.equinox_from_canonical("conv", v)
    conv = eqx.nn.Conv(dims, 4, 6, 3, groups=groups, key=KEY)
    conv = eqx.tree_at(lambda m: (m.weight, m.bias), conv, (eq["weight"], eq["bias"]))
    y_eq = jax.vmap(conv)(jnp.moveaxis(x, -1, 1))
    _close(layer.apply({"params": v}, x), jnp.moveaxis(y_eq, 1, -1))
    _round_trip("conv", dict(v))


def test_conv_transpose() -> None:
    x = jax.random.normal(KEY, (2, 5, 5, 3))
    layer = nn.ConvTranspose(4, (3, 3), strides=(2, 2), padding="VALID")
    v = layer.init(KEY, x)["params"]
    eq = layouts.equinox_from_canonical("conv_transpose", v)
    conv = eqx.nn.ConvTranspose(2, 3, 4, 3, stride=2, key=KEY)
    conv = eqx.tree_at(lambda m: (m.weight, m.bias), conv, (eq["weight"], eq["bias"]))
    y_eq = jax.vmap(conv)(jnp.moveaxis(x, -1, 1))
    _close(layer.apply({"params": v}, x), jnp.moveaxis(y_eq, 1, -1))
    _round_trip("conv_transpose", dict(v))


def test_attention() -> None:
    d, h = 8, 2
    x = jax.random.normal(KEY, (2, 5, d))
    layer = nn.MultiHeadDotProductAttention(num_heads=h)
    v = layer.init(KEY, x)["params"]
    flat = {f"{p}/{k}": a for p, sub in v.items() for k, a in sub.items()}
    eq = layouts.equinox_from_canonical("attention", flat)
    mha = eqx.nn.MultiheadAttention(
        h, d, use_query_bias=True, use_key_bias=True, use_value_bias=True, use_output_bias=True, key=KEY
    )
    mha = _set(mha, eq)
    y_eq = jax.vmap(lambda t: mha(t, t, t))(x)
    _close(layer.apply({"params": v}, x), y_eq)
    _round_trip("attention", flat, num_heads=h)


def _set(mha, arrays):
    for name, value in arrays.items():
        field, leaf = name.split("/")
        mha = eqx.tree_at(lambda m, f=field, lf=leaf: getattr(getattr(m, f), lf), mha, value)
    return mha
