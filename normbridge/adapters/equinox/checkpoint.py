"""Named, refactor-proof checkpoints for an equinox model and its ``eqx.nn.State``.

``eqx.tree_serialise_leaves`` writes leaves in pytree order with no names, so
reordering two fields of a model (or two stateful layers) silently swaps
same-shaped arrays on load (upstream equinox #267, #914, #1093). :func:`save`
writes every array **with its path** instead:

* a zip archive (stored, uncompressed) of ``.npy`` files plus ``index.json``
  mapping each path to its file, shape and dtype; numpy and the standard library
  only, and loading uses ``np.load(..., allow_pickle=False)``, so reading a
  checkpoint executes no code;
* model leaves are named by their pytree path (``"model/bn1/weight"``); ``State``
  entries by the path of their ``StateIndex`` in the model
  (``"state/bn1/ema_state_index/0"``), which also works for states built with
  ``eqx.nn.State(model)`` (whose markers are anonymous objects);
* written atomically: a temporary file in the same folder, then ``os.replace``.

:func:`load` fills a ``like`` model (and state) **by path** and returns a
:class:`LoadReport` listing every missing, extra, reshaped or retyped entry. It
also reads plain ``eqx.tree_serialise_leaves`` files: these have no names, so
their records are matched by position and every shape/dtype disagreement is
reported by path; given ``written_like`` (a template of the model/state that
wrote the file, e.g. built from the old class), the records get that
template's paths and are loaded by name, which undoes a reordering.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tempfile
import zipfile
from typing import Any

import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from normbridge import errors
from normbridge.adapters.equinox._common import eqx

FORMAT = "normbridge.equinox/1"
_INDEX = "index.json"
_ZIP_MAGIC = b"PK\x03\x04"
_NPY_MAGIC = b"\x93NUMPY"
_SCALAR_TYPES = (bool, int, float, complex)


class CheckpointMismatchError(errors.CheckpointMismatchError):
    """A checkpoint does not match the ``like`` model; ``.report`` lists every difference by path."""

    def __init__(self, report: LoadReport):
        self.report = report
        super().__init__(f"checkpoint {report.source!r} does not match the model: {report.text()}")


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What :func:`load` found; ``ok`` when nothing is missing, extra, reshaped or retyped."""

    source: str
    #: ``"named"`` (this module's format), ``"leaves"`` (plain file, by position) or
    #: ``"leaves+written_like"`` (plain file named by the writer's template).
    matched_by: str
    missing: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()
    #: ``"path: file (3,) vs model (4,)"``
    reshaped: tuple[str, ...] = ()
    #: ``"path: file int32 vs model float32"``
    retyped: tuple[str, ...] = ()
    #: Paths loaded by name from a different position than they have in the model: a leaf-order
    #: load (``eqx.tree_deserialise_leaves``) would have put another entry there.
    reordered: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.reshaped or self.retyped)

    def text(self) -> str:
        parts = []
        for name in ("missing", "extra", "reshaped", "retyped", "reordered"):
            items = getattr(self, name)
            if items:
                parts.append(f"{name} ({len(items)}): " + "; ".join(items))
        return ", ".join(parts) if parts else "all entries match"


def _is_index(x: Any) -> bool:
    return isinstance(x, eqx.nn.StateIndex)


def _is_saved(x: Any) -> bool:
    """Leaves ``eqx.default_serialise_filter_spec`` writes: arrays and Python scalars."""
    return eqx.is_array_like(x)


def _key(path: Any) -> str:
    return jtu.keystr(path, simple=True, separator="/")


def _named_leaves(model: Any, state: Any = None) -> list[tuple[str, Any]]:
    """``(name, leaf)`` for every saved leaf, in ``tree_serialise_leaves((model, state))`` order."""
    out = [("model/" + _key(p), leaf) for p, leaf in jtu.tree_flatten_with_path(model)[0] if _is_saved(leaf)]
    if state is None:
        return out
    index_paths = {
        leaf.marker: _key(p) for p, leaf in jtu.tree_flatten_with_path(model, is_leaf=_is_index)[0] if _is_index(leaf)
    }
    values, markers = state.tree_flatten()
    for marker, value in zip(markers, values):
        if marker not in index_paths:
            raise ValueError(
                f"checkpoint: the State has an entry {marker!r} with no StateIndex in the model; "
                "pass the model the state was made with"
            )
        base = "state/" + index_paths[marker]
        for p, leaf in jtu.tree_flatten_with_path(value)[0]:
            out.append((base + ("/" + _key(p) if p else ""), leaf))
    return out


def _shape_dtype(x: Any) -> tuple[tuple[int, ...], str]:
    if isinstance(x, _SCALAR_TYPES):
        return (), np.asarray(x).dtype.name if not isinstance(x, bool) else "bool"
    return tuple(np.shape(x)), jnp.dtype(x.dtype).name


def _to_numpy(x: Any) -> tuple[np.ndarray, str]:
    """``(array to write, dtype name)``; dtypes numpy cannot describe (bfloat16, fp8) are written as raw uints."""
    arr = np.asarray(x)
    name = jnp.dtype(arr.dtype).name
    if arr.dtype.kind == "V" or arr.dtype.type.__module__ != "numpy":
        arr = arr.view(np.dtype(f"uint{arr.dtype.itemsize * 8}"))
    return arr, name


def save(path: str | os.PathLike, model: Any, state: Any = None) -> None:
    """Write ``model`` (and ``state``) with their paths to ``path``, atomically."""
    entries = []
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".nbeqx", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh, zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED) as zf:
            for i, (name, leaf) in enumerate(_named_leaves(model, state)):
                arr, dtype = _to_numpy(leaf)
                buf = io.BytesIO()
                np.save(buf, arr, allow_pickle=False)
                member = f"arrays/{i}.npy"
                zf.writestr(member, buf.getvalue())
                kind = type(leaf).__name__ if isinstance(leaf, _SCALAR_TYPES) else "array"
                entries.append({"path": name, "file": member, "shape": list(arr.shape), "dtype": dtype, "kind": kind})
            zf.writestr(_INDEX, json.dumps({"format": FORMAT, "entries": entries}, indent=1))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # never leave a half-written checkpoint under `path`
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _read_named(path: str) -> dict[str, tuple[Any, tuple[int, ...], str]]:
    """``{path: (loader, shape, dtype)}`` of a named checkpoint, in file order."""
    out: dict[str, Any] = {}
    with zipfile.ZipFile(path) as zf:
        index = json.loads(zf.read(_INDEX))
        if index.get("format") != FORMAT:
            raise ValueError(f"load: {path!r} is not a {FORMAT} checkpoint (format {index.get('format')!r})")
        for e in index["entries"]:
            raw = np.load(io.BytesIO(zf.read(e["file"])), allow_pickle=False)
            dtype = jnp.dtype(e["dtype"])
            arr = raw.view(dtype) if raw.dtype != dtype else raw
            out[e["path"]] = (arr, tuple(e["shape"]), dtype.name)
    return out


def _read_leaves(path: str) -> list[np.ndarray]:
    """Every record of a plain ``eqx.tree_serialise_leaves`` file, in order (no pickles)."""
    records = []
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        while fh.tell() < size:
            records.append(np.load(fh, allow_pickle=False))
    return records


def _restore(like: Any, arr: np.ndarray) -> Any:
    """The loaded value in ``like``'s kind: Python scalar, numpy array or jax array."""
    if isinstance(like, _SCALAR_TYPES):
        return type(like)(arr.item())
    if isinstance(like, np.ndarray | np.generic):
        return np.asarray(arr)
    return jnp.asarray(arr, dtype=like.dtype)


def _file_dtype(arr: np.ndarray, like: Any) -> str:
    """dtype name of a plain-file record; jnp.save writes bfloat16 as 2-byte void, read as ``like`` when it fits."""
    if arr.dtype.kind == "V":
        like_dtype = np.asarray(like).dtype if not isinstance(like, _SCALAR_TYPES) else None
        if like_dtype is not None and like_dtype.itemsize == arr.dtype.itemsize:
            return jnp.dtype(like_dtype).name
    return jnp.dtype(arr.dtype).name


def load(
    path: str | os.PathLike,
    like: Any,
    state: Any = None,
    *,
    strict: bool = True,
    written_like: Any = None,
) -> tuple[Any, Any, LoadReport]:
    """``(model, state, report)`` read from ``path`` into the structure of ``like`` (and ``state``).

    ``path`` is a :func:`save` checkpoint, or a plain ``eqx.tree_serialise_leaves``
    file of ``model`` or ``(model, state)``. Entries are matched by path (plain
    files: by position, or by the paths of ``written_like`` — a ``(model, state)``
    pair or a model with the writer's layout). With ``strict`` (default) any
    missing, extra, reshaped or retyped entry raises :class:`CheckpointMismatchError`
    carrying the report; otherwise those entries keep ``like``'s values.
    """
    path = os.fspath(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
    expected = _named_leaves(like, state)
    order = {name: i for i, (name, _) in enumerate(expected)}
    missing: list[str] = []
    reshaped: list[str] = []
    retyped: list[str] = []
    found: dict[str, Any] = {}
    extra: list[str] = []
    if head.startswith(_ZIP_MAGIC):
        matched_by = "named"
        stored = _read_named(path)
    elif head.startswith(_NPY_MAGIC) or head == b"":
        records = _read_leaves(path)
        if written_like is not None:
            matched_by = "leaves+written_like"
            wl_model, wl_state = written_like if isinstance(written_like, tuple) else (written_like, None)
            names = [n for n, _ in _named_leaves(wl_model, wl_state)]
            if len(names) != len(records):
                raise ValueError(
                    f"load: {path!r} has {len(records)} records but written_like has {len(names)} saved leaves"
                )
            likes = dict(_named_leaves(wl_model, wl_state))
        else:
            matched_by = "leaves"
            names = [n for n, _ in expected[: len(records)]]
            names += [f"<record {i}>" for i in range(len(expected), len(records))]
            likes = dict(expected)
        stored = {}
        for name, arr in zip(names, records):
            ref = likes.get(name)
            stored[name] = (arr, tuple(arr.shape), _file_dtype(arr, ref) if ref is not None else arr.dtype.name)
    else:
        raise ValueError(f"load: {path!r} is neither a normbridge checkpoint nor an eqx.tree_serialise_leaves file")

    for name, ref in expected:
        if name not in stored:
            missing.append(name)
            continue
        arr, shape, dtype = stored[name]
        want_shape, want_dtype = _shape_dtype(ref)
        if shape != want_shape:
            reshaped.append(f"{name}: file {shape} vs model {want_shape}")
        elif dtype != want_dtype:
            retyped.append(f"{name}: file {dtype} vs model {want_dtype}")
        else:
            if arr.dtype.kind == "V":
                arr = arr.view(jnp.dtype(dtype))
            found[name] = _restore(ref, arr)
    extra = [n for n in stored if n not in order]
    file_pos = {n: i for i, n in enumerate(stored)}
    # Relative order of the entries both sides have: a leaf-order load pairs them by rank.
    common = [n for n, _ in expected if n in file_pos]
    rank_in_file = sorted(common, key=file_pos.__getitem__)
    reordered = [a for a, b in zip(common, rank_in_file) if a != b]
    report = LoadReport(
        source=path,
        matched_by=matched_by,
        missing=tuple(missing),
        extra=tuple(extra),
        reshaped=tuple(reshaped),
        retyped=tuple(retyped),
        reordered=tuple(reordered),
    )
    if strict and not report.ok:
        raise CheckpointMismatchError(report)

    values = [found.get(name, ref) for name, ref in expected]
    return (*_rebuild(like, state, values), report)


def _rebuild(like: Any, state: Any, values: list[Any]) -> tuple[Any, Any]:
    """Put ``values`` (in :func:`_named_leaves` order) back into ``like`` and ``state``."""
    it = iter(values)
    leaves, treedef = jtu.tree_flatten(like)
    model = jtu.tree_unflatten(treedef, [next(it) if _is_saved(leaf) else leaf for leaf in leaves])
    if state is None:
        return model, None
    old_values, markers = state.tree_flatten()
    new_values = []
    for value in old_values:
        v_leaves, v_def = jtu.tree_flatten(value)
        new_values.append(jtu.tree_unflatten(v_def, [next(it) for _ in v_leaves]))
    return model, type(state).tree_unflatten(markers, new_values)


__all__ = ["FORMAT", "CheckpointMismatchError", "LoadReport", "load", "save"]
