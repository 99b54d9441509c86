"""A checkpoint's arrays under framework-neutral names, and its layers as ``inspect`` shows them.

The names follow the canonical record (:class:`normbridge.core.NormRecord`) and flax's layouts,
one rule per framework, without a model (a checkpoint holds no architecture):

* linen: the collection is dropped (``params/BatchNorm_0/scale`` and ``batch_stats/BatchNorm_0/mean``
  are ``BatchNorm_0/scale`` and ``BatchNorm_0/mean``);
* NNX: the trailing ``/value`` of a variable is dropped;
* normbridge's Equinox format: ``model/`` is dropped, a 1-D ``weight`` is ``scale``, and a
  BatchNorm's ``state/<layer>/[ema_]state_index/0`` and ``/1`` are ``<layer>/mean`` and ``<layer>/var``;
* treex and the rest: as stored.

``inspect`` groups a checkpoint's arrays by these names (:func:`layers`). ``diff`` goes further
(:func:`canonical_view`, :func:`model_view`, :func:`diff_views`): each file's arrays as canonical
records (flax's layouts, Equinox's transposed by :mod:`normbridge.core.layouts`; from the file
alone where its arrays decide the kind, else from a model), paired by layer name after each
framework's naming rules and compared with :mod:`normbridge.testing`. Given both models
(:func:`diff_models`), the layers are paired as :func:`normbridge.convert` pairs them, by the engine's
:func:`normbridge.conversion.pair` (mapping, names, execution order, shape checks). Layers are never
paired by a guess: what cannot be mapped or paired is reported as such.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
from typing import Any

import numpy as np

from normbridge.checkpoint._common import Checkpoint

_EQX_STATE = re.compile(r"^state/(.+)/(?:ema_)?state_index/([01])$")


def canonical_leaves(ckpt: Checkpoint) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for path, arr in ckpt.leaves.items():
        out[canonical_path(ckpt, path, arr)] = arr
    if len(out) != len(ckpt.leaves):  # two stored paths fell on one name: keep them as stored
        return dict(ckpt.leaves)
    return out


def canonical_path(ckpt: Checkpoint, path: str, arr: Any) -> str:
    if ckpt.framework == "linen" or path.split("/", 1)[0] in ("params", "batch_stats"):
        head, _, rest = path.partition("/")
        if head in ("params", "batch_stats") and rest:
            return rest
    if path.endswith("/value"):
        return path[: -len("/value")]
    if ckpt.format == "equinox":
        m = _EQX_STATE.match(path)
        if m:
            return f"{m.group(1)}/{'mean' if m.group(2) == '0' else 'var'}"
        if path.startswith("model/"):
            path = path[len("model/"):]
            if path.endswith("/weight") and np.ndim(arr) == 1:
                return path[: -len("weight")] + "scale"
    return path


@dataclasses.dataclass
class Layer:
    """One layer of a checkpoint: its path, a kind guessed from its arrays' names, its arrays."""

    path: str
    kind: str
    arrays: dict[str, np.ndarray]

    @property
    def count(self) -> int:
        return sum(int(np.size(a)) for a in self.arrays.values())

    @property
    def nbytes(self) -> int:
        return sum(int(np.asarray(a).nbytes) for a in self.arrays.values())


def guess_kind(fields: dict[str, np.ndarray]) -> str:
    names = set(fields)
    if {"mean", "var"} <= names:
        return "BatchNorm"
    if {"u", "sigma"} & names:
        return "SpectralNorm"
    if "kernel" in names:
        return "Dense" if np.ndim(fields["kernel"]) == 2 else "Conv/DenseGeneral"
    if "embedding" in names:
        return "Embed"
    if "weight" in names:
        return "Linear" if np.ndim(fields["weight"]) == 2 else "Conv" if np.ndim(fields["weight"]) > 2 else "?"
    if names == {"scale", "bias"} or names == {"scale"} or names == {"bias"}:
        return "LayerNorm/GroupNorm/InstanceNorm" if "bias" in names else "RMSNorm (or a norm without bias)"
    return "?"


def layers(ckpt: Checkpoint) -> list[Layer]:
    """The checkpoint's arrays grouped by layer (the path up to the last component), in file order."""
    if ckpt.format == "eqx-leaves":  # no names: one entry per leaf
        return [Layer(f"<leaf {k}>", "?", {"": v}) for k, v in ckpt.leaves.items()]
    groups: dict[str, dict[str, np.ndarray]] = {}
    for path, arr in canonical_leaves(ckpt).items():
        layer, _, field = path.rpartition("/")
        groups.setdefault(layer, {})[field] = arr
    return [Layer(p or "<root>", guess_kind(f), f) for p, f in groups.items()]


def stats(arr: np.ndarray) -> dict[str, Any]:
    """min/max/mean over the finite values, NaN and Inf counts (numeric arrays only)."""
    a = np.asarray(arr)
    if a.dtype.kind == "V" or (a.dtype.kind not in "biufc" and "float" not in a.dtype.name):
        return {}
    f = a.astype(np.float64) if a.dtype.kind != "c" else np.abs(a)
    finite = np.isfinite(f)
    out: dict[str, Any] = {"nan": int(np.isnan(f).sum()), "inf": int(np.isinf(f).sum())}
    if finite.any():
        v = f[finite]
        out.update(min=float(v.min()), max=float(v.max()), mean=float(v.mean()))
    return out


# ------------------------------------------------------------------------- canonical records of a file
#: Fields one framework stores and another does not, per framework: mode flags, hyper-parameters kept
#: as state, bookkeeping (Equinox ``inference`` / Dropout ``p`` / BatchNorm's first-call flag, treex's BatchNorm
#: ``momentum``, a record's update ``count``). Present on both sides they are compared; on one side
#: only they are listed as not compared, never as a difference (no other framework could hold them).
CONVENTION_FIELDS: dict[str, tuple[str, ...]] = {
    "equinox": ("inference", "p", "first_time", "count"),
    "treex": ("momentum",),
}
_EQX_ATTENTION = ("query_proj", "key_proj", "value_proj", "output_proj")


@dataclasses.dataclass
class CanonicalView:
    """A checkpoint's arrays as canonical records (:mod:`normbridge.core.layouts`: flax's layouts;
    :class:`normbridge.core.NormRecord` field names), per layer.

    ``framework``: whose naming rules the layer paths follow (for
    :func:`normbridge.conversion.base.normalized_name`); ``layers``: ``{layer path: {field: array}}``,
    the layer path in that framework's own spelling, without linen's collection, NNX's ``/value`` or
    Equinox's ``model/``; ``stored``: ``"<layer>/<field>"`` → the path (or paths) in the file;
    ``unmapped``: file paths whose canonical layout the file alone does not decide, with the reason.
    """

    framework: str
    layers: dict[str, dict[str, Any]]
    stored: dict[str, str] = dataclasses.field(default_factory=dict)
    unmapped: dict[str, str] = dataclasses.field(default_factory=dict)
    #: the file's arrays by stored path (what an unmapped path holds)
    raw: dict[str, Any] = dataclasses.field(default_factory=dict)

    def leaves(self) -> dict[str, Any]:
        """``{"<layer>/<field>": array}``."""
        return {_join(layer, f): v for layer, fields in self.layers.items() for f, v in fields.items()}


def _join(layer: str, field: str) -> str:
    return f"{layer}/{field}" if layer else field


def canonical_view(ckpt: Checkpoint, *, flag: str = "--model") -> CanonicalView:
    """The canonical records of ``ckpt`` from the file alone (no architecture).

    Flax-family files (linen, NNX, treex, and files of no known framework) are in the canonical
    layout already: their leaves keep their names (after :func:`canonical_path`). Equinox's named
    format is mapped with :func:`normbridge.core.layouts.equinox_to_canonical` where the arrays decide
    the kind: ``weight (out, in)`` + ``bias (out,)`` is a Linear, ``weight (out, in, *window)`` +
    ``bias (out, 1, ..)`` a Conv, ``weight`` + ``bias`` of one shape or a 1-D ``weight`` a norm's
    ``scale``/``bias``, a BatchNorm's EMA state its ``mean``/``var``. What they do not decide is
    listed in ``unmapped`` (the reason names ``flag``, the option that gives the architecture):
    a bias-free 2-D ``weight`` (Linear or Embedding?), a bias-free N-D ``weight`` (Conv or an N-D
    LayerNorm?), MultiheadAttention (the number of heads is not stored), SpectralNorm/WeightNorm,
    Equinox ``mode="batch"`` statistics (zero-debiased), and every leaf of a file without names.
    Two files of one framework compare what neither maps by its stored path (:func:`diff_views`).
    """
    if ckpt.format == "eqx-leaves":
        why = f"the file holds no names (eqx.tree_serialise_leaves): pass {flag} to give the architecture"
        return CanonicalView("equinox", {}, unmapped={p: why for p in ckpt.leaves}, raw=ckpt.leaves)
    if ckpt.format != "equinox":
        leaves = canonical_leaves(ckpt)  # in file order; the stored names where two would collide
        # linen's collections name a linen tree in any format (as canonical_path reads them)
        linen = any(p.split("/", 1)[0] in ("params", "batch_stats") for p in ckpt.leaves)
        fw = ckpt.framework or ("linen" if linen else "unknown")
        view = CanonicalView(fw, {}, stored=dict(zip(leaves, ckpt.leaves)))
        for path, arr in leaves.items():
            layer, _, field = path.rpartition("/")
            view.layers.setdefault(layer, {})[field] = arr
        return view
    return _equinox_view(ckpt, flag)


def _equinox_view(ckpt: Checkpoint, flag: str) -> CanonicalView:
    view = CanonicalView("equinox", {}, raw=ckpt.leaves)
    need = f"pass {flag} to give the architecture"
    groups: dict[str, dict[str, tuple[str, Any]]] = {}
    for path, arr in ckpt.leaves.items():
        head, _, rest = path.partition("/")
        if head == "state":
            stats = re.match(r"^(?:(.*)/)?(ema_state_index|state_index)/([01])$", rest)
            flag_ = re.match(r"^(?:(.*)/)?(ema_first_time_index|batch_counter)$", rest)
            if stats and stats.group(2) == "ema_state_index":
                layer = stats.group(1) or ""
                groups.setdefault(layer, {})["mean" if stats.group(3) == "0" else "var"] = (path, arr)
            elif flag_ and flag_.group(2) == "ema_first_time_index":
                groups.setdefault(flag_.group(1) or "", {})["first_time"] = (path, arr)
            elif stats or flag_:
                view.unmapped[path] = ("Equinox BatchNorm mode='batch' statistics are zero-debiased (not the "
                                       "stored numbers of any other framework)")
            else:
                view.unmapped[path] = f"Equinox state of a layer the file does not identify ({need})"
            continue
        if head != "model":
            view.unmapped[path] = "neither model/ nor state/ of normbridge's Equinox format"
            continue
        layer, _, field = rest.rpartition("/")
        groups.setdefault(layer, {})[field] = (path, arr)

    def unmap(prefix: str, why: str) -> None:
        for layer in [g for g in groups if not prefix or g == prefix or g.startswith(prefix + "/")]:
            for p, _ in groups.pop(layer).values():
                view.unmapped[p] = why

    for layer in list(groups):
        parent, _, last = layer.rpartition("/")
        if last in _EQX_ATTENTION and layer in groups:
            unmap(parent, f"MultiheadAttention: the number of heads is not stored in the file ({need})")
    for layer in list(groups):
        parent, _, last = layer.rpartition("/")
        uv = f"state/{parent}/uv_index/" if parent else "state/uv_index/"
        if last == "layer" and layer in groups and (
            "g" in groups.get(parent, {}) or any(p.startswith(uv) for p in ckpt.leaves)
        ):
            for p in ckpt.leaves:
                if p.startswith(uv):
                    view.unmapped[p] = f"SpectralNorm state ({need})"
            unmap(parent, f"SpectralNorm/WeightNorm: the wrapped layer's record needs the architecture ({need})")
    for layer, fields in groups.items():
        arrays = {f: a for f, (_, a) in fields.items()}
        out: dict[str, Any] = {}
        w, b = arrays.pop("weight", None), arrays.pop("bias", None)
        try:
            out.update(_equinox_weight(view, fields, w, b, need))
        except (TypeError, ValueError) as err:  # e.g. a dtype jax cannot hold: compared as stored, or listed
            for f in ("weight", "bias"):
                if f in fields:
                    view.unmapped[fields[f][0]] = f"cannot be put in the canonical layout: {err}"
        out.update(arrays)  # bare parameters, flags, statistics: the same layout in every framework
        for field, arr in out.items():
            key = _join(layer, field)
            src = fields.get(field) or fields.get("weight" if field in ("kernel", "scale") else field)
            view.layers.setdefault(layer, {})[field] = np.asarray(arr)
            view.stored[key] = src[0] if src else key
    return view


def _equinox_weight(view: CanonicalView, fields: dict[str, tuple[str, Any]], w: Any, b: Any,
                    need: str) -> dict[str, Any]:
    """The canonical arrays of an Equinox layer's ``weight``/``bias`` where their shapes decide the
    kind (see :func:`canonical_view`); otherwise both are listed in ``view.unmapped``."""
    from normbridge.core import layouts

    if w is None:
        return {} if b is None else {"bias": b}
    wn, bs = np.ndim(w), None if b is None else np.shape(b)
    if b is not None and wn == 2 and bs == (np.shape(w)[0],):
        return layouts.equinox_to_canonical("dense", {"weight": w, "bias": b})
    if b is not None and wn >= 3 and bs == (np.shape(w)[0],) + (1,) * (wn - 2):
        return layouts.equinox_to_canonical("conv", {"weight": w, "bias": b})
    if b is not None and bs == np.shape(w):
        return {"scale": w, "bias": b}
    if b is None and wn == 1:
        return {"scale": w}
    what = ("a Linear without bias or an Embedding" if wn == 2 and b is None else
            "a Conv without bias or an N-D norm" if b is None else f"weight {list(np.shape(w))} with bias {list(bs)}")
    for f in ("weight", "bias"):
        if f in fields:
            view.unmapped[fields[f][0]] = f"{what} ({need})"
    return {}


def model_view(ckpt: Checkpoint, model: Any, probe: Any = None) -> CanonicalView:
    """The canonical records of ``ckpt`` loaded into ``model`` (built by a ``PKG.MODULE:FACTORY``):
    the checkpoint is loaded by path (:func:`normbridge.checkpoint.models.load_into`, every mismatch
    a :class:`~normbridge.errors.CheckpointMismatchError`), then the model's layers and records come
    from its framework's conversion spoke, as :func:`normbridge.convert` sees them (a linen model's
    layers exist only while it runs: it needs ``probe``). Equinox ``mode="batch"`` statistics are
    compared debiased (:func:`normbridge.core.debias`), as the layer uses them and as
    :func:`normbridge.convert` writes them for any other framework."""
    from normbridge.checkpoint import models

    return loaded_view(models.load_into(ckpt, model), probe, file=ckpt.file)


def loaded_view(loaded: Any, probe: Any = None, *, file: str | None = None) -> CanonicalView:
    """:func:`model_view` of a model the checkpoint ``file`` is already loaded into."""
    from normbridge.conversion.base import record_arrays
    from normbridge.conversion.engine import framework_of, spoke_for
    from normbridge.core import NormRecord, debias
    from normbridge.errors import CheckpointError

    fw = framework_of(loaded)
    try:
        layers = spoke_for(fw).layers(loaded, probe)
    except LookupError as err:
        raise CheckpointError(f"{err} (on the command line: --probe SHAPE)", file=file) from None
    view = CanonicalView(fw, {})
    for layer in layers.values():
        for item in (layer, layer.inner):
            if item is None:
                continue
            if item.kind == "unknown" or item.record is None:
                view.unmapped[item.path] = f"{item.cls}: a layer kind normbridge does not know"
                continue
            if item.kind == "param":  # a bare array of a user module: named as in the file
                parent, _, name = item.path.rpartition("/")
                view.layers.setdefault(parent, {})[name] = np.asarray(item.record["value"])
                view.stored[item.path] = item.path
                continue
            record = item.record
            if isinstance(record, NormRecord) and record.stats_convention == "zero_debiased":
                # Equinox mode="batch" keeps a hidden EMA: compare what the layer uses (what any other
                # framework stores after normbridge.convert), as the conversion does
                mean, var = debias((record.mean, record.var), record.momentum, record.count)
                record = record.replace(mean=mean, var=var)
            for name, arr in record_arrays(record).items():
                view.layers.setdefault(item.path, {})[name] = np.asarray(arr)
                view.stored[_join(item.path, name)] = _join(item.path, name)
    return view


# ------------------------------------------------------------------------------- two files compared
@dataclasses.dataclass(frozen=True)
class CheckpointDiff:
    """Two checkpoints compared as canonical records: ``report`` (:class:`normbridge.testing.DiffReport`
    of every paired leaf, ``a`` against the reference ``b``, and the leaves of one side only),
    ``unmapped`` (per side, file paths the file alone cannot map, with the reason), ``not_compared``
    (one framework's conventions, see :data:`CONVENTION_FIELDS`, and layers a mapping skips).
    With both models (:func:`diff_models`): ``pairs``, the engine's layer pairs
    (:class:`normbridge.conversion.Pair`), and where it refused to pair, ``problems`` (its problem
    lines, verbatim) and ``suggested_map`` (its suggested mapping, for the user to review; never used).
    True when every leaf was mapped, paired and matches."""

    report: Any
    unmapped_a: dict[str, str]
    unmapped_b: dict[str, str]
    not_compared: tuple[str, ...]
    frameworks: tuple[str, str]
    pairs: tuple[Any, ...] = ()
    problems: tuple[str, ...] = ()
    suggested_map: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.report.ok and not self.unmapped_a and not self.unmapped_b and not self.problems

    def __bool__(self) -> bool:
        return self.ok

    def render(self, style: str = "auto") -> str:
        na, nb = self.report.names
        if self.problems:  # nothing was compared: the report's headline ("match: 0 leaves") would mislead
            n = len(self.problems)
            out = [f"{na} and {nb} not compared: normbridge.conversion.pair refused to pair their models' layers "
                   f"({n} problem{'s' if n != 1 else ''}; in its words the source is {na}, like is {nb}):"]
            out += [f"  - {p}" for p in self.problems]
            if any("probe=" in p for p in self.problems):
                out.append("  (on the command line: --probe SHAPE or --probe PKG.MODULE:FACTORY)")
            if self.suggested_map:
                out.append(f"  suggested --map (review it; a null is a layer with no candidate): "
                           f"{json.dumps(self.suggested_map)}")
            for name, unmapped in ((na, self.unmapped_a), (nb, self.unmapped_b)):
                out.append(f"{len(unmapped)} arrays of {name} not compared: {', '.join(unmapped)}")
            return "\n".join(out)
        out = [self.report.render(style)]
        if self.pairs:
            hows = collections.Counter(p.how.split(" ")[0] if p.how.startswith("wrapped") else p.how
                                       for p in self.pairs)
            out.append(f"{len(self.pairs)} layers paired by normbridge.conversion.pair ("
                       + ", ".join(f"{n} by {how}" for how, n in hows.items()) + ")")
        for name, unmapped in ((na, self.unmapped_a), (nb, self.unmapped_b)):
            if unmapped:
                out.append(f"{len(unmapped)} arrays of {name} not mapped to canonical records (not compared):")
                by_reason: dict[str, list[str]] = {}
                for path, why in unmapped.items():
                    by_reason.setdefault(why, []).append(path)
                out += [f"  {', '.join(paths)}: {why}" for why, paths in by_reason.items()]
        if self.not_compared:
            out.append(f"not compared (one framework's conventions or skipped by the mapping): "
                       f"{', '.join(self.not_compared)}")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.render("auto")

    def to_dict(self) -> dict[str, Any]:
        return {**self.report.to_dict(), "ok": self.ok, "frameworks": list(self.frameworks),
                "unmapped": {"a": dict(self.unmapped_a), "b": dict(self.unmapped_b)},
                "not_compared": list(self.not_compared),
                "pairs": [{"a": p.source, "b": p.target, "kind": p.kind, "how": p.how} for p in self.pairs],
                "problems": list(self.problems), "suggested_map": self.suggested_map}

    def to_json(self, **kwargs: Any) -> str:
        from normbridge.testing.report import _jsonable

        kwargs.setdefault("indent", 2)
        return json.dumps(_jsonable(self.to_dict()), allow_nan=False, **kwargs)


def map_layer(path: str, mapping: dict[str, Any]) -> tuple[bool, str | None]:
    """``(matched, new path)`` of layer ``path`` under a ``--map`` mapping: a ``"re:<regex>"`` key matching
    the whole path (its value a ``re`` template), else the longest key that is the path or a prefix of
    it in whole components; a ``None`` value skips the layer."""
    from normbridge.testing.pairing import _rename

    for key, value in mapping.items():
        if key.startswith("re:"):
            m = re.fullmatch(key[3:], path)
            if m:
                return True, None if value is None else m.expand(value)
    plain = {k: v for k, v in mapping.items() if not k.startswith("re:")}
    hits = [k for k in plain if path == k or path.startswith(k + "/")]
    if not hits:
        return False, path
    best = max(hits, key=len)
    if plain[best] is None:
        return True, None
    return True, _rename(path, {best: plain[best]})


def _checked_mapping(mapping: dict[str, Any] | None) -> dict[str, Any]:
    """``mapping`` as a dict; ``ValueError`` (a bad ``--map``) for a value that is not a path or null
    and for a ``re:`` key that is not a regular expression."""
    mapping = dict(mapping or {})
    bad = {k: v for k, v in mapping.items() if not isinstance(v, (str, type(None)))}
    if bad:
        raise ValueError(f"mapping: values must be layer paths or null, got {bad}")
    for key in (k for k in mapping if k.startswith("re:")):
        try:
            re.compile(key[3:])
        except re.error as err:
            raise ValueError(f"mapping: {key!r} is not a regular expression ({err})") from None
    return mapping


def diff_views(va: CanonicalView, vb: CanonicalView, *, mapping: dict[str, Any] | None = None,
               names: tuple[str, str] = ("a", "b"), rtol: float | None = None, atol: float | None = None,
               max_ulp: int | None = None) -> CheckpointDiff:
    """Pair two checkpoints' layers by name after each framework's naming rules
    (:func:`normbridge.conversion.base.normalized_name`, the engine's name pairing: linen's
    ``layers_0`` is ``layers/0``), ``mapping`` first (``{a's layer path: b's layer path}``, ``None``
    skipping a layer of ``a``); a name two layers of one side share pairs neither (both listed as
    unmapped). Then every field of every pair is compared with :func:`normbridge.testing.compare_pairs`
    (the project's one comparison); ``b`` is the reference. No pairing by position or shape: a layer
    without a same-named counterpart is reported on its side. Two views of one framework compare
    the paths both leave unmapped as stored (one framework stores one layout; two
    ``eqx.tree_serialise_leaves`` files by leaf index, as that format loads)."""
    from normbridge.conversion.base import normalized_name
    from normbridge.testing._compare import compare_pairs
    from normbridge.testing.report import DiffReport, _tolerance_text

    mapping = _checked_mapping(mapping)
    unmapped = (dict(va.unmapped), dict(vb.unmapped))
    not_compared: list[str] = []
    used: set[str] = set()

    def key_of(side: int, view: CanonicalView, layer: str, field: str) -> str | None:
        """The pairing key of one leaf: its layer's normalized name and its field; ``None``: skipped."""
        fw = view.framework
        if side == 0 and mapping:
            leaf = _join(layer, field)
            if leaf in mapping and leaf not in view.layers:  # a bare parameter, mapped by its path
                used.add(leaf)
                target = mapping[leaf]
                return None if target is None else normalized_name(target, vb.framework)
            original = layer
            matched, layer = map_layer(original, mapping)
            if matched:
                used.update(k for k in mapping if map_layer(original, {k: mapping[k]})[0])
                fw = vb.framework
            if layer is None:
                return None
        return _join(normalized_name(layer, fw), field)

    def index(side: int, view: CanonicalView) -> dict[str, tuple[str, Any]]:
        by_key: dict[str, list[tuple[str, Any]]] = {}
        for layer, fields in view.layers.items():
            for field, arr in fields.items():
                key = key_of(side, view, layer, field)
                if key is None:
                    not_compared.append(f"{_join(layer, field)} (mapping: skipped)")
                    continue
                by_key.setdefault(key, []).append((_join(layer, field), arr))
        out = {}
        for key, leaves in by_key.items():
            if len(leaves) == 1:
                out[key] = leaves[0]
                continue
            for path, _ in leaves:  # the engine's rule: a name is paired only where it is unique
                unmapped[side][view.stored.get(path, path)] = (
                    f"{[p for p, _ in leaves]} fall on one name ({key}) after {view.framework}'s naming rules")
        return out

    ia, ib = index(0, va), index(1, vb)
    unused = [k for k in mapping if k not in used]
    if unused:
        raise ValueError(f"mapping: {unused} match no layer of {names[0]} (its layers: {sorted(va.layers)})")
    pairs: list[tuple[str, Any, str, Any]] = []
    only: tuple[list[str], list[str]] = ([], [])
    for side, (mine, theirs) in enumerate(((ia, ib), (ib, ia))):
        conventions = CONVENTION_FIELDS.get((va, vb)[side].framework, ())
        for key, (path, _) in mine.items():
            if key in theirs:
                continue
            if path.rpartition("/")[2] in conventions:
                not_compared.append(f"{path} ({names[side]} only)")
            else:
                only[side].append(path)
    pairs = [(pa, a, ib[key][0], ib[key][1]) for key, (pa, a) in ia.items() if key in ib]
    if va.framework == vb.framework:  # one framework stores one layout: what neither maps compares as stored
        for path in [p for p in unmapped[0] if p in unmapped[1] and p in va.raw and p in vb.raw]:
            pairs.append((path, va.raw[path], path, vb.raw[path]))
            del unmapped[0][path], unmapped[1][path]
    leaves = compare_pairs(pairs, rtol=rtol, atol=atol, max_ulp=max_ulp)
    report = DiffReport(tuple(leaves), tuple(sorted(only[0])), tuple(sorted(only[1])), names=names,
                        tolerance=_tolerance_text(rtol, atol, max_ulp))
    return CheckpointDiff(report, unmapped[0], unmapped[1], tuple(not_compared), (va.framework, vb.framework))


def diff_models(ckpt_a: Checkpoint, model_a: Any, ckpt_b: Checkpoint, model_b: Any, *, probe: Any = None,
                mapping: dict[str, Any] | None = None, names: tuple[str, str] = ("a", "b"),
                rtol: float | None = None, atol: float | None = None, max_ulp: int | None = None) -> CheckpointDiff:
    """Two checkpoints, each loaded into its model (:func:`normbridge.checkpoint.models.load_into`),
    their layers paired exactly as :func:`normbridge.convert` pairs them, by the engine's own
    :func:`normbridge.conversion.pair` (``a`` the source, ``b`` like): ``mapping``, then names after
    each framework's naming rules, then execution order on ``probe`` (one input, or ``(input for a,
    input for b)``), every pair's kind and shapes checked. Each pair's canonical records
    (:func:`loaded_view`) are compared field by field with :func:`normbridge.testing.compare_pairs`;
    ``b`` is the reference. Where the engine refuses, nothing is compared (a partial pairing could
    be a shifted one): its problem lines are the diff's ``problems``, its suggested mapping
    ``suggested_map``, and every leaf of both sides is listed unmapped. A mapping problem (a key that
    names no layer, a value that is not a layer path) is a ``ValueError``, as in :func:`diff_views`."""
    from normbridge.checkpoint import models
    from normbridge.conversion import pair
    from normbridge.errors import ConversionError
    from normbridge.testing._compare import compare_pairs
    from normbridge.testing.report import DiffReport, _tolerance_text

    mapping = _checked_mapping(mapping)
    probes = probe if isinstance(probe, tuple) and len(probe) == 2 else (probe, probe)
    loaded = (models.load_into(ckpt_a, model_a), models.load_into(ckpt_b, model_b))
    va = loaded_view(loaded[0], probes[0], file=ckpt_a.file)
    vb = loaded_view(loaded[1], probes[1], file=ckpt_b.file)
    tolerance = _tolerance_text(rtol, atol, max_ulp)
    frameworks = (va.framework, vb.framework)
    try:
        layer_pairs = pair(loaded[0], loaded[1], mapping=mapping, probe=probe)
    except ConversionError as err:
        bad_map = [p for p in err.problems if p.startswith("mapping:")]
        if bad_map:
            raise ValueError("; ".join(bad_map)) from None
        why = "not compared: normbridge.conversion.pair refused to pair the layers (see its problems)"
        unmapped = [{**{leaf: why for leaf in v.leaves()}, **v.unmapped} for v in (va, vb)]
        report = DiffReport((), (), (), names=names, tolerance=tolerance)
        return CheckpointDiff(report, unmapped[0], unmapped[1], (), frameworks, problems=tuple(err.problems),
                              suggested_map=err.mapping)
    pairs: list[tuple[str, Any, str, Any]] = []
    only: tuple[list[str], list[str]] = ([], [])
    not_compared: list[str] = []
    covered: tuple[set[str], set[str]] = (set(), set())
    for lp in layer_pairs:
        fields = (_pair_fields(va, lp.source, lp.kind), _pair_fields(vb, lp.target, lp.kind))
        for side, view in enumerate((va, vb)):
            covered[side].update(leaf for leaf, _ in fields[side].values())
            for field, (leaf, _) in fields[side].items():
                if field in fields[1 - side]:
                    continue
                if field in CONVENTION_FIELDS.get(view.framework, ()):
                    not_compared.append(f"{leaf} ({names[side]} only)")
                else:
                    only[side].append(leaf)
        pairs += [(*fields[0][f], *fields[1][f]) for f in fields[0] if f in fields[1]]
    for side, view in enumerate((va, vb)):  # what no pair covers: a layer the mapping skips
        for leaf in view.leaves():
            if leaf in covered[side]:
                continue
            if _skipped(leaf, mapping, side) or _skipped(leaf.rpartition("/")[0], mapping, side):
                not_compared.append(f"{leaf} (mapping: skipped)")
            else:
                only[side].append(leaf)
    leaves = compare_pairs(pairs, rtol=rtol, atol=atol, max_ulp=max_ulp)
    report = DiffReport(tuple(leaves), tuple(sorted(only[0])), tuple(sorted(only[1])), names=names,
                        tolerance=tolerance)
    return CheckpointDiff(report, dict(va.unmapped), dict(vb.unmapped), tuple(not_compared), frameworks,
                          pairs=tuple(layer_pairs))


def _pair_fields(view: CanonicalView, path: str, kind: str) -> dict[str, tuple[str, Any]]:
    """``{field: (leaf path, array)}`` of one paired layer of a :func:`loaded_view` (a bare parameter:
    its one array, under its own path)."""
    if kind == "param":
        parent, _, name = path.rpartition("/")
        arr = view.layers.get(parent, {}).get(name)
        return {} if arr is None else {"value": (path, arr)}
    return {f: (_join(path, f), a) for f, a in view.layers.get(path, {}).items()}


def _skipped(path: str, mapping: dict[str, Any], side: int) -> bool:
    """Whether the engine's mapping skips layer ``path`` of side ``side`` (a key with value ``None``; on
    the source side also a ``re:`` key matching it)."""
    if path in mapping and mapping[path] is None:
        return True
    return side == 0 and any(k.startswith("re:") and v is None and re.fullmatch(k[3:], path)
                             for k, v in mapping.items())
