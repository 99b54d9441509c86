"""Leaf-by-leaf comparison of two pytrees: the one tree-diff implementation of normbridge.

Used by :func:`normbridge.testing.tree_diff` / :func:`~normbridge.testing.assert_trees_close`, the
conformance suite (``normbridge.conformance.measure`` is a view over it), the conversion verifier
and ``normbridge diff``.

Element rule, for ``a`` (actual) against ``b`` (reference)::

    |a - b| <= atol + rtol * |b|      or, when max_ulp is given,      ulp(a, b) <= max_ulp

NaN at the same position on both sides matches (and is counted), NaN on one side never does;
an infinity matches only the same infinity at the same position. ``rtol=0, atol=0`` (no ``max_ulp``)
means bitwise: equal bit patterns, NaNs matched by position.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Per-dtype default: ``atol = atol_scale * max|b|`` (the leaf's largest finite magnitude), ``rtol``."""

    rtol: float
    atol_scale: float
    max_ulp: int | None = None
    note: str = ""


#: Default tolerances per dtype, used when none of ``rtol``, ``atol``, ``max_ulp`` is given.
#: The absolute part scales with the leaf (``atol = atol_scale * max|b|``): the project's conformance
#: standard ("float32 within 1e-6 relative") measured relative to the reference's largest magnitude, so
#: values near zero (normalized outputs, small gradients) are not held to a tighter bound than the rest.
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(0.0, 1e-12, note="1e-12 relative to the leaf's max |b|"),
    "float32": Tolerance(0.0, 1e-6, note="1e-6 relative to the leaf's max |b|"),
    "complex128": Tolerance(0.0, 1e-12, note="1e-12 relative to the leaf's max |b|"),
    "complex64": Tolerance(0.0, 1e-6, note="1e-6 relative to the leaf's max |b|"),
    # One unit in the last place at 1.0 (2**-nmant) relative to the leaf's max |b|: between one and two
    # ulps of the leaf's largest value, at most one ulp at that scale for every element.
    "float16": Tolerance(0.0, 2.0**-10, note="1 ulp at the leaf's max |b| (2**-10 relative)"),
    "bfloat16": Tolerance(0.0, 2.0**-7, note="1 ulp at the leaf's max |b| (2**-7 relative)"),
}
#: Dtypes not in the table (integers, bool, float8, strings, ...) compare exactly by default.
EXACT = Tolerance(0.0, 0.0, note="exact")


def default_tolerance(dtype: Any) -> Tolerance:
    """The default :class:`Tolerance` of a dtype (exact for dtypes outside :data:`DEFAULT_TOLERANCES`)."""
    return DEFAULT_TOLERANCES.get(str(np.dtype(dtype)) if not isinstance(dtype, str) else dtype, EXACT)


def tree_paths(tree: Any) -> dict[str, Any]:
    """``{"a/b/c": leaf}`` for every leaf of a pytree (dict keys, attributes, indices joined by ``/``)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(p, simple=True, separator="/"): leaf for p, leaf in flat}


def _is_float(dtype: np.dtype) -> bool:
    return dtype.kind == "f" or (dtype.kind == "V" and jnp.issubdtype(dtype, jnp.floating))


def _is_numeric(dtype: np.dtype) -> bool:
    return dtype.kind in "biuc" or _is_float(dtype)


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x)


def _bytes(a: np.ndarray) -> np.ndarray:
    # A byte view needs a contiguous array of rank >= 1; 0-d and strided arrays are copied.
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def ulp_distance(a: Any, b: Any) -> np.ndarray:
    """Number of representable values between ``a`` and ``b`` (same float dtype, any width incl. bfloat16).

    Bit patterns are mapped to a monotone integer line (``-0`` and ``+0`` are the same point); the result
    is float64, exact below 2**53. NaN positions are meaningless here (callers mask them).
    """
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    if a.dtype != b.dtype or not _is_float(a.dtype):
        raise TypeError(f"ulp_distance needs two arrays of one float dtype, got {a.dtype} and {b.dtype}")
    bits = 8 * a.dtype.itemsize
    uint = _UINT[a.dtype.itemsize]
    mask = np.uint64((1 << (bits - 1)) - 1)

    def split(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        u = x.view(uint).astype(np.uint64)
        return (u >> np.uint64(bits - 1)).astype(bool), (u & mask).astype(np.int64)

    sign_a, mag_a = split(a)
    sign_b, mag_b = split(b)
    same_side = np.abs(mag_a - mag_b).astype(np.float64)  # both < 2**63: no overflow
    across = mag_a.astype(np.float64) + mag_b.astype(np.float64)
    return np.where(sign_a == sign_b, same_side, across)


@dataclasses.dataclass(frozen=True)
class LeafDiff:
    """How one leaf of ``a`` compares with the same leaf of ``b`` (``b`` is the reference).

    ``max_abs`` is ``max |a - b|`` over the positions that are NaN on neither side, at ``index``
    (``value_a``, ``value_b`` there); ``max_rel`` is ``max |a - b| / |b|`` over those positions;
    ``max_ulp`` the largest ulp distance over positions finite on both sides (float dtypes of one dtype).
    ``absmax_a`` / ``absmax_b``: ``max |x|`` over non-NaN positions (the scale relative errors use).
    """

    path: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    dtype_a: str
    dtype_b: str
    size: int
    mismatched: int  # elements that do not match (all of them when shapes differ)
    bitwise: bool
    max_abs: float = 0.0
    index: tuple[int, ...] | None = None
    value_a: Any = None
    value_b: Any = None
    text_a: str = ""
    text_b: str = ""
    max_rel: float = 0.0
    max_ulp: float | None = None
    nan_matched: int = 0  # NaN on both sides at the same position (matches)
    nan_mismatched: int = 0  # NaN on exactly one side
    inf_mismatched: int = 0  # an infinity on one side without the same infinity on the other
    absmax_a: float = 0.0
    absmax_b: float = 0.0
    rtol: float = 0.0
    atol: float = 0.0
    max_ulp_allowed: int | None = None
    path_b: str | None = None  # b's own path when the two trees name the leaf differently

    @property
    def same_shape(self) -> bool:
        return self.shape_a == self.shape_b

    @property
    def same_dtype(self) -> bool:
        return self.dtype_a == self.dtype_b

    @property
    def ok(self) -> bool:
        return self.same_shape and self.same_dtype and self.mismatched == 0

    @property
    def kind(self) -> str:
        """``"shape"``, ``"dtype"``, ``"nan/inf"``, ``"values"`` or ``"equal"``."""
        if not self.same_shape:
            return "shape"
        if not self.same_dtype:
            return "dtype"
        if self.mismatched == 0:
            return "equal"
        if self.nan_mismatched or self.inf_mismatched:
            return "nan/inf"
        return "values"

    @property
    def norm_rel(self) -> float:
        """``max |a - b| / max |b|``: the difference relative to the leaf's scale (how failures are ranked)."""
        if self.absmax_b > 0 and math.isfinite(self.absmax_b):
            return self.max_abs / self.absmax_b
        return math.inf if self.max_abs > 0 else 0.0

    def note(self) -> str:
        """Short human-readable explanation of what differs."""
        parts = []
        if not self.same_shape:
            parts.append(f"shape {self.shape_a} vs {self.shape_b}")
        if not self.same_dtype:
            parts.append(f"dtype {self.dtype_a} vs {self.dtype_b}")
        if self.nan_mismatched:
            parts.append(f"{self.nan_mismatched} NaN on one side")
        if self.inf_mismatched:
            parts.append(f"{self.inf_mismatched} Inf unmatched")
        if self.nan_matched:
            parts.append(f"{self.nan_matched} NaN both (match)")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(ok=self.ok, kind=self.kind, index=None if self.index is None else list(self.index))
        d["shape_a"], d["shape_b"] = list(self.shape_a), list(self.shape_b)
        return d


_RANK = {"shape": 0, "dtype": 1, "nan/inf": 2, "values": 3, "equal": 4}


def rank_key(leaf: LeafDiff) -> tuple:
    """Worst first: shape, dtype, NaN/Inf, then the largest difference relative to the leaf's scale."""
    return (_RANK[leaf.kind], -leaf.norm_rel, -leaf.max_abs, leaf.path)


def _scalar(x: np.ndarray) -> Any:
    v = x.item()
    return v if not isinstance(v, np.generic) else v.item()


def _text(x: np.ndarray) -> str:
    s = str(x)
    return s[3:] if s.startswith("np.") else s


def resolve(dtype: np.dtype, rtol: float | None, atol: float | None, max_ulp: int | None) -> tuple[Tolerance, bool]:
    """The tolerance for a leaf: the dtype default when nothing is given, else exactly what is given (rest 0)."""
    if rtol is None and atol is None and max_ulp is None:
        return default_tolerance(dtype), True
    return Tolerance(float(rtol or 0.0), float(atol or 0.0), max_ulp), False


def compare_leaf(
    path: str,
    a: Any,
    b: Any,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    max_ulp: int | None = None,
    path_b: str | None = None,
) -> LeafDiff:
    """Compare one leaf of ``a`` with the same leaf of ``b`` (the reference); see the module doc for the rule."""
    x, y = _as_numpy(a), _as_numpy(b)
    common = dict(
        path=path,
        shape_a=tuple(x.shape),
        shape_b=tuple(y.shape),
        dtype_a=str(x.dtype),
        dtype_b=str(y.dtype),
        path_b=path_b if path_b != path else None,
    )
    tol, scaled = resolve(y.dtype, rtol, atol, max_ulp)
    if x.shape != y.shape:
        return LeafDiff(**common, size=int(y.size), mismatched=int(max(x.size, y.size)), bitwise=False)
    size = int(y.size)
    if not (_is_numeric(x.dtype) and _is_numeric(y.dtype)):
        eq = bool(np.array_equal(x, y)) if x.dtype == y.dtype else False
        return LeafDiff(
            **common,
            size=size,
            mismatched=0 if eq else max(size, 1),
            bitwise=eq,
            text_a=_text(x) if not eq else "",
            text_b=_text(y) if not eq else "",
        )
    bitwise = x.dtype == y.dtype and bool(np.array_equal(_bytes(x), _bytes(y)))
    cplx = x.dtype.kind == "c" or y.dtype.kind == "c"
    wide = np.complex128 if cplx else np.float64
    x64, y64 = x.astype(wide), y.astype(wide)
    nan_x, nan_y = np.isnan(x64), np.isnan(y64)
    valid = ~(nan_x | nan_y)
    with np.errstate(invalid="ignore", over="ignore"):
        same = x64 == y64  # equal values, equal infinities included
        d = np.where(valid & ~same, np.abs(x64 - y64), 0.0)
        d = np.where(np.isnan(d), np.inf, d)  # inf - inf of opposite signs is inf apart; be explicit
        inf_bad = valid & ~same & (np.isinf(x64) | np.isinf(y64))
        mag_y = np.abs(y64)
        finite_y = mag_y[valid & np.isfinite(mag_y)]
        scale = float(finite_y.max()) if finite_y.size else 0.0
        atol_used = tol.atol_scale * scale if scaled else tol.atol_scale
        rtol_used = tol.rtol
        exact = rtol_used == 0.0 and atol_used == 0.0 and tol.max_ulp is None and not scaled
        if exact:
            if x.dtype == y.dtype:
                u = x.dtype.itemsize
                xb = np.ascontiguousarray(x).reshape(-1).view(np.uint8).reshape(-1, u)
                yb = np.ascontiguousarray(y).reshape(-1).view(np.uint8).reshape(-1, u)
                elem_ok = (xb == yb).all(axis=1).reshape(x.shape)
            else:
                elem_ok = same
        else:
            elem_ok = same | (d <= atol_used + rtol_used * mag_y)
        ulp = None
        if x.dtype == y.dtype and _is_float(x.dtype):
            finite_both = valid & np.isfinite(x64) & np.isfinite(y64)
            dist = np.where(finite_both, ulp_distance(x, y), 0.0)
            ulp = float(dist.max()) if dist.size else 0.0
            if tol.max_ulp is not None:
                elem_ok = elem_ok | (finite_both & (dist <= tol.max_ulp))
        elem_ok = (elem_ok & valid & ~inf_bad) | (nan_x & nan_y)
        rel = np.where(d == 0, 0.0, d / np.where(mag_y == 0, 1.0, mag_y))
        rel = np.where((d > 0) & (mag_y == 0), np.inf, rel)
        rel = np.where(np.isnan(rel), np.inf, rel)
    out = dict(
        **common,
        size=size,
        mismatched=int((~elem_ok).sum()),
        bitwise=bitwise,
        max_ulp=ulp,
        nan_matched=int((nan_x & nan_y).sum()),
        nan_mismatched=int((nan_x ^ nan_y).sum()),
        inf_mismatched=int(inf_bad.sum()),
        absmax_a=float(np.abs(x64[~nan_x]).max()) if (~nan_x).any() else 0.0,
        absmax_b=float(mag_y[~nan_y].max()) if (~nan_y).any() else 0.0,
        rtol=rtol_used,
        atol=atol_used,
        max_ulp_allowed=tol.max_ulp,
    )
    if valid.any():
        # The reported element: the worst mismatch if any, else the largest difference.
        pick = np.where(valid, d, -1.0)
        if not elem_ok.all():
            pick = np.where(~elem_ok, np.where(valid, d, np.inf), -1.0)
        flat = int(np.argmax(pick))
        idx = tuple(int(i) for i in np.unravel_index(flat, x.shape)) if x.ndim else ()
        out.update(
            max_abs=float(d[valid].max()),
            max_rel=float(rel[valid].max()),
            index=idx,
            value_a=_scalar(x[idx]),
            value_b=_scalar(y[idx]),
            text_a=_text(x[idx]),
            text_b=_text(y[idx]),
        )
    elif size and not elem_ok.all():  # only NaN mismatches: point at the first
        flat = int(np.argmax(~elem_ok))
        idx = tuple(int(i) for i in np.unravel_index(flat, x.shape)) if x.ndim else ()
        out.update(index=idx, value_a=_scalar(x[idx]), value_b=_scalar(y[idx]))
        out.update(text_a=_text(x[idx]), text_b=_text(y[idx]))
    return LeafDiff(**out)


def compare_pairs(
    pairs: Iterable[tuple[str, Any, str, Any]],
    *,
    rtol: float | None = None,
    atol: float | None = None,
    max_ulp: int | None = None,
) -> list[LeafDiff]:
    """Compare already-paired leaves ``(path_a, leaf_a, path_b, leaf_b)``: the entry point for callers whose
    two trees name the same leaf differently (cross-framework equivalence, checkpoint diffs)."""
    return [compare_leaf(pa, a, b, rtol=rtol, atol=atol, max_ulp=max_ulp, path_b=pb) for pa, a, pb, b in pairs]


def split_paths(a: dict[str, Any], b: dict[str, Any]) -> tuple[list[str], tuple[str, ...], tuple[str, ...]]:
    """Common paths (in ``a``'s order), paths only in ``a``, paths only in ``b`` (each sorted)."""
    common = [k for k in a if k in b]
    return common, tuple(sorted(set(a) - set(b))), tuple(sorted(set(b) - set(a)))
