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
