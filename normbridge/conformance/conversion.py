"""The conversion section of ``compat_matrix.md``: every ordered framework pair, per architecture.

For each architecture of :mod:`normbridge.conformance.conversion_models` and each ordered pair of
frameworks that has it (and native → facade within one framework), :func:`measure` converts a model
with random state into the other framework with :func:`normbridge.convert` (verified), records the
measured max eval-output difference, converts it back into a fresh model of the first framework, and
checks that every array came back bit for bit. A refusal the layers' math calls for
(:data:`EXPECTED_REFUSALS`, :data:`EXPECTED_ONE_WAY`) is recorded with its reason; any other refusal
fails the check and is recorded with its first problem.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

ARCH_TITLES = {
    "resnet": "ResNet (stem `conv_init`/`bn_init`, blocks `ResNetBlock_N`)",
    "transformer": "pre-LN transformer block (Embed, attention, LayerNorm, Dense MLP, RMSNorm)",
    "sngn": "Conv + GroupNorm + SpectralNorm(Dense) + WeightNorm(Dense)",
    "mlp": "Dense + BatchNorm + LayerNorm + RMSNorm",
}


@dataclasses.dataclass(frozen=True)
class Refusal:
    """Why a conversion is refused by the math (``reason``, shown in the matrix), and ``marker``: text the
    engine's :class:`~normbridge.errors.ConversionError` must contain for the refusal to count as this one
    (a refusal for any other reason, e.g. a pairing regression, still fails the check)."""

    reason: str
    marker: str


#: Equinox's SpectralNorm divides by ``σ = uᵀ W v`` from its stored ``(u, v)`` at inference, with no
#: iteration; flax (linen, NNX and the treex facade's SpectralNorm, which follows flax) runs a power-iteration
#: step from ``u`` on every call. They agree only where Equinox's iteration has converged; the test models'
#: random ``(u, v)`` has not, and the verification refuses (docs/conversion.md).
EQX_SPECTRAL = Refusal(
    "Equinox SpectralNorm's stored (u, v) is not converged; flax re-iterates from u",
    "stored (u, v) at inference",
)
#: flax → Equinox SpectralNorm stores flax's iterated ``(u, v)`` (same σ, verified); converting back
#: re-iterates from there, so the way back is refused for the same reason.
FLAX_SPECTRAL_BACK = Refusal(
    "flax SpectralNorm -> Equinox stores flax's iterated (u, v); flax re-iterates from it on the way back",
    "stored (u, v) at inference",
)

#: The refusals the layers' math calls for, ``(architecture, source, target framework) -> Refusal``. Every
#: other refusal is a failure of the check, so a regression that makes the engine refuse a working
#: conversion cannot pass as "refused".
EXPECTED_REFUSALS: dict[tuple[str, str, str], Refusal] = {
    ("sngn", "equinox", fw): EQX_SPECTRAL for fw in ("linen", "nnx", "treex")
}
#: Conversions whose way back is refused for the same reason (flax-family → Equinox SpectralNorm is one way).
EXPECTED_ONE_WAY: dict[tuple[str, str, str], Refusal] = {
    ("sngn", fw, "equinox"): FLAX_SPECTRAL_BACK for fw in ("linen", "nnx", "treex")
}


def _expected(table: dict[tuple[str, str, str], Refusal], key: tuple[str, str, str], err: Exception) -> Refusal | None:
    """The expected refusal of ``key`` when ``err`` is that refusal (its marker is in the error), else ``None``."""
    refusal = table.get(key)
    return refusal if refusal is not None and refusal.marker in str(err) else None


@dataclasses.dataclass(frozen=True)
class Result:
    arch: str
    source: str  # framework, or "<fw> native"
    target: str  # framework, or "<fw> facade"
    ok: bool
    text: str
    refused: bool = False


def _one(arch: str, a: str, b: str, flavor_b: str) -> Result:
    import normbridge
    from normbridge.conformance import conversion_models as M
    from normbridge.conformance.measure import tree_diff

    name_b = f"{b} facade" if flavor_b == "facade" else b
    src = M.build(arch, a, "native", 0)
    try:
        tgt, report = normbridge.convert(src, M.build(arch, b, flavor_b, 5), probe=(M.probe(arch, a), M.probe(arch, b)))
    except normbridge.ConversionError as err:
        expected = _expected(EXPECTED_REFUSALS, (arch, a, b), err)
        if expected is not None:
            return Result(arch, a, name_b, True, f"refused (expected: {expected.reason})", refused=True)
        first = err.problems[0] if err.problems else str(err)
        return Result(arch, a, name_b, False, f"refused (unexpected): {first[:120]}", refused=True)
    v = report.verification
    measured = "bitwise" if v.bitwise else f"{v.max_abs:.1e}"
    try:
        back, _ = normbridge.convert(tgt, M.build(arch, a, "native", 9), probe=(M.probe(arch, b), M.probe(arch, a)))
    except normbridge.ConversionError as err:
        expected = _expected(EXPECTED_ONE_WAY, (arch, a, b), err)
        if expected is not None:
            return Result(arch, a, name_b, v.passed, f"{measured}; one way (way back refused as expected)")
        first = err.problems[0] if err.problems else str(err)
        return Result(arch, a, name_b, False, f"{measured}; way back refused (unexpected): {first[:100]}")
    exact = tree_diff(M.arrays(a, src), M.arrays(a, back)).exact()
    return Result(arch, a, name_b, v.passed and exact, f"{measured}; round trip {'exact' if exact else 'NOT exact'}")


def measure(
    frameworks: Iterable[str] = ("linen", "nnx", "equinox", "treex"), archs: Iterable[str] | None = None
) -> list[Result]:
    """Every (architecture, source, target) conversion among ``frameworks`` that the architecture exists in."""
    from normbridge.conformance import conversion_models as M

    wanted = tuple(frameworks)
    out = []
    for arch, fws in M.ARCHS.items():
        if archs is not None and arch not in archs:
            continue
        fws = [f for f in fws if f in wanted]
        for a in fws:
            for b in fws:
                flavors = ["facade"] if a == b and b != "treex" else [] if a == b else ["native"]
                for flavor in flavors:
                    try:
                        out.append(_one(arch, a, b, flavor))
                    except Exception as err:  # a crash is a failing cell, not a crash of the report
                        out.append(Result(arch, a, b, False, f"error: {type(err).__name__}: {err}"[:120]))
    return out


def to_markdown(results: list[Result]) -> str:
    """The ``## Whole-model conversion`` section: one from × to table per architecture."""
    lines = [
        "## Whole-model conversion",
        "",
        "`normbridge.convert(source, like, probe=...)` on the architectures of",
        "`normbridge/conformance/conversion_models.py` with random weights and statistics. Cell: the measured max",
        "absolute eval-output difference between source and converted model (`bitwise` = identical bits; the",
        "engine requires bitwise among linen/NNX/treex except attention, else <= 1e-5 relative), then whether",
        "converting back into a fresh source-framework model restores every array bit for bit. Rows: from",
        "(native layers; treex: its facade, treex itself no longer installs); columns: to (native layers, or",
        "the same framework's facade). `refused (expected: ...)`: the layers' math differs and the engine",
        "refuses with every problem listed, never converts wrongly (`EXPECTED_REFUSALS` in",
        "`normbridge/conformance/conversion.py`); `FAIL:` marks every other refusal or difference.",
    ]
    for arch in dict.fromkeys(r.arch for r in results):
        rows = [r for r in results if r.arch == arch]
        sources = list(dict.fromkeys(r.source for r in rows))
        targets = sorted(dict.fromkeys(r.target for r in rows), key=lambda t: (t.split()[0], t))
        cell = {(r.source, r.target): r for r in rows}
        lines += ["", f"### {ARCH_TITLES.get(arch, arch)}", "", "| from \\ to | " + " | ".join(targets) + " |"]
        lines.append("|---|" + "---|" * len(targets))
        for s in sources:
            cells = []
            for t in targets:
                r = cell.get((s, t))
                cells.append("—" if r is None else (r.text if r.ok else f"FAIL: {r.text}").replace("|", "\\|"))
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
    n = len(results)
    failed = sum(not r.ok for r in results)
    refused = sum(r.ok and r.refused for r in results)  # expected refusals; an unexpected one is failing
    summary = f"{n} conversions: {n - failed - refused} verified, {refused} refused as expected, {failed} failing."
    lines += ["", summary]
    return "\n".join(lines) + "\n"


def section(frameworks: Iterable[str], archs: Iterable[str] | None = None) -> tuple[str, list[str]]:
    """``(markdown, failures)`` for ``normbridge check``."""
    results = measure(frameworks, archs)
    failures = [f"conversion/{r.arch}/{r.source}->{r.target}" for r in results if not r.ok]
    return to_markdown(results), failures


__all__ = ["EXPECTED_ONE_WAY", "EXPECTED_REFUSALS", "Refusal", "Result", "measure", "section", "to_markdown"]
