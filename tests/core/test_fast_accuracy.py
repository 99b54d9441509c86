"""The accuracy contract of fast mode, per layer of every facade, on hypothesis-drawn inputs.

Measured by :func:`normbridge.conformance.fast.measure` (the conformance suite's comparison
helpers): outputs, gradients w.r.t. parameters and input, and updated state, fast vs exact, and
both vs a float64 run of the same layer.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from normbridge.conformance import fast as F


def _cases(facade: str) -> st.SearchStrategy[F.FastCase]:
    return st.builds(
        F.FastCase,
        facade=st.just(facade),
        layer=st.sampled_from(F.FACADE_LAYERS[facade]),
        layout=st.sampled_from(("rows", "conv")),
        conditioning=st.sampled_from(tuple(F.CONDITIONING)),
        group_size=st.sampled_from((2, 4)),
        dtype=st.sampled_from(("float32", "bfloat16")),
        seed=st.integers(0, 2**16),
        batch=st.integers(2, 5),
        spatial=st.integers(2, 6),
    )


def _check(m: F.FastMeasure) -> None:
    if m.case.well_conditioned:
        assert m.within(), f"{m.case}: fast vs exact {m.vs_exact.text()}"
    assert m.no_worse(), f"{m.case}: vs float64 fast {m.fast_err64:.2e} > exact {m.exact_err64:.2e}"


@pytest.mark.parametrize("facade", sorted(F.FACADE_LAYERS))
def test_fast_mode_accuracy_contract(facade):
    # Each example compiles three fwd+bwd programs (exact, fast, float64): fewer examples than the profile's,
    # the deterministic per-layer test below covers every layer.
    @settings(max_examples=min(settings().max_examples, 4))
    @given(_cases(facade))
    def check(case):
        _check(F.measure(case))

    check()


@pytest.mark.parametrize(
    ("facade", "layer"), [(f, layer) for f, layers in sorted(F.FACADE_LAYERS.items()) for layer in layers]
)
def test_every_layer_well_conditioned(facade, layer):
    """One deterministic well-conditioned channels-last (rows for wrappers) case per layer, so every
    layer of every facade is measured whatever hypothesis draws."""
    m = F.measure(F.FastCase(facade, layer, "conv", "well", seed=7))
    _check(m)


def test_fast_changes_the_channels_last_group_norm_program():
    """A guard that the tests above compare two different programs, not exact mode with itself."""
    m = F.measure(F.FastCase("linen", "GroupNorm", "conv", "well"))
    assert not m.vs_exact.exact()
    assert m.deviation > 0


def test_groups_of_two_are_ill_conditioned_and_no_worse():
    m = F.measure(F.FastCase("equinox", "GroupNorm", "rows", "large_mean", group_size=2, seed=3))
    assert not m.case.well_conditioned
    assert m.exact_err64 > 1e-5  # exact mode (native) itself is far from float64 here
    assert m.no_worse()


def test_column_cell_reports_the_contract():
    cell = F.column("linen", "WeightNorm")
    assert cell.startswith("pass: ")
    assert "vs float64 exact" in cell
    assert F.column("equinox", "InstanceNorm") == "n/a"
