"""NNX layer state ⇄ canonical :class:`~normbridge.core.NormRecord`, and loading native NNX states.

Layouts (facade and native ``flax.nnx`` layers alike; dispatch is by class name):

* BatchNorm: ``scale``/``bias`` (Param) and ``mean``/``var`` (BatchStat), all ``(num_features,)``;
* LayerNorm / RMSNorm / GroupNorm / InstanceNorm: ``scale`` (and ``bias``), ``(num_features,)``;
* SpectralNorm: ``batch_stats[(*path, 'u')]`` ``(1, out)``, ``batch_stats[(*path, 'sigma')]`` ``()``;
  the record holds ``u`` as ``(out,)`` under the ``/``-joined path (``'kernel'``, ``'inner/kernel'``);
* WeightNorm: ``scales[path]`` (``nnx.Param`` in the facade, a plain array in native nnx).

nnx stores feature parameters flattened to 1-D; canonical records hold them with the shape of
the feature axes (e.g. ``(4, 6)``). ``to_canonical(layer, feature_shape=(4, 6))`` reshapes;
without it the 1-D shape is kept (identical whenever there is one feature axis).
``from_canonical`` accepts either and flattens in C order, which is how nnx reshapes at call time.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from normbridge import core
from normbridge.adapters.nnx._common import path_str
from normbridge.core import NormRecord, SpectralVectors

_KINDS = core.KIND_OF_CLASS


def _nnx() -> Any:
    from normbridge._optional import require

    return require("flax.nnx", facade="nnx", extra="nnx")


def layer_kind(layer: Any, fn: str = "to_canonical") -> str:
    """The record kind of an nnx normalization layer (facade or native)."""
    name = type(layer).__name__
    if name not in _KINDS:
        raise TypeError(f"{fn}: unsupported module {name}; expected one of {sorted(_KINDS)}")
    return _KINDS[name]


def _axes(axes: Any) -> tuple[int, ...] | None:
    if axes is None:
        return None
    return tuple(axes) if isinstance(axes, Iterable) else (int(axes),)


def _dtype_name(dtype: Any) -> str | None:
    return None if dtype is None else str(jnp.dtype(dtype))


def _value(var: Any) -> jax.Array | None:
    if var is None:
        return None
    return var.get_value() if isinstance(var, _nnx().Variable) else jnp.asarray(var)


def _shaped(a: jax.Array | None, feature_shape: Sequence[int] | None) -> jax.Array | None:
    if a is None or feature_shape is None:
        return a
    return a.reshape(tuple(feature_shape))


def to_canonical(layer: Any, *, feature_shape: Sequence[int] | None = None) -> NormRecord:
    """Canonical record of one nnx normalization layer (facade or native); arrays are not copied."""
    kind = layer_kind(layer)
    options: list[tuple[str, Any]] = [("framework", "flax.nnx")]
    if kind == "spectral_norm":
        vectors: dict[str, dict[str, Any]] = {}
        for key, var in layer.batch_stats.items():
            *path, leaf = key
            arr = _value(var)
            vectors.setdefault(path_str(path), {})[leaf] = arr.reshape(arr.shape[-1]) if leaf == "u" else arr
        return NormRecord(
            kind=kind,
            spectral={p: SpectralVectors(u=d.get("u"), sigma=d.get("sigma")) for p, d in sorted(vectors.items())},
            epsilon=layer.epsilon,
            options=(*options, ("n_steps", layer.n_steps)),
        )
    if kind == "weight_norm":
        scales = {path_str(p): _value(v) for p, v in (layer.scales or {}).items()}
        feats = layer.feature_axes
        return NormRecord(
            kind=kind,
            weight_scales=dict(sorted(scales.items())),
            epsilon=layer.epsilon,
            feature_axes=None if feats == () else _axes(feats),
            options=tuple(options),
        )
    options += [("use_fast_variance", layer.use_fast_variance), ("dtype", _dtype_name(layer.dtype))]
    common: dict[str, Any] = dict(
        kind=kind,
        scale=_shaped(_value(layer.scale), feature_shape),
        bias=_shaped(_value(getattr(layer, "bias", None)), feature_shape),
        epsilon=layer.epsilon,
    )
    if kind == "batch_norm":
        return NormRecord(
            **common,
            mean=_shaped(_value(layer.mean), feature_shape),
            var=_shaped(_value(layer.var), feature_shape),
            momentum=layer.momentum,
            stats_convention="ema",
            feature_axes=_axes(layer.axis),
            options=tuple(options),
        )
    if kind in ("layer_norm", "rms_norm"):
        return NormRecord(
            **common,
            feature_axes=_axes(layer.feature_axes),
            reduction_axes=_axes(layer.reduction_axes),
            options=(*options, ("use_mean", kind == "layer_norm")),
        )
    if kind == "group_norm":
        return NormRecord(
            **common,
            feature_axes=(-1,),
            reduction_axes=_axes(layer.reduction_axes),
            num_groups=layer.num_groups,
            options=(*options, ("group_size", layer.group_size)),
        )
    return NormRecord(**common, feature_axes=_axes(layer.feature_axes), options=tuple(options))


def _writes(record: NormRecord, layer: Any) -> list[tuple[str, Any, Any, jax.Array]]:
    """``(path, container, key, value)`` for every array ``from_canonical`` writes; validated, not written."""
    kind = layer_kind(layer, "from_canonical")
    name = type(layer).__name__
    if record.kind != kind:
        raise ValueError(f"from_canonical({name}): record kind {record.kind!r} does not match; expected {kind!r}")
    # 'ema_blend' (equinox mode="ema") statistics are used as they are at eval, as nnx's 'ema' are.
    if record.stats_convention not in (None, "ema", "ema_blend"):
        raise ValueError(
            f"from_canonical({name}): stats_convention {record.stats_convention!r} is not nnx's 'ema'; "
            "convert it first (e.g. normbridge.core.debias for 'zero_debiased')"
        )
    if record.epsilon is not None and record.epsilon != layer.epsilon:
        raise ValueError(
            f"from_canonical({name}): epsilon is {layer.epsilon!r} but the record has {record.epsilon!r}; "
            "converting would change the layer's results"
        )
    writes: list[tuple[str, Any, Any, jax.Array]] = []
    errors: list[str] = []

    def add(path: str, container: Any, key: Any, current: Any, value: Any, *, reshape: bool = True) -> None:
        if current is None and value is None:
            return
        if current is None:
            errors.append(f"the record has '{path}' but the layer does not use it")
            return
        if value is None:
            errors.append(f"the layer expects '{path}' but the record has none")
            return
        cur, val = _value(current), jnp.asarray(value)
        if val.dtype != cur.dtype:
            errors.append(f"'{path}' has dtype {val.dtype}; the layer stores {cur.dtype}")
            return
        if val.shape != cur.shape:
            if not reshape or val.size != cur.size:
                errors.append(f"'{path}' has shape {val.shape}; the layer stores {cur.shape}")
                return
            val = val.reshape(cur.shape)
        writes.append((path, container, key, val))

    if kind == "spectral_norm":
        stats = layer.batch_stats
        wanted = {path_str(k[:-1]) for k in stats}
        for p in sorted(set(record.spectral) - wanted):
            errors.append(f"the record has 'spectral/{p}' but the layer normalizes no such weight")
        for key, var in stats.items():
            p = path_str(key[:-1])
            vec = record.spectral.get(p, SpectralVectors())
            add(f"spectral/{p}/{key[-1]}", stats, key, var, vec.u if key[-1] == "u" else vec.sigma)
    elif kind == "weight_norm":
        scales = layer.scales or {}
        by_name = {path_str(k): k for k in scales}
        for p in sorted(set(record.weight_scales) - set(by_name)):
            errors.append(f"the record has 'weight_scales/{p}' but the layer has no such gain")
        for p, key in by_name.items():
            add(f"weight_scales/{p}", scales, key, scales[key], record.weight_scales.get(p), reshape=False)
    else:
        for field in ("scale", "bias", "mean", "var"):
            add(field, layer, field, getattr(layer, field, None), getattr(record, field))
    if errors:
        raise ValueError(f"from_canonical({name}): " + "; ".join(errors))
    return writes


def _write(container: Any, key: Any, value: jax.Array) -> None:
    nnx = _nnx()
    current = container[key] if isinstance(container, Mapping) else getattr(container, key)
    if isinstance(current, nnx.Variable):
        current.set_value(value)
    elif isinstance(container, Mapping):  # native nnx WeightNorm keeps plain arrays in a dict
        container[key] = value
    else:  # pragma: no cover - every other entry is a Variable
        setattr(container, key, value)


def from_canonical(record: NormRecord, layer: Any) -> Any:
    """Write ``record``'s arrays into ``layer`` in place (inverse of :func:`to_canonical`); returns ``layer``.

    Everything is validated before anything is written: a record of another kind, a missing or
    unexpected array, a shape that does not flatten to the stored one, or a different dtype
    raises ``ValueError`` naming the layer and every offending path.
    """
    for _, container, key, value in _writes(record, layer):
        _write(container, key, value)
    return layer


# --------------------------------------------------------------------------- native NNX states


def _key_parts(key: Any) -> tuple[Any, ...]:
    """A state key as path parts: tuple keys and their string form (``"('kernel', 'u')"``, Orbax) are expanded."""
    if isinstance(key, tuple):
        return tuple(str(k) for k in key)
    if isinstance(key, str) and key.startswith("(") and key.endswith(")"):
        try:
            parsed = ast.literal_eval(key)
        except (ValueError, SyntaxError):
            return (key,)
        if isinstance(parsed, tuple):
            return tuple(str(k) for k in parsed)
    return (str(key),)


def flatten_state(tree: Any) -> dict[str, Any]:
    """``{"a/b/c": array}`` of an ``nnx.State``, a pure dict, or an Orbax-restored tree.

    ``Variable``s and ``{'value': array}`` nodes (how Orbax writes a Variable) become their array.
    """
    nnx = _nnx()
    if isinstance(tree, nnx.State):
        tree = nnx.to_pure_dict(tree)
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: tuple[Any, ...]) -> None:
        if isinstance(node, nnx.Variable):
            out["/".join(prefix)] = node.get_value()
        elif isinstance(node, Mapping):
            if set(node) == {"value"} and not isinstance(node["value"], Mapping):
                out["/".join(prefix)] = node["value"]
                return
            for k, v in node.items():
                walk(v, prefix + _key_parts(k))
        else:
            out["/".join(prefix)] = node

    walk(tree, ())
    return out


def model_entries(model: Any) -> dict[str, tuple[Any, Any]]:
    """``{"a/b/c": (container, key)}`` for every state entry of ``model`` (Variables and WeightNorm gains)."""
    nnx = _nnx()
    out: dict[str, tuple[Any, Any]] = {}
    for path, leaf in nnx.to_flat_state(nnx.state(model)):
        parts: tuple[Any, ...] = ()
        for p in path:
            parts += _key_parts(p)
        if isinstance(leaf, nnx.Variable):
            out["/".join(parts)] = (leaf, None)
        else:  # native WeightNorm gain: find its dict
            owner = model
            for p in path[:-1]:
                owner = owner[p] if isinstance(owner, Mapping) else getattr(owner, p)
            out["/".join(parts)] = (owner, path[-1])
    return out


def _current(entry: tuple[Any, Any]) -> jax.Array:
    obj, key = entry
    return obj.get_value() if key is None else obj[key]


def _set(entry: tuple[Any, Any], value: Any) -> None:
    obj, key = entry
    if key is None:
        obj.set_value(value)
    else:
        obj[key] = value


def load_native_state(model: Any, state: Any, *, strict: bool = True) -> Any:
    """Fill ``model`` (facade or native nnx) from an nnx state, pure dict or Orbax-restored tree, in place.

    Accepts the native nnx layout, including WeightNorm gains stored as plain arrays and
    Orbax's string form of tuple keys, so a native nnx checkpoint loads into the facade
    (whose gains are ``nnx.Param``). Note that a native SpectralNorm/WeightNorm checkpoint
    holds the kernel as nnx last overwrote it (already normalized); it loads as the raw
    kernel. Every path is validated (missing / unexpected with ``strict``, shape, dtype)
    before anything is written; a ``ValueError`` lists every offending path.
    """
    given = flatten_state(state)
    entries = model_entries(model)
    errors = []
    missing = sorted(set(entries) - set(given))
    extra = sorted(set(given) - set(entries))
    if strict and missing:
        errors.append(f"missing in the state: {missing}")
    if strict and extra:
        errors.append(f"not in the model: {extra}")
    for path in sorted(set(entries) & set(given)):
        cur, val = _current(entries[path]), given[path]
        if np.shape(val) != np.shape(cur):
            errors.append(f"{path}: shape {np.shape(val)}, model has {np.shape(cur)}")
        elif jnp.asarray(val).dtype != cur.dtype:
            errors.append(f"{path}: dtype {jnp.asarray(val).dtype}, model has {cur.dtype}")
    if errors:
        raise ValueError(f"load_native_state({type(model).__name__}): " + "; ".join(errors))
    for path in sorted(set(entries) & set(given)):
        _set(entries[path], jnp.asarray(given[path]))
    return model


def restore_native_checkpoint(model: Any, directory: Any) -> Any:
    """Restore an Orbax checkpoint of a native nnx ``nnx.state`` into ``model`` (see :func:`load_native_state`)."""
    from normbridge._optional import require

    ocp = require("orbax.checkpoint", facade="nnx", extra="nnx")
    restored = ocp.StandardCheckpointer().restore(directory)
    return load_native_state(model, restored)
