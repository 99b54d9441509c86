"""Model factories for the README's command-line examples (``normbridge convert --like
examples.models:...``): each is called with no arguments and returns a model of the architecture
of a checkpoint (checkpoints hold no architecture)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def treex_mlp():
    """The treex fixture ``sequential_linear_bn_relu_linear_ln``: Linear(5→8), BatchNorm, relu,
    Linear(8→4), LayerNorm, as the normbridge treex facade."""
    from normbridge.adapters import treex as tx

    model = tx.Sequential(tx.Linear(8), tx.BatchNorm(momentum=0.9), jax.nn.relu, tx.Linear(4), tx.LayerNorm())
    return model.init(0, jnp.zeros((2, 5))).eval()


def equinox_mlp():
    """The same architecture as native Equinox layers, with its ``eqx.nn.State``."""
    import equinox as eqx

    k1, k2 = jax.random.split(jax.random.key(0))
    return eqx.nn.make_with_state(eqx.nn.Sequential)([
        eqx.nn.Linear(5, 8, key=k1),
        eqx.nn.BatchNorm(8, axis_name="batch", momentum=0.9, inference=True, mode="ema"),
        eqx.nn.Lambda(jax.nn.relu),
        eqx.nn.Linear(8, 4, key=k2),
        eqx.nn.LayerNorm(4),
    ])


def linen_mlp():
    """A linen Dense(5→8) → BatchNorm → relu → Dense(8→4) → LayerNorm model with its ``variables``."""
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x)))
            return nn.LayerNorm()(nn.Dense(4)(x))

    module = MLP()
    return module, module.init(jax.random.key(0), jnp.zeros((1, 5)))


def nnx_mlp():
    """The same architecture as native ``flax.nnx`` layers."""
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.dense1 = nnx.Linear(5, 8, rngs=rngs)
            self.bn = nnx.BatchNorm(8, rngs=rngs)
            self.dense2 = nnx.Linear(8, 4, rngs=rngs)
            self.ln = nnx.LayerNorm(4, rngs=rngs)

        def __call__(self, x):
            return self.ln(self.dense2(nnx.relu(self.bn(self.dense1(x)))))

    model = MLP(nnx.Rngs(0))
    model.eval()
    return model


def write_linen_checkpoint(path: str = "linen.msgpack") -> None:
    """Write a linen checkpoint of :func:`linen_mlp` with non-trivial statistics (one training
    step's batch statistics) to ``path`` with ``flax.serialization``."""
    from flax import serialization

    module, variables = linen_mlp()
    _, updates = module.apply(variables, 3 * jax.random.normal(jax.random.key(1), (16, 5)) + 1, train=True,
                              mutable=["batch_stats"])
    variables = {**variables, **updates}
    with open(path, "wb") as fh:
        fh.write(serialization.msgpack_serialize(serialization.to_state_dict(variables)))
