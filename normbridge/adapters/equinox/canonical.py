"""Conversion between equinox layers (facade **or** native ``equinox.nn``) and :class:`~normbridge.core.NormRecord`.

The facade has equinox's field names, so one duck-typed implementation serves
both; the layer kind is taken from the class name. Layout (see ``core/record.py``):

==============  =====================================================================
layer           record
==============  =====================================================================
BatchNorm       ``scale=weight``, ``bias``, ``mean``/``var`` from the ``State``;
                ``mode="ema"``: ``stats_convention="ema_blend"``, ``count`` = 0 while
                the first-time flag is set, else 1; ``mode="batch"``:
                ``"zero_debiased"`` hidden EMA and ``count`` = the batch counter
LayerNorm       ``scale=weight``, ``bias`` of the full ``shape``; ``feature_axes`` =
RMSNorm         ``reduction_axes`` = every axis of one example
GroupNorm       ``scale``/``bias`` ``(C,)``, ``num_groups``, ``feature_axes=(0,)``
InstanceNorm    ``kind="instance_norm"``, ``num_groups = C``
SpectralNorm    ``spectral={weight_name: SpectralVectors(u (out,), v (in,))}``
WeightNorm      ``weight_scales={weight_name: g}`` reshaped to the kept axis, ``(out,)``
==============  =====================================================================

:func:`from_canonical` refuses (``ValueError``) a record whose kind, epsilon,
momentum, statistics convention, groups or shapes would change the layer's math.
A flax-family ``stats_convention="ema"`` record loads into ``mode="ema"`` with the
first-time flag cleared (its statistics are used as is at inference, as flax's are).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from jax import lax

from normbridge import core
from normbridge.adapters.equinox._common import eqx
from normbridge.core import NormRecord, SpectralVectors

_KINDS = core.KIND_OF_CLASS


def _kind(layer: Any) -> str:
    name = type(layer).__name__
    if name not in _KINDS or not isinstance(layer, eqx.Module):
        raise TypeError(f"to_canonical: expected an equinox normalization layer ({sorted(_KINDS)}), got {name}")
    return _KINDS[name]


def _need_state(layer: Any, state: Any, fn: str) -> Any:
    if state is None:
        raise ValueError(f"{fn}: {type(layer).__name__} keeps its statistics in an eqx.nn.State; pass `state`")
    return state


def to_canonical(layer: Any, state: Any = None) -> NormRecord:
    """The :class:`NormRecord` of one equinox layer (facade or native); stateful layers need their ``state``."""
    kind = _kind(layer)
    if kind == "batch_norm":
        state = _need_state(layer, state, "to_canonical")
        common = dict(
            kind=kind,
            scale=layer.weight,
            bias=layer.bias,
            epsilon=layer.eps,
            momentum=layer.momentum,
            feature_axes=(0,),
            options=(("mode", layer.mode), ("channelwise_affine", layer.channelwise_affine)),
        )
        if layer.mode == "ema":
            mean, var = state.get(layer.ema_state_index)
            first = state.get(layer.ema_first_time_index)
            count = jnp.where(first, 0, 1).astype(jnp.int32)
            return NormRecord(mean=mean, var=var, count=count, stats_convention="ema_blend", **common)
        mean, var = state.get(layer.batch_state_index)
        return NormRecord(
            mean=mean, var=var, count=state.get(layer.batch_counter), stats_convention="zero_debiased", **common
        )
    if kind in ("layer_norm", "rms_norm"):
        axes = tuple(range(len(layer.shape)))
        return NormRecord(
            kind=kind,
            scale=layer.weight,
            bias=layer.bias,
            epsilon=layer.eps,
            feature_axes=axes,
            reduction_axes=axes,
            options=(("shape", tuple(layer.shape)),),
        )
    if kind in ("group_norm", "instance_norm"):
        groups = layer.groups if kind == "group_norm" else layer.channels
        return NormRecord(
            kind=kind,
            scale=layer.weight,
            bias=layer.bias,
            epsilon=layer.eps,
            feature_axes=(0,),
            num_groups=groups,
            options=(("channelwise_affine", layer.channelwise_affine),),
        )
    if kind == "spectral_norm":
        state = _need_state(layer, state, "to_canonical")
        u, v = state.get(layer.uv_index)
        return NormRecord(
            kind=kind,
            spectral={layer.weight_name: SpectralVectors(u=u, v=v)},
            epsilon=layer.eps,
            options=(("num_power_iterations", layer.num_power_iterations), ("kept_axis", 0)),
        )
    # weight_norm: g is stored with keepdims; the record holds the kept-axis shape.
    g = layer.g
    kept = () if layer.axis is None else (g.shape[layer.axis],)
    return NormRecord(
        kind=kind,
        weight_scales={layer.weight_name: g.reshape(kept)},
        feature_axes=None if layer.axis is None else (layer.axis,),
        options=(("kept_axis", layer.axis),),
    )


def _check(fn: str, layer: Any, what: str, expected: Any, got: Any) -> None:
    if expected != got:
        raise ValueError(
            f"{fn}: {type(layer).__name__}.{what} is {expected!r} but the record has {got!r}; "
            "converting would change the layer's results"
        )


def _array(fn: str, layer: Any, what: str, like: Any, value: Any) -> Any:
    """``value`` as an array with ``like``'s shape and dtype (``None`` must match ``None``)."""
    if like is None or value is None:
        if (like is None) != (value is None):
            raise ValueError(
                f"{fn}: {type(layer).__name__}.{what}: layer has {'no' if like is None else 'an'} array, "
                f"record has {'none' if value is None else 'one'}"
            )
        return None
    value = jnp.asarray(value)
    if tuple(value.shape) != tuple(like.shape):
        raise ValueError(
            f"{fn}: {type(layer).__name__}.{what}: expected shape {tuple(like.shape)}, record has {tuple(value.shape)}"
        )
    if value.dtype != like.dtype:
        raise ValueError(f"{fn}: {type(layer).__name__}.{what}: expected dtype {like.dtype}, record has {value.dtype}")
    return value


def from_canonical(record: NormRecord, like: Any, state: Any = None) -> tuple[Any, Any]:
    """``(layer, state)``: ``like`` (facade or native) with the record's arrays; ``state`` updated if given.

    Stateful layers (BatchNorm, SpectralNorm) need ``state``; it is returned as a
    new ``State`` (the one passed in is invalidated, as by ``State.set``). For the
    stateless layers the returned state is the one passed (possibly ``None``).
    """
    fn = "from_canonical"
    kind = _kind(like)
    _check(fn, like, "kind", kind, record.kind)
    if kind in ("batch_norm", "layer_norm", "rms_norm", "group_norm", "instance_norm"):
        _check(fn, like, "eps", like.eps, record.epsilon)
        weight = _array(fn, like, "weight", like.weight, record.scale)
        bias = _array(fn, like, "bias", like.bias, record.bias)
        layer = eqx.tree_at(lambda m: (m.weight, m.bias), like, (weight, bias), is_leaf=lambda x: x is None)
    if kind == "group_norm" or (kind == "instance_norm" and record.num_groups is not None):
        # A flax-family InstanceNorm record has no num_groups: one group per channel is what the kind means.
        _check(fn, like, "groups", like.groups if kind == "group_norm" else like.channels, record.num_groups)
    if kind == "batch_norm":
        state = _need_state(like, state, fn)
        _check(fn, like, "momentum", like.momentum, record.momentum)
        convention = "ema_blend" if like.mode == "ema" else "zero_debiased"
        # flax's 'ema' statistics are used as is at eval, as mode="ema"'s are once past the first call.
        got = "ema_blend" if like.mode == "ema" and record.stats_convention == "ema" else record.stats_convention
        _check(fn, like, "mode (statistics convention)", convention, got)
        index = like.ema_state_index if like.mode == "ema" else like.batch_state_index
        old_mean, old_var = state.get(index)
        mean = _array(fn, like, "mean", old_mean, record.mean)
        var = _array(fn, like, "var", old_var, record.var)
        count = record.count
        if count is None and record.stats_convention == "ema":
            count = 1  # flax statistics: not the first call any more (as to_equinox sets first_time=False)
        if count is None:
            raise ValueError(f"{fn}: BatchNorm needs the record's count (first-time flag or batch counter)")
        state = state.set(index, (mean, var))
        # lax.full_like keeps the stored scalar's dtype and weak type, which State.set checks.
        if like.mode == "ema":
            first = state.get(like.ema_first_time_index)
            state = state.set(like.ema_first_time_index, lax.full_like(first, jnp.asarray(count) == 0))
        else:
            counter = state.get(like.batch_counter)
            state = state.set(like.batch_counter, lax.full_like(counter, count))
        return layer, state
    if kind in ("layer_norm", "rms_norm", "group_norm", "instance_norm"):
        return layer, state
    if kind == "spectral_norm":
        state = _need_state(like, state, fn)
        _check(fn, like, "eps", like.eps, record.epsilon)
        _check(fn, like, "weight convention (kept_axis)", 0, record.option("kept_axis"))
        vectors = dict(record.spectral)
        if set(vectors) != {like.weight_name}:
            raise ValueError(f"{fn}: SpectralNorm normalizes {like.weight_name!r}, record has {sorted(vectors)}")
        old_u, old_v = state.get(like.uv_index)
        sv = vectors[like.weight_name]
        u = _array(fn, like, "u", old_u, sv.u)
        v = _array(fn, like, "v", old_v, sv.v)
        return like, state.set(like.uv_index, (u, v))
    # weight_norm
    _check(fn, like, "axis", like.axis, record.option("kept_axis"))
    scales = dict(record.weight_scales)
    if set(scales) != {like.weight_name}:
        raise ValueError(f"{fn}: WeightNorm normalizes {like.weight_name!r}, record has {sorted(scales)}")
    g = jnp.asarray(scales[like.weight_name])
    if int(np.prod(g.shape)) != like.g.size:
        raise ValueError(f"{fn}: WeightNorm.g: expected {like.g.size} entries, record has shape {tuple(g.shape)}")
    g = _array(fn, like, "g", like.g, g.reshape(like.g.shape))
    return eqx.tree_at(lambda m: m.g, like, g), state
