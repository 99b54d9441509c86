"""treex's ``Linear``, ``Sequential`` and ``Lambda``: enough to load and run whole treex models.

* ``Linear(features_out, *, use_bias=True, dtype=float32, precision=None,
  kernel_init=lecun_normal(), bias_init=zeros, axis_name=None)``: flax 0.4.1 Dense,
  ``y = x·K + b`` with ``kernel`` ``(in, out)`` and ``bias`` ``(out,)`` Parameters,
  input and parameters cast to ``dtype`` first.
* ``Sequential(*layers)``: calls the layers in order; plain callables are wrapped
  in ``Lambda``; the field ``layers`` is a list (``layers/0/...`` in ``to_dict``).
* ``Lambda(f)``: ``f`` is a static field (an activation such as ``jax.nn.relu``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from normbridge.adapters.treex.module import Module, Parameter, initializing, next_key, to

__all__ = ["Lambda", "Linear", "Sequential"]

#: flax's ``default_kernel_init``.
_LECUN_NORMAL = jax.nn.initializers.lecun_normal()


class Linear(Module):
    """treex ``Linear`` (flax 0.4.1 ``Dense``)."""

    kernel: jax.Array | None = Parameter.node()
    bias: jax.Array | None = Parameter.node()

    def __init__(
        self,
        features_out: int,
        *,
        use_bias: bool = True,
        dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Callable[..., jax.Array] = _LECUN_NORMAL,
        bias_init: Callable[..., jax.Array] = jax.nn.initializers.zeros,
        axis_name: str | None = None,
    ) -> None:
        if not isinstance(features_out, int) or features_out <= 0:
            raise ValueError(f"Linear: `features_out` must be a positive int, got {features_out!r}")
        self._set_name()
        self.features_out = features_out
        self.use_bias = use_bias
        self.dtype = dtype
        self.precision = precision
        self.kernel_init = kernel_init
        self.bias_init = bias_init
        self.axis_name = axis_name
        self.kernel = None
        self.bias = None

    def __call__(self, x: jax.Array) -> jax.Array:
        self._check_ready()
        x = jnp.asarray(x)
        if initializing():
            self.kernel = jnp.asarray(self.kernel_init(next_key(), (x.shape[-1], self.features_out), jnp.float32))
            if self.use_bias:
                self.bias = jnp.asarray(self.bias_init(next_key(), (self.features_out,), jnp.float32))
        if self.kernel is None:
            raise RuntimeError("Linear: `kernel` is None; call `.init(key, inputs)` first")
        if x.shape[-1] != self.kernel.shape[0]:
            raise ValueError(f"Linear: input has {x.shape[-1]} features, the kernel expects {self.kernel.shape[0]}")
        x = jnp.asarray(x, self.dtype)
        kernel = jnp.asarray(self.kernel, self.dtype)
        y = lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision)
        if self.use_bias:
            y = y + jnp.reshape(jnp.asarray(self.bias, self.dtype), (1,) * (y.ndim - 1) + (-1,))
        return y


class Lambda(Module):
    """treex ``Lambda``: a module around a plain function."""

    def __init__(self, f: Callable[[jax.Array], jax.Array]) -> None:
        if not callable(f):
            raise TypeError(f"Lambda: `f` must be callable, got {type(f).__name__}")
        self._set_name()
        self.f = f

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.f(x)


class Sequential(Module):
    """treex ``Sequential``: ``layers[-1](...layers[1](layers[0](*args, **kwargs)))``."""

    layers: list[Module] = to.node()

    def __init__(self, *layers: Module | Callable[[jax.Array], jax.Array]) -> None:
        self._set_name()
        self.layers = [layer if isinstance(layer, Module) else Lambda(layer) for layer in layers]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.layers:
            raise ValueError("Sequential: no layers")
        out = self.layers[0](*args, **kwargs)
        for layer in self.layers[1:]:
            out = layer(out)
        return out
