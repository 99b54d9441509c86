"""The conversion engine: list both models' layers (spokes), pair them, write, verify.

Pairing, in this order, each pair checked before it is accepted:

1. ``mapping``: ``{source path: target path}`` (``None`` skips the layer; a key ``"re:<regex>"``
   matches whole source paths and its value is a ``re`` template, ``r"blocks/\\1"``). A key that is
   only a target path with value ``None`` skips that target layer.
2. equal names after each framework's naming rules (:func:`~normbridge.conversion.base.normalized_name`),
   when the name is unique on both sides and the kinds agree;
3. execution order: both models run once abstractly on the probe; the k-th call of each kind in the
   source is paired with the k-th in the target.

A source that is linen variables without their module (a checkpoint with no architecture) cannot
run: it is paired by 1 and 2 only, each of its layers read in the layout of the kind of the ``like``
layer it pairs with, and it cannot be verified (``verify=False``; the report says why).

RNG state (treex ``Rng`` leaves of a ``KeySeq``/``Dropout``, NNX ``RngState``, typed PRNG keys) is stateless
for pairing, like Dropout and activations: it is never paired nor converted (the target keeps ``like``'s
own) and is listed in the report's ``skipped_state``.

Every pair must agree in kind, parameter shapes and (where both were called) activation shapes.
Definition order is never used. Anything unpaired, conflicting or disagreeing is one
:class:`~normbridge.errors.ConversionError` listing every problem and a suggested ``mapping``.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from normbridge.conversion.base import (
    FLAX_FAMILY,
    NORM_KINDS,
    UNTYPED,
    WRAPPER_KINDS,
    Call,
    Layer,
    Spoke,
    normalized_name,
    record_dtypes,
    record_shapes,
)
from normbridge.conversion.report import ConversionReport, Pair, Verification
from normbridge.core import NormRecord
from normbridge.errors import ConversionError

#: Output bound where the two frameworks' layers do not run the same operations in the same order
#: (Equinox vs the flax family; attention between linen and NNX): relative to max |source output|.
#: The native libraries differ by about 1e-7 relative on the test architectures (measured in
#: tests/conversion); a mispaired or wrongly transposed layer shows up as 1e-2 or more.
CROSS_RTOL = 1e-5


# --------------------------------------------------------------------------- frameworks


def framework_of(obj: Any) -> str:
    """``"linen"``, ``"nnx"``, ``"equinox"`` or ``"treex"`` for what the user passed (see :func:`convert`)."""
    model = obj[0] if isinstance(obj, tuple) and len(obj) == 2 else obj
    for cls in type(model).__mro__:
        mod = cls.__module__ or ""
        if mod.startswith("normbridge.adapters.treex") and cls.__name__ == "Module":
            return "treex"
        if mod.startswith("flax.linen"):
            if not (isinstance(obj, tuple) and len(obj) == 2):
                raise ConversionError(
                    f"a linen model is passed as (module, variables); got a bare {type(model).__name__}"
                )
            return "linen"
        if mod.startswith("flax.nnx"):
            return "nnx"
        if mod.startswith("equinox"):
            return "equinox"
    if isinstance(obj, Mapping) and obj and all(isinstance(v, Mapping) for v in obj.values()):
        return "linen"  # linen variables without their module: {'params': ..., 'batch_stats': ...}
    raise ConversionError(
        f"{type(model).__name__} is not a model of a supported framework: pass linen (module, variables), an NNX "
        "module, Equinox (model, state) or a normbridge.adapters.treex module (or, as the source only, linen "
        "variables {'params': ..., 'batch_stats': ...})"
    )


def spoke_for(framework: str) -> Spoke:
    if framework == "linen":
        from normbridge.conversion.linen import LinenSpoke

        return LinenSpoke()
    if framework == "nnx":
        from normbridge.conversion.nnx import NnxSpoke

        return NnxSpoke()
    if framework == "equinox":
        from normbridge.conversion.equinox import EquinoxSpoke

        return EquinoxSpoke()
    from normbridge.conversion.treex import TreexSpoke

    return TreexSpoke()


def _split_probe(probe: Any) -> tuple[Any, Any]:
    if isinstance(probe, tuple) and len(probe) == 2 and all(hasattr(p, "shape") for p in probe):
        return probe
    return probe, probe


# --------------------------------------------------------------------------- probes

#: Batch size and (per spatial dim, at least) image size of a probe built from parameter shapes.
PROBE_BATCH, PROBE_SPATIAL = 2, 8
#: Seed of the random normal values (random integer tokens) of a built probe.
PROBE_SEED = 0
_MAX_PROBE_TRIES = 12


def _family(framework: str) -> str:
    return "equinox" if framework == "equinox" else "flax"


def _in_layout(x: Any, framework: str) -> Any:
    """A flax-layout probe (batched, channels last) as ``framework`` takes it: Equinox images channels first
    (``jax.vmap`` gives each example to the model)."""
    return jnp.moveaxis(x, -1, 1) if framework == "equinox" and x.ndim >= 3 else x


def _probe_error(obj: Any, probe: Any, call: Callable | None) -> str | None:
    """Why ``obj`` cannot be traced on ``probe`` (an abstract ``jax.eval_shape`` run), or ``None`` when it runs
    and records layer calls."""
    fw = framework_of(obj)
    try:
        calls = spoke_for(fw).trace(_materialized(obj) if fw in ("linen", "equinox") else obj, probe, call)
    except Exception as err:  # the user's model rejected this input
        return f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
    return None if calls else "no layer calls recorded"


def _layout_probes(source: Any, like: Any, probe: Any, calls: tuple, notes: list[str], problems: list[str]) -> tuple:
    """One probe for two frameworks of different input layouts (Equinox: channels first, one example per call;
    the flax family: batched, channels last): the side it does not run on gets it in the other layout."""
    sides = [framework_of(source), framework_of(like)]
    if _family(sides[0]) == _family(sides[1]) or not hasattr(probe, "ndim") or probe.ndim < 3:
        return probe, probe
    out = [probe, probe]
    for i, (obj, label) in enumerate(((source, "source"), (like, "like"))):
        if isinstance(obj, Mapping):  # bare variables cannot run: nothing to adapt the probe to
            continue
        if _probe_error(obj, probe, calls[i]) is None:
            continue
        to_eqx = sides[i] == "equinox"
        moved = jnp.moveaxis(probe, -1, 1) if to_eqx else jnp.moveaxis(probe, 1, -1)
        how = "last -> first (Equinox layout)" if to_eqx else "first -> last (flax layout)"
        err = _probe_error(obj, moved, calls[i])
        if err is None:
            out[i] = moved
            notes.append(f"probe for {label} ({sides[i]}): the given probe {tuple(probe.shape)} with channels {how}")
        else:
            problems.append(f"{label} ({sides[i]}): also tried the probe with channels {how}: {err}")
    return tuple(out)


def _candidate_specs(obj: Any) -> list[tuple[tuple[int, ...], Any, int | None, str]]:
    """Inputs ``(flax-layout shape, dtype, token range or None, from which layer)`` that the layers of ``obj``
    could take first, in the order the spoke lists them: Dense/Linear ``(N, in)``; Conv/ConvTranspose
    ``(N, S.., in)``; Embed integer tokens ``(N, L)``; attention ``(N, L, D)``; a norm layer ``(N, C)``. ``L``
    from the model's bare parameters (a ``pos_embedding``'s length), else 4."""
    from normbridge.conversion.base import record_arrays

    fw = framework_of(obj)
    if fw == "linen":
        variables = obj if isinstance(obj, Mapping) else obj[1]
        layers = _linen_layers_from_params(variables.get("params", {}))
    else:
        try:
            listed = spoke_for(fw).layers(_materialized(obj) if fw == "equinox" else obj)
            layers = {p: (layer.kind, record_arrays(layer.record)) for p, layer in listed.items()}
        except Exception:  # nothing to learn from this side
            return []
    lengths = []
    for kind, arrays in layers.values():
        if kind == "param":
            lengths += [d for d in np.shape(arrays.get("value"))[:-1] if 1 < d <= 1024]
    lengths = list(dict.fromkeys([*lengths, 4]))
    n, out = PROBE_BATCH, []

    def floating(v: Any) -> Any:
        dt = jnp.result_type(v)
        return dt if jnp.issubdtype(dt, jnp.floating) else jnp.float32

    for path, (kind, arrays) in layers.items():
        where = f"{path!r} ({kind})"
        kernel = arrays.get("kernel")
        if kind in ("dense", "dense_general") and kernel is not None:
            out.append(((n, np.shape(kernel)[0]), floating(kernel), None, where))
        elif kind in ("conv", "conv_transpose") and kernel is not None and np.ndim(kernel) >= 3:
            size = max(PROBE_SPATIAL, 2 * max(np.shape(kernel)[:-2]))
            out.append(((n, *[size] * (np.ndim(kernel) - 2), np.shape(kernel)[-2]), floating(kernel), None, where))
        elif kind == "embed" and "embedding" in arrays:
            vocab = np.shape(arrays["embedding"])[0]
            out += [((n, length), jnp.int32, vocab, where) for length in lengths]
        elif kind == "attention" and "query/kernel" in arrays:
            q = arrays["query/kernel"]
            out += [((n, length, np.shape(q)[0]), floating(q), None, where) for length in lengths]
        elif kind in NORM_KINDS and arrays.get("scale") is not None and np.ndim(arrays["scale"]) == 1:
            out.append(((n, np.shape(arrays["scale"])[0]), floating(arrays["scale"]), None, where))
    return out


def _linen_layers_from_params(params: Any, prefix: str = "") -> dict[str, tuple[str, dict[str, Any]]]:
    """A linen model's layers cannot be listed without running it: guesses from its ``params`` tree alone
    (only to build probe candidates): a dict with a ``kernel`` is a Dense (2-D) or Conv, one with an
    ``embedding`` an Embed, a bare array a ``param``."""
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    if not isinstance(params, Mapping):
        return out
    for name, value in params.items():
        path = f"{prefix}/{name}" if prefix else str(name)
        if isinstance(value, Mapping):
            if hasattr(value.get("kernel"), "shape"):
                out[path] = ("dense" if np.ndim(value["kernel"]) == 2 else "conv", {"kernel": value["kernel"]})
            elif hasattr(value.get("embedding"), "shape"):
                out[path] = ("embed", {"embedding": value["embedding"]})
            else:
                out.update(_linen_layers_from_params(value, path))
        elif hasattr(value, "shape"):
            out[path] = ("param", {"value": value})
    return out


def _built_probes(source: Any, like: Any, calls: tuple, notes: list[str], tried: list[str]) -> tuple[Any, Any]:
    """A probe built from the parameter shapes of the layers (see :func:`_candidate_specs`; sides whose layers
    are listed without running them first): the first candidate both models run on (abstractly) and record
    calls. Random normal values (integer tokens) from :data:`PROBE_SEED`; the Equinox side gets the same data
    channels first. ``(None, None)`` when none runs; ``tried`` says what was tried and why it failed."""
    objs = (source, like)
    order = sorted(range(2), key=lambda i: framework_of(objs[i]) == "linen")
    specs: dict[tuple, str] = {}
    for i in order:
        for shape, dtype, vocab, where in _candidate_specs(objs[i]):
            specs.setdefault((shape, jnp.dtype(dtype).name, vocab), f"{('source', 'like')[i]} {where}")
    key = jax.random.key(PROBE_SEED)
    for (shape, dtype, vocab), where in list(specs.items())[:_MAX_PROBE_TRIES]:
        x = jax.random.randint(key, shape, 0, vocab, dtype) if vocab else jax.random.normal(key, shape, dtype)
        probes = tuple(_in_layout(x, framework_of(obj)) for obj in objs)
        errors = []
        for i, label in enumerate(("source", "like")):
            err = _probe_error(objs[i], probes[i], calls[i])
            if err is not None:
                errors.append(f"{label}: {err}")
                break
        what = f"{shape} {dtype}" + (f" tokens in [0, {vocab})" if vocab else "")
        if not errors:
            moved = "".join(
                f"; {label} gets it channels first: {tuple(p.shape)}"
                for label, p in zip(("source", "like"), probes)
                if p.shape != x.shape
            )
            notes.append(f"probe built from parameter shapes: {what} (from {where}){moved}")
            return probes
        tried.append(f"{what} (from {where}): {errors[0]}")
    return None, None


# --------------------------------------------------------------------------- one side


@dataclasses.dataclass
class _Side:
    label: str  # "source" / "like"
    framework: str
    spoke: Spoke
    obj: Any
    probe: Any
    call: Callable | None
    layers: dict[str, Layer]
    calls: list[Call] | None
    stateless: list[str]
    rng_state: list[str]
    #: Why this side cannot run (linen variables without their module), else ``None``.
    cannot_run: str | None = None

    @property
    def order(self) -> dict[str, int]:
        return {c.path: i for i, c in enumerate(self.calls or [])}

    @property
    def by_path(self) -> dict[str, Call]:
        return {c.path: c for c in self.calls or []}


def _materialized(obj: Any) -> Any:
    """``obj`` with abstract (``eval_shape``) arrays as zeros: the per-layer converters read arrays.
    Only ``like`` is ever abstract, and all its values are replaced (an unpaired layer is refused)."""
    import jax
    import jax.numpy as jnp

    def zeros(x: Any) -> Any:
        return jnp.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x

    return jax.tree_util.tree_map(zeros, obj, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))


#: Why a source of linen variables without their module cannot run (and so cannot be verified).
NO_MODULE = "the source is variables without a module"


def _side(label: str, obj: Any, probe: Any, call: Callable | None, problems: list[str]) -> _Side:
    fw = framework_of(obj)
    bare = fw == "linen" and isinstance(obj, Mapping)
    if bare and label == "like":
        raise ConversionError(
            "like gives the target's architecture: pass linen (module, variables), not variables alone"
        )
    if fw in ("linen", "equinox"):  # NNX abstract models are handled by nnx itself
        obj = _materialized(obj)
    spoke = spoke_for(fw)
    layers: dict[str, Layer] = {}
    calls = None
    stateless: list[str] = []
    rng_state: list[str] = []
    try:
        layers = spoke.layers(obj, probe, call)
        stateless = spoke.stateless(obj, probe, call)
        rng_state = spoke.rng_state(obj, probe, call)
        if probe is not None:
            calls = spoke.trace(obj, probe, call)
    except LookupError as err:
        problems.append(f"{label} ({fw}): {err}")
    except ConversionError:
        raise
    except Exception as err:  # the user's model code failed on the probe: report, don't leak
        hint = "" if call is not None else "; if it is not called the default way, pass call=(source_fn, like_fn)"
        problems.append(f"{label} ({fw}): running the model on the probe failed: {type(err).__name__}: {err}{hint}")
    if probe is not None and calls is not None and not calls and layers:
        problems.append(
            f"{label} ({fw}): the probe run recorded no layer calls (does the call hook copy the model?); "
            "pairing by execution order is impossible"
        )
    return _Side(label, fw, spoke, obj, probe, call, layers, calls, stateless, rng_state, NO_MODULE if bare else None)


# --------------------------------------------------------------------------- pairing


def _apply_mapping(
    src: _Side, tgt: _Side, mapping: Mapping[str, Any], problems: list[str]
) -> tuple[list[tuple[str, str, str]], set[str], set[str]]:
    pairs: list[tuple[str, str, str]] = []
    skip_s: set[str] = set()
    skip_t: set[str] = set()
    for key, value in mapping.items():
        if key.startswith("re:"):
            rx = re.compile(key[3:])
            hits = [p for p in src.layers if rx.fullmatch(p)]
            if not hits:
                problems.append(f"mapping: pattern {key!r} matches no source layer")
            for p in hits:
                if value is None:
                    skip_s.add(p)
                else:
                    pairs.append((p, rx.fullmatch(p).expand(value), "mapping"))
            continue
        if key in src.layers:
            if value is None:
                skip_s.add(key)
                if key in tgt.layers:
                    skip_t.add(key)
            else:
                pairs.append((key, value, "mapping"))
        elif value is None and key in tgt.layers:
            skip_t.add(key)
        else:
            problems.append(f"mapping: {key!r} is not a layer of the source (source layers: {sorted(src.layers)})")
    for s, t, _ in list(pairs):
        if t not in tgt.layers:
            problems.append(
                f"mapping: {s!r} -> {t!r}: {t!r} is not a layer of like (like's layers: {sorted(tgt.layers)})"
            )
            pairs.remove((s, t, "mapping"))
    return pairs, skip_s, skip_t


def _name_pairs(src: _Side, tgt: _Side, free_s: list[str], free_t: list[str]) -> list[tuple[str, str, str]]:
    def index(side: _Side, free: list[str]) -> dict[str, str]:
        names = collections.Counter(normalized_name(p, side.framework) for p in free)
        return {normalized_name(p, side.framework): p for p in free if names[normalized_name(p, side.framework)] == 1}

    ns, nt = index(src, free_s), index(tgt, free_t)
    out = []
    for name in sorted(set(ns) & set(nt)):
        s, t = ns[name], nt[name]
        kind = tgt.layers[t].kind if src.layers[s].kind == UNTYPED else src.layers[s].kind
        if kind == tgt.layers[t].kind and kind != "unknown":
            out.append((s, t, "name"))
    return out


def _order_pairs(src: _Side, tgt: _Side, free_s: list[str], free_t: list[str]) -> list[tuple[str, str, str]]:
    if src.calls is None or tgt.calls is None:
        return []
    os_, ot = src.order, tgt.order
    out = []
    kinds = sorted({src.layers[p].kind for p in free_s} | {tgt.layers[p].kind for p in free_t})
    for kind in kinds:
        if kind in ("unknown", "param"):
            continue
        ss = sorted((p for p in free_s if src.layers[p].kind == kind and p in os_), key=os_.__getitem__)
        ts = sorted((p for p in free_t if tgt.layers[p].kind == kind and p in ot), key=ot.__getitem__)
        out += [(s, t, "execution order") for s, t in zip(ss, ts)]
    return out


def _activation_ok(a: tuple[int, ...] | None, b: tuple[int, ...] | None, same_family: bool) -> bool:
    if a is None or b is None:
        return True
    if same_family:
        return tuple(a) == tuple(b)
    # Equinox sees one example, channels first (and maybe further vmapped): its dims must be among
    # the flax side's per-example dims.
    flax, eqx = (a, b) if len(a) >= len(b) else (b, a)
    return not (collections.Counter(eqx) - collections.Counter(flax[1:] if len(flax) > len(eqx) else flax))


def _norm_sizes(layer: Layer) -> dict[str, int]:
    rec = layer.record
    if not isinstance(rec, NormRecord):
        return {}
    return {k: int(np.size(v)) for k in ("scale", "bias", "mean", "var") if (v := getattr(rec, k)) is not None}


def _check_pair(src: _Side, tgt: _Side, s: str, t: str) -> list[str]:
    a, b = src.layers[s], tgt.layers[t]
    where = f"source {s!r} ({src.framework} {a.cls}) -> like {t!r} ({tgt.framework} {b.cls})"
    if a.kind != b.kind:
        return [f"{where}: kinds differ ({a.kind} vs {b.kind})"]
    problems = []
    if a.kind in NORM_KINDS:
        if a.record is None or b.record is None:
            problems.append(f"{where}: a stateful layer without its state (pass (model, state))")
        else:
            sa, sb = _norm_sizes(a), _norm_sizes(b)
            for k in sorted(set(sa) & set(sb)):
                if sa[k] != sb[k]:
                    problems.append(f"{where}: {k} has {sa[k]} features in the source, {sb[k]} in like")
        if a.kind in WRAPPER_KINDS:
            if (a.inner is None) != (b.inner is None):
                problems.append(f"{where}: only one side wraps a layer")
            elif a.inner is not None:
                if a.inner.kind != b.inner.kind:
                    problems.append(f"{where}: wrapped layers differ ({a.inner.kind} vs {b.inner.kind})")
                elif record_shapes(a.inner.record) != record_shapes(b.inner.record):
                    problems.append(
                        f"{where}: wrapped layer {a.inner.path!r} -> {b.inner.path!r} shapes differ: "
                        f"{record_shapes(a.inner.record)} vs "
                        f"{record_shapes(b.inner.record)}"
                    )
    elif a.kind == "unknown":
        problems.append(f"{where}: layer kind unknown to normbridge; skip it with mapping={{{s!r}: None}}")
    elif record_shapes(a.record) != record_shapes(b.record):
        problems.append(
            f"{where}: parameter shapes differ: source {record_shapes(a.record)}, like {record_shapes(b.record)}"
        )
    ca, cb = src.by_path.get(s), tgt.by_path.get(t)
    if ca is not None and cb is not None:
        same = src.spoke.family == tgt.spoke.family
        if not _activation_ok(ca.in_shape, cb.in_shape, same) or not _activation_ok(ca.out_shape, cb.out_shape, same):
            problems.append(
                f"{where}: activation shapes differ: source {ca.in_shape} -> {ca.out_shape}, "
                f"like {cb.in_shape} -> {cb.out_shape}"
            )
    return problems


_HYPER = {"epsilon": {"equinox": "eps"}, "momentum": {}, "num_groups": {"equinox": "groups"}}
#: Record options that change a layer's results, compared when both sides record them.
_OPTIONS = ("use_fast_variance", "force_float32_reductions", "dtype", "n_steps", "group_size", "use_mean")


def _hyper_diffs(a: Layer, b: Layer) -> list[tuple[str, Any, Any, bool]]:
    """``(field, source value, like value, equal at float32)`` for every differing hyper-parameter."""
    out = []
    if not (isinstance(a.record, NormRecord) and isinstance(b.record, NormRecord)):
        return out
    for field in _HYPER:
        va, vb = getattr(a.record, field), getattr(b.record, field)
        if va is None or vb is None or va == vb:
            continue
        f32 = isinstance(va, float) and isinstance(vb, float) and np.float32(va) == np.float32(vb)
        out.append((field, va, vb, bool(f32)))
    for name in _OPTIONS:
        va, vb = a.record.option(name), b.record.option(name)
        if va is not None and vb is not None and va != vb:
            out.append((name, va, vb, False))
    return out


def _typed_bare(
    src: _Side, tgt: _Side, pairs: list[tuple[str, str, str]], skipped: set[str], problems: list[str]
) -> list[tuple[str, str, str]]:
    """Linen variables without their module: read each paired scope in the layout of its ``like`` layer's
    kind, and list what does not fit or is left over. ``src.layers`` becomes the typed layers."""
    variables = src.obj
    typed: dict[str, Layer] = {}
    good: list[tuple[str, str, str]] = []
    no_stats: list[str] = []
    has_stats = bool(variables.get("batch_stats"))
    for s, t, how in pairs:
        like = tgt.layers[t]
        if like.kind in ("batch_norm", "spectral_norm") and not has_stats:
            no_stats.append(t)
            typed[s] = Layer(s, like.kind, "variables")  # read (its params) but not paired
            continue
        try:
            layer = src.spoke.typed(variables, src.layers[s], like)
        except (ValueError, TypeError) as err:
            problems.append(
                f"source {s!r} (variables) -> like {t!r} ({tgt.framework} {like.cls}): {err} [paired by {how}]"
            )
            typed[s] = Layer(s, like.kind, "variables")
            continue
        if isinstance(layer.record, NormRecord) and isinstance(like.record, NormRecord):
            known = {f: getattr(like.record, f) for f in _HYPER if getattr(layer.record, f) is None}
            layer.record = layer.record.replace(**known)  # variables record none: like's are taken
        typed[s] = layer
        if tgt.spoke.family == src.spoke.family:  # the same arrays on both sides (else the bridge decides)
            found = _layout_mismatch(layer, like)
            if layer.inner is not None and like.inner is not None:
                found += [f"wrapped {layer.inner.path!r} -> {like.inner.path!r}: {f}"
                          for f in _layout_mismatch(layer.inner, like.inner)]  # fmt: skip
            if found:
                where = f"source {s!r} (variables) -> like {t!r} ({tgt.framework} {like.cls})"
                problems += [f"{where}: {f} [paired by {how}]" for f in found]
                continue
        good.append((s, t, how))
    if no_stats:
        problems.append(
            f"the source has no batch_stats collection (like's {', '.join(map(repr, no_stats))} keep state there)"
        )
    covered = [src.spoke.covers(layer) for layer in typed.values()]
    covered += [src.spoke.covers(layer.inner) for layer in typed.values() if layer.inner is not None]
    covered += [{"*": tuple(p.split("/"))} for p in skipped]
    inner = {layer.inner.path for layer in typed.values() if layer.inner is not None}
    problems += [f"source {p!r} is paired with like {t!r} and also wrapped by a paired layer" for p, t, _ in good
                 if p in inner]  # fmt: skip
    leftover: dict[str, dict[str, tuple[int, ...]]] = {}
    for col, tree in src.spoke.collections(variables):
        for key, value in tree.items():
            if not any(key[: len(parts)] == parts for c in covered for k, parts in c.items() if k in ("*", col)):
                scope = "/".join(key[:-1]) or key[0]
                leftover.setdefault(scope, {})[f"{col}/{key[-1]}"] = tuple(np.shape(value))
    for scope, shapes in leftover.items():
        problems.append(
            f"source {scope!r} (variables {shapes}) is not paired with any layer of like; map it "
            f"(mapping={{{scope!r}: <like path>}}), skip it ({{{scope!r}: None}}), or pass (module, variables) "
            "and probe= to pair by execution order"
        )
    src.layers = {s: typed[s] for s, _, _ in good}
    return good


def _variables_alone(source: Any) -> bool:
    """``source`` is linen variables without their module (see :func:`convert`)."""
    return isinstance(source, Mapping) and framework_of(source) == "linen"


def _refuse_unverifiable(
    source: Any, like: Any, mapping: Any, probe: Any, call: Any, on_mismatch: str, verify: Any
) -> None:
    """Variables without their module cannot run, so ``verify`` cannot pass: refuse, as a missing probe is,
    with the fix first and every pairing problem after it (before any probe or verification code runs)."""
    plan = _plan(source, like, mapping, probe, call, on_mismatch)
    raise ConversionError(
        f"normbridge.convert ({plan.src.framework} -> {plan.tgt.framework}) refused",
        problems=[
            f"verify={verify!r} runs both models, but {NO_MODULE}: pass (module, variables) to verify, or "
            "verify=False for an unverified conversion",
            *plan.problems,
        ],
        mapping=plan.suggestion,
    )


def _layout_mismatch(a: Layer, b: Layer) -> list[str]:
    """The arrays one side of a pair has and the other has not, and those whose dtypes differ (the
    records' names; shapes are :func:`_check_pair`'s)."""
    da, db = record_dtypes(a.record), record_dtypes(b.record)
    out = [f"like's layer has {k!r}, the source has none" for k in sorted(set(db) - set(da))]
    out += [f"the source has {k!r}, like's layer has none" for k in sorted(set(da) - set(db))]
    return out + [
        f"{k!r} is {da[k]} in the source, {db[k]} in like" for k in sorted(set(da) & set(db)) if da[k] != db[k]
    ]


@dataclasses.dataclass
class _Plan:
    src: _Side
    tgt: _Side
    pairs: list[tuple[str, str, str]]
    problems: list[str]
    notes: list[str]
    suggestion: dict[str, Any]
    hyper: dict[str, list[tuple[str, Any, Any, bool]]]
    probe_tried: list[str] = dataclasses.field(default_factory=list)  # built-probe candidates that did not run


def _plan(
    source: Any,
    like: Any,
    mapping: Mapping[str, Any] | None,
    probe: Any,
    call: Any,
    on_mismatch: str,
    build_probe: bool = False,
) -> _Plan:
    if on_mismatch not in ("refuse", "keep_like"):
        raise ValueError(f"on_mismatch must be 'refuse' or 'keep_like', got {on_mismatch!r}")
    problems: list[str] = []
    notes: list[str] = []
    scall, tcall = call if call is not None else (None, None)
    tried: list[str] = []
    if probe is None and build_probe:
        sprobe, tprobe = _built_probes(source, like, (scall, tcall), notes, tried)
    elif probe is not None and _split_probe(probe)[0] is probe:  # one array, not a (source, like) pair
        sprobe, tprobe = _layout_probes(source, like, probe, (scall, tcall), notes, problems)
    else:
        sprobe, tprobe = _split_probe(probe)
    src = _side("source", source, sprobe, scall, problems)
    tgt = _side("like", like, tprobe, tcall, problems)
    pairs, skip_s, skip_t = _apply_mapping(src, tgt, dict(mapping or {}), problems)
    used_s = {s for s, _, _ in pairs} | skip_s
    used_t = {t for _, t, _ in pairs} | skip_t
    for step in (_name_pairs, _order_pairs):
        free_s = [p for p in src.layers if p not in used_s]
        free_t = [p for p in tgt.layers if p not in used_t]
        found = step(src, tgt, free_s, free_t)
        pairs += found
        used_s |= {s for s, _, _ in found}
        used_t |= {t for _, t, _ in found}
    if src.cannot_run is not None:
        pairs = _typed_bare(src, tgt, pairs, skip_s, problems)
        used_s = {s for s, _, _ in pairs} | skip_s
        notes.append(
            "hyper-parameters (epsilon, momentum, groups, ...) are like's: variables without a module have none"
        )
    for counts in (collections.Counter(s for s, _, _ in pairs), collections.Counter(t for _, t, _ in pairs)):
        for p, n in counts.items():
            if n > 1:
                problems.append(f"{p!r} is paired {n} times: {[x for x in pairs if p in x[:2]]}")
    good: list[tuple[str, str, str]] = []
    hyper: dict[str, list[tuple[str, Any, Any, bool]]] = {}
    for s, t, how in pairs:
        found = _check_pair(src, tgt, s, t)
        problems += [f"{f} [paired by {how}]" for f in found]
        if found:
            continue
        good.append((s, t, how))
        diffs = _hyper_diffs(src.layers[s], tgt.layers[t])
        if diffs:
            hyper[t] = diffs
        for field, va, vb, f32 in diffs:
            param = _HYPER.get(field, {}).get(tgt.framework, field)
            if f32:
                notes.append(f"{t}: {field} {vb!r} taken for the source's {va!r} (equal at float32, treex's precision)")
            elif on_mismatch == "keep_like":
                notes.append(
                    f"{t}: {field} kept as like's {vb!r} (the source {s!r} has {va!r}); on_mismatch='keep_like'"
                )
            else:
                problems.append(
                    f"like {t!r}: {field} is {vb!r} but the source {s!r} has {va!r}, which changes the outputs; "
                    f"fix like: build {tgt.layers[t].cls}(..., {param}={va!r}) (or pass on_mismatch='keep_like')"
                )
    unpaired_s = [p for p in src.layers if p not in used_s]
    unpaired_t = [p for p in tgt.layers if p not in used_t]
    hint = "" if src.calls is not None and tgt.calls is not None else "; pass probe= to pair by execution order"
    if src.cannot_run is not None:
        hint = "; map it, or pass (module, variables) and probe= to pair by execution order"
    for p in unpaired_s:
        layer = src.layers[p]
        what = "layer kind unknown to normbridge" if layer.kind == "unknown" else f"{layer.kind} {layer.shapes}"
        problems.append(f"source {p!r} ({layer.cls}: {what}) is not paired with any layer of like{hint}")
    for p in unpaired_t:
        layer = tgt.layers[p]
        what = "layer kind unknown to normbridge" if layer.kind == "unknown" else f"{layer.kind} {layer.shapes}"
        problems.append(f"like {p!r} ({layer.cls}: {what}) is not paired with any layer of the source{hint}")
    suggestion: dict[str, Any] = {s: t for s, t, _ in good}
    for p in unpaired_s:  # a unique same-kind, same-shape candidate is worth suggesting; the user reviews it
        cands = [
            t
            for t in unpaired_t
            if tgt.layers[t].kind == src.layers[p].kind and tgt.layers[t].shapes == src.layers[p].shapes
        ]
        suggestion[p] = cands[0] if len(cands) == 1 else None
    return _Plan(src, tgt, good, problems, notes, suggestion, hyper, tried)


#: Equinox norm layers with one ``channelwise_affine`` switch for scale and bias together.
_ONE_AFFINE_SWITCH = ("batch_norm", "group_norm", "instance_norm")


def _affine_fill(record: NormRecord, like_record: NormRecord) -> dict[str, Any]:
    """A flax-family scale or bias that is off, for an Equinox layer that has both (one ``channelwise_affine``
    switch): ones and zeros (``x * 1`` and ``x + 0`` are exact). Verification checks the outputs."""
    import jax.numpy as jnp

    if record.kind not in _ONE_AFFINE_SWITCH:
        return {}
    fill = {}
    if record.scale is None and like_record.scale is not None:
        fill["scale"] = jnp.ones_like(like_record.scale)
    if record.bias is None and like_record.bias is not None:
        fill["bias"] = jnp.zeros_like(like_record.bias)
    return fill


def _transforms(kind: str, a: Layer, sfw: str, tfw: str, b: Layer | None = None) -> tuple[str, ...]:
    out = []
    cross = (sfw == "equinox") != (tfw == "equinox")
    if cross and kind == "dense":
        out.append("transpose weight (out, in) <-> kernel (in, out)")
    if cross and kind in ("conv", "conv_transpose"):
        out.append("transpose OIHW <-> HWIO; bias (out, 1, ..) <-> (out,)")
    if cross and kind == "attention":
        out.append("q/k/v (H*Dh, D) <-> (D, H, Dh), out (D, H*Dh) <-> (H, Dh, D)")
    rec = a.record
    if isinstance(rec, NormRecord):
        if rec.stats_convention == "zero_debiased" and tfw != "equinox":
            out.append("debias running statistics (equinox mode='batch')")
        if rec.stats_convention == "ema" and tfw == "equinox":
            out.append("flax EMA statistics -> equinox mode='ema', first-time flag cleared")
        if cross and kind == "spectral_norm":
            out.append(
                "flax power iteration from u -> equinox (u, v)" if tfw == "equinox" else "equinox u, sigma = u W v"
            )
        if cross and kind == "weight_norm":
            out.append("gain per output unit (flax eps 1e-12 under the root, equinox none)")
        if tfw == "equinox" and b is not None and isinstance(b.record, NormRecord):
            filled = _affine_fill(rec, b.record)
            if filled:
                what = " and ".join({"scale": "scale -> ones", "bias": "bias -> zeros"}[k] for k in filled)
                out.append(f"source without {'/'.join(filled)}: {what} (equinox's one channelwise_affine switch)")
    return tuple(out)


# --------------------------------------------------------------------------- public API


def pair(
    source: Any, like: Any, *, mapping: Mapping[str, Any] | None = None, probe: Any = None, call: Any = None
) -> list[Pair]:
    """How :func:`convert` pairs ``source``'s layers with ``like``'s: a list of :class:`Pair`.

    Same arguments and rules as :func:`convert` (no writing, no verification; hyper-parameter
    differences are not problems here). Raises :class:`~normbridge.errors.ConversionError` listing
    every layer that cannot be paired, with a suggested ``mapping``. Wrapped layers of
    SpectralNorm/WeightNorm follow their wrapper (``how="wrapped by <path>"``).
    """
    plan = _plan(source, like, mapping, probe, call, "keep_like")
    if plan.problems:
        raise ConversionError(
            "normbridge.pair: cannot pair the layers", problems=plan.problems, mapping=plan.suggestion
        )
    return _pairs(plan)


def _pairs(plan: _Plan) -> list[Pair]:
    out = []
    for s, t, how in plan.pairs:
        a, b = plan.src.layers[s], plan.tgt.layers[t]
        out.append(Pair(s, t, a.kind, how, _transforms(a.kind, a, plan.src.framework, plan.tgt.framework, b)))
        if a.inner is not None and b.inner is not None:
            out.append(
                Pair(
                    a.inner.path,
                    b.inner.path,
                    a.inner.kind,
                    f"wrapped by {s}",
                    _transforms(a.inner.kind, a.inner, plan.src.framework, plan.tgt.framework),
                )
            )
    return out


def _compare(target_out: Any, source_out: Any) -> Any:
    """The project's one tree comparison (:func:`normbridge.testing.tree_diff`); the source is the reference."""
    from normbridge.testing import tree_diff

    return tree_diff(target_out, source_out, rtol=0.0, atol=0.0)


def _verify(plan: _Plan, target: Any, reordered: bool) -> Verification:
    src, tgt = plan.src, plan.tgt
    ms, mt = src.spoke.prepare(src.obj, False), tgt.spoke.prepare(target, False)
    ys = src.spoke.runner(ms, src.call)(src.probe)
    yt = tgt.spoke.runner(mt, tgt.call)(tgt.probe)
    d = _compare(yt, ys)
    bitwise_required = src.framework in FLAX_FAMILY and tgt.framework in FLAX_FAMILY and not reordered
    bound = "bitwise" if bitwise_required else f"rel <= {CROSS_RTOL:g}"
    if not d.same_structure or any(not (x.same_shape and x.same_dtype) for x in d.leaves):
        return Verification("eval", False, float("inf"), float("inf"), bound, False, d.failing_paths[:3])
    max_abs = max((x.max_abs for x in d.leaves), default=0.0)
    max_rel = max((x.norm_rel for x in d.leaves), default=0.0)  # relative to the largest source output
    worst = (
        ()
        if d.bitwise
        else tuple(x.path or "<output>" for x in sorted(d.leaves, key=lambda x: -x.norm_rel)[:3] if x.max_abs > 0)
    )
    passed = d.bitwise if bitwise_required else max_rel <= CROSS_RTOL
    return Verification("eval", d.bitwise, max_abs, max_rel, bound, passed, worst)


def _eval_why(plan: _Plan) -> list[str]:
    """Known reasons why eval outputs differ although every pair checked out."""
    crossing = plan.src.framework == "equinox" and plan.tgt.framework != "equinox"
    if crossing and any(plan.src.layers[s].kind == "spectral_norm" for s, _, _ in plan.pairs):
        return [
            "equinox SpectralNorm uses its stored (u, v) at inference, flax iterates from u on every call: "
            "they agree only where equinox's power iteration has converged"
        ]
    return []


def _train_why(plan: _Plan) -> list[str]:
    """Known reasons why train mode differs although eval mode agrees."""
    fws = {plan.src.framework, plan.tgt.framework}
    if "equinox" not in fws or fws == {"equinox"}:
        return []
    kinds = {plan.src.layers[s].kind for s, _, _ in plan.pairs}
    why = []
    if "batch_norm" in kinds:
        why.append(
            "equinox BatchNorm mode='ema' normalises with its running statistics in training once they are "
            "populated, flax-family BatchNorm with the batch's: eval behaviour converts, train behaviour does not"
        )
    if "spectral_norm" in kinds:
        why.append(
            "equinox SpectralNorm iterates from its stored (u, v) in training, flax from u: eval behaviour "
            "converts, train behaviour does not"
        )
    return why


def _refuse_if_differs(
    plan: _Plan,
    measured: Verification,
    tolerated: bool,
    reason: str,
    worst_label: str,
    why: Callable[[_Plan], list[str]],
) -> None:
    """Raise the :class:`ConversionError` of a verification that measured a difference, unless the difference
    is ``tolerated`` (``on_mismatch="keep_like"`` with differing hyper-parameters): the measurement, its
    worst paths, the known reasons ``why(plan)``, and the mapping found."""
    if measured.passed or tolerated:
        return
    raise ConversionError(
        f"normbridge.convert ({plan.src.framework} -> {plan.tgt.framework}) refused: {reason}",
        problems=[measured.text(), f"{worst_label}: {list(measured.worst)}", *why(plan)],
        mapping={s: t for s, t, _ in plan.pairs},
        measured=measured,
    )


def _verify_train(plan: _Plan, target: Any, reordered: bool) -> tuple[Verification, Verification | None, list[str]]:
    """One training step on both sides: ``(train outputs and updated statistics, gradients, notes)``.

    A train-mode forward pass compares the outputs and every paired norm layer's updated state; then
    :func:`_verify_gradients`. Call hooks run with ``train=True``; a linen/Equinox hook returns its updated
    state as ``(y, updates)`` / ``(y, state)``, else the statistics are not compared (a note says so)."""
    from normbridge.conversion.base import record_arrays

    src, tgt = plan.src, plan.tgt
    notes: list[str] = []
    ys, src_after = src.spoke.train_step(src.obj, src.probe, src.call)
    yt, tgt_after = tgt.spoke.train_step(target, tgt.probe, tgt.call)
    a: dict[str, Any] = {"output": yt}
    b: dict[str, Any] = {"output": ys}
    stats = src_after is not None and tgt_after is not None
    if stats:
        sl, tl = src.spoke.layers(src_after, src.probe, src.call), tgt.spoke.layers(tgt_after, tgt.probe, tgt.call)
        for s, t, _ in plan.pairs:
            if src.layers[s].kind not in NORM_KINDS:
                continue
            ra, rb = record_arrays(tl[t].record), record_arrays(sl[s].record)
            for k in sorted(set(ra) & set(rb) - {"count"}):
                if np.shape(ra[k]) == np.shape(rb[k]) or np.size(ra[k]) == np.size(rb[k]):
                    a[f"{t}/{k}"], b[f"{t}/{k}"] = np.reshape(np.asarray(ra[k]), np.shape(rb[k])), rb[k]
    elif any(src.layers[s].kind in NORM_KINDS for s, _, _ in plan.pairs):
        which = " and ".join(side.label for side, after in ((src, src_after), (tgt, tgt_after)) if after is None)
        notes.append(
            f"train: updated statistics not compared: the {which} call hook returns no state (in train mode a "
            "linen hook returns apply(..., mutable=...)'s (y, updates), an Equinox hook (y, state))"
        )
    mode = "train (outputs, updated statistics)" if stats else "train (outputs)"
    d = _compare(a, b)
    # treex updates statistics with its float32 momentum (1 - m rounds differently): bitwise only linen <-> NNX
    bitwise_required = {src.framework, tgt.framework} <= {"linen", "nnx"} and not reordered
    bound = "bitwise" if bitwise_required else f"rel <= {CROSS_RTOL:g}"
    if not d.same_structure or any(not (x.same_shape and x.same_dtype) for x in d.leaves):
        return Verification(mode, False, float("inf"), float("inf"), bound, False, d.failing_paths[:3]), None, notes
    max_abs = max((x.max_abs for x in d.leaves), default=0.0)
    max_rel = max((x.norm_rel for x in d.leaves), default=0.0)
    worst = () if d.bitwise else tuple(x.path for x in sorted(d.leaves, key=lambda x: -x.norm_rel)[:3] if x.max_abs > 0)
    passed = d.bitwise if bitwise_required else max_rel <= CROSS_RTOL
    train = Verification(mode, d.bitwise, max_abs, max_rel, bound, passed, worst)
    grads, grad_notes = _verify_gradients(plan, target, reordered, ys)
    return train, grads, notes + grad_notes


#: Seed of the fixed random cotangent ``c`` of verify="train"'s scalar loss ``sum(output * c)`` (both sides).
COTANGENT_SEED = 0


def _loss_of_output(y: Any) -> Callable[[Any], Any]:
    """``out -> sum(out * c)``: ``c`` random normal from :data:`COTANGENT_SEED`, shaped like the source output
    ``y`` (the train outputs were compared first: both sides' outputs have these shapes)."""
    leaves = [leaf for leaf in jax.tree_util.tree_leaves(y) if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
    keys = jax.random.split(jax.random.key(COTANGENT_SEED), max(len(leaves), 1))
    cot = [jax.random.normal(k, np.shape(leaf), jnp.result_type(leaf)) for k, leaf in zip(keys, leaves)]

    def loss(out: Any) -> Any:
        outs = [leaf for leaf in jax.tree_util.tree_leaves(out) if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
        return sum(jnp.sum(o * c).astype(jnp.float32) for o, c in zip(outs, cot))

    return loss


def _gradient_model(side: _Side, model: Any, loss: Callable[[Any], Any]) -> Any:
    """``model`` with every parameter replaced by ``d loss(train-mode output) / d parameter`` and its state
    before the step: a model of the side's framework, so its spoke lists the gradients in the canonical layout
    and writes canonical gradients like parameters. Parameters/state and rebuilding come from
    :func:`normbridge.testing._models.functional`; the train-mode call is the spoke's (or the side's hook)."""
    from normbridge.testing._models import functional

    f = functional(model)
    grads = jax.grad(lambda p: loss(side.spoke.train_step(f.rebuild(p, f.state), side.probe, side.call)[0]))(f.params)
    return f.rebuild(grads, f.state)


def _parameter_fields(side: _Side, model: Any) -> set[tuple[str, str]]:
    """``(layer path, canonical field)`` of the arrays the framework differentiates (its parameters: linen
    ``params``, ``nnx.Param``, Equinox inexact arrays, treex ``Parameter``): found by rebuilding the model with
    NaN parameters and listing it. Native NNX ``WeightNorm`` keeps its scales outside ``nnx.Param``, linen's are
    params: such an array has a gradient on one side only."""
    from normbridge.conversion.base import record_arrays
    from normbridge.testing._models import functional

    f = functional(model)

    def nan(p: Any) -> Any:
        return jnp.full_like(p, jnp.nan) if jnp.issubdtype(jnp.result_type(p), jnp.inexact) else p

    marked = f.rebuild(jax.tree_util.tree_map(nan, f.params), f.state)
    layers = _with_inner(spoke_for(side.framework).layers(marked, side.probe, side.call))
    return {
        (path, k)
        for path, layer in layers.items()
        for k, v in record_arrays(layer.record).items()
        if jnp.issubdtype(jnp.result_type(v), jnp.inexact) and bool(np.all(np.isnan(np.asarray(v))))
    }


def _grad_fields(record: Any) -> list[str]:
    """The arrays of a canonical record that are parameters (gradients are taken of them)."""
    from normbridge.conversion.base import record_arrays

    names = list(record_arrays(record))
    if not isinstance(record, NormRecord):
        return names
    return [k for k in names if k in ("scale", "bias") or k.startswith("weight_scales/")]


def _with_inner(layers: Mapping[str, Layer]) -> dict[str, Layer]:
    out = dict(layers)
    for layer in layers.values():
        if layer.inner is not None:
            out[layer.inner.path] = layer.inner
    return out


def _verify_gradients(plan: _Plan, target: Any, reordered: bool, ys: Any) -> tuple[Verification, list[str]]:
    """Gradients of ``sum(train output * fixed cotangent)`` with respect to every paired layer's parameters.

    The source's gradients go through the same per-pair conversion as its parameters (its spoke lists the
    gradient model's canonical records, like's spoke writes them into the target's gradient model), and are
    compared with the target's own gradients, read back through like's spoke, with
    :func:`normbridge.testing.tree_diff`. Bound: bitwise where the eval outputs must be (flax family, no
    attention), else ``CROSS_RTOL`` relative to the largest gradient of the same layer. A SpectralNorm/
    WeightNorm converted across families (a reparametrisation, not a layout) is not compared (noted)."""
    from normbridge.conversion.base import record_arrays

    src, tgt = plan.src, plan.tgt
    loss = _loss_of_output(ys)
    gs = _gradient_model(src, src.obj, loss)
    gt = _gradient_model(tgt, target, loss)
    # fresh spokes: the gradient models are new objects (the linen spoke caches its traces by object id)
    s_layers = spoke_for(src.framework).layers(gs, src.probe, src.call)
    t_spoke = spoke_for(tgt.framework)
    t_layers = t_spoke.layers(gt, tgt.probe, tgt.call)
    s_params, t_params = _parameter_fields(src, src.obj), _parameter_fields(tgt, target)
    records: dict[str, Any] = {}
    fields: dict[str, tuple[str, list[str]]] = {}  # target path -> (its pair's target path, compared fields)
    notes: list[str] = []
    cross = src.spoke.family != tgt.spoke.family

    def compared(s: str, t: str, record: Any) -> list[str]:
        out = []
        for k in _grad_fields(record):
            ps, pt = (s, k) in s_params, (t, k) in t_params
            if ps and pt:
                out.append(k)
            elif ps or pt:
                one, other = (src, tgt) if ps else (tgt, src)
                notes.append(
                    f"train: gradient of {t}/{k} not compared: a parameter of the {one.label} ({one.framework}) "
                    f"but not of {other.label} ({other.framework}), which does not differentiate it"
                )
        return out

    for s, t, _ in plan.pairs:
        a, b = s_layers[s], t_layers[t]
        if a.kind in WRAPPER_KINDS and cross:
            notes.append(
                f"train: gradients of {s!r} -> {t!r} not compared ({a.kind} across frameworks is a "
                "reparametrisation, not a layout change)"
            )
            continue
        records[t], fields[t] = a.record, (t, compared(s, t, a.record))
        if a.inner is not None and b.inner is not None:
            inner = (t, compared(a.inner.path, b.inner.path, a.inner.record))
            records[b.inner.path], fields[b.inner.path] = a.inner.record, inner

    def adapt(path: str, record: Any, like_record: Any) -> Any:  # as convert's: like's kept hyper-parameters,
        if not (isinstance(record, NormRecord) and isinstance(like_record, NormRecord)):  # and like's own
            return record  # gradient where the source has no scale/bias (not compared)
        keep = {f: getattr(like_record, f) for f, _, _, _ in plan.hyper.get(path, ()) if f in _HYPER}
        fill = {k: getattr(like_record, k) for k in ("scale", "bias") if getattr(record, k) is None}
        return record.replace(**keep, **{k: v for k, v in fill.items() if v is not None})

    written = t_spoke.write(gt, records, t_layers, adapt)
    mapped = _with_inner(spoke_for(tgt.framework).layers(written, tgt.probe, tgt.call))
    own = _with_inner(t_layers)
    a_tree: dict[str, Any] = {}
    b_tree: dict[str, Any] = {}
    layer_of: dict[str, str] = {}
    for path, (pair_path, names) in fields.items():
        ra, rb = record_arrays(own[path].record), record_arrays(mapped[path].record)
        for k in names:
            if k in ra and k in rb:
                key = f"{path}/{k}"
                a_tree[key], b_tree[key], layer_of[key] = ra[k], rb[k], pair_path
    d = _compare(a_tree, b_tree)
    bitwise_required = src.framework in FLAX_FAMILY and tgt.framework in FLAX_FAMILY and not reordered
    bound = "bitwise" if bitwise_required else f"rel <= {CROSS_RTOL:g} of the layer's largest gradient"
    n = len(set(layer_of.values()))
    mode = f"train gradients ({len(a_tree)} parameter arrays of {n} layers)"
    if not d.same_structure or any(not (x.same_shape and x.same_dtype) for x in d.leaves):
        return Verification(mode, False, float("inf"), float("inf"), bound, False, d.failing_paths[:3]), notes
    scale: dict[str, float] = collections.defaultdict(float)
    for key, value in b_tree.items():
        scale[layer_of[key]] = max(scale[layer_of[key]], float(np.max(np.abs(np.asarray(value)), initial=0.0)))
    by_path = {x.path: x for x in d.leaves}

    def rel(x: Any) -> float:
        s = scale[layer_of.get(x.path, "")] if x.path in layer_of else 0.0
        return 0.0 if x.max_abs == 0 else (x.max_abs / s if s > 0 else float("inf"))

    rels = {p: rel(x) for p, x in by_path.items()}
    max_abs = max((x.max_abs for x in d.leaves), default=0.0)
    max_rel = max(rels.values(), default=0.0)
    worst = () if d.bitwise else tuple(p for p in sorted(rels, key=lambda p: -rels[p])[:3] if rels[p] > 0)
    passed = d.bitwise if bitwise_required else max_rel <= CROSS_RTOL
    return Verification(mode, d.bitwise, max_abs, max_rel, bound, passed, worst), notes


def convert(
    source: Any,
    like: Any,
    *,
    mapping: Mapping[str, Any] | None = None,
    probe: Any = None,
    verify: bool | str = True,
    call: tuple[Callable | None, Callable | None] | None = None,
    on_mismatch: str = "refuse",
) -> tuple[Any, ConversionReport]:
    """Convert a whole model to another framework (or to/from the facades): ``(target, report)``.

    ``source`` / ``like``: linen ``(module, variables)``, an NNX module, Equinox ``(model, state)``
    (or a stateless model), a :mod:`normbridge.adapters.treex` module; native layers or facades. A
    ``source`` may also be linen variables alone (no module; see the module docstring): paired by
    ``mapping`` and names only, and it cannot be verified (``verify=False``).
    ``like`` gives the target's architecture and layer classes (its values are replaced; abstract
    ``eval_shape`` values are fine); the target has ``like``'s structure, and nothing passed in is
    mutated. ``mapping``: ``{source path: target path}`` pairs that take precedence (``None`` skips
    a layer; ``"re:<regex>"`` keys; see the module docstring).

    ``probe``: an input batch, or ``(probe_for_source, probe_for_like)``; needed to pair by execution
    order, for linen models, and to verify. One array for two frameworks of different input layouts
    (Equinox: channels first, one example per call under ``jax.vmap``; the flax family: batched, channels
    last) is given as is to the side it runs on and with its channel axis moved (``-1 <-> 1``) to the other
    side (the report notes it). Without a probe and with ``verify`` on, one is built from the layers'
    parameter shapes: candidates ``(2, in)`` for a Dense/Linear, ``(2, S.., in)`` images for a Conv
    (``S = max(8, 2 * kernel)``), integer tokens ``(2, L)`` for an Embed (``L`` from a bare parameter such
    as a ``pos_embedding``, else 4), ``(2, L, D)`` for attention, ``(2, C)`` for a norm layer, in the order
    the non-linen side lists its layers; the first that both models run on abstractly (``jax.eval_shape``)
    and that records layer calls is used, with random normal values (random tokens) from a fixed key, and
    the report says ``probe built from parameter shapes: <shape> <dtype>``; if none runs, the refusal lists
    what was tried. A wrong guess cannot make a conversion silently wrong: both models are still run on it
    and compared, and every pair still passes its shape checks; at worst a correct conversion is refused
    (pass a probe). With ``verify=False`` no probe is built (pairing by names only; linen needs one).

    ``call=(source_fn, like_fn)``: ``fn(model, x, train) -> y`` where the default way of calling a model
    does not apply (``None`` entries keep the default).

    ``verify``: ``True`` runs both models in eval mode on the probe and compares outputs (bitwise among
    linen/NNX/treex without attention, else ``CROSS_RTOL`` relative to the largest output); ``"train"``
    also checks one training step: a train-mode forward pass (outputs, and every paired norm layer's
    updated statistics: bitwise between linen and NNX, else ``CROSS_RTOL``), and the gradients of
    ``sum(output * c)`` (``c`` a fixed random cotangent, :data:`COTANGENT_SEED`, the same on both sides)
    with respect to every paired layer's parameters: the source's gradients are mapped into ``like``'s
    layout by the same per-pair conversion as its parameters and compared with the target's own (bitwise
    where the eval outputs must be, else ``CROSS_RTOL`` of the layer's largest gradient; ``report.gradients``
    with the worst paths). Arrays only one framework differentiates (native NNX ``WeightNorm`` scales are
    not ``nnx.Param``) and SpectralNorm/WeightNorm across families (a reparametrisation) are noted, not
    compared. With ``call=`` hooks, train mode calls ``fn(model, x, True)``; a linen hook returns
    ``apply(..., mutable=[...])``'s ``(y, updates)`` and an Equinox hook ``(y, state)`` for the updated
    statistics to be compared (otherwise a note says they were not; NNX and treex update in place).
    ``False`` converts unverified (the report says so). ``on_mismatch="keep_like"`` converts even when a
    layer's hyper-parameters (eps, momentum, groups, ``use_fast_variance``, dtype, ...) differ, keeping
    like's; the report records it and the measured output change.

    Raises :class:`~normbridge.errors.ConversionError` listing every problem (unpaired, unknown,
    mismatched layers; a refused verification with the measured difference).
    """
    if verify in (True, "train") and _variables_alone(source):
        _refuse_unverifiable(source, like, mapping, probe, call, on_mismatch, verify)
    if verify not in (True, False, "train"):
        raise ValueError(f"verify must be True, False or 'train', got {verify!r}")
    plan = _plan(source, like, mapping, probe, call, on_mismatch, build_probe=bool(verify))
    src, tgt = plan.src, plan.tgt
    if verify and (src.probe is None or tgt.probe is None):
        tried = "".join(f"\n    tried {t}" for t in plan.probe_tried) or " none (no Dense, Conv, Embed layer found)"
        plan.problems.append(
            "verify=True needs an input: pass probe= (or verify=False for an unverified conversion); no probe "
            f"could be built from the parameter shapes:{tried}"
        )
    if plan.problems:
        raise ConversionError(
            f"normbridge.convert ({src.framework} -> {tgt.framework}) refused",
            problems=plan.problems,
            mapping=plan.suggestion,
        )
    records: dict[str, Any] = {}
    bridge_problems: list[str] = []
    for s, t, _ in plan.pairs:
        a, b = src.layers[s], tgt.layers[t]
        records[t] = a.record
        if a.kind in WRAPPER_KINDS and src.spoke.family != tgt.spoke.family:
            from normbridge.conversion.bridge import wrapper_record

            try:
                records[t] = wrapper_record(a, b, src.spoke.family)
            except (ValueError, KeyError, TypeError) as err:
                bridge_problems.append(f"source {s!r} -> like {t!r}: {err}")
        if a.inner is not None and b.inner is not None:
            records[b.inner.path] = a.inner.record
    if bridge_problems:
        raise ConversionError(
            f"normbridge.convert ({src.framework} -> {tgt.framework}) refused",
            problems=bridge_problems,
            mapping=plan.suggestion,
        )

    def adapt(path: str, record: Any, like_record: Any) -> Any:
        if not (isinstance(record, NormRecord) and isinstance(like_record, NormRecord)):
            return record
        diffs = plan.hyper.get(path, ())
        keep = {
            f: getattr(like_record, f) for f, _, _, f32 in diffs if f in _HYPER and (f32 or on_mismatch == "keep_like")
        }
        fill = _affine_fill(record, like_record) if tgt.framework == "equinox" else {}
        return record.replace(**keep, **fill) if keep or fill else record

    # A checkpoint read from disk holds numpy arrays (read-only, host memory); the target holds jax
    # arrays like any model of its framework.
    records = {t: jax.tree.map(lambda v: jnp.asarray(v) if isinstance(v, np.ndarray) else v, r)
               for t, r in records.items()}  # fmt: skip
    try:
        target = tgt.spoke.write(tgt.obj, records, tgt.layers, adapt)
    except ConversionError as err:
        raise ConversionError(
            f"normbridge.convert ({src.framework} -> {tgt.framework}) refused: like's layers cannot hold the "
            "source's state",
            problems=err.problems,
            mapping={s: t for s, t, _ in plan.pairs},
        ) from None
    pairs = _pairs(plan)
    verification = None
    train_check = None
    gradients = None
    notes = list(plan.notes)
    if verify:
        # linen and NNX attention natively differ in operation order (~2e-7)
        reordered = any(p.kind == "attention" for p in pairs)
        try:
            verification = _verify(plan, target, reordered)
        except ConversionError:
            raise
        except Exception as err:  # the user's model code failed: say where, don't leak a foreign exception
            raise ConversionError(
                f"normbridge.convert ({src.framework} -> {tgt.framework}) refused: running the models to verify "
                f"failed: {type(err).__name__}: {err}",
                mapping={s: t for s, t, _ in plan.pairs},
            ) from err
        tolerated = on_mismatch == "keep_like" and bool(plan.hyper)
        _refuse_if_differs(
            plan, verification, tolerated, "the converted model's outputs differ", "worst output paths", _eval_why
        )
        if not verification.passed:
            notes.append(f"outputs changed by keeping like's hyper-parameters: {verification.text()}")
        if verify == "train":
            try:
                train, gradients, train_notes = _verify_train(plan, target, reordered)
            except ConversionError:
                raise
            except Exception as err:  # the user's model code failed in train mode: say where, don't leak it
                raise ConversionError(
                    f"normbridge.convert ({src.framework} -> {tgt.framework}) refused: running the models in train "
                    f"mode to verify failed: {type(err).__name__}: {err}",
                    mapping={s: t for s, t, _ in plan.pairs},
                ) from err
            _refuse_if_differs(plan, train, tolerated, "in train mode the converted model differs", "worst", _train_why)
            if gradients is not None:
                _refuse_if_differs(
                    plan, gradients, tolerated, "in train mode the gradients differ", "worst gradient paths", _train_why
                )
            train_check = train
            notes += train_notes
    else:
        bare = src.cannot_run is not None
        notes.append(f"unverified: {src.cannot_run} (pass (module, variables) to verify)" if bare else
                     "unverified (verify=False)")  # fmt: skip
    skipped = tuple(f"source {p}" for p in src.stateless) + tuple(f"like {p}" for p in tgt.stateless)
    skipped_state = tuple(f"source {p}" for p in src.rng_state) + tuple(f"like {p}" for p in tgt.rng_state)
    report = ConversionReport(
        src.framework,
        tgt.framework,
        tuple(pairs),
        skipped,
        verification,
        tuple(notes),
        train=train_check,
        skipped_state=skipped_state,
        gradients=gradients,
    )
    return target, report
