"""Comparison helpers shared by every facade's conformance checks and tests.

The comparison itself is :mod:`normbridge.testing` (one tree-diff implementation); ``Diff`` and
``TreeDiff`` are the suite's summaries of its :class:`~normbridge.testing.LeafDiff` records.
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

from normbridge.testing import DEFAULT_TOLERANCES, DiffReport, LeafDiff, compare_leaf, tree_paths
from normbridge.testing.report import diff_paths

#: Relative tolerance per result dtype (relative to max |native|): the scale part of
#: :data:`normbridge.testing.DEFAULT_TOLERANCES`, so the suite and the testing helpers agree.
REL_TOL: dict[str, float] = {k: DEFAULT_TOLERANCES[k].atol_scale for k in ("float64", "float32", "bfloat16", "float16")}

_INF = float("inf")


def _result_dtype(x: Any) -> str:
    # The dtype jnp.asarray(x) would have (float64 inputs become float32 unless x64 is enabled).
    return str(jax.dtypes.canonicalize_dtype(np.asarray(x).dtype)) if not isinstance(x, jax.Array) else str(x.dtype)


@dataclasses.dataclass(frozen=True)
class Diff:
    """Difference between a native and a facade array: a view of :class:`normbridge.testing.LeafDiff`."""

    bitwise: bool
    max_abs: float
    max_rel: float
    dtype: str
    same_shape: bool = True
    same_dtype: bool = True

    @classmethod
    def of(cls, leaf: LeafDiff, dtype: str) -> Diff:
        """The suite's summary of one leaf: ``max_rel`` is ``max |native - facade| / max |native|``."""
        if not leaf.same_shape:
            return cls(False, _INF, _INF, dtype, same_shape=False)
        if not leaf.same_dtype:
            return cls(False, _INF, _INF, dtype, same_dtype=False)
        if np.dtype(leaf.dtype_b).kind in "biu":
            return cls(leaf.bitwise, 0.0 if leaf.bitwise else _INF, 0.0 if leaf.bitwise else _INF, dtype)
        if leaf.nan_mismatched:
            return cls(False, _INF, _INF, dtype)
        if leaf.nan_matched == leaf.size:
            return cls(leaf.bitwise, 0.0, 0.0, dtype)
        scale = leaf.absmax_b
        return cls(leaf.bitwise, leaf.max_abs, leaf.max_abs / scale if scale > 0 else leaf.max_abs, dtype)

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


def diff(native: Any, facade: Any) -> Diff:
    """Compare two arrays: bitwise equality, max abs and relative error (NaNs must coincide)."""
    # normbridge.testing's reference side is b: the native result.
    return Diff.of(compare_leaf("", facade, native), _result_dtype(native))


@dataclasses.dataclass(frozen=True)
class TreeDiff:
    """Result of comparing two pytrees leaf by leaf, by path (a view of a :class:`DiffReport`)."""

    missing: tuple[str, ...]  # in native, not in facade
    extra: tuple[str, ...]  # in facade, not in native
    leaves: dict[str, Diff]
    report: DiffReport | None = dataclasses.field(default=None, compare=False, repr=False)

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


def tree_diff(native: Any, facade: Any) -> TreeDiff:
    """Compare two pytrees by path (:func:`normbridge.testing.tree_diff` with the native tree as reference)."""
    a, b = tree_paths(native), tree_paths(facade)
    report = diff_paths(b, a)
    leaves = {leaf.path: Diff.of(leaf, _result_dtype(a[leaf.path])) for leaf in report.leaves}
    return TreeDiff(report.only_b, report.only_a, dict(sorted(leaves.items())), report)


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
