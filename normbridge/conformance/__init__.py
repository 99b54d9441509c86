"""Measured conformance of each facade against the installed native library.

Each facade has a module ``normbridge.conformance.<facade>`` with a function
``rows() -> list[Row]``: one :class:`Row` per layer, every :class:`Cell` the result
of running the facade and the native layer on the same inputs and parameters.
The pytest suite in ``tests/conformance`` drives the same measuring functions
with hypothesis; ``normbridge check`` runs a fixed grid of them and writes
``compat_matrix.md``.
"""

from __future__ import annotations

import dataclasses
import importlib
import traceback
from collections.abc import Callable, Iterable

FACADES: tuple[str, ...] = ("linen", "nnx", "equinox", "treex")

#: Columns of ``compat_matrix.md``, in order.
COLUMNS: tuple[str, ...] = (
    "signature",
    "state layout",
    "train/eval semantics",
    "outputs",
    "gradients",
    "checkpoint round trip",
)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One measured result: ``ok`` and the measurement, e.g. ``"bitwise (12 cases)"``."""

    ok: bool
    text: str
    #: A deliberate, documented deviation from native (e.g. an upstream bug not reproduced).
    deviation: bool = False

    @property
    def status(self) -> str:
        if self.deviation:
            return "deviation"
        return "pass" if self.ok else "FAIL"


@dataclasses.dataclass(frozen=True)
class Row:
    facade: str
    layer: str
    cells: dict[str, Cell]
    #: Evidence: what the row was measured against (native library + version, or fixtures).
    evidence: str = ""
    notes: str = ""

    @property
    def ok(self) -> bool:
        return all(c.ok or c.deviation for c in self.cells.values())


def measured(fn: Callable[[], Cell]) -> Cell:
    """Run one measurement; an exception becomes a failing cell that says what broke."""
    try:
        return fn()
    except Exception as err:  # a crash is a measured failure, not a crash of the report
        last = traceback.extract_tb(err.__traceback__)[-1]
        return Cell(False, f"error: {type(err).__name__}: {err} ({last.filename.split('/')[-1]}:{last.lineno})"[:300])


def sections(facades: Iterable[str] = FACADES) -> list[tuple[str, list[str]]]:
    """Extra ``compat_matrix.md`` sections, ``(markdown, failures)`` each: the whole-model conversion matrix."""
    from normbridge.conformance import conversion

    return [conversion.section(facades)]


#: The matrix's columns: the per-facade measurements, then fast mode's accuracy contract.
MATRIX_COLUMNS: tuple[str, ...] = (*COLUMNS, "fast mode")


def collect(facades: Iterable[str] = FACADES, *, fast_mode: bool = True) -> list[Row]:
    """Rows of every requested facade whose conformance module exists, each with its ``fast mode``
    cell (:func:`normbridge.conformance.fast.cell`) unless ``fast_mode=False``."""
    rows: list[Row] = []
    for facade in facades:
        try:
            mod = importlib.import_module(f"normbridge.conformance.{facade}")
        except ModuleNotFoundError as err:
            if err.name == f"normbridge.conformance.{facade}":
                continue  # facade not built yet
            raise
        rows.extend(mod.rows())
    if fast_mode:
        from normbridge.conformance import fast

        rows = [_with_cell(r, "fast mode", fast.cell(r.facade, r.layer)) for r in rows]
    return rows


def _with_cell(row: Row, column: str, cell: Cell | None) -> Row:
    return row if cell is None else dataclasses.replace(row, cells={**row.cells, column: cell})
