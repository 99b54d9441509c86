r"""``BatchNorm``: drop-in for ``equinox.nn.BatchNorm``; the math is :mod:`normbridge.core`.

Equinox sees one example at a time, channels first ``(C, ...)``; the batch is the
named ``jax.vmap``/``jax.pmap`` axis ``axis_name`` (a name or a tuple of names).
Per channel the statistics are the two-pass mean and biased variance over the
example's other axes and the named batch axis, **in the input dtype** (no upcast):
:func:`normbridge.core.moments` with ``axes=None, use_fast_variance=False,
force_float32=False, clip_two_pass=True`` applied per channel under ``jax.vmap``,
exactly like equinox's ``_stats``. Normalization is
``(x - mean) / sqrt(var + eps) * weight + bias`` (core order ``"divide_sqrt"``).

Modes (``momentum`` weights the old value):

* ``"ema"`` (and ``"legacy"``, which warns): training normalizes with
  ``ema_blend(running, batch)`` (the batch statistics on the very first call) and
  stores it; inference uses the stored statistics.
* ``"batch"``: training normalizes with the batch statistics and updates a hidden
  EMA started at ``(0, 1)`` plus a counter; inference uses
  ``hidden / (1 - momentum**counter)`` (core :func:`~normbridge.core.debias`).

Operation order vs the flax facades: flax reduces in float32 with the fast variance
``E[x²]−E[x]²`` and computes ``(x−μ)·(rsqrt(σ²+ε)·γ)+β``; equinox reduces two-pass in
the input dtype and computes ``(x−μ)/sqrt(σ²+ε)·γ+β``. In float32 the two agree to
~1e-6 relative; with bfloat16 inputs equinox's statistics carry bf16 error (~1e-2).
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax import lax

from normbridge import core
from normbridge.adapters.equinox._common import default_floating_dtype, eqx, named_errors

StateIndex = eqx.nn.StateIndex
State = eqx.nn.State


class BatchNorm(eqx.nn.StatefulLayer):
    """Batch normalization over the named vmap/pmap batch axis (same fields and ``State`` as equinox)."""

    # Field names and order are equinox's: they decide the leaf order of checkpoints
    # and the ``make_with_state`` markers ("BatchNorm.ema_state_index", ...).
    weight: jax.Array | None
    bias: jax.Array | None
    ema_first_time_index: StateIndex | None
    ema_state_index: StateIndex | None
    batch_counter: StateIndex | None
    batch_state_index: StateIndex | None
    axis_name: Hashable | Sequence[Hashable]
    inference: bool
    input_size: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    channelwise_affine: bool = eqx.field(static=True)
    momentum: float = eqx.field(static=True)
    mode: Literal["ema", "batch"] = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        axis_name: Hashable | Sequence[Hashable],
        eps: float = 1e-5,
        channelwise_affine: bool = True,
        momentum: float = 0.99,
        inference: bool = False,
        dtype=None,
        mode: Literal["ema", "batch", "legacy"] = "legacy",
    ):
        """Same arguments and defaults as ``equinox.nn.BatchNorm``; ``dtype`` is the state and affine dtype."""
        if mode == "legacy":
            mode = "ema"
            # Same category and text as equinox, so warning filters written for it still apply.
            warnings.warn(
                "When `eqx.nn.BatchNorm(..., mode=...)` is unspecified it defaults to "
                "'ema', for backward compatibility. This typically has a performance "
                "impact, and for new code the user is encouraged to use 'batch' "
                "instead. See `https://github.com/patrick-kidger/equinox/issues/659`.",
                stacklevel=2,
            )
        if mode not in {"ema", "batch"}:
            raise ValueError(f"BatchNorm: Invalid mode, must be 'ema' or 'batch'. (got mode={mode!r})")
        self.mode = mode
        dtype = default_floating_dtype() if dtype is None else dtype
        if channelwise_affine:
            self.weight = jnp.ones((input_size,), dtype=dtype)
            self.bias = jnp.zeros((input_size,), dtype=dtype)
        else:
            self.weight = None
            self.bias = None
        if mode == "ema":
            self.ema_first_time_index = StateIndex(jnp.array(True))
            # equinox uses jnp.empty: zeros up to jax 0.10, uninitialized memory from jax 0.11 (jax-ml/jax#38674);
            # zeros keep the initial state deterministic.
            init = (jnp.zeros((input_size,), dtype=dtype), jnp.zeros((input_size,), dtype=dtype))
            self.ema_state_index = StateIndex(init)
            self.batch_counter = None
            self.batch_state_index = None
        else:
            self.batch_counter = StateIndex(jnp.array(0))
            hidden = (jnp.zeros((input_size,), dtype=dtype), jnp.ones((input_size,), dtype=dtype))
            self.batch_state_index = StateIndex(hidden)
            self.ema_first_time_index = None
            self.ema_state_index = None
        self.inference = inference
        self.axis_name = axis_name
        self.input_size = input_size
        self.eps = eps
        self.channelwise_affine = channelwise_affine
        self.momentum = momentum

    def _batch_stats(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Per-channel ``(mean, var)`` of ``x`` ``(C, ...)`` across the named batch axis, in ``x.dtype``."""

        def per_channel(y: jax.Array) -> tuple[jax.Array, jax.Array]:
            return core.moments(
                y,
                None,
                axis_name=self.axis_name,
                use_fast_variance=False,
                force_float32=False,
                clip_two_pass=True,
                conj_product=True,
            )

        with named_errors("BatchNorm"):  # a 0-d x: equinox's vmap error, word for word
            return jax.vmap(per_channel)(x)

    def __call__(
        self,
        x: jax.Array,
        state: State,
        *,
        key: Any = None,
        inference: bool | None = None,
    ) -> tuple[jax.Array, State]:
        """``x`` ``(input_size, ...)`` → ``(out, new_state)``; ``inference`` overrides the field when not None.

        Raises ``NameError`` outside a vmap/pmap binding ``axis_name`` (from the collective).
        """
        del key
        if x.ndim >= 1 and x.shape[0] != self.input_size:
            # equinox fails here with a TypeError from broadcasting the batch statistics against the stored
            # ones (a jax message, not one of equinox's): the same type, and a message that says why
            raise TypeError(
                f"BatchNorm: x must have shape (input_size={self.input_size}, ...) for one example "
                f"(vmap over the batch), got {x.shape}"
            )
        if inference is None:
            inference = self.inference
        if self.mode == "ema":
            assert self.ema_first_time_index is not None and self.ema_state_index is not None
            if inference:
                mean, var = state.get(self.ema_state_index)
            else:
                first_time = state.get(self.ema_first_time_index)
                # equinox stores jnp.array(False), whose abstract value lacks the pmap axis' sharding, so
                # State.set rejects it under jax.pmap (ValueError); full_like keeps the stored value's type.
                state = state.set(self.ema_first_time_index, lax.full_like(first_time, False))
                batch_mean, batch_var = self._batch_stats(x)
                running_mean, running_var = state.get(self.ema_state_index)
                # bf16 input with f32 state: lax.select raises TypeError, as in equinox.
                mean = core.ema_blend(running_mean, batch_mean, self.momentum, first_time)
                var = core.ema_blend(running_var, batch_var, self.momentum, first_time)
                state = state.set(self.ema_state_index, (mean, var))
        else:
            assert self.batch_counter is not None and self.batch_state_index is not None
            counter = state.get(self.batch_counter)
            hidden_mean, hidden_var = state.get(self.batch_state_index)
            if inference:
                # one de-biasing scale for both, as equinox: the same XLA program (and bits) as native
                mean, var = core.debias((hidden_mean, hidden_var), self.momentum, counter)
            else:
                mean, var = self._batch_stats(x)
                state = state.set(self.batch_counter, counter + 1)
                state = state.set(
                    self.batch_state_index,
                    (core.ema(hidden_mean, mean, self.momentum), core.ema(hidden_var, var, self.momentum)),
                )

        def per_channel(y, m, v, w, b):
            return core.normalize(y, m, v, self.eps, w, b, order="divide_sqrt")

        out = jax.vmap(per_channel)(x, mean, var, self.weight, self.bias)
        return out, state
