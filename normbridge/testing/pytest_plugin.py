"""pytest plugin: a failing ``assert report`` prints the whole :class:`~normbridge.testing.DiffReport` table.

Registered through the ``pytest11`` entry point (``normbridge``), so it is active wherever normbridge is
installed; ``pytest -p no:normbridge`` turns it off. What it does:

- ``assert report`` / ``assert tree_diff(a, b)``: pytest shows ``assert DiffReport(3 differ: ...)``; the
  plugin adds the full table under it (every mismatching leaf, worst first).
- ``pytest_assertrepr_compare``: a comparison with a ``DiffReport`` on either side
  (``assert report == expected``) is explained by the report's table.

Equivalence of two models in a parametrized test::

    import pytest
    from normbridge.testing import assert_equivalent

    @pytest.mark.parametrize("train_steps", [0, 3])
    def test_port_matches(train_steps):
        assert_equivalent((linen_module, variables), nnx_model, batches, train_steps=train_steps)
"""

from __future__ import annotations

import os
from collections.abc import Generator
from types import TracebackType
from typing import Any

import pytest

from normbridge.testing.report import DiffReport

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_MARK = "normbridge DiffReport:"


def pytest_assertrepr_compare(config: pytest.Config, op: str, left: Any, right: Any) -> list[str] | None:
    reports = [(side, x) for side, x in (("left", left), ("right", right)) if isinstance(x, DiffReport)]
    if not reports:
        return None
    lines = [f"{left!r} {op} {right!r}"]
    for side, report in reports:
        lines.append(f"{side}: {report.render('plain').splitlines()[0]}" if len(reports) > 1 else "")
        lines += report.render("plain").splitlines()[1 if len(reports) > 1 else 0 :]
    return [line for line in lines if line != ""] or None


def _innermost_frame(tb: TracebackType | None) -> Any:
    frame = None
    while tb is not None:
        frame, tb = tb.tb_frame, tb.tb_next
    return frame


def _failing_reports(err: AssertionError) -> list[DiffReport]:
    """Falsy reports in the frame whose ``assert`` failed, when the failure message shows them."""
    frame = _innermost_frame(err.__traceback__)
    if frame is None or os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == _PACKAGE_DIR:
        return []  # raised by normbridge.testing itself: its message already is the table
    message = str(err)
    if _MARK in message:
        return []
    found: dict[int, DiffReport] = {}
    for value in frame.f_locals.values():
        shown = isinstance(value, DiffReport) and not value and repr(value)[:30] in message
        if shown and value.summary() not in message:  # not already explained by pytest_assertrepr_compare
            found.setdefault(id(value), value)
    return list(found.values())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, Any]:
    try:
        return (yield)
    except AssertionError as err:
        reports = _failing_reports(err)
        if reports:
            tables = "\n".join(f"{_MARK}\n{r.render('plain')}" for r in reports)
            text = str(err.args[0]) if err.args else ""
            err.args = (f"{text}\n{tables}", *err.args[1:])
        raise
