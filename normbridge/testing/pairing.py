"""Which leaf of model ``b`` is which leaf of model ``a``: the pairing interface of ``assert_equivalent``.

:func:`pair_leaves` returns one :class:`LeafPair` per parameter or statistic: ``a``'s path, ``b``'s path,
and ``to_a``, the layout change that puts ``b``'s array (value or gradient) in ``a``'s layout.

Implemented here: models of one framework (native or facade layers, whose layouts are the same by
construction), paired by path, with ``mapping`` renaming paths or path prefixes. Models of two
frameworks are paired by the conversion engine's rules (``normbridge.conversion``: mapping, names,
execution order); until it provides a pairing this raises ``NotImplementedError`` rather than guess.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class LeafPair:
    path_a: str
    path_b: str
    to_a: Callable[[Any], Any] | None = None  # b's array in a's layout; None: same layout


def _rename(path: str, mapping: Mapping[str, str]) -> str:
    """``path`` with its longest mapped prefix (whole path components) replaced."""
    best = None
    for src in mapping:
        if (path == src or path.startswith(src + "/")) and (best is None or len(src) > len(best)):
            best = src
    return path if best is None else mapping[best] + path[len(best) :]


def pair_leaves(
    fa: Any,
    fb: Any,
    named_a: dict[str, Any],
    named_b: dict[str, Any],
    *,
    mapping: Mapping[str, str] | None = None,
    models: tuple[Any, Any] | None = None,
) -> tuple[list[LeafPair], list[str]]:
    """Pair every leaf of ``named_a`` with a leaf of ``named_b``; unpaired leaves are left out (the caller
    reports them as present on one side only). Returns ``(pairs, notes)``."""
    mapping = dict(mapping or {})
    if fa.framework != fb.framework:
        raise NotImplementedError(
            f"assert_equivalent: pairing a {fa.framework} model with a {fb.framework} model needs the "
            "conversion engine's pairing (normbridge.conversion, issue 13), which this build does not have; "
            "models of one framework (native or facade) are supported"
        )
    pairs = []
    for pa in named_a:
        pb = _rename(pa, mapping)
        if pb in named_b:
            pairs.append(LeafPair(pa, pb))
    notes = [f"paired by path ({fa.framework} and {fb.framework})" + (f", mapping {mapping}" if mapping else "")]
    return pairs, notes
