"""The conversion architectures of tests/conversion and ``normbridge check``, once per framework (``ns``:
native layers or facades; treex: its facade only, treex itself no longer installs):

* ``resnet``: a ResNet in the style of flax's ``examples/imagenet/models.py``: stem ``conv_init`` /
  ``bn_init`` and blocks ``ResNetBlock_N`` (linen sorts the stem after the blocks); every BatchNorm has
  the same shape, so a shifted pairing is invisible to shape checks. The NNX/Equinox/treex blocks *define*
  ``bn2`` before ``bn1`` (definition order is not call order); linen, NNX, Equinox, treex;
* ``transformer``: a pre-LN encoder block: Embed + a bare ``pos_embedding`` parameter, LayerNorm,
  multi-head self-attention, LayerNorm, Dense MLP, final RMSNorm; linen, NNX, Equinox (the treex facade
  has no attention layer: docs/conversion.md, Limits);
* ``sngn``: Conv + GroupNorm + SpectralNorm(Dense) + WeightNorm(Dense); linen, NNX, Equinox, treex;
* ``mlp``: Dense + BatchNorm + LayerNorm + RMSNorm; linen, NNX, Equinox, treex.

``build(arch, framework, flavor)`` returns the model (in the form ``normbridge.convert`` takes) with
random, non-trivial state (random weights and running statistics, set in each framework's own layout
with its own API); ``probe(arch, framework)`` its input (Equinox: channels-first images);
``outputs`` runs it with the framework's own API. Tiny shapes keep the suite fast.
"""

from __future__ import annotations

import functools
from typing import Any

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import normbridge.adapters.equinox as E
import normbridge.adapters.linen as L
import normbridge.adapters.nnx as F
import normbridge.adapters.treex as T
from normbridge.adapters.treex.module import to

N, HW, C, CLASSES = 2, 6, 4, 3
SEQ, D, VOCAB, HEADS = 5, 8, 11, 2
ARCHS = {
    "resnet": ("linen", "nnx", "equinox", "treex"),
    "transformer": ("linen", "nnx", "equinox"),
    "sngn": ("linen", "nnx", "equinox", "treex"),
    "mlp": ("linen", "nnx", "equinox", "treex"),
}
NS = {
    "linen": {"native": nn, "facade": L},
    "nnx": {"native": nnx, "facade": F},
    "equinox": {"native": eqx.nn, "facade": E},
    "treex": {"facade": T},
}


def image(seed: int = 7) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (N, HW, HW, 3))


def tokens(seed: int = 7) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (N, SEQ), 0, VOCAB)


def features(seed: int = 7) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (N, 6))


# --------------------------------------------------------------------------- linen


class ResNetBlock(nn.Module):
    ns: Any

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = functools.partial(self.ns.BatchNorm, use_running_average=not train, momentum=0.9)
        y = nn.relu(norm()(nn.Conv(C, (3, 3), use_bias=False)(x)))
        y = norm()(nn.Conv(C, (3, 3), use_bias=False)(y))
        return nn.relu(x + y)


class LinenResNet(nn.Module):
    ns: Any

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(C, (3, 3), name="conv_init")(x)
        x = nn.relu(self.ns.BatchNorm(use_running_average=not train, momentum=0.9, name="bn_init")(x))
        for _ in range(2):
            x = ResNetBlock(self.ns)(x, train)
        return nn.Dense(CLASSES)(x.mean(axis=(1, 2)))


class LinenTransformer(nn.Module):
    ns: Any

    @nn.compact
    def __call__(self, ids, train: bool = False):
        x = nn.Embed(VOCAB, D)(ids) + self.param("pos_embedding", nn.initializers.normal(0.02), (SEQ, D))
        h = self.ns.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, deterministic=not train)(h)
        h = self.ns.LayerNorm()(x)
        x = x + nn.Dense(D)(nn.gelu(nn.Dense(2 * D)(h)))
        return self.ns.RMSNorm()(x)


class LinenSnGn(nn.Module):
    ns: Any

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(self.ns.GroupNorm(num_groups=2)(nn.Conv(C, (3, 3))(x)))
        x = x.mean(axis=(1, 2))
        x = nn.relu(self.ns.SpectralNorm(nn.Dense(C))(x, update_stats=train))
        return self.ns.WeightNorm(nn.Dense(CLASSES))(x)


class LinenMlp(nn.Module):
    ns: Any

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = self.ns.BatchNorm(use_running_average=not train, momentum=0.9)(nn.Dense(C)(x))
        x = self.ns.LayerNorm()(nn.relu(x))
        x = self.ns.RMSNorm()(nn.Dense(C)(x))
        return nn.Dense(CLASSES)(x)


# --------------------------------------------------------------------------- nnx


class NnxBlock(nnx.Module):
    def __init__(self, ns: Any, rngs: nnx.Rngs):
        self.bn2 = ns.BatchNorm(C, momentum=0.9, rngs=rngs)  # defined before bn1 on purpose
        self.conv1 = nnx.Conv(C, C, (3, 3), use_bias=False, rngs=rngs)
        self.bn1 = ns.BatchNorm(C, momentum=0.9, rngs=rngs)
        self.conv2 = nnx.Conv(C, C, (3, 3), use_bias=False, rngs=rngs)

    def __call__(self, x):
        y = nnx.relu(self.bn1(self.conv1(x)))
        return nnx.relu(x + self.bn2(self.conv2(y)))


class NnxResNet(nnx.Module):
    def __init__(self, ns: Any, rngs: nnx.Rngs):
        self.head = nnx.Linear(C, CLASSES, rngs=rngs)
        self.conv_init = nnx.Conv(3, C, (3, 3), rngs=rngs)
        self.bn_init = ns.BatchNorm(C, momentum=0.9, rngs=rngs)
        self.blocks = nnx.List([NnxBlock(ns, rngs) for _ in range(2)])

    def __call__(self, x):
        x = nnx.relu(self.bn_init(self.conv_init(x)))
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(axis=(1, 2)))


class NnxTransformer(nnx.Module):
    def __init__(self, ns: Any, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.pos_embedding = nnx.Param(jnp.zeros((SEQ, D)))
        self.ln1 = ns.LayerNorm(D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(HEADS, D, decode=False, rngs=rngs)
        self.ln2 = ns.LayerNorm(D, rngs=rngs)
        self.up = nnx.Linear(D, 2 * D, rngs=rngs)
        self.down = nnx.Linear(2 * D, D, rngs=rngs)
        self.final = ns.RMSNorm(D, rngs=rngs)

    def __call__(self, ids):
        x = self.embed(ids) + self.pos_embedding[...]
        x = x + self.attn(self.ln1(x))
        x = x + self.down(nnx.gelu(self.up(self.ln2(x))))
        return self.final(x)


class NnxSnGn(nnx.Module):
    def __init__(self, ns: Any, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, C, (3, 3), rngs=rngs)
        self.gn = ns.GroupNorm(C, num_groups=2, rngs=rngs)
        self.sn = ns.SpectralNorm(nnx.Linear(C, C, rngs=rngs), rngs=rngs)
        self.wn = ns.WeightNorm(nnx.Linear(C, CLASSES, rngs=rngs), rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.gn(self.conv(x))).mean(axis=(1, 2))
        return self.wn(nnx.relu(self.sn(x)))


class NnxMlp(nnx.Module):
    def __init__(self, ns: Any, rngs: nnx.Rngs):
        self.dense1 = nnx.Linear(6, C, rngs=rngs)
        self.bn = ns.BatchNorm(C, momentum=0.9, rngs=rngs)
        self.ln = ns.LayerNorm(C, rngs=rngs)
        self.dense2 = nnx.Linear(C, C, rngs=rngs)
        self.rms = ns.RMSNorm(C, rngs=rngs)
        self.head = nnx.Linear(C, CLASSES, rngs=rngs)

    def __call__(self, x):
        x = self.ln(nnx.relu(self.bn(self.dense1(x))))
        return self.head(self.rms(self.dense2(x)))


# --------------------------------------------------------------------------- equinox


def _bn(ns: Any) -> Any:
    return ns.BatchNorm(C, axis_name="batch", momentum=0.9, mode="ema")


class EqxBlock(eqx.Module):
    bn2: Any
    conv1: Any
    bn1: Any
    conv2: Any

    def __init__(self, ns: Any, key: jax.Array):
        k1, k2 = jax.random.split(key)
        self.bn2 = _bn(ns)
        self.conv1 = eqx.nn.Conv2d(C, C, 3, padding=1, use_bias=False, key=k1)
        self.bn1 = _bn(ns)
        self.conv2 = eqx.nn.Conv2d(C, C, 3, padding=1, use_bias=False, key=k2)

    def __call__(self, x, state):
        y, state = self.bn1(self.conv1(x), state)
        y, state = self.bn2(self.conv2(jax.nn.relu(y)), state)
        return jax.nn.relu(x + y), state


class EqxResNet(eqx.Module):
    head: Any
    conv_init: Any
    bn_init: Any
    blocks: list

    def __init__(self, ns: Any, key: jax.Array):
        k = jax.random.split(key, 4)
        self.head = eqx.nn.Linear(C, CLASSES, key=k[0])
        self.conv_init = eqx.nn.Conv2d(3, C, 3, padding=1, key=k[1])
        self.bn_init = _bn(ns)
        self.blocks = [EqxBlock(ns, k[2]), EqxBlock(ns, k[3])]

    def __call__(self, x, state):
        x, state = self.bn_init(self.conv_init(x), state)
        x = jax.nn.relu(x)
        for block in self.blocks:
            x, state = block(x, state)
        return self.head(x.mean(axis=(1, 2))), state


class EqxTransformer(eqx.Module):
    embed: Any
    pos_embedding: jax.Array
    ln1: Any
    attn: Any
    ln2: Any
    up: Any
    down: Any
    final: Any

    def __init__(self, ns: Any, key: jax.Array):
        k = jax.random.split(key, 4)
        self.embed = eqx.nn.Embedding(VOCAB, D, key=k[0])
        self.pos_embedding = jnp.zeros((SEQ, D))
        self.ln1 = ns.LayerNorm(D, eps=1e-6)
        self.attn = eqx.nn.MultiheadAttention(
            HEADS, D, use_query_bias=True, use_key_bias=True, use_value_bias=True, use_output_bias=True, key=k[1]
        )
        self.ln2 = ns.LayerNorm(D, eps=1e-6)
        self.up = eqx.nn.Linear(D, 2 * D, key=k[2])
        self.down = eqx.nn.Linear(2 * D, D, key=k[3])
        self.final = ns.RMSNorm(D, eps=1e-6, use_bias=False)

    def __call__(self, ids):
        x = jax.vmap(self.embed)(ids) + self.pos_embedding
        h = jax.vmap(self.ln1)(x)
        x = x + self.attn(h, h, h)
        h = jax.vmap(self.ln2)(x)
        x = x + jax.vmap(self.down)(jax.nn.gelu(jax.vmap(self.up)(h)))
        return jax.vmap(self.final)(x)


class EqxSnGn(eqx.Module):
    conv: Any
    gn: Any
    sn: Any
    wn: Any

    def __init__(self, ns: Any, key: jax.Array):
        k = jax.random.split(key, 4)
        self.conv = eqx.nn.Conv2d(3, C, 3, padding=1, key=k[0])
        self.gn = ns.GroupNorm(2, C, eps=1e-6)
        self.sn = ns.SpectralNorm(eqx.nn.Linear(C, C, key=k[1]), "weight", key=k[2])
        self.wn = ns.WeightNorm(eqx.nn.Linear(C, CLASSES, key=k[3]))

    def __call__(self, x, state):
        x = jax.nn.relu(self.gn(self.conv(x))).mean(axis=(1, 2))
        x, state = self.sn(x, state)
        return self.wn(jax.nn.relu(x)), state


class EqxMlp(eqx.Module):
    dense1: Any
    bn: Any
    ln: Any
    dense2: Any
    rms: Any
    head: Any

    def __init__(self, ns: Any, key: jax.Array):
        k = jax.random.split(key, 3)
        self.dense1 = eqx.nn.Linear(6, C, key=k[0])
        self.bn = _bn(ns)
        self.ln = ns.LayerNorm(C, eps=1e-6)
        self.dense2 = eqx.nn.Linear(C, C, key=k[1])
        self.rms = ns.RMSNorm(C, eps=1e-6, use_bias=False)
        self.head = eqx.nn.Linear(C, CLASSES, key=k[2])

    def __call__(self, x, state):
        x, state = self.bn(self.dense1(x), state)
        x = self.ln(jax.nn.relu(x))
        return self.head(self.rms(self.dense2(x))), state


# --------------------------------------------------------------------------- treex


class TreexBlock(T.Module):
    def __init__(self):
        self.bn2 = T.BatchNorm(momentum=0.9)  # defined before bn1 on purpose
        self.conv1 = T.Conv(C, (3, 3), use_bias=False)
        self.bn1 = T.BatchNorm(momentum=0.9)
        self.conv2 = T.Conv(C, (3, 3), use_bias=False)

    def __call__(self, x):
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        return jax.nn.relu(x + self.bn2(self.conv2(y)))


class TreexResNet(T.Module):
    blocks: list = to.node()

    def __init__(self):
        self.head = T.Linear(CLASSES)
        self.conv_init = T.Conv(C, (3, 3))
        self.bn_init = T.BatchNorm(momentum=0.9)
        self.blocks = [TreexBlock() for _ in range(2)]

    def __call__(self, x):
        x = jax.nn.relu(self.bn_init(self.conv_init(x)))
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(axis=(1, 2)))


class TreexSnGn(T.Module):
    def __init__(self):
        self.conv = T.Conv(C, (3, 3))
        self.gn = T.GroupNorm(num_groups=2, epsilon=1e-6)  # treex's default eps is 1e-5, linen's 1e-6
        self.sn = T.SpectralNorm(T.Linear(C))
        self.wn = T.WeightNorm(T.Linear(CLASSES))

    def __call__(self, x):
        x = jax.nn.relu(self.gn(self.conv(x))).mean(axis=(1, 2))
        return self.wn(jax.nn.relu(self.sn(x)))


class TreexMlp(T.Module):
    def __init__(self):
        self.dense1 = T.Linear(C)
        self.bn = T.BatchNorm(momentum=0.9)
        self.ln = T.LayerNorm(epsilon=1e-6)
        self.dense2 = T.Linear(C)
        self.rms = T.RMSNorm(epsilon=1e-6)
        self.head = T.Linear(CLASSES)

    def __call__(self, x):
        x = self.ln(jax.nn.relu(self.bn(self.dense1(x))))
        return self.head(self.rms(self.dense2(x)))


# --------------------------------------------------------------------------- building


def _rand(key: jax.Array, leaf: Any, positive: bool = False) -> Any:
    if not (hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)):
        return leaf
    lo, hi = (0.5, 1.5) if positive else (-1.0, 1.0)
    return jax.random.uniform(key, leaf.shape, leaf.dtype, lo, hi)


def _randomize_tree(tree: Any, seed: int, positive: Any) -> Any:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    keys = jax.random.split(jax.random.key(seed), len(flat))
    out = [_rand(k, leaf, positive(jax.tree_util.keystr(p))) for k, (p, leaf) in zip(keys, flat)]
    return jax.tree_util.tree_unflatten(treedef, out)


def _is_var(path: str) -> bool:
    return "var" in path


LINEN = {"resnet": LinenResNet, "transformer": LinenTransformer, "sngn": LinenSnGn, "mlp": LinenMlp}
NNX = {"resnet": NnxResNet, "transformer": NnxTransformer, "sngn": NnxSnGn, "mlp": NnxMlp}
EQX = {"resnet": EqxResNet, "transformer": EqxTransformer, "sngn": EqxSnGn, "mlp": EqxMlp}
TREEX = {"resnet": TreexResNet, "sngn": TreexSnGn, "mlp": TreexMlp}


def probe(arch: str, framework: str) -> jax.Array:
    if arch == "transformer":
        return tokens()
    if arch == "mlp":
        return features()
    x = image()
    return jnp.moveaxis(x, -1, 1) if framework == "equinox" else x


def build(arch: str, framework: str, flavor: str = "native", seed: int = 0) -> Any:
    """A model of ``arch`` in ``framework`` with random state, in the form ``normbridge.convert`` takes."""
    ns = NS[framework].get(flavor, T)
    x = probe(arch, framework)
    if framework == "linen":
        module = LINEN[arch](ns)
        variables = module.init(jax.random.key(seed), x)
        return module, _randomize_tree(variables, seed + 1, _is_var)
    if framework == "nnx":
        model = NNX[arch](ns, nnx.Rngs(seed))
        graph, state = nnx.split(model)
        return nnx.merge(graph, _randomize_tree(state, seed + 1, _is_var))
    if framework == "equinox":
        model, state = eqx.nn.make_with_state(EQX[arch])(ns, jax.random.key(seed))
        model = _randomize_tree(model, seed + 1, lambda p: False)
        for i, bn in enumerate(m for m in jax.tree_util.tree_leaves(model, is_leaf=_is_bn) if _is_bn(m)):
            mean, var = state.get(bn.ema_state_index)
            k1, k2 = jax.random.split(jax.random.fold_in(jax.random.key(seed), i))  # the same state every run
            state = state.set(bn.ema_state_index, (_rand(k1, mean), _rand(k2, var, positive=True)))
            state = state.set(bn.ema_first_time_index, jnp.array(False))
        for sn in [m for m in jax.tree_util.tree_leaves(model, is_leaf=_is_sn) if _is_sn(m)]:
            u, v = state.get(sn.uv_index)
            k1, k2 = jax.random.split(jax.random.key(seed + 3))
            state = state.set(sn.uv_index, (_unit(_rand(k1, u)), _unit(_rand(k2, v))))
        return model, state
    return _randomize_treex(TREEX[arch]().init(jax.random.key(seed), x), seed)


#: The array fields of the treex layers in these architectures (norm statistics, spectral ``u``/``sigma``).
_TREEX_FIELDS = ("kernel", "bias", "scale", "mean", "var", "u", "sigma", "embedding")


def _randomize_treex(model: Any, seed: int) -> Any:
    """A copy of a treex model with every array field random (``var`` positive), walked in attribute order."""
    out = model.copy()
    index = iter(range(10**6))

    def walk(node: Any) -> None:
        if isinstance(node, list):
            for child in node:
                walk(child)
            return
        if not isinstance(node, T.Module):
            return
        for field in _TREEX_FIELDS:
            value = getattr(node, field, None)
            if value is not None:
                key = jax.random.key(seed * 100 + next(index))
                node.__dict__[field] = _rand(key, value, field == "var")
        for _, child in sorted(vars(node).items()):
            walk(child)

    walk(out)
    return out


def _unit(v: jax.Array) -> jax.Array:
    return v / jnp.linalg.norm(v)


def _is_bn(m: Any) -> bool:
    return type(m).__name__ == "BatchNorm"


def _is_sn(m: Any) -> bool:
    return type(m).__name__ == "SpectralNorm"


def outputs(framework: str, model: Any, x: jax.Array) -> np.ndarray:
    """Eval-mode outputs computed with each framework's own API (independent of the engine)."""
    if framework == "linen":
        module, variables = model
        return np.asarray(
            module.apply(variables, x, train=False) if "train" in _params(module) else module.apply(variables, x)
        )
    if framework == "nnx":
        m = nnx.clone(model)
        m.eval()
        return np.asarray(m(x))
    if framework == "equinox":
        m, state = model
        m = eqx.nn.inference_mode(m)
        if isinstance(EQX_CALL.get(type(m).__name__), str):
            return np.asarray(jax.vmap(m)(x))
        y, _ = jax.vmap(m, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)
        return np.asarray(y)
    return np.asarray(model.eval()(x))


EQX_CALL = {"EqxTransformer": "stateless"}


def _params(module: Any) -> Any:
    import inspect

    return inspect.signature(type(module).__call__).parameters


def arrays(framework: str, obj: Any) -> dict[str, np.ndarray]:
    """Every array of a model by path, read with the framework's own API (for round-trip checks)."""
    if framework == "linen":
        tree = obj[1]
    elif framework == "nnx":
        tree = nnx.to_pure_dict(nnx.state(obj))
    elif framework == "equinox":
        tree = eqx.filter(obj, eqx.is_array)
    else:
        tree = obj
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
