"""``DiffReport``: every difference between two pytrees, as a table, JSON, and a truth value."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import sys
from typing import Any

from normbridge.testing._compare import LeafDiff, compare_leaf, rank_key, split_paths, tree_paths

_MAX_ROWS = 200  # rows in the rendered table; the JSON always has every leaf


def _fmt_float(x: float | None, spec: str = ".3g") -> str:
    if x is None:
        return "-"
    if isinstance(x, complex):
        return str(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return format(x, spec)


def _jsonable(x: Any) -> Any:
    """Strict JSON: non-finite floats as the strings "nan", "inf", "-inf"; complex as [re, im]."""
    if isinstance(x, float) and not math.isfinite(x):
        return _fmt_float(x)
    if isinstance(x, complex):
        return [_jsonable(x.real), _jsonable(x.imag)]
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _n(k: int, one: str, many: str | None = None) -> str:
    return f"{k} {one if k == 1 else (many or one + 's')}"


def _use_rich() -> bool:
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return bool(getattr(sys.stdout, "isatty", lambda: False)())


@dataclasses.dataclass(frozen=True)
class DiffReport:
    """All differences between two pytrees ``a`` (actual) and ``b`` (reference).

    ``only_a`` / ``only_b``: paths present on one side only; ``leaves``: one :class:`LeafDiff` per
    common path (in ``a``'s order); ``failures``: the leaves that do not match, worst first.
    ``bool(report)`` is true when the trees have the same paths and every leaf matches.
    ``str(report)`` is a table (rich on a terminal, plain text otherwise); ``report.to_json()`` for scripts.
    """

    leaves: tuple[LeafDiff, ...]
    only_a: tuple[str, ...] = ()
    only_b: tuple[str, ...] = ()
    names: tuple[str, str] = ("a", "b")
    tolerance: str = "per-dtype defaults"
    title: str = ""

    # -- verdict ---------------------------------------------------------------------------------------
    @property
    def same_structure(self) -> bool:
        return not self.only_a and not self.only_b

    @property
    def ok(self) -> bool:
        return self.same_structure and all(leaf.ok for leaf in self.leaves)

    def __bool__(self) -> bool:
        return self.ok

    @property
    def failures(self) -> tuple[LeafDiff, ...]:
        """Mismatching common leaves, worst first (shape, dtype, NaN/Inf, then largest relative difference)."""
        return tuple(sorted((leaf for leaf in self.leaves if not leaf.ok), key=rank_key))

    @property
    def failing_paths(self) -> tuple[str, ...]:
        """Every path that differs: one-sided paths, then mismatching leaves worst first."""
        return self.only_a + self.only_b + tuple(leaf.path for leaf in self.failures)

    def __getitem__(self, path: str) -> LeafDiff:
        for leaf in self.leaves:
            if leaf.path == path or leaf.path_b == path:
                return leaf
        raise KeyError(path)

    @property
    def bitwise(self) -> bool:
        return self.same_structure and all(leaf.bitwise for leaf in self.leaves)

    # -- output ----------------------------------------------------------------------------------------
    def summary(self) -> str:
        na, nb = self.names
        n_bad = len(self.failures) + len(self.only_a) + len(self.only_b)
        n_all = len(self.leaves) + len(self.only_a) + len(self.only_b)
        head = f"{self.title}: " if self.title else ""
        if self.ok:
            n_bit = sum(leaf.bitwise for leaf in self.leaves)
            size = sum(leaf.size for leaf in self.leaves)
            return (
                f"{head}{na} and {nb} match: {_n(len(self.leaves), 'leaf', 'leaves')}, {_n(size, 'element')} "
                f"({n_bit} bitwise); tolerance: {self.tolerance}"
            )
        n_all_text = _n(n_all, "leaf", "leaves")
        return f"{head}{n_bad} of {n_all_text} differ between {na} and {nb}; tolerance: {self.tolerance}"

    def _two_paths(self) -> bool:
        return any(leaf.path_b for leaf in self.failures)

    def _rows(self) -> tuple[list[str], list[list[str]]]:
        na, nb = self.names
        two = self._two_paths()
        header = [f"path ({na})", f"path ({nb})"] if two else ["path"]
        header += ["mismatched", "max |a-b|", "at index", na, nb, "max rel", "max ulp", "note"]
        rows = []
        for p in self.only_a:
            rows.append([p, "-"] if two else [p])
            rows[-1] += ["-", "-", "-", "-", "-", "-", "-", f"only in {na}"]
        for p in self.only_b:
            rows.append(["-", p] if two else [p])
            rows[-1] += ["-", "-", "-", "-", "-", "-", "-", f"only in {nb}"]
        for leaf in self.failures:
            row = [leaf.path, leaf.path_b or leaf.path] if two else [leaf.path]
            if not leaf.same_shape:
                row += ["all", "-", "-", "-", "-", "-", "-", leaf.note()]
            else:
                row += [
                    f"{leaf.mismatched}/{leaf.size}",
                    _fmt_float(leaf.max_abs),
                    "-" if leaf.index is None else str(leaf.index),
                    leaf.text_a or "-",
                    leaf.text_b or "-",
                    _fmt_float(leaf.max_rel, ".2g"),
                    "-" if leaf.max_ulp is None else _fmt_float(leaf.max_ulp, ".0f"),
                    leaf.note(),
                ]
            rows.append(row)
        return header, rows

    def _footer(self) -> str:
        n_eq = sum(leaf.ok for leaf in self.leaves)
        n_bit = sum(leaf.ok and leaf.bitwise for leaf in self.leaves)
        extra = ""
        shown = len(self.only_a) + len(self.only_b) + len(self.failures)
        if shown > _MAX_ROWS:
            extra = f"; {shown - _MAX_ROWS} more rows in report.to_json()"
        return f"{_n(n_eq, 'leaf', 'leaves')} match ({n_bit} bitwise){extra}"

    def render(self, style: str = "auto") -> str:
        """The report as text: ``style`` is ``"plain"``, ``"rich"`` (box drawing, colour) or ``"auto"``."""
        if style == "auto":
            style = "rich" if _use_rich() else "plain"
        if self.ok:
            return self.summary()
        if style == "rich":
            from rich.console import Console

            buf = io.StringIO()
            Console(file=buf, force_terminal=True, width=max(120, _terminal_width())).print(self.__rich__())
            return buf.getvalue().rstrip("\n")
        header, rows = self._rows()
        rows = rows[:_MAX_ROWS]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
        out = [self.summary(), line(header), line(["-" * w for w in widths])]
        out += [line(r) for r in rows]
        out.append(self._footer())
        return "\n".join(out)

    def __rich__(self) -> Any:
        from rich.table import Table

        if self.ok:
            return self.summary()
        header, rows = self._rows()
        table = Table(title=self.summary(), caption=self._footer(), title_justify="left", caption_justify="left")
        for h in header:
            table.add_column(h, overflow="fold", style="red" if h == "mismatched" else None)
        for r in rows[:_MAX_ROWS]:
            table.add_row(*r)
        return table

    def __str__(self) -> str:
        return self.render("auto")

    def __repr__(self) -> str:
        if self.ok:
            return f"DiffReport(ok, {len(self.leaves)} leaves)"
        paths = self.failing_paths
        more = f", ... {len(paths) - 3} more" if len(paths) > 3 else ""
        return f"DiffReport({len(paths)} differ: {', '.join(paths[:3])}{more})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "names": list(self.names),
            "tolerance": self.tolerance,
            "only_a": list(self.only_a),
            "only_b": list(self.only_b),
            "failures": [leaf.path for leaf in self.failures],
            "leaves": [leaf.to_dict() for leaf in self.leaves],
        }

    def to_json(self, **kwargs: Any) -> str:
        """The full report (every leaf, matching ones included) as strict JSON."""
        kwargs.setdefault("indent", 2)
        return json.dumps(_jsonable(self.to_dict()), allow_nan=False, **kwargs)


def _terminal_width() -> int:
    try:
        return os.get_terminal_size().columns
    except OSError:
        return 120


def _tolerance_text(rtol: float | None, atol: float | None, max_ulp: int | None) -> str:
    if rtol is None and atol is None and max_ulp is None:
        return "per-dtype defaults"
    if not rtol and not atol and max_ulp is None:
        return "bitwise"
    parts = [f"rtol={rtol or 0:g}", f"atol={atol or 0:g}"]
    if max_ulp is not None:
        parts.append(f"max_ulp={max_ulp}")
    return ", ".join(parts)


def tree_diff(
    a: Any, b: Any, *, rtol: float | None = None, atol: float | None = None, max_ulp: int | None = None
) -> DiffReport:
    """Compare two pytrees leaf by leaf, by path; ``b`` is the reference.

    Structure first (paths only in ``a`` or only in ``b``, shape or dtype differences), then every common
    leaf: mismatching elements / total, max abs difference with its index and both values, max relative
    difference, max ulp distance (float dtypes), NaN/Inf mismatches.

    An element matches when ``|a - b| <= atol + rtol * |b|`` or, with ``max_ulp``, when it is within
    ``max_ulp`` ulps. With none of ``rtol``/``atol``/``max_ulp`` given, each leaf uses its dtype's default
    (:data:`normbridge.testing.DEFAULT_TOLERANCES`: float32 ``atol = 1e-6 * max|b|``, float64 ``1e-12``,
    float16/bfloat16 one ulp at the leaf's largest magnitude, everything else exact); given any, the others
    are 0. ``rtol=0, atol=0`` is bitwise. NaN at the same position on both sides matches, on one side never.
    """
    return diff_paths(tree_paths(a), tree_paths(b), rtol=rtol, atol=atol, max_ulp=max_ulp)


def diff_paths(
    pa: dict[str, Any],
    pb: dict[str, Any],
    *,
    rtol: float | None = None,
    atol: float | None = None,
    max_ulp: int | None = None,
) -> DiffReport:
    """:func:`tree_diff` of two already flattened trees ``{path: leaf}`` (as :func:`tree_paths` returns)."""
    common, only_a, only_b = split_paths(pa, pb)
    leaves = tuple(compare_leaf(k, pa[k], pb[k], rtol=rtol, atol=atol, max_ulp=max_ulp) for k in common)
    return DiffReport(leaves, only_a, only_b, tolerance=_tolerance_text(rtol, atol, max_ulp))


def assert_trees_close(
    a: Any, b: Any, *, rtol: float | None = None, atol: float | None = None, max_ulp: int | None = None
) -> DiffReport:
    """Raise ``AssertionError`` with the full :func:`tree_diff` report (every mismatching leaf) unless the
    trees match; returns the report when they do."""
    __tracebackhide__ = True
    report = tree_diff(a, b, rtol=rtol, atol=atol, max_ulp=max_ulp)
    if not report:
        raise AssertionError(report.render("plain"))
    return report
