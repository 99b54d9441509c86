"""Factories for the SIGKILL test: a linen and an NNX MLP big enough (~24 MB) that a kill can land
while arrays are being written, not only while Python starts."""

from __future__ import annotations

import jax
import jax.numpy as jnp

WIDTH = 1536


def linen_mlp():
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.Dense(WIDTH)(x)
            x = nn.BatchNorm(use_running_average=not train)(x)
            x = nn.Dense(WIDTH)(nn.relu(x))
            return nn.LayerNorm()(nn.Dense(WIDTH)(x))

    m = MLP()
    return m, jax.jit(m.init)(jax.random.key(0), jnp.zeros((1, WIDTH)))


def nnx_mlp():
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.d0 = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
            self.bn = nnx.BatchNorm(WIDTH, rngs=rngs)
            self.d1 = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
            self.d2 = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
            self.ln = nnx.LayerNorm(WIDTH, rngs=rngs)

        def __call__(self, x):
            return self.ln(self.d2(self.d1(nnx.relu(self.bn(self.d0(x))))))

    return MLP(nnx.Rngs(1))
