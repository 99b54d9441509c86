"""linen variable subtree ⇄ canonical :class:`~normbridge.core.NormRecord`, bit for bit.

Subtree layouts (what ``to_canonical`` takes and ``from_canonical`` returns):

* BatchNorm: ``{'params': {'scale', 'bias'}, 'batch_stats': {'mean', 'var'}}``;
* LayerNorm / GroupNorm / InstanceNorm: ``{'params': {'scale', 'bias'}}``; RMSNorm: ``{'params': {'scale'}}``
  (disabled parameters are absent, and so is an empty collection);
* SpectralNorm: the layer's own flat dict in ``collection_name`` (``variables['batch_stats']['SpectralNorm_0']``),
  ``{'<layer>/<path>/u': (1, out), '<layer>/<path>/sigma': ()}``. ``to_canonical`` also accepts it wrapped as
  ``{collection_name: {...}}`` (e.g. the whole variables dict of a top-level SpectralNorm);
* WeightNorm: the layer's own flat ``params`` dict ``{'<layer>/<path>/scale': feature shape}`` (or wrapped
  as ``{'params': {...}}``; nested dicts there, the wrapped layer's own params, are skipped).

In the record, SpectralNorm/WeightNorm paths are relative to the wrapped layer (``'kernel'``,
``'inner/kernel'``); the linen layer name (``'Dense_1'``, ``'layer_instance'``) is kept in
``record.option('layer_name')`` so the round trip restores the same keys. ``u`` is stored as
``(out,)``. Native ``flax.linen`` instances are accepted (dispatch is by class name: same layout).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from normbridge import core
from normbridge.core import NormRecord, SpectralVectors

_KINDS = core.KIND_OF_CLASS


def _kind(module: Any, fn: str) -> str:
    name = type(module).__name__
    if name not in _KINDS:
        raise TypeError(f"{fn}: unsupported module {name}; expected one of {sorted(_KINDS)}")
    return _KINDS[name]


def _axes(axes: Any) -> tuple[int, ...] | None:
    if axes is None:
        return None
    return tuple(axes) if isinstance(axes, Iterable) else (int(axes),)


def _dtype_name(dtype: Any) -> str | None:
    return None if dtype is None else str(jnp.dtype(dtype))


def _plain(tree: Mapping[str, Any]) -> dict[str, Any]:
    """A plain ``dict`` of a (Frozen)dict, one level deep."""
    return {k: tree[k] for k in tree}


def _unwrap(subtree: Mapping[str, Any], collection: str) -> dict[str, Any]:
    """The flat dict of a wrapper layer, whether given as ``{collection: {...}}`` or directly."""
    if collection in subtree and isinstance(subtree[collection], Mapping):
        return _plain(subtree[collection])
    return _plain(subtree)


def _split_key(layer: str, key: str, suffix: str) -> tuple[str, str]:
    """``'Dense_1/inner/kernel/u'`` → ``('Dense_1', 'inner/kernel')``."""
    if not key.endswith("/" + suffix) or "/" not in key[: -len(suffix) - 1]:
        raise ValueError(f"to_canonical({layer}): key {key!r} is not of the form '<layer>/<path>/{suffix}'")
    stem = key[: -len(suffix) - 1]
    name, path = stem.split("/", 1)
    return name, path


def _layer_name(record: NormRecord, module: Any, layer_name: str | None) -> str:
    if layer_name is not None:
        return layer_name
    if record.option("layer_name") is not None:
        return record.option("layer_name")
    inner = getattr(module, "layer_instance", None)
    # An unbound top-level wrapper adopts its layer under the name 'layer_instance'.
    return getattr(inner, "name", None) or "layer_instance"


class _NoModule:
    """The module of a checkpoint read without its architecture: every hyper-parameter unknown (``None``),
    SpectralNorm's collection linen's default."""

    collection_name = "batch_stats"

    def __getattr__(self, name: str) -> None:
        return None


def to_canonical(variables_subtree: Mapping[str, Any], module: Any, *, kind: str | None = None) -> NormRecord:
    """Canonical record of one linen layer's variables (see the module docstring for layouts).

    ``module=None`` with ``kind=`` (a :data:`normbridge.core.KIND_OF_CLASS` value): variables of a
    checkpoint without its module, read in that kind's layout; the record's hyper-parameters (epsilon,
    momentum, axes, options) are then ``None``, unknown.
    """
    if module is None:
        if kind not in _KINDS.values():
            raise TypeError(f"to_canonical: module=None needs kind= one of {sorted(set(_KINDS.values()))}")
        module, layer = _NoModule(), kind
    else:
        kind, layer = _kind(module, "to_canonical"), type(module).__name__
    if kind == "spectral_norm":
        flat = _unwrap(variables_subtree, module.collection_name)
        vectors: dict[str, dict[str, Any]] = {}
        names = set()
        for key, value in flat.items():
            suffix = key.rsplit("/", 1)[-1]
            if suffix not in ("u", "sigma"):
                raise ValueError(f"to_canonical({layer}): unexpected key {key!r}; expected '.../u' or '.../sigma'")
            name, path = _split_key(layer, key, suffix)
            names.add(name)
            arr = jnp.asarray(value)
            if suffix == "u":
                if arr.ndim != 2 or arr.shape[0] != 1:
                    raise ValueError(f"to_canonical({layer}): {key!r} has shape {arr.shape}; expected (1, out)")
                arr = arr.reshape(arr.shape[1])
            vectors.setdefault(path, {})[suffix] = arr
        if len(names) > 1:
            raise ValueError(f"to_canonical({layer}): keys name several wrapped layers {sorted(names)}")
        return NormRecord(
            kind=kind,
            spectral={p: SpectralVectors(u=d.get("u"), sigma=d.get("sigma")) for p, d in sorted(vectors.items())},
            epsilon=module.epsilon,
            options=(
                ("collection_name", module.collection_name),
                ("layer_name", names.pop() if names else None),
                ("n_steps", module.n_steps),
                ("framework", "flax.linen"),
            ),
        )
    if kind == "weight_norm":
        flat = _unwrap(variables_subtree, "params")
        scales: dict[str, Any] = {}
        names = set()
        for key, value in flat.items():
            if isinstance(value, Mapping):
                continue  # the wrapped layer's own params, when a top-level wrapper's whole dict is given
            name, path = _split_key(layer, key, "scale")
            names.add(name)
            scales[path] = jnp.asarray(value)
        if len(names) > 1:
            raise ValueError(f"to_canonical({layer}): keys name several wrapped layers {sorted(names)}")
        return NormRecord(
            kind=kind,
            weight_scales=dict(sorted(scales.items())),
            epsilon=module.epsilon,
            feature_axes=_axes(module.feature_axes),
            options=(("layer_name", names.pop() if names else None), ("framework", "flax.linen")),
        )

    params = _plain(variables_subtree.get("params", {}))
    stats = _plain(variables_subtree.get("batch_stats", {}))
    allowed = {"params": {"scale", "bias"} if kind != "rms_norm" else {"scale"}}
    allowed["batch_stats"] = {"mean", "var"} if kind == "batch_norm" else set()
    for col, got in (("params", params), ("batch_stats", stats)):
        extra = set(got) - allowed[col]
        if extra:
            raise ValueError(f"to_canonical({layer}): unexpected entries {sorted(f'{col}/{k}' for k in extra)}")
    extra_cols = set(variables_subtree) - {"params", "batch_stats"}
    if extra_cols:
        raise ValueError(f"to_canonical({layer}): unexpected collections {sorted(extra_cols)}")
    options: list[tuple[str, Any]] = [
        ("use_fast_variance", module.use_fast_variance),
        ("force_float32_reductions", module.force_float32_reductions),
        ("dtype", _dtype_name(module.dtype)),
        ("framework", "flax.linen"),
    ]
    common = dict(kind=kind, scale=_get(params, "scale"), bias=_get(params, "bias"), epsilon=module.epsilon)
    if kind == "batch_norm":
        return NormRecord(
            **common,
            mean=_get(stats, "mean"),
            var=_get(stats, "var"),
            momentum=module.momentum,
            stats_convention="ema",
            feature_axes=_axes(module.axis),
            options=tuple(options),
        )
    if kind in ("layer_norm", "rms_norm"):
        return NormRecord(
            **common,
            feature_axes=_axes(module.feature_axes),
            reduction_axes=_axes(module.reduction_axes),
            options=(*options, ("use_mean", kind == "layer_norm")),
        )
    if kind == "group_norm":
        return NormRecord(
            **common,
            feature_axes=(-1,),
            reduction_axes=_axes(module.reduction_axes),
            num_groups=module.num_groups,
            options=(*options, ("group_size", module.group_size)),
        )
    return NormRecord(**common, feature_axes=_axes(module.feature_axes), options=tuple(options))  # instance_norm


def _get(tree: Mapping[str, Any], key: str) -> Any:
    return jnp.asarray(tree[key]) if key in tree else None


def _check_presence(layer: str, path: str, value: Any, wanted: bool) -> None:
    if wanted and value is None:
        raise ValueError(f"from_canonical({layer}): the module expects '{path}' but the record has none")
    if not wanted and value is not None:
        raise ValueError(f"from_canonical({layer}): the record has '{path}' but the module does not use it")


def from_canonical(record: NormRecord, module: Any, *, layer_name: str | None = None) -> dict[str, Any]:
    """The linen variable subtree of ``module`` holding ``record``'s arrays (inverse of :func:`to_canonical`).

    ``layer_name`` (SpectralNorm/WeightNorm) overrides the wrapped layer's name used in the
    keys; by default the one recorded by :func:`to_canonical`, else the module's. A record of
    another kind, another ``epsilon`` (when the record has one), an equinox weight convention
    (SpectralNorm ``v``, ``kept_axis``), a missing or unexpected array, or inconsistent shapes
    raise ``ValueError`` naming the layer and the path. Records with ``stats_convention="zero_debiased"`` are
    de-biased (:func:`core.debias`) into linen's used-as-is EMA.
    """
    kind = _kind(module, "from_canonical")
    layer = type(module).__name__
    if record.kind != kind:
        raise ValueError(f"from_canonical({layer}): record kind {record.kind!r} does not match; expected {kind!r}")
    if record.epsilon is not None and record.epsilon != module.epsilon:
        raise ValueError(
            f"from_canonical({layer}): epsilon is {module.epsilon!r} but the record has {record.epsilon!r}; "
            "converting would change the layer's results"
        )
    if kind in ("spectral_norm", "weight_norm") and record.option("kept_axis") is not None:
        # equinox's convention: weight (out, in), its own power iteration (u and v) / no epsilon in WeightNorm.
        raise ValueError(
            f"from_canonical({layer}): the record is in equinox's weight convention "
            f"(kept_axis={record.option('kept_axis')!r}, paths {sorted(record.spectral or record.weight_scales)}); "
            "linen's math differs"
        )
    if kind == "spectral_norm":
        name = _layer_name(record, module, layer_name)
        out: dict[str, Any] = {}
        for path, vec in record.spectral.items():
            if vec.v is not None:
                raise ValueError(f"from_canonical({layer}): the record has spectral/{path}/v; linen does not keep v")
            if vec.u is not None:
                u = jnp.asarray(vec.u)
                if u.ndim != 1:
                    raise ValueError(f"from_canonical({layer}): spectral/{path}/u has shape {u.shape}; expected (out,)")
                out[f"{name}/{path}/u"] = u.reshape(1, u.shape[0])
            if vec.sigma is not None:
                sigma = jnp.asarray(vec.sigma)
                if sigma.ndim != 0:
                    raise ValueError(
                        f"from_canonical({layer}): spectral/{path}/sigma has shape {sigma.shape}; expected ()"
                    )
                out[f"{name}/{path}/sigma"] = sigma
        return out
    if kind == "weight_norm":
        name = _layer_name(record, module, layer_name)
        if record.weight_scales and not module.use_scale:
            raise ValueError(f"from_canonical({layer}): the record has weight_scales but use_scale=False")
        out = {}
        for path, scale in record.weight_scales.items():
            scale = jnp.asarray(scale)
            if module.feature_axes is None and scale.ndim != 0:
                raise ValueError(
                    f"from_canonical({layer}): weight_scales/{path} has shape {scale.shape}; "
                    "feature_axes=None expects a scalar"
                )
            out[f"{name}/{path}/scale"] = scale
        return out

    use_scale = module.use_scale
    use_bias = kind != "rms_norm" and module.use_bias
    _check_presence(layer, "params/scale", record.scale, use_scale)
    _check_presence(layer, "params/bias", record.bias, use_bias)
    arrays = {"params/scale": record.scale, "params/bias": record.bias}
    if kind == "batch_norm":
        mean, var = record.mean, record.var
        _check_presence(layer, "batch_stats/mean", mean, True)
        _check_presence(layer, "batch_stats/var", var, True)
        if record.stats_convention == "zero_debiased":
            if record.count is None or record.momentum is None:
                raise ValueError(f"from_canonical({layer}): a zero_debiased record needs count and momentum")
            mean = core.debias(jnp.asarray(mean), record.momentum, jnp.asarray(record.count))
            var = core.debias(jnp.asarray(var), record.momentum, jnp.asarray(record.count))
        arrays.update({"batch_stats/mean": mean, "batch_stats/var": var})
    else:
        _check_presence(layer, "batch_stats/mean", record.mean, False)
        _check_presence(layer, "batch_stats/var", record.var, False)
    shapes = {p: np.shape(a) for p, a in arrays.items() if a is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"from_canonical({layer}): feature arrays disagree in shape: {shapes}")
    out = {}
    for path, value in arrays.items():
        if value is not None:
            col, key = path.split("/")
            out.setdefault(col, {})[key] = jnp.asarray(value)
    return out
