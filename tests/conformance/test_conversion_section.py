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
        conversion.Result("sngn", "linen", "equinox", True, "refused: sn: equinox's weight convention", refused=True),
        conversion.Result("sngn", "equinox", "linen", False, "2.0e+00; round trip NOT exact"),
    ]
    md = conversion.to_markdown(results)
    assert "refused: sn: equinox's weight convention" in md and "FAIL: 2.0e+00" in md
    assert "2 conversions: 0 verified, 1 refused, 1 failing." in md


def test_an_unexpected_refusal_fails_the_check(monkeypatch) -> None:
    """Only the refusals the math calls for (EXPECTED_REFUSALS) pass: an engine that starts refusing a
    working conversion must fail `normbridge check`, not show up as a quiet "refused"."""
    import normbridge
    import normbridge.conversion

    def refuse(*args, **kwargs):
        raise normbridge.ConversionError("refused (test)", problems=["a regression"])

    monkeypatch.setattr(normbridge.conversion, "convert", refuse)
    md, failures = conversion.section(("nnx", "treex"), archs=("mlp",))
    assert len(failures) == 3 and "refused (unexpected): a regression" in md
    assert ("sngn", "equinox", "linen") in conversion.EXPECTED_REFUSALS
