"""Running statistics: exponential moving averages and their variants.

The momentum convention is the same in flax, equinox and treex: ``momentum``
weights the *old* value (0.99 = slow), the opposite of PyTorch.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax


def ema(old: jax.Array, new: jax.Array, momentum: float) -> jax.Array:
    """``momentum * old + (1 - momentum) * new`` (flax, treex and equinox "batch" hidden state)."""
    return momentum * old + (1 - momentum) * new


def ema_blend(
    running: jax.Array, batch: jax.Array, momentum: float, first_time: jax.Array
) -> jax.Array:
    """Equinox ``mode="ema"``: the blended statistic, or the batch one on the first call.

    Equinox normalizes training inputs with this blended value and stores it.
    """
    blended = ema(running, batch, momentum)
    return lax.select(first_time, batch, blended)


def debias(hidden: Any, momentum: float, count: jax.Array) -> Any:
    """Zero-debiased EMA (equinox ``mode="batch"`` at inference): ``hidden / (1 - m**count)``.

    A count of 0 divides by 1. ``hidden`` may also be a pytree of arrays (e.g. ``(mean, var)``):
    the scale is then computed once and divides every leaf, which is what equinox does; computing
    it once per statistic makes XLA fuse a different (slower, differently rounded) program.
    """
    scale = jnp.where(count == 0, 1, 1 - momentum**count)
    return jax.tree_util.tree_map(lambda h: h / scale, hidden)
