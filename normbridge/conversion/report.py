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
        what = "eval outputs" if self.mode == "eval" else self.mode
        worst = f"; worst: {', '.join(self.worst)}" if self.worst and not self.bitwise else ""
        return f"{what} {measured} (bound: {self.bound}){worst} -> {'passed' if self.passed else 'FAILED'}"


@dataclasses.dataclass(frozen=True)
class ConversionReport:
    """Every pair, the skipped stateless layers and RNG state, the verification (``None`` means unverified), notes.

    ``skipped``: called layers without arrays (Dropout, activations), ``"source <path>"`` / ``"like <path>"``.
    ``skipped_state``: RNG-state leaves (a treex Dropout's ``next_key/key``, an NNX Dropout's ``rngs``):
    not converted; the target keeps ``like``'s own.
    """

    source_framework: str
    target_framework: str
    pairs: tuple[Pair, ...]
    skipped: tuple[str, ...] = ()
    verification: Verification | None = None
    notes: tuple[str, ...] = ()
    #: ``verify="train"``: one train-mode pass, outputs and updated statistics compared.
    train: Verification | None = None
    skipped_state: tuple[str, ...] = ()
    #: ``verify="train"``: gradients of ``sum(train output * fixed cotangent)`` w.r.t. every paired parameter.
    gradients: Verification | None = None

    @property
    def verified(self) -> bool:
        ok = self.verification is not None and self.verification.passed
        return ok and all(v is None or v.passed for v in (self.train, self.gradients))

    def to_dict(self) -> dict[str, Any]:
        return {
            "source_framework": self.source_framework,
            "target_framework": self.target_framework,
            "pairs": [p.to_dict() for p in self.pairs],
            "skipped": list(self.skipped),
            "skipped_state": list(self.skipped_state),
            "verification": None if self.verification is None else dataclasses.asdict(self.verification),
            "train": None if self.train is None else dataclasses.asdict(self.train),
            "gradients": None if self.gradients is None else dataclasses.asdict(self.gradients),
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
        if self.skipped_state:
            lines.append(f"  RNG state, not converted (like's own kept): {', '.join(self.skipped_state)}")
        lines.append("  verification: " + ("unverified" if self.verification is None else self.verification.text()))
        for extra in (self.train, self.gradients):
            if extra is not None:
                lines.append("  verification: " + extra.text())
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)
