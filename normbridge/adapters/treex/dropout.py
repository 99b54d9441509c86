"""treex 0.6.12's ``KeySeq`` and ``Dropout`` (flax 0.4.1 ``Dropout`` with treex's stored key).

* ``KeySeq(key=None)``: a module with one ``Rng`` leaf ``key`` (a raw ``uint32[2]`` threefry key;
  an int seed becomes ``PRNGKey(seed)``). Without a key, ``init`` gives it one (``next_key()``,
  before the forward pass, in leaf order, as treex's ``Initializer``). ``seq()`` returns
  ``k`` and stores ``k'`` where ``k, k' = split(key)``.
* ``Dropout(rate, broadcast_dims=())``: field ``next_key`` (a ``KeySeq``). Active when
  ``training and not frozen`` (its own flags), unless ``deterministic=`` is passed. An active call
  takes ``mask_key = next_key()`` (the stored key advances) and, as flax 0.4.1,
  :math:`y = \\mathrm{where}(m, x/(1-r), 0)` with ``m = bernoulli(fold_in(mask_key, h), 1-r,
  shape)`` (``h`` flax's fold-in of ``make_rng('dropout')``, ``broadcast_dims`` of size 1),
  drawn on jax's non-partitionable threefry so that the bits are real treex's. Inactive: ``y = x``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from normbridge.adapters.treex.module import Module, Rng, next_key, param_key, to

__all__ = ["Dropout", "KeySeq"]


class KeySeq(Module):
    """treex ``KeySeq``: a stored PRNG key that yields a new key on every call."""

    key: jax.Array | None = Rng.node()

    def __init__(self, key: jax.Array | int | None = None) -> None:
        self._set_name()
        if isinstance(key, int):
            key = jax.random.PRNGKey(key)
        elif key is not None and not isinstance(key, (jax.Array, np.ndarray)):
            raise TypeError(f"KeySeq: `key` must be an int, a PRNG key array or None, got {type(key).__name__}")
        self.key = None if key is None else jnp.asarray(key)

    def rng_init(self) -> None:
        if self.key is None:
            self.key = next_key()

    def __call__(self) -> jax.Array:
        """A new key; the stored key advances (``key, self.key = split(self.key)``)."""
        if self.key is None:
            raise RuntimeError("KeySeq: `key` is None; call `.init(key, inputs)` first (or pass a key)")
        with jax.threefry_partitionable(False):
            key, self.key = jax.random.split(self.key)
        return key


class Dropout(Module):
    """treex ``Dropout``: flax 0.4.1 dropout with the mask key taken from the stored ``KeySeq``."""

    next_key: KeySeq = to.node()

    def __init__(self, rate: float, broadcast_dims: Sequence[int] = ()) -> None:
        self._set_name()
        self.rate = rate
        self.broadcast_dims = broadcast_dims
        self.next_key = KeySeq()

    def __call__(self, x: jax.Array, deterministic: bool | None = None, rng: jax.Array | None = None) -> jax.Array:
        """Drop each entry with probability ``rate`` and scale the rest by ``1/(1-rate)`` when active."""
        x = jnp.asarray(x)
        active = not deterministic if deterministic is not None else self._training and not self._frozen
        if not active:
            return x
        if rng is None:
            rng = self.next_key()
        if self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = list(x.shape)
        for dim in self.broadcast_dims:
            shape[dim] = 1
        with jax.threefry_partitionable(False):
            mask = jax.random.bernoulli(param_key(rng, 1), p=keep, shape=tuple(shape))
        mask = jnp.broadcast_to(mask, x.shape)
        return lax.select(mask, x / keep, jnp.zeros_like(x))
