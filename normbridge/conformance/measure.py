"""Comparison helpers shared by every facade's conformance checks and tests.

Tolerances follow the project standard: float32 within 1e-6 relative (bitwise
where the operation order is the same), half precision within one unit in the
last place of the native result, stored state exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

#: Relative tolerance per result dtype (relative to max |native|).
REL_TOL: dict[str, float] = {
    "float64": 1e-12,
    "float32": 1e-6,
    "bfloat16": 2.0**-7,  # one bf16 ulp: what native shows between jit and eager runs
    "float16": 2.0**-10,
}


@dataclasses.dataclass(frozen=True)
class Diff:
    """Difference between a native and a facade array."""

    bitwise: bool
    max_abs: float
    max_rel: float
    dtype: str
    same_shape: bool = True
    same_dtype: bool = True

    def within(self, rel_tol: float | None = None) -> bool:
        if not (self.same_shape and self.same_dtype):
            return False
        if self.bitwise:
            return True
        tol = REL_TOL.get(self.dtype, 1e-6) if rel_tol is None else rel_tol
        return self.max_rel <= tol

    def text(self) -> str:
        if not self.same_shape:
            return "shape differs"
        if not self.same_dtype:
            return "dtype differs"
        return "bitwise" if self.bitwise else f"max rel {self.max_rel:.1e}"


def _bytes(a: np.ndarray) -> np.ndarray:
    # A byte view needs a contiguous array of rank >= 1; 0-d and strided arrays are copied.
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def diff(native: Any, facade: Any) -> Diff:
    """Compare two arrays: bitwise equality, max abs and relative error (NaNs must coincide)."""
    a = np.asarray(native)
    b = np.asarray(facade)
    dtype = str(jnp.asarray(native).dtype)
    if a.shape != b.shape:
        return Diff(False, float("inf"), float("inf"), dtype, same_shape=False)
    if a.dtype != b.dtype:
        return Diff(False, float("inf"), float("inf"), dtype, same_dtype=False)
    if a.dtype.kind in "biu" or a.dtype == bool:
        eq = bool(np.array_equal(a, b))
        return Diff(eq, 0.0 if eq else float("inf"), 0.0 if eq else float("inf"), dtype)
    bitwise = bool(np.array_equal(_bytes(a), _bytes(b)))
    a64 = a.astype(np.complex128 if a.dtype.kind == "c" else np.float64)
    b64 = b.astype(a64.dtype)
    nan_a, nan_b = np.isnan(a64), np.isnan(b64)
    if not np.array_equal(nan_a, nan_b):
        return Diff(False, float("inf"), float("inf"), dtype)
    finite = ~nan_a
    if not finite.any():
        return Diff(bitwise, 0.0, 0.0, dtype)
    err = np.abs(a64[finite] - b64[finite])
    max_abs = float(err.max()) if err.size else 0.0
    scale = float(np.abs(a64[finite]).max()) if err.size else 0.0
    max_rel = max_abs / scale if scale > 0 else max_abs
    return Diff(bitwise, max_abs, max_rel, dtype)


@dataclasses.dataclass(frozen=True)
class TreeDiff:
    """Result of comparing two pytrees leaf by leaf, by path."""

    missing: tuple[str, ...]  # in native, not in facade
    extra: tuple[str, ...]  # in facade, not in native
    leaves: dict[str, Diff]

    @property
    def same_structure(self) -> bool:
        return not self.missing and not self.extra

    def exact(self) -> bool:
        """Same paths, shapes, dtypes and bits."""
        return self.same_structure and all(d.bitwise and d.same_shape and d.same_dtype for d in self.leaves.values())

    def within(self, rel_tol: float | None = None) -> bool:
        return self.same_structure and all(d.within(rel_tol) for d in self.leaves.values())

    def worst(self) -> float:
        return max((d.max_rel for d in self.leaves.values()), default=0.0)

    def text(self) -> str:
        if self.missing or self.extra:
            return f"paths differ: missing {list(self.missing)[:4]}, extra {list(self.extra)[:4]}"
        bad = [p for p, d in self.leaves.items() if not (d.same_shape and d.same_dtype)]
        if bad:
            return f"shape/dtype differ at {bad[:4]}"
        if all(d.bitwise for d in self.leaves.values()):
            return "bitwise"
        return f"max rel {self.worst():.1e}"


def tree_paths(tree: Any) -> dict[str, Any]:
    """``{"a/b/c": leaf}`` for every leaf of a pytree (dict keys, attributes, indices)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(p, simple=True, separator="/"): leaf for p, leaf in flat}


def tree_diff(native: Any, facade: Any) -> TreeDiff:
    """Compare two pytrees by path."""
    a, b = tree_paths(native), tree_paths(facade)
    missing = tuple(sorted(set(a) - set(b)))
    extra = tuple(sorted(set(b) - set(a)))
    leaves = {k: diff(a[k], b[k]) for k in sorted(set(a) & set(b))}
    return TreeDiff(missing, extra, leaves)


def shape_dtype_tree(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{path: (shape, dtype)}`` of a pytree, for layout comparisons."""
    return {k: (tuple(np.shape(v)), str(jnp.asarray(v).dtype)) for k, v in tree_paths(tree).items()}


class Accumulator:
    """Collects :class:`Diff`/:class:`TreeDiff` results of many cases into one matrix cell text."""

    def __init__(self) -> None:
        self.cases = 0
        self.failures: list[str] = []
        self.worst = 0.0
        self.all_bitwise = True
        self.compared = 0  # cases that compared numbers, as opposed to boolean checks

    def add(self, name: str, d: Diff | TreeDiff, *, exact: bool = False, rel_tol: float | None = None) -> None:
        self.cases += 1
        self.compared += 1
        if isinstance(d, TreeDiff):
            ok = d.exact() if exact else d.within(rel_tol)
            bitwise = d.exact()
            worst = d.worst() if d.same_structure else float("inf")
        else:
            ok = (d.bitwise and d.same_dtype and d.same_shape) if exact else d.within(rel_tol)
            bitwise = d.bitwise and d.same_shape and d.same_dtype
            worst = d.max_rel
        self.all_bitwise &= bitwise
        if not bitwise:
            self.worst = max(self.worst, worst)
        if not ok:
            self.failures.append(f"{name}: {d.text()}")

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        self.cases += 1
        if not ok:
            self.failures.append(f"{name}: {detail}" if detail else name)

    @property
    def ok(self) -> bool:
        return self.cases > 0 and not self.failures

    def text(self) -> str:
        if self.cases == 0:
            return "no case ran"
        if self.failures:
            return f"{len(self.failures)}/{self.cases} failed: " + "; ".join(self.failures[:3])
        if self.compared == 0:
            return f"identical ({self.cases} checks)"
        if self.all_bitwise:
            return f"bitwise ({self.cases} cases)"
        return f"max rel {self.worst:.1e} ({self.cases} cases)"
