"""treex 0.6.12's ``Conv`` and ``ConvTranspose`` (flax 0.4.1 ``Conv`` / ``ConvTranspose`` on ``lax``).

* ``Conv(features_out, kernel_size, *, strides=None, padding="SAME", input_dilation=None,
  kernel_dilation=None, feature_group_count=1, use_bias=True, dtype=float32, param_dtype=float32,
  precision=None, kernel_init=lecun_normal(), bias_init=zeros)``: channels-last input
  ``(N, *spatial, C_in)`` (or one example without ``N``), ``kernel`` ``(*kernel_size, C_in/groups,
  features_out)`` (HWIO), ``bias`` ``(features_out,)``, both Parameters stored in ``param_dtype``;
  :math:`y = \\mathrm{conv}(x, K) + b` computed in ``dtype`` by ``lax.conv_general_dilated``
  exactly as flax 0.4.1 called it. ``kernel_size`` must be a sequence (flax 0.4.1 refused an int).
  ``padding``: ``"SAME"``, ``"VALID"``, ``"CIRCULAR"`` or ``(low, high)`` pairs per spatial axis.
* ``ConvTranspose(features_out, kernel_size, *, strides=None, padding="SAME", kernel_dilation=None,
  use_bias=True, dtype=float32, param_dtype=float32, precision=None, kernel_init, bias_init)``:
  ``lax.conv_transpose`` with ``kernel`` ``(*kernel_size, C_in, features_out)``; an int
  ``kernel_size`` means 1-D (flax 0.4.1).

Init: one ``next_key()`` per layer (the flax module's ``params`` rng), kernel from its first
fold-in and bias from its second, so the same key gives real treex's parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from normbridge.adapters.treex.module import Module, Parameter, initializing, next_key, param_key

__all__ = ["Conv", "ConvTranspose"]

Initializer = Callable[..., jax.Array]
_LECUN_NORMAL = jax.nn.initializers.lecun_normal()


def _dimension_numbers(ndim: int) -> lax.ConvDimensionNumbers:
    """flax's ``_conv_dimension_numbers``: channels-last input and output, HWIO kernel."""
    lhs = (0, ndim - 1, *range(1, ndim - 1))
    rhs = (ndim - 1, ndim - 2, *range(0, ndim - 2))
    return lax.ConvDimensionNumbers(lhs, rhs, lhs)


def _broadcast(value: Any, n: int) -> tuple[int, ...]:
    if value is None:
        value = 1
    if isinstance(value, int):
        return (value,) * n
    return tuple(value)


def _circular_pad(x: jax.Array, kernel_size: tuple[int, ...], dilation: tuple[int, ...]) -> jax.Array:
    """flax's ``padding="CIRCULAR"``: wrap-pad the spatial axes so that a VALID conv keeps the size."""
    k = [(ks - 1) * d + 1 for ks, d in zip(kernel_size, dilation)]
    pads = [(0, 0)] + [((kk - 1) // 2, kk // 2) for kk in k] + [(0, 0)]
    return jnp.pad(x, pads, mode="wrap")


class _ConvBase(Module):
    kernel: jax.Array | None = Parameter.node()
    bias: jax.Array | None = Parameter.node()

    def _configure(self, **config: Any) -> None:
        """Name the layer and store its constructor arguments as attributes, in signature order
        (field iteration follows that order); ``kernel`` and ``bias`` wait for ``init``."""
        self._set_name()
        for field, value in config.items():
            setattr(self, field, value)
        self.kernel = None
        self.bias = None

    def _init_params(self, kernel_shape: tuple[int, ...]) -> None:
        key = next_key()
        self.kernel = jnp.asarray(self.kernel_init(param_key(key, 1), kernel_shape, self.param_dtype))
        if self.use_bias:
            self.bias = jnp.asarray(self.bias_init(param_key(key, 2), (self.features_out,), self.param_dtype))

    def _add_bias(self, y: jax.Array) -> jax.Array:
        if not self.use_bias:
            return y
        bias = jnp.asarray(self.bias, self.dtype)
        return y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))

    def _ready_kernel(self, name: str) -> jax.Array:
        if self.kernel is None:
            raise RuntimeError(f"{name}: `kernel` is None; call `.init(key, inputs)` first")
        return jnp.asarray(self.kernel, self.dtype)


class Conv(_ConvBase):
    """treex ``Conv``: flax 0.4.1 ``Conv`` (``lax.conv_general_dilated``, channels last, HWIO kernel)."""

    def __init__(
        self,
        features_out: int,
        kernel_size: Sequence[int],
        *,
        strides: Sequence[int] | int | None = None,
        padding: str | Sequence[tuple[int, int]] = "SAME",
        input_dilation: Sequence[int] | int | None = None,
        kernel_dilation: Sequence[int] | int | None = None,
        feature_group_count: int = 1,
        use_bias: bool = True,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Initializer = _LECUN_NORMAL,
        bias_init: Initializer = jax.nn.initializers.zeros,
    ) -> None:
        self._configure(
            features_out=features_out,
            kernel_size=kernel_size,
            strides=strides,
            padding=padding,
            input_dilation=input_dilation,
            kernel_dilation=kernel_dilation,
            feature_group_count=feature_group_count,
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=precision,
            kernel_init=kernel_init,
            bias_init=bias_init,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """Convolve ``x`` ``(N, *spatial, C_in)`` (or ``(*spatial, C_in)``) with ``kernel`` and add ``bias``."""
        self._check_ready()
        x = jnp.asarray(x, self.dtype)
        if isinstance(self.kernel_size, int):
            raise TypeError("The kernel size must be specified as a tuple/list of integers (eg.: [3, 3]).")
        kernel_size = tuple(self.kernel_size)
        single = x.ndim == len(kernel_size) + 1
        if single:
            x = jnp.expand_dims(x, 0)
        n = len(kernel_size)
        strides = _broadcast(self.strides, n)
        input_dilation = _broadcast(self.input_dilation, n)
        kernel_dilation = _broadcast(self.kernel_dilation, n)
        padding = self.padding
        if padding == "CIRCULAR":
            x = _circular_pad(x, kernel_size, kernel_dilation)
            padding = "VALID"
        elif not isinstance(padding, str):
            padding = tuple(tuple(p) for p in padding)
        in_features = x.shape[-1]
        if in_features % self.feature_group_count:
            raise ValueError(
                f"Conv: {in_features} input features are not divisible by "
                f"feature_group_count={self.feature_group_count}"
            )
        if initializing():
            self._init_params((*kernel_size, in_features // self.feature_group_count, self.features_out))
        kernel = self._ready_kernel("Conv")
        y = lax.conv_general_dilated(
            x,
            kernel,
            strides,
            padding,
            lhs_dilation=input_dilation,
            rhs_dilation=kernel_dilation,
            dimension_numbers=_dimension_numbers(x.ndim),
            feature_group_count=self.feature_group_count,
            precision=self.precision,
        )
        if single:
            y = jnp.squeeze(y, axis=0)
        return self._add_bias(y)


class ConvTranspose(_ConvBase):
    """treex ``ConvTranspose``: flax 0.4.1 ``ConvTranspose`` (``lax.conv_transpose``, channels last)."""

    def __init__(
        self,
        features_out: int,
        kernel_size: Sequence[int] | int,
        *,
        strides: Sequence[int] | None = None,
        padding: str | Sequence[tuple[int, int]] = "SAME",
        kernel_dilation: Sequence[int] | None = None,
        use_bias: bool = True,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Initializer = _LECUN_NORMAL,
        bias_init: Initializer = jax.nn.initializers.zeros,
    ) -> None:
        self._configure(
            features_out=features_out,
            kernel_size=kernel_size,
            strides=strides,
            padding=padding,
            kernel_dilation=kernel_dilation,
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=precision,
            kernel_init=kernel_init,
            bias_init=bias_init,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """Transposed convolution of ``x`` ``(N, *spatial, C_in)`` (or one example) with ``kernel``, plus ``bias``."""
        self._check_ready()
        x = jnp.asarray(x, self.dtype)
        kernel_size = (self.kernel_size,) if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
        single = x.ndim == len(kernel_size) + 1
        if single:
            x = jnp.expand_dims(x, 0)
        strides = tuple(self.strides) if self.strides else (1,) * (x.ndim - 2)
        padding = self.padding if isinstance(self.padding, str) else tuple(tuple(p) for p in self.padding)
        if initializing():
            self._init_params((*kernel_size, x.shape[-1], self.features_out))
        kernel = self._ready_kernel("ConvTranspose")
        dilation = None if self.kernel_dilation is None else tuple(self.kernel_dilation)
        spec = _dimension_numbers(x.ndim)
        y = lax.conv_transpose(
            x, kernel, strides, padding, rhs_dilation=dilation, dimension_numbers=spec, precision=self.precision
        )
        if single:
            y = jnp.squeeze(y, axis=0)
        return self._add_bias(y)
