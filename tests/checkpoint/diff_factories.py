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


# The MLP and ResNet of normbridge.conformance.conversion_models, built abstractly: linen's layers keep
# linen's automatic names (Dense_0, BatchNorm_0, ResNetBlock_0/Conv_1, ...), Equinox's are its fields
# (dense1, bn, blocks/0/conv2, ...): only execution order pairs them.
def _linen(arch: str):
    from normbridge.conformance import conversion_models as cm

    module = cm.LINEN[arch](cm.NS["linen"]["native"])
    return module, jax.eval_shape(module.init, jax.random.key(0), cm.probe(arch, "linen"))


def _equinox(cls, *args):
    import equinox as eqx

    abstract = eqx.filter_eval_shape(eqx.nn.make_with_state(cls), *args, jax.random.key(1))
    return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype) if isinstance(s, jax.ShapeDtypeStruct) else s,
                                  abstract, is_leaf=lambda s: isinstance(s, jax.ShapeDtypeStruct))


def linen_mlp():
    return _linen("mlp")


def equinox_mlp():
    from normbridge.conformance import conversion_models as cm

    return _equinox(cm.EqxMlp, cm.NS["equinox"]["native"])


def linen_resnet():
    return _linen("resnet")


def equinox_resnet():
    from normbridge.conformance import conversion_models as cm

    return _equinox(cm.EqxResNet, cm.NS["equinox"]["native"])


def _mlp_with_extra_cls():
    """The Equinox MLP with one more Linear (``extra``, 4 → 4) called before ``head``: the linen MLP's
    third Dense (4 → 3) would be paired by execution order with ``extra``, whose shapes differ."""
    import equinox as eqx

    from normbridge.conformance import conversion_models as cm

    class MlpWithExtra(eqx.Module):
        dense1: eqx.nn.Linear
        bn: eqx.nn.BatchNorm
        ln: eqx.nn.LayerNorm
        dense2: eqx.nn.Linear
        rms: eqx.nn.RMSNorm
        extra: eqx.nn.Linear
        head: eqx.nn.Linear

        def __init__(self, key):
            k = jax.random.split(key, 4)
            self.dense1 = eqx.nn.Linear(6, cm.C, key=k[0])
            self.bn = eqx.nn.BatchNorm(cm.C, axis_name="batch", momentum=0.9, mode="ema")
            self.ln = eqx.nn.LayerNorm(cm.C, eps=1e-6)
            self.dense2 = eqx.nn.Linear(cm.C, cm.C, key=k[1])
            self.rms = eqx.nn.RMSNorm(cm.C, eps=1e-6, use_bias=False)
            self.extra = eqx.nn.Linear(cm.C, cm.C, key=k[2])
            self.head = eqx.nn.Linear(cm.C, cm.CLASSES, key=k[3])

        def __call__(self, x, state):
            x, state = self.bn(self.dense1(x), state)
            x = self.ln(jax.nn.relu(x))
            return self.head(self.extra(self.rms(self.dense2(x)))), state

    return MlpWithExtra


def equinox_mlp_with_extra():
    return _equinox(_mlp_with_extra_cls())
