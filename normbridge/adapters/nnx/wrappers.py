"""NNX ``SpectralNorm`` and ``WeightNorm`` wrappers whose math comes from :mod:`normbridge.core`.

Both keep nnx's constructor and state layout but, following linen and the documented
intent, **never overwrite the wrapped layer's stored weights**: the normalized weight is
put into the wrapped layer's Variables only for the duration of the wrapped call and the
raw value is put back afterwards (nnx 0.12.8 writes it back permanently on every call,
google/flax#5576, so a second call renormalizes an already-normalized kernel and
``nnx.grad``/``nnx.Optimizer`` update the normalized kernel). Gradients flow from the
output through the normalization into the raw weights, as in linen.

WeightNorm's gains are ``nnx.Param`` (nnx 0.12.8 stores plain arrays, so they never
train) created with ``param_dtype``.
"""

import contextlib
import typing as tp

import jax
import jax.numpy as jnp

from normbridge import core
from normbridge._optional import require
from normbridge.adapters.nnx._common import first_from, path_str, promote_dtype

nnx = require("flax.nnx", facade="nnx", extra="nnx")
initializers = require("flax.nnx.nn.initializers", facade="nnx", extra="nnx")
_ftyping = require("flax.typing", facade="nnx", extra="nnx")

Array = _ftyping.Array
Axes = _ftyping.Axes
Dtype = _ftyping.Dtype
Initializer = _ftyping.Initializer
PromoteDtypeFn = _ftyping.PromoteDtypeFn

_KERNEL = nnx.PathContains("kernel")

__all__ = ["SpectralNorm", "WeightNorm"]


@contextlib.contextmanager
def _substituted(swaps: list[tuple[tp.Any, jax.Array]]) -> tp.Iterator[None]:
    """Give each Variable a temporary value; restore the raw values afterwards, even on error."""
    raw = [(var, var.get_value()) for var, _ in swaps]
    try:
        for var, value in swaps:
            var[...] = value  # same rule as nnx's write-back: cast to the Variable's dtype
        yield
    finally:
        for var, value in raw:
            var.set_value(value)


def _params(module: tp.Any) -> list[tuple[tuple[tp.Any, ...], tp.Any]]:
    """``(path, Variable)`` of every ``nnx.Param`` in ``module``, in nnx's flat-state order."""
    return list(nnx.to_flat_state(nnx.state(module, nnx.Param)))


class SpectralNorm(nnx.Module):
    """Spectral normalization ``W/σ(W)`` of every ``nnx.Param`` with ``ndim ≥ 2`` of the wrapped layer.

    State: ``batch_stats[(*param_path, 'u')]`` ``(1, out)`` (``N(0, 0.01²)`` init) and
    ``batch_stats[(*param_path, 'sigma')]`` ``()`` (ones), both ``nnx.BatchStat`` in
    ``param_dtype``. ``update_stats`` (call) or else ``not use_running_average``
    (``.train()``/``.eval()``) says whether ``u``/``σ`` are stored. Power iteration:
    :func:`core.power_iteration_flax` on the kernel viewed as ``(-1, out)``.
    """

    def __init__(
        self,
        layer_instance: nnx.Module,
        *,
        n_steps: int = 1,
        epsilon: float = 1e-12,
        dtype: tp.Optional[Dtype] = None,
        param_dtype: Dtype = jnp.float32,
        error_on_non_matrix: bool = False,
        update_stats: bool = True,
        rngs: "nnx.Rngs",
    ):
        self.layer_instance = layer_instance
        self.n_steps = n_steps
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.error_on_non_matrix = error_on_non_matrix
        self.use_running_average = not update_stats

        batch_stats: dict[tuple, tp.Any] = {}
        for path, param in _params(self.layer_instance):
            if param.ndim <= 1 or self.n_steps < 1:
                continue
            self._check_matrix(path, param.ndim)
            key = rngs.params()  # one key per normalized weight, shared by u and sigma (as nnx)
            out = param.shape[-1]
            batch_stats[(*path, "u")] = nnx.BatchStat(initializers.normal()(key, (1, out), self.param_dtype))
            batch_stats[(*path, "sigma")] = nnx.BatchStat(initializers.ones(key, (), self.param_dtype))
        self.batch_stats = nnx.data(batch_stats)

    def _check_matrix(self, path: tuple, ndim: int) -> None:
        if ndim > 2 and self.error_on_non_matrix:
            raise ValueError(
                f"SpectralNorm: parameter {path_str(path)!r}: "
                f"Layer instance parameter is {ndim}D but error_on_non_matrix is True"
            )

    def __call__(self, x, update_stats: tp.Optional[bool] = None):
        update_stats = first_from(
            update_stats,
            not self.use_running_average,
            # nnx's text, whitespace included (unreachable there too: use_running_average is a bool)
            error_msg="""No `update_stats` argument was provided to SpectralNorm
        as either a __call__ argument or __init__ argument.""",
        )
        swaps = []
        for path, param in _params(self.layer_instance):
            normalized = self._normalized(path, param, update_stats)
            if normalized is not None:
                swaps.append((param, normalized))
        with _substituted(swaps):
            return self.layer_instance(x)

    def _normalized(self, path: tuple, param: tp.Any, update_stats: bool) -> jax.Array | None:
        """``W/σ`` for one weight (``None`` if it is not normalized); stores ``u``, ``σ`` when updating."""
        if param.ndim <= 1 or self.n_steps < 1:
            return None
        self._check_matrix(path, param.ndim)
        path_u, path_sigma = (*path, "u"), (*path, "sigma")
        for which, p in (("u", path_u), ("sigma", path_sigma)):
            if p not in self.batch_stats:
                raise RuntimeError(
                    f"SpectralNorm: Could not find the path for {which} batch stat corresponding to the param {path} "
                    "in the batch stats dict. Parameters of the layer_instance should not change!"
                )
        w = param[...]
        mat = core.as_matrix(w, -1)
        u, v = core.power_iteration_flax(mat, self.batch_stats[path_u][...], self.n_steps, self.epsilon)
        sigma = core.sigma_flax(mat, u, v)
        normalized = core.divide_by_sigma(mat, sigma).reshape(w.shape)
        if update_stats:
            self.batch_stats[path_u][...] = u
            self.batch_stats[path_sigma][...] = sigma
        return jnp.asarray(normalized, core.result_dtype(normalized, u, v, sigma, dtype=self.dtype))


class WeightNorm(nnx.Module):
    """Weight normalization ``W = scale · W/‖W‖`` (norm over the non-feature axes) of the filtered Params.

    State: the wrapped layer, plus ``scales[param_path]`` — an ``nnx.Param`` with the
    shape of the kept ``feature_axes`` (``()`` for ``None``), ``scale_init`` in
    ``param_dtype`` — when ``use_scale``. Math: :func:`core.weight_norm_flax`.
    """

    def __init__(
        self,
        layer_instance: nnx.Module,
        *,
        feature_axes: Axes | None = -1,
        use_scale: bool = True,
        scale_init: Initializer = initializers.ones,
        epsilon: float = 1e-12,
        dtype: tp.Optional[Dtype] = None,
        param_dtype: Dtype = jnp.float32,
        variable_filter: "nnx.filterlib.Filter" = _KERNEL,
        promote_dtype: PromoteDtypeFn = promote_dtype,
        rngs: "nnx.Rngs",
    ):
        self.layer_instance = layer_instance
        self.feature_axes = () if feature_axes is None else feature_axes
        self.use_scale = use_scale
        self.scale_init = scale_init
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.variable_filter = nnx.filterlib.to_predicate(variable_filter)
        self.promote_dtype = promote_dtype
        self.scales: tp.Optional[dict] = None
        if use_scale:
            # nnx passes the rng *stream* without drawing from it, so the caller's later
            # layers see the same keys; we derive the key the stream would give next,
            # folded with a constant, and leave the stream's count untouched likewise.
            stream = rngs["params"]
            key = jax.random.fold_in(jax.random.fold_in(stream.key[...], stream.count[...]), 0x5CA1E)
            scales = {}
            for path, param in _params(self.layer_instance):
                if self.variable_filter(path, param):
                    shape = core.weight_norm_scale_shape(param.shape, self.feature_axes)
                    scales[path] = nnx.Param(scale_init(key, shape, param_dtype))
            self.scales = nnx.data(scales)

    def __call__(self, x: Array, *args, **kwargs) -> Array:
        swaps = []
        for path, param in _params(self.layer_instance):
            if not self.variable_filter(path, param):
                continue
            scale = None
            if self.use_scale:
                if path not in self.scales:
                    raise RuntimeError(
                        f"WeightNorm: Could not find the scale corresponding to the param {path} "
                        "in scales dict. Parameters of the layer_instance should not change!"
                    )
                scale = self.scales[path][...]
            w = param[...]
            normalized = core.weight_norm_flax(w, self.feature_axes, self.epsilon, scale)
            swaps.append((param, jnp.asarray(normalized, core.result_dtype(w, scale, dtype=self.dtype))))
        with _substituted(swaps):
            return self.layer_instance(x, *args, **kwargs)
