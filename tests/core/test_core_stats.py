"""normbridge.core statistics, normalization and running averages vs independent float64 numpy formulas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from normbridge import core

SHAPES = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=3)


@st.composite
def data(draw, *, with_mask: bool = False):
    shape = draw(SHAPES)
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    offset = draw(st.sampled_from([0.0, 0.5, 3.0]))
    x = (rng.normal(size=shape) * 2 + offset).astype(np.float32)
    axes = tuple(sorted(draw(st.lists(st.sampled_from(range(len(shape))), min_size=1, unique=True))))
    mask = None
    if with_mask:
        mask = rng.random(shape) < 0.7
        mask.flat[0] = True
        # at least one selected position in every reduced slice
        first = tuple(0 if i in axes else slice(None) for i in range(len(shape)))
        mask[first] = True
    return x, axes, mask


def tol(x64: np.ndarray) -> float:
    """Absolute tolerance for float32 statistics of ``x``: a few ulps of E[x²] (the fast variance cancels)."""
    return 1e-5 * (float(np.mean(x64**2)) + 1.0)


@given(data(with_mask=True), st.booleans(), st.booleans())
def test_moments_match_float64(d, fast: bool, masked: bool) -> None:
    x, axes, mask = d
    mask = mask if masked else None
    x64 = x.astype(np.float64)
    where = mask if mask is not None else True
    ref_mean = np.mean(x64, axis=axes, where=where)
    ref_var = np.mean((x64 - np.expand_dims(ref_mean, axes)) ** 2, axis=axes, where=where)
    mean, var = core.moments(jnp.asarray(x), axes, use_fast_variance=fast, mask=mask)
    assert mean.dtype == jnp.float32 and var.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(mean), ref_mean, atol=tol(x64), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(var), ref_var, atol=tol(x64), rtol=1e-5)
    assert np.all(np.asarray(var) >= 0)


FORMS = {
    "fast": {},
    "two-pass": {"use_fast_variance": False},
    "rms": {"use_mean": False},
    "equinox BatchNorm": {"use_fast_variance": False, "conj_product": True, "clip_two_pass": True},
    "equinox LayerNorm/GroupNorm": {"use_fast_variance": False, "jnp_var": True, "clip_two_pass": True},
}


@given(data(), st.sampled_from(sorted(FORMS)))
def test_every_form_matches_float64_and_keepdims_keeps_the_reduced_axes(d, form: str) -> None:
    x, axes, _ = d
    x64 = x.astype(np.float64)
    kw = FORMS[form]
    mean, var = core.moments(jnp.asarray(x), axes, **kw)
    ref_mean = np.zeros_like(np.mean(x64, axis=axes)) if form == "rms" else np.mean(x64, axis=axes)
    ref_var = np.mean((x64 - np.expand_dims(ref_mean, axes)) ** 2, axis=axes)
    np.testing.assert_allclose(np.asarray(mean), ref_mean, atol=tol(x64), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(var), ref_var, atol=tol(x64), rtol=1e-5)
    kept_mean, kept_var = core.moments(jnp.asarray(x), axes, keepdims=True, **kw)
    assert kept_mean.shape == kept_var.shape == tuple(1 if i in axes else n for i, n in enumerate(x.shape))
    np.testing.assert_array_equal(np.asarray(kept_mean), np.expand_dims(np.asarray(mean), axes))
    np.testing.assert_array_equal(np.asarray(kept_var), np.expand_dims(np.asarray(var), axes))


def test_jnp_var_form_refuses_what_it_cannot_compute() -> None:
    x = jnp.ones((2, 3))
    two_pass = {"use_fast_variance": False}
    for kw in ({"mask": jnp.ones((2, 3), bool), **two_pass}, {"axis_name": "batch", **two_pass},
               {"use_fast_variance": True}, {"use_mean": False, **two_pass}, {"conj_product": True, **two_pass}):
        with pytest.raises(ValueError, match="jnp_var"):
            core.moments(x, 0, jnp_var=True, **kw)


@given(data())
def test_rms_moments_are_mean_square(d) -> None:
    x, axes, _ = d
    x64 = x.astype(np.float64)
    mean, var = core.moments(jnp.asarray(x), axes, use_mean=False)
    np.testing.assert_array_equal(np.asarray(mean), 0)
    np.testing.assert_allclose(np.asarray(var), np.mean(x64**2, axis=axes), rtol=1e-5, atol=1e-6)


@given(data(), st.sampled_from([jnp.bfloat16, jnp.float16]))
def test_moments_precision(d, half) -> None:
    x, axes, _ = d
    xh = jnp.asarray(x, half)
    assert core.moments(xh, axes)[1].dtype == jnp.float32
    assert core.moments(xh, axes, force_float32=False)[1].dtype == half
    assert core.moments(xh, axes, dtype=jnp.float16, force_float32=False)[1].dtype == jnp.float16


@given(data(), st.booleans())
def test_axis_name_mean_is_global(d, fast: bool) -> None:
    """Per-lane statistics synced over a named (vmapped) axis equal those of the whole stacked batch."""
    x, axes, _ = d
    lanes = np.stack([x, x * 0.5 + 1.0, -x])
    x64 = lanes.astype(np.float64)
    lane_axes = tuple(a + 1 for a in axes)
    all_axes = (0, *lane_axes)
    mean, var = jax.vmap(lambda xi: core.moments(xi, axes, axis_name="b", use_fast_variance=fast), axis_name="b")(
        jnp.asarray(lanes)
    )
    ref_mean = np.mean(x64, axis=all_axes)
    ref_var = np.var(x64, axis=all_axes)
    for lane in range(3):
        np.testing.assert_allclose(np.asarray(mean[lane]), ref_mean, atol=tol(x64), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(var[lane]), ref_var, atol=tol(x64), rtol=1e-5)


@given(data(), st.booleans(), st.booleans(), st.sampled_from([1e-6, 1e-3]))
def test_normalize_orders_agree_with_float64(d, with_scale: bool, with_mean: bool, eps: float) -> None:
    x, axes, _ = d
    x64 = x.astype(np.float64)
    rng = np.random.default_rng(1)
    shape = tuple(1 if i in axes else s for i, s in enumerate(x.shape))
    mean64 = np.mean(x64, axis=axes, keepdims=True) if with_mean else None
    var64 = np.var(x64, axis=axes, keepdims=True)
    scale64 = rng.normal(size=shape) if with_scale else None
    bias64 = rng.normal(size=shape)
    ref = (x64 - (0 if mean64 is None else mean64)) / np.sqrt(var64 + eps)
    ref = ref * (1 if scale64 is None else scale64) + bias64

    def f32(a):
        return None if a is None else jnp.asarray(a, jnp.float32)

    outs = {}
    for order in ("flax", "rsqrt_then_affine", "divide_sqrt"):
        out = core.normalize(f32(x), f32(mean64), f32(var64), eps, f32(scale64), f32(bias64), order=order)
        outs[order] = np.asarray(out, np.float64)
        # relative to the size of the normalized values, which can reach 1/sqrt(eps) for constant slices
        bound = 1e-5 * (np.max(np.abs(ref)) + 1)
        np.testing.assert_allclose(outs[order], ref, atol=bound, rtol=1e-5)
    np.testing.assert_allclose(outs["flax"], outs["divide_sqrt"], atol=1e-5 * (np.max(np.abs(ref)) + 1))


def test_normalize_rejects_unknown_order() -> None:
    import pytest

    with pytest.raises(ValueError, match="unknown order"):
        core.normalize(jnp.ones(2), None, jnp.ones(2), 1e-5, order="torch")  # type: ignore[arg-type]


@given(
    st.lists(st.floats(-10, 10, width=32), min_size=1, max_size=4),
    st.lists(st.floats(-10, 10, width=32), min_size=1, max_size=4),
    st.sampled_from([0.0, 0.5, 0.9, 0.99]),
    st.integers(0, 50),
    st.booleans(),
)
def test_running_averages(old, new, m: float, count: int, first: bool) -> None:
    n = min(len(old), len(new))
    old64, new64 = np.asarray(old[:n], np.float64), np.asarray(new[:n], np.float64)
    o, b = jnp.asarray(old64, jnp.float32), jnp.asarray(new64, jnp.float32)
    np.testing.assert_allclose(np.asarray(core.ema(o, b, m)), m * old64 + (1 - m) * new64, atol=1e-5)
    blended = np.asarray(core.ema_blend(o, b, m, jnp.asarray(first)))
    np.testing.assert_allclose(blended, new64 if first else m * old64 + (1 - m) * new64, atol=1e-5)
    debiased = np.asarray(core.debias(o, m, jnp.asarray(count)))
    denom = 1.0 if count == 0 else 1 - m**count
    if denom > 1e-3:
        np.testing.assert_allclose(debiased, old64 / denom, rtol=1e-5, atol=1e-6)


def test_debias_matches_a_zero_started_ema() -> None:
    """After n updates of a zero-started EMA with a constant batch, de-biasing recovers that batch value."""
    m, value = 0.9, np.float32(2.5)
    hidden = jnp.zeros(())
    for n in range(1, 8):
        hidden = core.ema(hidden, value, m)
        np.testing.assert_allclose(float(core.debias(hidden, m, jnp.asarray(n))), value, rtol=1e-5)
