"""Drop-in ``flax.linen`` normalization modules whose numbers all come from :mod:`normbridge.core`.

Each class has the installed linen class's dataclass fields (names, order, defaults,
annotations) and ``__call__`` signature, and creates its variables with the same
``self.param`` / ``self.variable`` calls, in the same order and with the same
initializers, so ``init`` from the same key gives the same values. The math
(statistics, normalization, running averages, power iteration, weight norm, dtype
rules) is delegated to :mod:`normbridge.core`; this module only does flax plumbing.

Annotations are evaluated (no ``from __future__ import annotations``) on purpose:
``inspect.signature`` of a class must equal the native one, annotations included.
"""

import dataclasses
import functools
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
from jax.nn import initializers

from normbridge import core
from normbridge._optional import require

nn = require("flax.linen", facade="linen")
_ftyping = require("flax.typing", facade="linen")

Array = _ftyping.Array
Axes = _ftyping.Axes
Dtype = _ftyping.Dtype
Initializer = _ftyping.Initializer

__all__ = ["BatchNorm", "GroupNorm", "InstanceNorm", "LayerNorm", "RMSNorm", "SpectralNorm", "WeightNorm"]


def _merge_flag(layer: str, name: str, ctor: bool | None, call: bool | None) -> bool:
    """A flag given to exactly one of constructor and call (flax's ``merge_param`` rule).

    The errors are ``merge_param``'s, word for word, after the layer name.
    """
    if ctor is None and call is None:
        raise ValueError(f'{layer}: Parameter "{name}" must be passed to the constructor or at call time.')
    if ctor is not None and call is not None:
        raise ValueError(
            f'{layer}: Parameter "{name}" was passed to the constructor and at call time. Should be passed just once.'
        )
    return ctor if call is None else call


def _normalize(
    mdl: Any,
    x: Array,
    mean: Array,
    var: Array,
    reduction_axes: Axes,
    feature_axes: Axes,
    dtype: Dtype | None,
    param_dtype: Dtype,
    epsilon: float,
    use_bias: bool,
    use_scale: bool,
    bias_init: Initializer,
    scale_init: Initializer,
    force_float32_reductions: bool = True,
    groups: int | None = None,
) -> Array:
    """Create ``scale``/``bias`` in ``mdl`` (linen's names, shapes and order) and apply :func:`core.normalize`
    (``groups``: GroupNorm's repeated group statistics, see there).

    ``mean``/``var`` have the reduced shape; they are re-expanded over ``reduction_axes``.
    The result dtype is :func:`core.result_dtype` of the input and the parameters.
    """
    red = core.canonicalize_axes(x.ndim, reduction_axes)
    param_shape, bshape = core.feature_shapes(x.shape, feature_axes)
    mean = jnp.expand_dims(mean, red)
    var = jnp.expand_dims(var, red)
    args: list[Any] = [x]
    scale = bias = None
    if use_scale:
        scale = mdl.param("scale", scale_init, list(param_shape), param_dtype).reshape(bshape)
        if not force_float32_reductions:
            scale = jnp.asarray(scale, param_dtype)
        args.append(scale)
    if use_bias:
        bias = mdl.param("bias", bias_init, list(param_shape), param_dtype).reshape(bshape)
        if not force_float32_reductions:
            bias = jnp.asarray(bias, param_dtype)
        args.append(bias)
    y = core.normalize(x, mean, var, epsilon, scale, bias, order="flax", groups=groups)
    return jnp.asarray(y, core.result_dtype(*args, dtype=dtype))


def _moments(mdl: Any, x: Array, axes: Any, mask: Array | None, *, axis_name: Any, use_mean: bool = True):
    """:func:`core.moments` with the module's dtype / device-sync / variance / precision settings."""
    return core.moments(
        x,
        axes,
        dtype=mdl.dtype,
        axis_name=axis_name,
        axis_index_groups=mdl.axis_index_groups,
        use_mean=use_mean,
        use_fast_variance=mdl.use_fast_variance,
        mask=mask,
        force_float32=mdl.force_float32_reductions,
    )


class BatchNorm(nn.Module):
    """Batch normalization with running statistics in ``batch_stats`` (``mean`` zeros, ``var`` ones).

    Train (``use_running_average=False``): normalize with the batch moments over every
    axis but ``axis`` and update ``ra = momentum·ra + (1−momentum)·batch`` (not during
    ``init``, where the cross-device ``pmean`` is skipped too). Eval: normalize with
    the stored statistics. ``use_running_average`` goes to the constructor xor the call.
    """

    use_running_average: bool | None = None
    axis: int = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True

    @nn.compact
    def __call__(
        self,
        x,
        use_running_average: bool | None = None,
        *,
        mask: jax.Array | None = None,
    ):
        use_running_average = _merge_flag(
            "BatchNorm", "use_running_average", self.use_running_average, use_running_average
        )
        feature_axes = core.canonicalize_axes(x.ndim, self.axis)
        reduction_axes = core.complement_axes(x.ndim, feature_axes)
        feature_shape = [x.shape[ax] for ax in feature_axes]
        stat_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype

        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, stat_dtype), feature_shape)
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, stat_dtype), feature_shape)

        if use_running_average:
            mean, var = ra_mean.value, ra_var.value
            if not self.force_float32_reductions:
                mean, var = jnp.asarray(mean, self.param_dtype), jnp.asarray(var, self.param_dtype)
        else:
            initializing = self.is_initializing()
            mean, var = _moments(self, x, reduction_axes, mask, axis_name=None if initializing else self.axis_name)
            if not initializing:
                ra_mean.value = core.ema(ra_mean.value, mean, self.momentum)
                ra_var.value = core.ema(ra_var.value, var, self.momentum)

        return _normalize(
            self,
            x,
            mean,
            var,
            reduction_axes,
            feature_axes,
            self.dtype,
            self.param_dtype,
            self.epsilon,
            self.use_bias,
            self.use_scale,
            self.bias_init,
            self.scale_init,
            self.force_float32_reductions,
        )


class LayerNorm(nn.Module):
    """Layer normalization: moments over ``reduction_axes`` of each example, params over ``feature_axes``."""

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    reduction_axes: Axes = -1
    feature_axes: Axes = -1
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True

    @nn.compact
    def __call__(self, x, *, mask: jax.Array | None = None):
        mean, var = _moments(self, x, self.reduction_axes, mask, axis_name=self.axis_name)
        return _normalize(
            self,
            x,
            mean,
            var,
            self.reduction_axes,
            self.feature_axes,
            self.dtype,
            self.param_dtype,
            self.epsilon,
            self.use_bias,
            self.use_scale,
            self.bias_init,
            self.scale_init,
            self.force_float32_reductions,
        )


class RMSNorm(nn.Module):
    """RMS normalization: ``x · rsqrt(mean(x²) + eps) · scale`` over ``reduction_axes``; no bias."""

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_scale: bool = True
    scale_init: Initializer = initializers.ones
    reduction_axes: Axes = -1
    feature_axes: Axes = -1
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True

    @nn.compact
    def __call__(self, x, *, mask: jax.Array | None = None):
        mean, var = _moments(self, x, self.reduction_axes, mask, axis_name=self.axis_name, use_mean=False)
        return _normalize(
            self,
            x,
            mean,
            var,
            self.reduction_axes,
            self.feature_axes,
            self.dtype,
            self.param_dtype,
            self.epsilon,
            False,
            self.use_scale,
            initializers.zeros,
            self.scale_init,
            self.force_float32_reductions,
        )


class GroupNorm(nn.Module):
    """Group normalization over contiguous channel blocks of the last axis.

    Default reductions: axes ``1 .. ndim−2`` plus the within-group axis (axis 0 is the
    batch). A custom ``reduction_axes`` must include the last axis. Exactly one of
    ``num_groups`` / ``group_size`` (pass ``num_groups=None`` to use ``group_size``).

    Deviation: ``mask`` may be any shape broadcastable to ``x``, as linen documents; linen
    itself raises ``TypeError`` unless the mask's last axis has all ``C`` channels.
    """

    num_groups: int | None = 32
    group_size: int | None = None
    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    reduction_axes: Axes | None = None
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True

    @nn.compact
    def __call__(self, x, *, mask: jax.Array | None = None):
        if self.reduction_axes is not None:
            reduction_axes = self.reduction_axes
        else:
            reduction_axes = [*range(1, x.ndim - 1), -1]
        feature_axis = -1
        reduction_axes = core.canonicalize_axes(x.ndim, reduction_axes)
        if reduction_axes[-1] != (feature_axis % x.ndim):
            raise ValueError(
                "GroupNorm: The reduction axes must include the final dimension as this is assumed to be the "
                f"feature axis. (reduction_axes={self.reduction_axes!r}, input of rank {x.ndim})"
            )
        if self.group_size is None and self.num_groups is not None:
            # linen asserts this (an AssertionError) before dividing the channels
            assert isinstance(self.num_groups, int), f"GroupNorm: num_groups={self.num_groups!r} is not an int"
        channels = x.shape[-1]
        try:
            num_groups, group_size = core.resolve_groups(channels, self.num_groups, self.group_size)
        except ValueError as err:
            raise ValueError(
                f"GroupNorm: {err} (num_groups={self.num_groups!r}, group_size={self.group_size!r}, "
                f"channels={channels})"
            ) from None

        if mask is not None:
            # Documented: a mask "of shape broadcastable to inputs". linen reshapes the raw mask and crashes
            # unless its last axis is C; broadcasting first follows the documentation and is a no-op
            # (bitwise the same result) for every mask linen accepts.
            try:
                mask = jnp.broadcast_to(mask, x.shape)
            except ValueError:
                # a mask that fits neither way: linen's own reshape raises its error (a TypeError) first
                mask.reshape((*mask.shape[:-1], num_groups, group_size))
                raise
            mask = core.split_groups(mask, num_groups)
        mean, var = _moments(
            self, core.split_groups(x, num_groups), [*reduction_axes[:-1], -1], mask, axis_name=self.axis_name
        )
        # Per-group statistics back to one value per channel (layout only: contiguous blocks).
        mean = jnp.repeat(mean, group_size, axis=-1)
        var = jnp.repeat(var, group_size, axis=-1)
        return _normalize(
            self,
            x,
            mean,
            var,
            reduction_axes[:-1],
            (feature_axis,),
            self.dtype,
            self.param_dtype,
            self.epsilon,
            self.use_bias,
            self.use_scale,
            self.bias_init,
            self.scale_init,
            self.force_float32_reductions,
            groups=num_groups,
        )


class InstanceNorm(nn.Module):
    """Instance normalization: moments over every axis except 0 (batch) and ``feature_axes``."""

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    feature_axes: Axes = -1
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True

    @nn.compact
    def __call__(self, x, *, mask: jax.Array | None = None):
        feature_axes = core.canonicalize_axes(x.ndim, self.feature_axes)
        if 0 in feature_axes:
            raise ValueError(
                "InstanceNorm: The channel axes cannot include the leading dimension as this is assumed to be the "
                f"batch axis. (feature_axes={self.feature_axes!r}, input of rank {x.ndim})"
            )
        reduction_axes = [i for i in range(1, x.ndim) if i not in feature_axes]
        mean, var = _moments(self, x, reduction_axes, mask, axis_name=self.axis_name)
        return _normalize(
            self,
            x,
            mean,
            var,
            reduction_axes,
            feature_axes,
            self.dtype,
            self.param_dtype,
            self.epsilon,
            self.use_bias,
            self.use_scale,
            self.bias_init,
            self.scale_init,
            self.force_float32_reductions,
        )


def _path_name(layer_name: str | None, path: tuple[Any, ...]) -> str:
    """``'<layer>/<param path>'`` as linen names SpectralNorm/WeightNorm variables (``path[0]`` is the collection)."""
    return f"{layer_name}/" + "/".join(k.key for k in path[1:])


class SpectralNorm(nn.Module):
    """Spectral normalization of every ≥2-D variable of ``layer_instance``: ``W / σ(W)``.

    σ comes from ``n_steps`` flax power-iteration steps on the ``(-1, out)`` view of
    ``W`` starting from the stored ``u`` (``collection_name``: ``'<layer>/<path>/u'``
    ``(1, out)`` and ``'.../sigma'`` ``()``). ``update_stats`` (required, keyword-only)
    stores the new ``u`` and σ. Like linen, the normalized weight is written into
    ``params`` at ``init``.
    """

    layer_instance: nn.Module
    n_steps: int = 1
    epsilon: float = 1e-12
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    error_on_non_matrix: bool = False
    collection_name: str = "batch_stats"

    @nn.compact
    def __call__(self, *args, update_stats: bool, **kwargs):
        def layer_forward(layer_instance):
            return layer_instance(*args, **kwargs)

        return nn.map_variables(
            layer_forward,
            trans_in_fn=lambda vs: jax.tree_util.tree_map_with_path(
                functools.partial(self._spectral_normalize, update_stats=update_stats), vs
            ),
            init=self.is_initializing(),
            mutable=True,
        )(self.layer_instance)

    def _spectral_normalize(self, path, vs, update_stats):
        value = jnp.asarray(vs)
        value_shape = value.shape
        if value.ndim <= 1 or self.n_steps < 1:
            return value
        if value.ndim > 2 and self.error_on_non_matrix:
            raise ValueError(
                f"SpectralNorm: variable {_path_name(self.layer_instance.name, path)!r}: "
                f"Input is {value.ndim}D but error_on_non_matrix is True"
            )
        matrix = core.as_matrix(value, -1)
        name = _path_name(self.layer_instance.name, path)
        u_var = self.variable(
            self.collection_name,
            name + "/u",
            jax.random.normal,
            # Only draw a key when the variable is created: make_rng advances the rng counter.
            self.make_rng("params") if not self.has_variable(self.collection_name, name + "/u") else None,
            (1, matrix.shape[-1]),
            self.param_dtype,
        )
        sigma_var = self.variable(self.collection_name, name + "/sigma", jnp.ones, (), self.param_dtype)
        u0, v0 = core.power_iteration_flax(matrix, u_var.value, self.n_steps, self.epsilon)
        sigma = core.sigma_flax(matrix, u0, v0)
        value_bar = core.divide_by_sigma(matrix, sigma).reshape(value_shape)
        if update_stats:
            u_var.value = u0
            sigma_var.value = sigma
        return jnp.asarray(value_bar, core.result_dtype(vs, u0, v0, sigma, dtype=self.dtype))


class WeightNorm(nn.Module):
    """Weight normalization ``scale · W / ‖W‖`` (norm over the non-feature axes) of ``layer_instance``'s variables.

    Only variables whose ``'<layer>/<path>'`` string contains one of ``variable_filter``
    (substring test; ``None`` = all) are normalized. The gain is a ``params`` entry
    ``'<layer>/<path>/scale'`` of the feature shape. The normalized weight is written
    into ``params`` at ``init``, as linen does.
    """

    layer_instance: nn.Module
    epsilon: float = 1e-12
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_scale: bool = True
    scale_init: Initializer = initializers.ones
    feature_axes: Axes | None = -1
    variable_filter: Iterable | None = dataclasses.field(default_factory=lambda: {"kernel"})

    @nn.compact
    def __call__(self, *args, **kwargs):
        def layer_forward(layer_instance):
            return layer_instance(*args, **kwargs)

        return nn.map_variables(
            layer_forward,
            trans_in_fn=lambda vs: jax.tree_util.tree_map_with_path(self._l2_normalize, vs),
            init=self.is_initializing(),
        )(self.layer_instance)

    def _l2_normalize(self, path, vs):
        value = jnp.asarray(vs)
        str_path = f"{self.layer_instance.name}/" + jax.tree_util.keystr(path[1:], simple=True, separator="/")
        if self.variable_filter and not any(name in str_path for name in self.variable_filter):
            return value
        scale = None
        args: list[Any] = [vs]
        if self.use_scale:
            scale = self.param(
                str_path + "/scale",
                self.scale_init,
                list(core.weight_norm_scale_shape(value.shape, self.feature_axes)),
                self.param_dtype,
            )
            args.append(scale)
        value_bar = core.weight_norm_flax(value, self.feature_axes, self.epsilon, scale)
        return jnp.asarray(value_bar, core.result_dtype(*args, dtype=self.dtype))
