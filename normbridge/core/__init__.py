"""normbridge.core: every normalization formula, once, as pure functions on arrays.

Imports nothing but ``jax`` and ``numpy``. The facades in ``normbridge.adapters``
translate each framework's signature, state layout and mode flags into calls here.
"""

from normbridge.core.axes import canonicalize_axes, complement_axes, feature_shapes
from normbridge.core.config import fast, implementation, use_fast
from normbridge.core.dtypes import result_dtype, stats_dtype, upcast_dtype
from normbridge.core.groups import merge_groups, resolve_groups, split_groups
from normbridge.core.normalize import affine, normalize
from normbridge.core.record import KIND_OF_CLASS, LAYER_KINDS, NormRecord, SpectralVectors
from normbridge.core.running import debias, ema, ema_blend
from normbridge.core.spectral import (
    as_matrix,
    divide_by_sigma,
    l2_normalize,
    power_iteration_eqx,
    power_iteration_flax,
    power_iteration_step_eqx,
    sigma_eqx,
    sigma_flax,
)
from normbridge.core.stats import abs_sq, moments
from normbridge.core.weight_norm import (
    norm_except_axis,
    weight_norm_axes,
    weight_norm_eqx,
    weight_norm_flax,
    weight_norm_scale_shape,
)

__all__ = [
    "KIND_OF_CLASS",
    "LAYER_KINDS",
    "NormRecord",
    "SpectralVectors",
    "abs_sq",
    "affine",
    "as_matrix",
    "canonicalize_axes",
    "complement_axes",
    "debias",
    "divide_by_sigma",
    "ema",
    "ema_blend",
    "fast",
    "feature_shapes",
    "implementation",
    "l2_normalize",
    "merge_groups",
    "moments",
    "norm_except_axis",
    "normalize",
    "power_iteration_eqx",
    "power_iteration_flax",
    "power_iteration_step_eqx",
    "resolve_groups",
    "result_dtype",
    "sigma_eqx",
    "sigma_flax",
    "split_groups",
    "stats_dtype",
    "upcast_dtype",
    "use_fast",
    "weight_norm_axes",
    "weight_norm_eqx",
    "weight_norm_flax",
    "weight_norm_scale_shape",
]
