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

    model = tx.Sequential(tx.Linear(8), tx.BatchNorm(), jax.nn.relu, tx.Linear(4), tx.LayerNorm())
    return model.init(0, jnp.zeros((2, 5))).eval()


def equinox_mlp():
    """The same architecture as native Equinox layers, with its ``eqx.nn.State``."""
    import equinox as eqx

    k1, k2 = jax.random.split(jax.random.key(0))
    return eqx.nn.make_with_state(eqx.nn.Sequential)([
        eqx.nn.Linear(5, 8, key=k1),
        eqx.nn.BatchNorm(8, axis_name="batch", momentum=0.9, inference=True),
        eqx.nn.Lambda(jax.nn.relu),
        eqx.nn.Linear(8, 4, key=k2),
        eqx.nn.LayerNorm(4),
    ])


def linen_cnn():
    """A linen Conv → BatchNorm → relu → Dense → LayerNorm model with its ``variables``."""
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.Conv(8, (3, 3))(x)
            x = nn.BatchNorm(use_running_average=not train)(x)
            x = nn.relu(x).mean(axis=(1, 2))
            x = nn.Dense(4)(x)
            return nn.LayerNorm()(x)

    module = Net()
    return module, module.init(jax.random.key(0), jnp.zeros((1, 6, 6, 3)))


def nnx_cnn():
    """The same architecture as native ``flax.nnx`` layers."""
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
            self.bn = nnx.BatchNorm(8, rngs=rngs)
            self.dense = nnx.Linear(8, 4, rngs=rngs)
            self.ln = nnx.LayerNorm(4, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.bn(self.conv(x))).mean(axis=(1, 2))
            return self.ln(self.dense(x))

    return Net(nnx.Rngs(0))


def linen_cnn_variables_for_the_readme(path: str) -> None:
    """Write a trained-looking linen checkpoint (non-trivial statistics) to ``path`` as msgpack."""
    from flax import serialization

    module, variables = linen_cnn()
    _, updates = module.apply(variables, jax.random.normal(jax.random.key(1), (4, 6, 6, 3)), train=True,
                              mutable=["batch_stats"])
    variables = {**variables, **updates}
    with open(path, "wb") as fh:
        fh.write(serialization.msgpack_serialize(serialization.to_state_dict(variables)))
