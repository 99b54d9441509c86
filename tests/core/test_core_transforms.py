"""normbridge.core groups, axes, dtypes, power iteration and weight norm vs independent numpy references."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from normbridge import core


@given(st.integers(1, 4), st.integers(1, 3), st.lists(st.integers(1, 3), max_size=2), st.booleans())
def test_groups_split_merge_roundtrip_and_contiguity(groups: int, size: int, rest: list[int], first: bool) -> None:
    c = groups * size
    shape = (c, *rest) if first else (*rest, c)
    x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
    split = core.split_groups(x, groups, channels_first=first)
    assert split.shape == ((groups, size, *rest) if first else (*rest, groups, size))
    np.testing.assert_array_equal(np.asarray(core.merge_groups(split, channels_first=first)), np.asarray(x))
    xn = np.asarray(x)
    for g in range(groups):
        block = xn[g * size : (g + 1) * size] if first else xn[..., g * size : (g + 1) * size]
        got = np.asarray(split[g] if first else split[..., g, :])
        np.testing.assert_array_equal(got, block)  # group g is the contiguous block [g·C/G, (g+1)·C/G)


@given(st.integers(1, 12), st.one_of(st.none(), st.integers(-1, 13)), st.one_of(st.none(), st.integers(1, 13)))
def test_resolve_groups(channels: int, num_groups, group_size) -> None:
    valid = (num_groups is None) != (group_size is None)
    if valid and group_size is not None:
        valid = channels % group_size == 0
    if valid and num_groups is not None:
        valid = num_groups > 0 and channels % num_groups == 0
    if not valid:
        with pytest.raises(ValueError):
            core.resolve_groups(channels, num_groups, group_size)
        return
    g, s = core.resolve_groups(channels, num_groups, group_size)
    assert g * s == channels and (num_groups in (None, g)) and (group_size in (None, s))


@given(st.integers(1, 4), st.data())
def test_axes_helpers(ndim: int, data) -> None:
    axes = data.draw(st.lists(st.integers(-ndim, ndim - 1), min_size=1, max_size=ndim))
    canon = core.canonicalize_axes(ndim, axes)
    assert sorted(canon) == sorted({a % ndim for a in axes})
    assert core.complement_axes(ndim, axes) == tuple(i for i in range(ndim) if i not in canon)
    shape = tuple(range(2, 2 + ndim))
    param, bshape = core.feature_shapes(shape, axes)
    assert param == tuple(shape[a] for a in canon)
    assert bshape == tuple(s if i in canon else 1 for i, s in enumerate(shape))
    assert core.canonicalize_axes(ndim, -1) == (ndim - 1,)


def test_dtype_rules() -> None:
    bf = jnp.ones(2, jnp.bfloat16)
    f32 = jnp.ones(2, jnp.float32)
    assert core.result_dtype(bf, None) == jnp.bfloat16
    assert core.result_dtype(bf, f32) == jnp.float32
    assert core.result_dtype(bf, f32, dtype=jnp.float16) == jnp.float16
    assert core.result_dtype(jnp.ones(2, jnp.int32)) == jnp.float32
    with pytest.raises(ValueError, match="inexact"):
        core.result_dtype(bf, dtype=jnp.int32)
    assert core.stats_dtype(jnp.bfloat16) == jnp.float32
    assert core.stats_dtype(jnp.bfloat16, force_float32=False) == jnp.bfloat16
    assert core.stats_dtype(jnp.float32, jnp.float16, force_float32=False) == jnp.float16
    assert core.upcast_dtype(jnp.float16) == jnp.float32


def matrix_with_gap(seed: int, out: int, inp: int) -> np.ndarray:
    """A random ``(inp, out)`` matrix whose top singular value (3) is well separated (next ≤ 1)."""
    rng = np.random.default_rng(seed)
    k = min(out, inp)
    u, _ = np.linalg.qr(rng.normal(size=(inp, k)))
    v, _ = np.linalg.qr(rng.normal(size=(out, k)))
    s = np.concatenate([[3.0], rng.uniform(0.1, 1.0, size=k - 1)])
    return (u * s) @ v.T


@given(st.integers(0, 2**16), st.integers(2, 5), st.integers(2, 5))
def test_power_iterations_converge_to_top_singular_value(seed: int, out: int, inp: int) -> None:
    w64 = matrix_with_gap(seed, out, inp)
    top = np.linalg.svd(w64, compute_uv=False)[0]
    w = jnp.asarray(w64, jnp.float32)
    rng = np.random.default_rng(seed + 1)
    u0 = jnp.asarray(rng.normal(size=(1, out)), jnp.float32)
    u, v = core.power_iteration_flax(w, u0, 30, 1e-12)
    sigma = float(core.sigma_flax(w, u, v))
    np.testing.assert_allclose(sigma, top, rtol=1e-5)
    np.testing.assert_allclose(float(jnp.linalg.norm(u)), 1.0, rtol=1e-5)
    # normalized matrix has spectral norm 1
    normalized = np.asarray(core.divide_by_sigma(w, jnp.asarray(sigma)), np.float64)
    np.testing.assert_allclose(np.linalg.svd(normalized, compute_uv=False)[0], 1.0, rtol=1e-5)
    # equinox convention: weight (out, in), u in the output space, v in the input space
    we = w.T
    ue, ve = core.power_iteration_eqx(
        we, jnp.asarray(rng.normal(size=out), jnp.float32), jnp.asarray(rng.normal(size=inp), jnp.float32), 30, 1e-12
    )
    np.testing.assert_allclose(float(core.sigma_eqx(we, ue, ve)), top, rtol=1e-5)
    # both u live in the output space: same direction up to sign
    np.testing.assert_allclose(abs(float(jnp.dot(u[0], ue))), 1.0, rtol=1e-4)


def test_divide_by_sigma_zero_leaves_weight() -> None:
    w = jnp.asarray([[1.0, 2.0]])
    np.testing.assert_array_equal(np.asarray(core.divide_by_sigma(w, jnp.asarray(0.0))), np.asarray(w))


def test_as_matrix_views() -> None:
    w = jnp.zeros((2, 3, 4, 5))
    assert core.as_matrix(w, -1).shape == (24, 5)
    assert core.as_matrix(w, 0).shape == (2, 60)
    with pytest.raises(ValueError):
        core.as_matrix(w, 1)


@given(st.integers(0, 2**16), st.lists(st.integers(1, 4), min_size=1, max_size=3), st.data())
def test_weight_norm_unit_norms(seed: int, shape: list[int], data) -> None:
    ndim = len(shape)
    v64 = np.random.default_rng(seed).normal(size=shape) + 0.1
    v = jnp.asarray(v64, jnp.float32)
    feature_axes = data.draw(st.one_of(st.none(), st.sampled_from(range(-ndim, ndim))))
    out = np.asarray(core.weight_norm_flax(v, feature_axes, 1e-12, None), np.float64)
    if feature_axes is None:
        red = tuple(range(ndim))
    else:
        red = tuple(i for i in range(ndim) if i != feature_axes % ndim)
    norms = np.sqrt(np.sum(out**2, axis=red))
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    assert core.weight_norm_scale_shape(tuple(shape), feature_axes) == (
        () if feature_axes is None else (shape[feature_axes],)
    )
    # with a gain the norms become the gain
    g = jnp.asarray(np.arange(1, 1 + (1 if feature_axes is None else shape[feature_axes])), jnp.float32)
    g = g.reshape(()) if feature_axes is None else g
    scaled = np.asarray(core.weight_norm_flax(v, feature_axes, 1e-12, g), np.float64)
    np.testing.assert_allclose(np.sqrt(np.sum(scaled**2, axis=red)), np.asarray(g), rtol=1e-5)
    # equinox: v·g/‖v‖ per kept axis, ‖·‖ from numpy
    axis = None if feature_axes is None else feature_axes % ndim
    ref_norm = np.sqrt(np.sum(v64.astype(np.float32).astype(np.float64) ** 2, axis=red, keepdims=True))
    np.testing.assert_allclose(np.asarray(core.norm_except_axis(v, axis)), ref_norm, rtol=1e-5)
    eq = np.asarray(core.weight_norm_eqx(v, jnp.asarray(2.0), axis), np.float64)
    np.testing.assert_allclose(np.sqrt(np.sum(eq**2, axis=red)), 2.0, rtol=1e-5)
