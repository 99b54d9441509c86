"""One small architecture in linen and in Equinox, for ``normbridge diff`` across frameworks
(``--a-model`` / ``--b-model tests.checkpoint.diff_factories:...``). The linen layers are named as
Equinox's fields, its list of Dense layers is linen's ``layers_0``/``layers_1`` (Equinox's
``layers/0``/``layers/1``); ``conv`` has a bias, ``conv2`` has none (Conv or an N-D norm? the
Equinox file alone cannot tell). Both are built abstractly (``jax.eval_shape``; Equinox's then as
zeros): normbridge reads their structure, shapes and dtypes, and the checkpoint gives the values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

C, HW = 4, 5


def linen_model():
    import flax.linen as nn

    class Net(nn.Module):
        def setup(self):
            self.conv = nn.Conv(C, (3, 3))
            self.bn = nn.BatchNorm(momentum=0.9)
            self.conv2 = nn.Conv(C, (3, 3), use_bias=False)
            self.layers = [nn.Dense(6), nn.Dense(3)]
            self.ln = nn.LayerNorm()

        def __call__(self, x, train: bool = False):
            x = nn.relu(self.bn(self.conv(x), use_running_average=not train))
            x = self.conv2(x).mean(axis=(1, 2))
            return self.ln(self.layers[1](nn.relu(self.layers[0](x))))

    module = Net()
    return module, jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, HW, HW, 3)))


def equinox_model():
    import equinox as eqx

    class Net(eqx.Module):
        conv: eqx.nn.Conv2d
        bn: eqx.nn.BatchNorm
        conv2: eqx.nn.Conv2d
        layers: list
        ln: eqx.nn.LayerNorm

        def __init__(self, key):
            k = jax.random.split(key, 4)
            self.conv = eqx.nn.Conv2d(3, C, 3, padding=1, key=k[0])
            self.bn = eqx.nn.BatchNorm(C, axis_name="batch", momentum=0.9, mode="ema")
            self.conv2 = eqx.nn.Conv2d(C, C, 3, padding=1, use_bias=False, key=k[1])
            self.layers = [eqx.nn.Linear(C, 6, key=k[2]), eqx.nn.Linear(6, 3, key=k[3])]
            self.ln = eqx.nn.LayerNorm(3, eps=1e-6)

        def __call__(self, x, state):
            x, state = self.bn(self.conv(x), state)
            x = self.conv2(jax.nn.relu(x)).mean(axis=(1, 2))
            return self.ln(self.layers[1](jax.nn.relu(self.layers[0](x)))), state

    abstract = eqx.filter_eval_shape(eqx.nn.make_with_state(Net), jax.random.key(1))
    return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype) if isinstance(s, jax.ShapeDtypeStruct) else s,
                                  abstract,  # Equinox loads into arrays
                                  is_leaf=lambda s: isinstance(s, jax.ShapeDtypeStruct))


def probes():
    """``(linen input, Equinox input)``: the same images, channels last and channels first."""
    x = jax.random.normal(jax.random.key(2), (2, HW, HW, 3))
    return x, jnp.moveaxis(x, -1, 1)


VOCAB, SEQ, D, HEADS = 7, 3, 8, 2


def linen_attention():
    """Embed + multi-head self-attention (kernels ``(D, H, Dh)``), linen."""
    import flax.linen as nn

    class Att(nn.Module):
        @nn.compact
        def __call__(self, ids, train: bool = False):
            x = nn.Embed(VOCAB, D, name="embed")(ids)
            return nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attn")(x)

    module = Att()
    return module, jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, SEQ), jnp.int32))


def equinox_attention():
    """The same in Equinox (projections ``(H·Dh, D)``, the number of heads a static field)."""
    import equinox as eqx

    class Att(eqx.Module):
        embed: eqx.nn.Embedding
        attn: eqx.nn.MultiheadAttention

        def __init__(self, key):
            k1, k2 = jax.random.split(key)
            self.embed = eqx.nn.Embedding(VOCAB, D, key=k1)
            self.attn = eqx.nn.MultiheadAttention(HEADS, D, use_query_bias=True, use_key_bias=True,
                                                  use_value_bias=True, use_output_bias=True, key=k2)

        def __call__(self, ids):
            x = jax.vmap(self.embed)(ids)
            return self.attn(x, x, x)

    abstract = eqx.filter_eval_shape(Att, jax.random.key(1))
    return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype) if isinstance(s, jax.ShapeDtypeStruct) else s,
                                  abstract, is_leaf=lambda s: isinstance(s, jax.ShapeDtypeStruct))
