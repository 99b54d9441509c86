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
    assert m.no_worse(), (f"{m.case}: vs float64 fast {m.fast_err64:.2e}, exact {m.exact_err64:.2e}: "
                          f"{m.excess_ulps:+.2f} ulp > {F.NO_WORSE_ULPS}")


@pytest.mark.parametrize("facade", sorted(F.FACADE_LAYERS))
def test_fast_mode_accuracy_contract(facade):
    # Each example compiles three fwd+bwd programs (exact, fast, float64): fewer examples than the profile's,
    # the deterministic per-layer test below covers every layer.
    @settings(max_examples=min(settings().max_examples, 4))
    @given(_cases(facade))
    def check(case):
        _check(F.measure(case))

    check()


@pytest.mark.parametrize("facade", sorted(F.FACADE_LAYERS))
def test_fast_mode_no_worse_on_ill_conditioned_inputs(facade):
    """Only ill-conditioned draws (large mean, tiny variance, groups / batches of two), channels-last,
    where the fast formulations differ from native: fast within NO_WORSE_ULPS of exact's error vs float64."""

    @settings(max_examples=min(settings().max_examples, 3))
    @given(
        st.builds(
            F.FastCase,
            facade=st.just(facade),
            layer=st.sampled_from(tuple(x for x in F.FACADE_LAYERS[facade] if x not in F.WRAPPERS)),
            layout=st.just("conv"),
            conditioning=st.sampled_from(("large_mean", "tiny_var")),
            group_size=st.just(2),
            dtype=st.sampled_from(("float32", "bfloat16")),
            seed=st.integers(0, 2**16),
            batch=st.integers(2, 4),
            spatial=st.integers(2, 5),
        )
    )
    def check(case):
        m = F.measure(case)
        assert not case.well_conditioned
        assert m.no_worse(), f"{case}: fast − exact = {m.excess_ulps:+.2f} ulp vs float64 (> {F.NO_WORSE_ULPS})"

    check()


def test_no_worse_allows_rounding_not_a_less_accurate_formula():
    """The rule's slack is ulps, not a factor: an error 1 % above exact's (far more than rounding on an
    ill-conditioned result of 1e-2) fails, two ulps pass."""
    case = F.FastCase("linen", "GroupNorm", "conv", "large_mean")
    eps = 2.0**-23
    diff = F.measure(case).vs_exact
    assert F.FastMeasure(case, diff, 1e-2, 1e-2 + F.NO_WORSE_ULPS * eps).no_worse()
    assert not F.FastMeasure(case, diff, 1e-2, 1.01e-2).no_worse()
    assert not F.FastMeasure(case, diff, 1e-7, 1e-7 + 3 * eps).no_worse()


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


def test_channels_last_group_norm_is_more_accurate_than_native_on_a_large_mean():
    """The one layer whose fast program differs (flax GroupNorm channels-last): measured, its two-level
    sums are closer to float64 than flax's single strided sum, not merely within the slack."""
    m = F.measure(F.FastCase("linen", "GroupNorm", "conv", "large_mean", seed=5))
    assert m.exact_err64 > 1e-3
    assert m.fast_err64 < 0.5 * m.exact_err64


def test_column_cell_reports_the_contract():
    cell = F.column("linen", "WeightNorm")
    assert cell.startswith("pass: ")
    assert "vs float64 exact" in cell and f"(≤ {F.NO_WORSE_ULPS})" in cell
    assert F.column("equinox", "InstanceNorm") == "n/a"
