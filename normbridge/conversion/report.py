"""What a conversion did: :class:`Pair` (one paired layer) and :class:`ConversionReport`."""

from __future__ import annotations

import dataclasses
import json
from typing import Any


@dataclasses.dataclass(frozen=True)
class Pair:
    """One source layer paired with one target layer.

    ``how``: ``"mapping"`` (the user's ``mapping``), ``"name"`` (equal paths after each framework's
    naming rules), ``"execution order"`` (the k-th call of this kind in both models), or
    ``"wrapped by <path>"`` (the layer a paired SpectralNorm/WeightNorm wraps). ``transform``: what
    was done to the arrays on the way (``"transpose (out, in) -> (in, out)"``, ``"debias"``, ...).
    """

    source: str
    target: str
    kind: str
    how: str
    transform: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"transform": list(self.transform)}


@dataclasses.dataclass(frozen=True)
class Verification:
    """Outcome of running source and target on the probe and comparing outputs."""

    mode: str  # "eval"
    bitwise: bool
    max_abs: float
    max_rel: float
    bound: str  # "bitwise" or "rel <= 1e-5"
    passed: bool
    worst: tuple[str, ...] = ()

    def text(self) -> str:
        measured = "bitwise equal" if self.bitwise else f"max abs {self.max_abs:.3g}, max rel {self.max_rel:.3g}"
        return f"{self.mode} outputs {measured} (bound: {self.bound}) -> {'passed' if self.passed else 'FAILED'}"


@dataclasses.dataclass(frozen=True)
class ConversionReport:
    """Every pair, the skipped stateless layers, the verification (``None`` means unverified), notes."""

    source_framework: str
    target_framework: str
    pairs: tuple[Pair, ...]
    skipped: tuple[str, ...] = ()
    verification: Verification | None = None
    notes: tuple[str, ...] = ()

    @property
    def verified(self) -> bool:
        return self.verification is not None and self.verification.passed

    def to_dict(self) -> dict[str, Any]:
        return {
            "source_framework": self.source_framework,
            "target_framework": self.target_framework,
            "pairs": [p.to_dict() for p in self.pairs],
            "skipped": list(self.skipped),
            "verification": None if self.verification is None else dataclasses.asdict(self.verification),
            "verified": self.verified,
            "notes": list(self.notes),
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), indent=kwargs.pop("indent", 2), **kwargs)

    def __str__(self) -> str:
        lines = [f"conversion {self.source_framework} -> {self.target_framework}: {len(self.pairs)} layers"]
        width = max((len(p.source) for p in self.pairs), default=0)
        for p in self.pairs:
            extra = f"  [{'; '.join(p.transform)}]" if p.transform else ""
            lines.append(f"  {p.source:<{width}} -> {p.target}  ({p.kind}, {p.how}){extra}")
        if self.skipped:
            lines.append(f"  stateless, not paired: {', '.join(self.skipped)}")
        lines.append("  verification: " + ("unverified" if self.verification is None else self.verification.text()))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)
