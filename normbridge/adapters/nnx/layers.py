"""Drop-in ``flax.nnx`` normalization modules whose numbers all come from :mod:`normbridge.core`.

Each class has the installed nnx class's constructor (keyword-only arguments, required
``rngs``, ``promote_dtype``, ``*_metadata``), creates its Variables in the same order
with the same initializers and ``rngs.params()`` draws, and stores the same attributes,
so ``Facade(..., rngs=nnx.Rngs(0))`` and ``nnx.X(..., rngs=nnx.Rngs(0))`` have the same
``nnx.state``. The math is delegated to :mod:`normbridge.core`.

Annotations are evaluated (no ``from __future__ import annotations``) so that
``inspect.signature`` of ``__init__``/``__call__`` reads like the native one.
"""

import typing as tp
from types import MappingProxyType

import jax
import jax.numpy as jnp

from normbridge import core
from normbridge._optional import require
from normbridge.adapters.nnx._common import first_from, normalize_flax, promote_dtype, value_or_none

nnx = require("flax.nnx", facade="nnx", extra="nnx")
initializers = require("flax.nnx.nn.initializers", facade="nnx", extra="nnx")
_ftyping = require("flax.typing", facade="nnx", extra="nnx")

Array = _ftyping.Array
Axes = _ftyping.Axes
Dtype = _ftyping.Dtype
Initializer = _ftyping.Initializer
PromoteDtypeFn = _ftyping.PromoteDtypeFn

_ZEROS = initializers.zeros_init()
_ONES = initializers.ones_init()

__all__ = ["BatchNorm", "GroupNorm", "InstanceNorm", "LayerNorm", "RMSNorm"]

_NO_FLAG = (
    "No `use_running_average` argument was provided to BatchNorm. Consider one of the following options:\n\n"
    "1. Pass `use_running_average` to the BatchNorm constructor:\n\n"
    # nnx's text names its own class; split so that the no-native-layer source scan does not read it as a use
    "  self.bn = nnx" ".BatchNorm(..., use_running_average=True/False)\n\n"
    "2. Pass `use_running_average` to the BatchNorm __call__:\n\n"
    "  self.bn(x, use_running_average=True/False)\n\n"
    "3. Use `nnx.view` to create a view of the model with a specific `use_running_average` value:\n\n"
    "  model_view = nnx.view(model, use_running_average=True/False)\n"
)


def _affine(
    module: tp.Any,
    num_features: int,
    rngs: tp.Any,
    *,
    use_scale: bool,
    use_bias: bool,
    scale_init: tp.Any,
    bias_init: tp.Any,
    param_dtype: tp.Any,
    scale_metadata: tp.Mapping[str, tp.Any],
    bias_metadata: tp.Mapping[str, tp.Any],
    none: tp.Callable[[tp.Any], tp.Any] = lambda v: nnx.data(v),
) -> None:
    """``scale`` then ``bias`` as ``nnx.Param`` ``(num_features,)``, each drawing one ``rngs.params()`` key."""
    shape = (num_features,)
    if use_scale:
        module.scale = nnx.Param(scale_init(rngs.params(), shape, param_dtype), **scale_metadata)
    else:
        module.scale = none(None)
    if use_bias:
        module.bias = nnx.Param(bias_init(rngs.params(), shape, param_dtype), **bias_metadata)
    else:
        module.bias = none(None)


class BatchNorm(nnx.Module):
    """Batch normalization; running ``mean``/``var`` are ``nnx.BatchStat`` ``(num_features,)`` in float32.

    Train (``use_running_average=False``, the default; ``.train()``): normalize with the
    batch moments over every axis but ``axis`` and update
    ``ra = momentum·ra + (1−momentum)·batch``. Eval (``True``; ``.eval()``;
    ``nnx.view(m, use_running_average=True)``): normalize with the stored statistics.
    The call argument wins over the attribute. Inputs, running stats and parameters go
    through ``promote_dtype`` first (so with ``dtype=None`` the output is at least f32).
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        dtype: tp.Optional[Dtype] = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = _ZEROS,
        scale_init: Initializer = _ONES,
        axis_name: tp.Optional[str] = None,
        axis_index_groups: tp.Any = None,
        use_fast_variance: bool = True,
        promote_dtype: PromoteDtypeFn = promote_dtype,
        rngs: "nnx.Rngs",
        bias_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
        scale_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
    ):
        feature_shape = (num_features,)
        self.mean = nnx.BatchStat(jnp.zeros(feature_shape, jnp.float32))
        self.var = nnx.BatchStat(jnp.ones(feature_shape, jnp.float32))
        _affine(
            self, num_features, rngs, use_scale=use_scale, use_bias=use_bias, scale_init=scale_init,
            bias_init=bias_init, param_dtype=param_dtype, scale_metadata=scale_metadata, bias_metadata=bias_metadata,
        )
        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype

    def __call__(
        self,
        x,
        use_running_average: tp.Optional[bool] = None,
        *,
        mask: tp.Optional[jax.Array] = None,
    ):
        use_running_average = first_from(use_running_average, self.use_running_average, error_msg=_NO_FLAG)
        feature_axes = core.canonicalize_axes(x.ndim, self.axis)
        reduction_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
        x, mean, var, scale, bias = self.promote_dtype(
            (x, self.mean[...], self.var[...], value_or_none(self.scale), value_or_none(self.bias)), dtype=self.dtype
        )
        if not use_running_average:
            mean, var = core.moments(
                x,
                reduction_axes,
                dtype=self.dtype,
                axis_name=self.axis_name,
                axis_index_groups=self.axis_index_groups,
                use_fast_variance=self.use_fast_variance,
                mask=mask,
            )
            # Like nnx: stop the gradient into the stored statistics only where they are refs that can update.
            if getattr(self.mean, "_can_update", True) or getattr(self.var, "_can_update", True):
                stop = jax.lax.stop_gradient
            else:  # pragma: no cover - array-ref mode

                def stop(v):
                    return v

            self.mean[...] = stop(core.ema(self.mean[...], mean, self.momentum))
            self.var[...] = stop(core.ema(self.var[...], var, self.momentum))
        return normalize_flax(x, mean, var, scale, bias, reduction_axes, feature_axes, self.dtype, self.epsilon)

    def set_view(self, use_running_average: bool | None = None):
        """Class method used by ``nnx.view``.

        Args:
          use_running_average: if True, the stored batch statistics will be
            used instead of computing the batch statistics on the input.
        """
        # nnx.view_info parses the ``Args:`` section above: it must list every argument, as native's does
        # (same wording, so that view_info prints the same text for facade and native).
        if use_running_average is not None:
            self.use_running_average = use_running_average


class LayerNorm(nnx.Module):
    """Layer normalization over ``reduction_axes``; ``(num_features,)`` parameters reshaped to the feature axes."""

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: tp.Optional[Dtype] = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = _ZEROS,
        scale_init: Initializer = _ONES,
        reduction_axes: Axes = -1,
        feature_axes: Axes = -1,
        axis_name: tp.Optional[str] = None,
        axis_index_groups: tp.Any = None,
        use_fast_variance: bool = True,
        promote_dtype: PromoteDtypeFn = promote_dtype,
        rngs: "nnx.Rngs",
        bias_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
        scale_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
    ):
        _affine(
            self, num_features, rngs, use_scale=use_scale, use_bias=use_bias, scale_init=scale_init,
            bias_init=bias_init, param_dtype=param_dtype, scale_metadata=scale_metadata, bias_metadata=bias_metadata,
        )
        self.num_features = num_features
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.reduction_axes = reduction_axes
        self.feature_axes = feature_axes
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype

    def __call__(self, x, *, mask: tp.Optional[jax.Array] = None):
        x, scale, bias = self.promote_dtype((x, value_or_none(self.scale), value_or_none(self.bias)), dtype=self.dtype)
        mean, var = core.moments(
            x,
            self.reduction_axes,
            dtype=self.dtype,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            use_fast_variance=self.use_fast_variance,
            mask=mask,
        )
        return normalize_flax(
            x, mean, var, scale, bias, self.reduction_axes, self.feature_axes, self.dtype, self.epsilon
        )


class RMSNorm(nnx.Module):
    """RMS normalization: ``x·rsqrt(mean(x²)+eps)·scale`` over ``reduction_axes`` (no bias, no centring)."""

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: tp.Optional[Dtype] = None,
        param_dtype: Dtype = jnp.float32,
        use_scale: bool = True,
        scale_init: Initializer = initializers.ones,
        reduction_axes: Axes = -1,
        feature_axes: Axes = -1,
        axis_name: tp.Optional[str] = None,
        axis_index_groups: tp.Any = None,
        use_fast_variance: bool = True,
        promote_dtype: PromoteDtypeFn = promote_dtype,
        rngs: "nnx.Rngs",
        scale_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
    ):
        feature_shape = (num_features,)
        if use_scale:
            self.scale = nnx.Param(scale_init(rngs.params(), feature_shape, param_dtype), **scale_metadata)
        else:
            self.scale = nnx.data(None)
        self.num_features = num_features
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_scale = use_scale
        self.reduction_axes = reduction_axes
        self.feature_axes = feature_axes
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype

    def __call__(self, x, mask: tp.Optional[jax.Array] = None):
        x, scale = self.promote_dtype((x, value_or_none(self.scale)), dtype=self.dtype)
        mean, var = core.moments(
            x,
            self.reduction_axes,
            dtype=self.dtype,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            use_mean=False,
            use_fast_variance=self.use_fast_variance,
            mask=mask,
        )
        return normalize_flax(
            x, mean, var, scale, None, self.reduction_axes, self.feature_axes, self.dtype, self.epsilon
        )


class GroupNorm(nnx.Module):
    """Group normalization over contiguous channel blocks of the last axis.

    Deviation from nnx 0.12.8 (which repeats the group statistics along axis 1, wrong
    unless the statistics are 2-D ``(N, G)``): the statistics are repeated along the
    last axis, as linen does and as the docstring describes; and, like linen, custom
    ``reduction_axes`` must include the last axis.
    """

    def __init__(
        self,
        num_features: int,
        num_groups: tp.Optional[int] = 32,
        group_size: tp.Optional[int] = None,
        *,
        epsilon: float = 1e-6,
        dtype: tp.Optional[Dtype] = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = _ZEROS,
        scale_init: Initializer = _ONES,
        reduction_axes: tp.Optional[Axes] = None,
        axis_name: tp.Optional[str] = None,
        axis_index_groups: tp.Any = None,
        use_fast_variance: bool = True,
        promote_dtype: PromoteDtypeFn = promote_dtype,
        rngs: "nnx.Rngs",
        bias_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
        scale_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
    ):
        self.feature_axis = -1
        try:
            if num_groups is not None and group_size is None and not isinstance(num_groups, int):
                # nnx's own test: a non-int num_groups gets the "does not divide" message
                raise ValueError(
                    f"Number of groups ({num_groups}) does not divide the number of channels ({num_features})."
                )
            self.num_groups, self.group_size = core.resolve_groups(
                num_features, num_groups, group_size, channels_word="features"
            )
        except ValueError as err:
            raise ValueError(f"GroupNorm(num_features={num_features}): {err}") from None
        _affine(
            self, num_features, rngs, use_scale=use_scale, use_bias=use_bias, scale_init=scale_init,
            bias_init=bias_init, param_dtype=param_dtype, scale_metadata=scale_metadata, bias_metadata=bias_metadata,
        )
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.reduction_axes = reduction_axes
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype

    def __call__(self, x, *, mask: tp.Optional[jax.Array] = None):
        if self.reduction_axes is not None:
            reduction_axes = self.reduction_axes
        else:
            reduction_axes = [*range(1, x.ndim - 1), -1]
        reduction_axes = core.canonicalize_axes(x.ndim, reduction_axes)
        if reduction_axes[-1] != x.ndim - 1:
            # linen's check and message (nnx has none: see the class docstring)
            raise ValueError(
                "GroupNorm: The reduction axes must include the final dimension as this is assumed to be the "
                f"feature axis. (reduction_axes={self.reduction_axes!r}, input of rank {x.ndim})"
            )
        group_shape = (*x.shape[:-1], self.num_groups, self.group_size)
        if mask is not None:
            mask = core.split_groups(mask, self.num_groups)
        x, scale, bias = self.promote_dtype((x, value_or_none(self.scale), value_or_none(self.bias)), dtype=self.dtype)
        mean, var = core.moments(
            x.reshape(group_shape),
            [*reduction_axes[:-1], -1],
            dtype=self.dtype,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            use_fast_variance=self.use_fast_variance,
            mask=mask,
        )
        # Back from (…, G) to (…, C): each group's statistic over its channel block (the last axis).
        mean = jnp.repeat(mean, self.group_size, axis=-1)
        var = jnp.repeat(var, self.group_size, axis=-1)
        return normalize_flax(
            x, mean, var, scale, bias, reduction_axes[:-1], (self.feature_axis,), self.dtype, self.epsilon,
            groups=self.num_groups,
        )


class InstanceNorm(nnx.Module):
    """Instance normalization: per example (axis 0) and per feature, over every other axis."""

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: tp.Optional[Dtype] = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = initializers.zeros,
        scale_init: Initializer = initializers.ones,
        feature_axes: Axes = -1,
        axis_name: tp.Optional[str] = None,
        axis_index_groups: tp.Any = None,
        use_fast_variance: bool = True,
        promote_dtype: PromoteDtypeFn = promote_dtype,
        rngs: "nnx.Rngs",
        bias_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
        scale_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
    ):
        _affine(
            self, num_features, rngs, use_scale=use_scale, use_bias=use_bias, scale_init=scale_init,
            bias_init=bias_init, param_dtype=param_dtype, scale_metadata=scale_metadata, bias_metadata=bias_metadata,
            none=lambda v: v,  # nnx InstanceNorm stores a plain None
        )
        self.num_features = num_features
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.feature_axes = feature_axes
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype

    def __call__(self, x, *, mask: tp.Optional[jax.Array] = None):
        feature_axes = core.canonicalize_axes(x.ndim, self.feature_axes)
        if 0 in feature_axes:
            raise ValueError(
                "InstanceNorm: The channel axes cannot include the leading dimension as this is assumed to be the "
                f"batch axis. (feature_axes={self.feature_axes!r}, input of rank {x.ndim})"
            )
        reduction_axes = [i for i in range(1, x.ndim) if i not in feature_axes]
        x, scale, bias = self.promote_dtype((x, value_or_none(self.scale), value_or_none(self.bias)), dtype=self.dtype)
        mean, var = core.moments(
            x,
            reduction_axes,
            dtype=self.dtype,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            use_fast_variance=self.use_fast_variance,
            mask=mask,
        )
        return normalize_flax(x, mean, var, scale, bias, reduction_axes, feature_axes, self.dtype, self.epsilon)
