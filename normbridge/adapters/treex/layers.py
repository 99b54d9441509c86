"""treex's ``Linear``, ``Sequential`` and ``Lambda``: enough to load and run whole treex models.

* ``Linear(features_out, *, use_bias=True, dtype=float32, precision=None,
  kernel_init=lecun_normal(), bias_init=zeros, axis_name=None)``: flax 0.4.1 Dense,
  ``y = x·K + b`` with ``kernel`` ``(in, out)`` and ``bias`` ``(out,)`` Parameters,
  input and parameters cast to ``dtype`` first.
* ``Sequential(*layers)``: calls the layers in order; plain callables are wrapped
  in ``Lambda``; the field ``layers`` is a list (``layers/0/...`` in ``to_dict``).
* ``Lambda(f)``: ``f`` is a static field (an activation such as ``jax.nn.relu``).
* ``Flatten()``: ``(N, ...) -> (N, prod(...))`` (treex: ``einops.rearrange(x, "batch ... -> batch (...)")``).
* ``MLP(features, *, activation=relu, use_bias=True, dtype=float32, precision=None,
  kernel_init=lecun_normal(), bias_init=zeros)``: treex's ``@compact`` MLP: ``Linear(f)`` for each
  ``f`` in ``features`` with ``activation`` between them (none after the last), created at init as
  node fields ``linear``, ``linear2``, ... (named in the static ``_subtrees``).
* ``Embed(num_embeddings, features, *, dtype=float32, embedding_init=variance_scaling(1, "fan_in",
  "normal", out_axis=0))``: flax 0.4.1 ``Embed``, ``embedding`` Parameter ``(num_embeddings,
  features)``; ``y = take(embedding, ids, axis=0)`` in ``dtype``; ``attend(q) = q · embeddingᵀ``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from normbridge.adapters.treex.module import Module, Parameter, initializing, next_key, param_key, to

__all__ = ["MLP", "Embed", "Flatten", "Lambda", "Linear", "Sequential"]

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
            key = next_key()  # treex: the flax Dense's ``params`` rng; kernel, then bias
            shape = (x.shape[-1], self.features_out)
            self.kernel = jnp.asarray(self.kernel_init(param_key(key, 1), shape, jnp.float32))
            if self.use_bias:
                self.bias = jnp.asarray(self.bias_init(param_key(key, 2), (self.features_out,), jnp.float32))
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


#: flax 0.4.1's ``default_embed_init``.
_EMBED_INIT = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)


class Flatten(Module):
    """treex ``Flatten``: keep the batch axis, flatten the rest."""

    def __init__(self) -> None:
        self._set_name()

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.asarray(x)
        return jnp.reshape(x, (x.shape[0], -1))


class MLP(Module):
    """treex ``MLP``: ``Linear`` layers with ``activation`` between them (the last one linear)."""

    def __init__(
        self,
        features: Any,
        *,
        activation: Callable[[jax.Array], jax.Array] = jax.nn.relu,
        use_bias: bool = True,
        dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Callable[..., jax.Array] = _LECUN_NORMAL,
        bias_init: Callable[..., jax.Array] = jax.nn.initializers.zeros,
    ) -> None:
        self._set_name()
        self.features = features
        self.activation = activation
        self.use_bias = use_bias
        self.dtype = dtype
        self.precision = precision
        self.kernel_init = kernel_init
        self.bias_init = bias_init
        self._subtrees = ()

    @staticmethod
    def _child_name(i: int) -> str:
        return "linear" if i == 0 else f"linear{i + 1}"

    def _set_child(self, name: str, layer: Linear) -> None:
        self.__dict__[name] = layer
        self._field_metadata[name] = to.types.FieldMetadata(node=True, kind=type(None))

    @property
    def layers(self) -> list[Linear]:
        """The ``Linear`` children in call order."""
        return [getattr(self, name) for name in self._subtrees]

    def __call__(self, x: jax.Array) -> jax.Array:
        self._check_ready()
        features = list(self.features)
        if initializing() and not self._subtrees:
            # treex's @compact creates each child where it is first called; it spends one key on the
            # child before the child takes its own (measured: the real-treex fixture's MLP kernels come
            # from every second key).
            names = []
            for i, units in enumerate(features):
                next_key()
                name = self._child_name(i)
                layer = Linear(
                    units, use_bias=self.use_bias, dtype=self.dtype, precision=self.precision,
                    kernel_init=self.kernel_init, bias_init=self.bias_init,
                )  # fmt: skip
                self._set_child(name, layer)
                names.append(name)
                x = layer(x)
                if i < len(features) - 1:
                    x = self.activation(x)
            self.__dict__["_subtrees"] = tuple(names)
            return x
        layers = self.layers
        if len(layers) != len(features):
            raise RuntimeError("MLP: layers are not created; call `.init(key, inputs)` first")
        for layer in layers[:-1]:
            x = self.activation(layer(x))
        return layers[-1](x)


class Embed(Module):
    """treex ``Embed``: flax 0.4.1 ``Embed`` (a lookup table of ``features``-vectors)."""

    embedding: jax.Array | None = Parameter.node()

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        dtype: Any = jnp.float32,
        embedding_init: Callable[..., jax.Array] = _EMBED_INIT,
    ) -> None:
        self._set_name()
        self.num_embeddings = num_embeddings
        self.features = features
        self.dtype = dtype
        self.embedding_init = embedding_init
        self.embedding = None

    def __call__(self, x: jax.Array) -> jax.Array:
        """The embedding rows of the integer ids ``x``: shape ``x.shape + (features,)``."""
        self._check_ready()
        x = jnp.asarray(x)
        if initializing():
            key = next_key()
            shape = (self.num_embeddings, self.features)
            self.embedding = jnp.asarray(self.embedding_init(param_key(key, 1), shape, jnp.float32))
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError("Input type must be an integer or unsigned integer.")
        if self.embedding is None:
            raise RuntimeError("Embed: `embedding` is None; call `.init(key, inputs)` first")
        return jnp.take(jnp.asarray(self.embedding, self.dtype), x, axis=0)

    def attend(self, query: jax.Array) -> jax.Array:
        """``query · embeddingᵀ`` (flax's ``Embed.attend``)."""
        return jnp.dot(query, jnp.asarray(self.embedding, self.dtype).T)
