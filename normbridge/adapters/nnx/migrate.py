"""Linen → NNX migration of a whole model's checkpoint: :func:`migrate_linen_checkpoint`.

A linen ``variables`` dict (``{'params': ..., 'batch_stats': ...}``, as ``model.init``
returns it and as ``flax.serialization`` msgpack or Orbax save it) fills an NNX model's
normalization layers (facade or native nnx) and the Dense/Conv/Embed layers around them
(``nnx.Linear``/``nnx.Conv``/``nnx.Embed``: same layouts as linen).

Layers are paired per kind. Linen layers are found in the variable tree (a dict whose
values are arrays is a layer); their kind comes from linen's automatic name
(``Conv_0``, ``BatchNorm_3``, ``SpectralNorm_0`` ...) or, for custom names, from their
contents (``batch_stats`` mean/var → BatchNorm, ``embedding`` → Embed, a 2-D kernel →
Dense, a >2-D kernel → Conv; ``scale``/``bias`` alone is ambiguous). Linen
SpectralNorm/WeightNorm entries (``'Dense_1/kernel/u'``, ``'Dense_1/kernel/scale'``)
name the wrapped layer, which is paired with the NNX wrapper's ``layer_instance``.
NNX layers are found by walking the model's attributes in definition order.

Pairing: the explicit ``mapping`` (``{nnx path: linen path}``, ``/``-joined) first,
then, per kind, the i-th linen layer (natural order of paths: ``Conv_2`` before
``Conv_10``) with the i-th NNX layer. Everything is validated (unmatched and
ambiguous layers on both sides, missing/extra arrays, shapes, dtypes) before anything is
written; a :class:`MigrationError` lists every offending path and the model is unchanged.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from normbridge import errors
from normbridge._optional import require
from normbridge.adapters.nnx.convert import _writes, layer_kind
from normbridge.core import KIND_OF_CLASS, NormRecord, SpectralVectors

__all__ = ["MigrationError", "linen_layers", "load_linen_variables", "migrate_linen_checkpoint", "nnx_layers"]

_NORM_CLASSES = set(KIND_OF_CLASS)
_LINEN_KIND = {"Dense": "dense", "Conv": "conv", "Embed": "embed", **KIND_OF_CLASS}
_AUTO_NAME = re.compile(r"^([A-Za-z]+)_(\d+)$")


class MigrationError(errors.CheckpointMismatchError):
    """A linen checkpoint does not fit the NNX model; the message lists every offending path."""


# --------------------------------------------------------------------------- loading


def load_linen_variables(source: Any) -> dict[str, Any]:
    """A linen ``variables`` dict from a dict, a msgpack file (``flax.serialization``) or an Orbax directory."""
    if isinstance(source, Mapping):
        return _plain(source)
    path = os.fspath(source)
    if os.path.isdir(path):
        ocp = require("orbax.checkpoint", facade="nnx", extra="nnx")
        return _plain(ocp.StandardCheckpointer().restore(os.path.abspath(path)))
    serialization = require("flax.serialization", facade="nnx", extra="nnx")
    with open(path, "rb") as fh:
        return _plain(serialization.msgpack_restore(fh.read()))


def _plain(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {str(k): _plain(v) for k, v in tree.items()}
    return tree


# --------------------------------------------------------------------------- discovery


def _natural(path: tuple[str, ...]) -> tuple:
    key = []
    for part in path:
        m = _AUTO_NAME.match(part)
        key.append((m.group(1), int(m.group(2))) if m else (part, -1))
    return tuple(key)


def _is_array(v: Any) -> bool:
    return hasattr(v, "shape") and hasattr(v, "dtype")


def _leaf_modules(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], dict[str, Any]]:
    """Dicts whose values include arrays: the layers of a linen collection."""
    out: dict[tuple[str, ...], dict[str, Any]] = {}
    arrays = {k: v for k, v in tree.items() if _is_array(v)}
    if arrays:
        out[prefix] = arrays
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_leaf_modules(v, (*prefix, k)))
    return out


def linen_layers(variables: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{path: {'kind', 'params', 'batch_stats', 'wrapped'}}`` of a linen variables dict, in natural path order.

    ``kind`` is ``None`` for an ambiguous layer; ``wrapped`` is the path of the layer a
    SpectralNorm/WeightNorm normalizes.
    """
    params = _leaf_modules(variables.get("params", {}))
    stats = _leaf_modules(variables.get("batch_stats", {}))
    found: dict[tuple[str, ...], dict[str, Any]] = {}
    for path in set(params) | set(stats):
        found[path] = {"params": params.get(path, {}), "batch_stats": stats.get(path, {}), "wrapped": None}
    for path, entry in found.items():
        name = path[-1] if path else ""
        keys = set(entry["params"]) | set(entry["batch_stats"])
        auto = _AUTO_NAME.match(name)
        kind = _LINEN_KIND.get(auto.group(1)) if auto else None
        if any("/" in k and k.endswith(("/u", "/sigma")) for k in entry["batch_stats"]):
            kind = "spectral_norm"
        elif any("/" in k and k.endswith("/scale") for k in entry["params"]):
            kind = "weight_norm"
        elif kind is None:
            if {"mean", "var"} <= set(entry["batch_stats"]):
                kind = "batch_norm"
            elif "embedding" in keys:
                kind = "embed"
            elif "kernel" in entry["params"]:
                kind = "dense" if np.ndim(entry["params"]["kernel"]) == 2 else "conv"
        if kind in ("spectral_norm", "weight_norm"):
            flat = entry["batch_stats"] if kind == "spectral_norm" else entry["params"]
            inner = {k.split("/", 1)[0] for k in flat}
            entry["wrapped"] = "/".join((*path[:-1], *sorted(inner)[:1])) if len(inner) == 1 else None
        entry["kind"] = kind
    ordered = sorted(found, key=_natural)
    return {"/".join(p): found[p] for p in ordered}


def _children(node: Any) -> list[tuple[str, Any]]:
    nnx = require("flax.nnx", facade="nnx", extra="nnx")
    if isinstance(node, (nnx.List, list, tuple)):
        return [(str(i), v) for i, v in enumerate(node)]
    if isinstance(node, Mapping):
        return [(str(k), v) for k, v in node.items()]
    return [(k, v) for k, v in vars(node).items() if not k.startswith("_")]


def _nnx_kind(module: Any) -> str | None:
    nnx = require("flax.nnx", facade="nnx", extra="nnx")
    name = type(module).__name__
    if name in _NORM_CLASSES:
        return layer_kind(module)
    if isinstance(module, nnx.Linear):
        return "dense"
    if isinstance(module, nnx.Conv):
        return "conv"
    if isinstance(module, nnx.Embed):
        return "embed"
    return None


def nnx_layers(model: Any) -> dict[str, tuple[str | None, Any]]:
    """``{path: (kind, module)}`` of an NNX model's layers in definition order (wrapped layers excluded).

    A module of unknown kind that holds Params itself is listed with kind ``None``.
    """
    nnx = require("flax.nnx", facade="nnx", extra="nnx")
    out: dict[str, tuple[str | None, Any]] = {}

    def walk(node: Any, prefix: tuple[str, ...]) -> None:
        for key, value in _children(node):
            path = (*prefix, key)
            if isinstance(value, nnx.Module):
                kind = _nnx_kind(value)
                if kind is not None:
                    out["/".join(path)] = (kind, value)
                    continue
                if any(isinstance(v, nnx.Param) for _, v in _children(value)):
                    out["/".join(path)] = (None, value)
                walk(value, path)
            elif isinstance(value, (list, tuple, Mapping)):
                walk(value, path)

    walk(model, ())
    return out


# --------------------------------------------------------------------------- planning


def _record(kind: str, entry: Mapping[str, Any]) -> NormRecord:
    p, s = entry["params"], entry["batch_stats"]
    if kind == "spectral_norm":
        vec: dict[str, dict[str, Any]] = {}
        for k, v in s.items():
            _, rest = k.split("/", 1)
            path, leaf = rest.rsplit("/", 1)
            arr = jnp.asarray(v)
            vec.setdefault(path, {})[leaf] = arr.reshape(arr.shape[-1]) if leaf == "u" and arr.ndim == 2 else arr
        return NormRecord(
            kind=kind, spectral={q: SpectralVectors(u=d.get("u"), sigma=d.get("sigma")) for q, d in vec.items()}
        )
    if kind == "weight_norm":
        scales = {k.split("/", 1)[1].rsplit("/", 1)[0]: jnp.asarray(v) for k, v in p.items()}
        return NormRecord(kind=kind, weight_scales=scales)
    get = lambda d, k: jnp.asarray(d[k]) if k in d else None  # noqa: E731
    return NormRecord(
        kind=kind,
        scale=get(p, "scale"),
        bias=get(p, "bias"),
        mean=get(s, "mean"),
        var=get(s, "var"),
        stats_convention="ema" if kind == "batch_norm" else None,
    )


def _plain_layer_writes(lpath: str, entry: Mapping[str, Any], npath: str, module: Any, errors: list[str]) -> list:
    """Dense/Conv/Embed: same names, shapes and dtypes in linen and NNX."""
    nnx = require("flax.nnx", facade="nnx", extra="nnx")
    ours = {k: v for k, v in vars(module).items() if isinstance(v, nnx.Param)}
    theirs = dict(entry["params"])
    writes = []
    for k in sorted(set(ours) - set(theirs)):
        errors.append(f"nnx {npath}/{k}: missing in linen {lpath}")
    for k in sorted(set(theirs) - set(ours)):
        errors.append(f"linen {lpath}/{k}: no such parameter in nnx {npath}")
    if entry["batch_stats"]:
        errors.append(f"linen {lpath}: unexpected batch_stats {sorted(entry['batch_stats'])}")
    for k in sorted(set(ours) & set(theirs)):
        cur, val = ours[k].get_value(), jnp.asarray(theirs[k])
        if val.shape != cur.shape:
            errors.append(f"linen {lpath}/{k}: shape {val.shape}, nnx {npath}/{k} has {cur.shape}")
        elif val.dtype != cur.dtype:
            errors.append(f"linen {lpath}/{k}: dtype {val.dtype}, nnx {npath}/{k} has {cur.dtype}")
        else:
            writes.append((ours[k], val))
    return writes


def _norm_writes(lpath: str, entry: Mapping[str, Any], npath: str, module: Any, errors: list[str]) -> list:
    try:
        planned = _writes(_record(entry["kind"], entry), module)
    except ValueError as err:
        errors.append(f"linen {lpath} → nnx {npath}: {err}")
        return []
    out = []
    for _, container, key, value in planned:
        out.append(((container, key), value))
    return out


def migrate_linen_checkpoint(
    source: Any,
    model: Any,
    *,
    mapping: Mapping[str, str] | None = None,
    module: Any = None,
    probe: Any = None,
) -> Any:
    """Fill ``model`` (an NNX module) from a linen checkpoint, in place; returns ``model``.

    ``source``: a linen ``variables`` dict, a msgpack file written with
    ``flax.serialization.msgpack_serialize(variables)`` or an Orbax directory of ``variables``.
    ``mapping``: ``{nnx path: linen path}`` (paths ``/``-joined, e.g. ``{'blocks/0/bn': 'Block_0/BatchNorm_1'}``).

    With the linen ``module`` and a ``probe`` input this is :func:`normbridge.convert`: layers are
    paired by mapping, names, then execution order, and the result is verified by running both
    models (a :class:`MigrationError` lists every problem). Without them (deprecated) the
    checkpoint alone is paired by order within each kind, which cannot see same-shaped layers
    called in another order than linen names them; wrapped layers follow their
    SpectralNorm/WeightNorm. Either way nothing is written unless everything fits.
    """
    variables = load_linen_variables(source)
    if module is not None or probe is not None:
        return _migrate_by_execution(variables, model, mapping, module, probe)
    import warnings

    warnings.warn(
        "migrate_linen_checkpoint without module= and probe= pairs layers by order within each kind, which "
        "can pair same-shaped layers wrongly; pass module= and probe= (or use normbridge.convert), which pairs "
        "by execution order and verifies outputs",
        DeprecationWarning,
        stacklevel=2,
    )
    unknown_cols = sorted(set(variables) - {"params", "batch_stats"})
    lin = linen_layers(variables)
    ours = nnx_layers(model)
    errors: list[str] = []
    if unknown_cols:
        errors.append(f"unsupported linen collections {unknown_cols}")
    wrapped = {e["wrapped"] for e in lin.values() if e["wrapped"]}
    for p, e in lin.items():
        if e["kind"] in ("spectral_norm", "weight_norm") and e["wrapped"] is None:
            errors.append(f"linen {p}: {e['kind']} entries name no single wrapped layer")
    for p in sorted(wrapped - set(lin)):
        errors.append(f"linen {p}: wrapped layer has no params")
    ambiguous_l = [p for p, e in lin.items() if e["kind"] is None and p not in wrapped]
    unsupported_n = [p for p, (k, _) in ours.items() if k is None]

    pairs: list[tuple[str, str]] = []
    mapping = dict(mapping or {})
    for npath, lpath in mapping.items():
        if npath not in ours:
            errors.append(f"mapping: nnx path {npath!r} is not a layer of the model")
        elif lpath not in lin:
            errors.append(f"mapping: linen path {lpath!r} is not a layer of the checkpoint")
        else:
            pairs.append((npath, lpath))
    mapped_n = {n for n, _ in pairs}
    mapped_l = {v for _, v in pairs}
    if not mapped_l.isdisjoint(ambiguous_l):
        ambiguous_l = [p for p in ambiguous_l if p not in mapped_l]
    kinds = sorted({k for k, _ in ours.values() if k} | {e["kind"] for e in lin.values() if e["kind"]})
    unmatched_l: list[str] = []
    unmatched_n: list[str] = []
    for kind in kinds:
        ls = [p for p, e in lin.items() if e["kind"] == kind and p not in wrapped and p not in mapped_l]
        ns = [p for p, (k, _) in ours.items() if k == kind and p not in mapped_n]
        alike = _same_shaped(ls, lin)
        if len(ns) > 1 and alike:
            # Pairing these by order is a guess no shape check can catch (NNX definition order need not
            # be linen's call order): refuse rather than risk loading the wrong weights.
            errors.append(
                f"{kind}: linen layers {alike} have the same shapes, so pairing them by order cannot be checked; "
                "pass module= and probe= (pairs by execution order and verifies outputs) or map each of them"
            )
            continue
        pairs.extend(zip(ns, ls))
        unmatched_n += ns[len(ls) :]
        unmatched_l += ls[len(ns) :]
    if unmatched_l:
        errors.append(f"unmatched linen layers {unmatched_l}")
    if unmatched_n:
        errors.append(f"unmatched nnx layers {unmatched_n}")
    if ambiguous_l:
        errors.append(f"ambiguous linen layers (kind unknown; pass mapping=) {ambiguous_l}")
    if unsupported_n:
        errors.append(f"nnx layers of unsupported kind {unsupported_n}")

    writes: list[tuple[Any, jax.Array]] = []
    for npath, lpath in pairs:
        kind, module = ours[npath]
        entry = lin[lpath]
        if entry["kind"] != kind and entry["kind"] is not None:
            errors.append(f"mapping: nnx {npath} is {kind} but linen {lpath} is {entry['kind']}")
            continue
        entry = {**entry, "kind": kind}
        if kind in ("dense", "conv", "embed"):
            writes += _plain_layer_writes(lpath, entry, npath, module, errors)
            continue
        writes += _norm_writes(lpath, entry, npath, module, errors)
        if kind in ("spectral_norm", "weight_norm") and entry["wrapped"] in lin:
            inner_kind = _nnx_kind(module.layer_instance)
            inner_path = f"{npath}/layer_instance"
            if inner_kind not in ("dense", "conv", "embed"):
                errors.append(f"nnx {inner_path}: unsupported wrapped layer {type(module.layer_instance).__name__}")
            else:
                writes += _plain_layer_writes(
                    entry["wrapped"], lin[entry["wrapped"]], inner_path, module.layer_instance, errors
                )
    if errors:
        raise MigrationError("migrate_linen_checkpoint: " + "; ".join(errors))
    for target, value in writes:
        if isinstance(target, tuple):
            container, key = target
            current = container[key] if isinstance(container, Mapping) else getattr(container, key)
            if hasattr(current, "set_value"):
                current.set_value(value)
            else:
                container[key] = value
        else:
            target.set_value(value)
    return model


def _same_shaped(paths: list[str], lin: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The layers among ``paths`` whose arrays have exactly the shapes of another one's."""

    def signature(entry: Mapping[str, Any]) -> tuple:
        return tuple(
            sorted((col, name, tuple(np.shape(v))) for col in ("params", "batch_stats")
                   for name, v in (entry.get(col) or {}).items())
        )  # fmt: skip

    sigs = [signature(lin[p]) for p in paths]
    return [p for p, sig in zip(paths, sigs) if sigs.count(sig) > 1]


def _migrate_by_execution(variables: Mapping[str, Any], model: Any, mapping: Any, module: Any, probe: Any) -> Any:
    """The engine's path: ``normbridge.convert((module, variables), model)``, written into ``model`` in place."""
    nnx = require("flax.nnx", facade="nnx", extra="nnx")
    from normbridge.conversion import convert

    if module is None or probe is None:
        raise TypeError("migrate_linen_checkpoint: pass both module= (the linen module) and probe= (an input batch)")
    inverted = {linen: ours for ours, linen in (mapping or {}).items()}  # convert's mapping is source -> target
    try:
        target, _ = convert((module, variables), model, mapping=inverted, probe=probe)
    except errors.ConversionError as err:
        raise MigrationError(f"migrate_linen_checkpoint: {err}") from err
    nnx.update(model, nnx.state(target))
    return model
