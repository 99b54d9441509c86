"""The conversion section of compat_matrix.md (normbridge.conformance.conversion): measured cells and rendering."""

from __future__ import annotations

from normbridge.conformance import conversion


def test_section_measures_every_pair_among_the_requested_frameworks() -> None:
    md, failures = conversion.section(("nnx", "treex"), archs=("mlp",))
    assert failures == []
    # mlp is the one architecture treex has: nnx <-> treex and nnx native -> facade
    assert "| nnx | — | bitwise; round trip exact | bitwise; round trip exact |" in md, md
    assert "| treex | bitwise; round trip exact | — | — |" in md, md
    assert "### Dense + BatchNorm + LayerNorm + RMSNorm" in md and "3 conversions: 3 verified" in md


def test_refusals_and_failures_are_rendered() -> None:
    results = [
        conversion.Result("sngn", "equinox", "linen", True, "refused (expected: the math differs)", refused=True),
        conversion.Result("sngn", "equinox", "nnx", False, "refused (unexpected): a regression", refused=True),
        conversion.Result("sngn", "linen", "nnx", False, "2.0e+00; round trip NOT exact"),
        conversion.Result("sngn", "nnx", "linen", True, "bitwise; round trip exact"),
    ]
    md = conversion.to_markdown(results)
    assert "| refused (expected: the math differs) |" in md and "FAIL: refused (unexpected): a regression" in md
    assert "FAIL: 2.0e+00" in md and "FAIL: refused (expected" not in md
    # an unexpected refusal counts as failing, once
    assert "4 conversions: 1 verified, 1 refused as expected, 2 failing." in md


def test_expected_equinox_spectral_norm_refusals_read_as_expected() -> None:
    """The measured cells of the refusals the math calls for (Equinox SpectralNorm -> flax family, treex
    included; flax family -> Equinox one way) say so with the reason, and are not failures."""
    refused, one_way = (
        conversion._one("sngn", "equinox", "treex", "native"),
        conversion._one("sngn", "treex", "equinox", "native"),
    )
    assert refused.ok and refused.refused and refused.text == f"refused (expected: {conversion.EQX_SPECTRAL.reason})"
    assert one_way.ok and not one_way.refused and one_way.text.endswith("; one way (way back refused as expected)")
    md = conversion.to_markdown([refused, one_way])
    row = next(line for line in md.splitlines() if line.startswith("| equinox |"))
    cells = "\n".join(line for line in md.splitlines() if line.startswith("| "))
    # the engine's "-> FAILED" verification text is not shown for an expected refusal
    assert "| refused (expected: " in row and "FAIL" not in cells, cells
    assert "2 conversions: 1 verified, 1 refused as expected, 0 failing." in md


def test_an_expected_cell_refused_for_another_reason_fails(monkeypatch) -> None:
    import normbridge
    import normbridge.conversion

    def refuse(*args, **kwargs):
        raise normbridge.ConversionError("refused (test)", problems=["sn: unpaired"])

    monkeypatch.setattr(normbridge.conversion, "convert", refuse)
    results = conversion.measure(("equinox", "treex"), archs=("sngn",))
    cell = next(r for r in results if (r.source, r.target) == ("equinox", "treex"))
    assert not cell.ok and cell.text == "refused (unexpected): sn: unpaired"


def test_an_unexpected_refusal_fails_the_check(monkeypatch) -> None:
    """Only the refusals the math calls for (EXPECTED_REFUSALS) pass: an engine that starts refusing a
    working conversion must fail `normbridge check`, not show up as a quiet "refused"."""
    import normbridge
    import normbridge.conversion

    def refuse(*args, **kwargs):
        raise normbridge.ConversionError("refused (test)", problems=["a regression"])

    monkeypatch.setattr(normbridge.conversion, "convert", refuse)
    md, failures = conversion.section(("nnx", "treex"), archs=("mlp",))
    assert len(failures) == 3 and "FAIL: refused (unexpected): a regression" in md
    assert "3 conversions: 0 verified, 0 refused as expected, 3 failing." in md
    assert ("sngn", "equinox", "linen") in conversion.EXPECTED_REFUSALS


def test_a_refused_way_back_outside_expected_one_way_fails(monkeypatch) -> None:
    import normbridge
    import normbridge.conversion

    real = normbridge.conversion.convert
    calls = []

    def back_refused(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise normbridge.ConversionError("refused (test)", problems=["stored (u, v) at inference"])
        return real(*args, **kwargs)

    monkeypatch.setattr(normbridge.conversion, "convert", back_refused)
    cell = conversion._one("mlp", "nnx", "treex", "native")
    assert len(calls) == 2 and not cell.ok and "way back refused (unexpected): stored (u, v)" in cell.text, cell
