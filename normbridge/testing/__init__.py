"""Equivalence testing for JAX pytrees and models: a report that shows every mismatch.

- :func:`tree_diff` -> :class:`DiffReport`: compare two pytrees leaf by leaf (structure, then values).
- :func:`assert_trees_close`: raise ``AssertionError`` with the full report.
- :func:`assert_equivalent`: two models of any of the four frameworks compute the same thing.
- pytest plugin (``normbridge.testing.pytest_plugin``, registered through ``pytest11``): ``assert report``
  prints the table.

See ``docs/testing.md`` for the tolerance rules.
"""

from normbridge.testing._compare import (
    DEFAULT_TOLERANCES,
    LeafDiff,
    Tolerance,
    compare_leaf,
    compare_pairs,
    default_tolerance,
    tree_paths,
    ulp_distance,
)
from normbridge.testing.report import DiffReport, assert_trees_close, tree_diff

__all__ = [
    "DEFAULT_TOLERANCES",
    "DiffReport",
    "LeafDiff",
    "Tolerance",
    "assert_trees_close",
    "compare_leaf",
    "compare_pairs",
    "default_tolerance",
    "tree_diff",
    "tree_paths",
    "ulp_distance",
]
