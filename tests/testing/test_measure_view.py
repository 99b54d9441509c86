"""normbridge.conformance.measure is a view over normbridge.testing: its numbers must stay what they were.

The reference below is measure's own former computation, kept here as the regression oracle.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from normbridge.conformance import measure

_DTYPES = [np.float32, np.float64, np.float16, jnp.bfloat16, np.int32, np.bool_, np.complex64]
_SPECIAL = [np.nan, 0.0, -0.0, 1e-30, 3.0]


def _reference(native, facade):
    """(bitwise, max_abs, max_rel, dtype, same_shape, same_dtype) as measure computed them before."""
    a, b = np.asarray(native), np.asarray(facade)
    dtype = str(jnp.asarray(native).dtype)
    inf = float("inf")
    if a.shape != b.shape:
        return (False, inf, inf, dtype, False, True)
    if a.dtype != b.dtype:
        return (False, inf, inf, dtype, True, False)
    if a.dtype.kind in "biu":
        eq = bool(np.array_equal(a, b))
        return (eq, 0.0 if eq else inf, 0.0 if eq else inf, dtype, True, True)
    bitwise = bool(
        np.array_equal(
            np.ascontiguousarray(a).reshape(-1).view(np.uint8), np.ascontiguousarray(b).reshape(-1).view(np.uint8)
        )
    )
    a64 = a.astype(np.complex128 if a.dtype.kind == "c" else np.float64)
    b64 = b.astype(a64.dtype)
    nan_a, nan_b = np.isnan(a64), np.isnan(b64)
    if not np.array_equal(nan_a, nan_b):
        return (False, inf, inf, dtype, True, True)
    finite = ~nan_a
    if not finite.any():
        return (bitwise, 0.0, 0.0, dtype, True, True)
    err = np.abs(a64[finite] - b64[finite])
    max_abs = float(err.max())
    scale = float(np.abs(a64[finite]).max())
    return (bitwise, max_abs, max_abs / scale if scale > 0 else max_abs, dtype, True, True)


@st.composite
def _pairs(draw):
    dtype = draw(st.sampled_from(_DTYPES))
    shape = draw(st.sampled_from([(), (3,), (2, 3), (0,)]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if dtype is np.bool_:
        a = rng.integers(0, 2, size=shape).astype(bool)
    elif dtype is np.int32:
        a = rng.integers(-5, 5, size=shape).astype(dtype)
    else:
        a = (rng.normal(size=shape) * 10.0 ** draw(st.integers(-3, 3))).astype(dtype)
    b = a.copy()
    change = draw(st.sampled_from(["none", "scale", "special", "dtype", "shape", "one"]))
    if change == "scale" and a.size:
        b = (b * np.asarray(1 + 10.0 ** draw(st.integers(-8, -1)), b.dtype)).astype(dtype)
    elif change == "special" and a.size and np.dtype(dtype).kind in "fcV":
        i = draw(st.integers(0, a.size - 1))
        b.reshape(-1)[i] = draw(st.sampled_from(_SPECIAL))
        if draw(st.booleans()):
            a.reshape(-1)[i] = draw(st.sampled_from(_SPECIAL))
    elif change == "dtype":
        b = b.astype(np.complex128 if dtype is np.complex64 else np.float64 if dtype is np.float32 else np.float32)
    elif change == "shape":
        b = np.zeros((5,), dtype)
    elif change == "one" and a.size and dtype is not np.bool_:
        b.reshape(-1)[0] = b.reshape(-1)[0] + np.asarray(1, dtype)
    return (a, b) if draw(st.booleans()) else (b, a)


@given(_pairs())
def test_diff_is_measures_former_computation(pair):
    a, b = pair
    d = measure.diff(a, b)
    got = (d.bitwise, d.max_abs, d.max_rel, d.dtype, d.same_shape, d.same_dtype)
    assert repr(got) == repr(_reference(a, b))  # repr: bit-for-bit floats, nan == nan


def test_tree_diff_view_keeps_paths_and_text():
    native = {"a": np.ones(3, np.float32), "b": {"c": np.arange(3), "d": np.float32(2)}}
    facade = {"a": np.ones(3, np.float32) * np.float32(1.0000001), "b": {"c": np.arange(3), "e": 1.0}}
    t = measure.tree_diff(native, facade)
    assert t.missing == ("b/d",) and t.extra == ("b/e",)
    assert list(t.leaves) == ["a", "b/c"]
    assert t.text() == "paths differ: missing ['b/d'], extra ['b/e']"
    assert t.report is not None and t.report.only_b == ("b/d",)  # the full report travels with the view
    t = measure.tree_diff({"a": native["a"]}, {"a": facade["a"]})
    assert t.within() and not t.exact() and t.text() == "max rel 1.2e-07"
    assert measure.REL_TOL == {"float64": 1e-12, "float32": 1e-6, "bfloat16": 2.0**-7, "float16": 2.0**-10}


def test_matched_infinities_are_equal_not_nan():
    """The one intended change: equal infinities at the same position no longer make max_abs NaN."""
    x = np.array([np.inf, 1.0], np.float32)
    d = measure.diff(x, np.array([np.inf, 1.0 + 2e-7], np.float32))
    assert d.max_abs == np.float32(1.0 + 2e-7) - np.float32(1.0) and d.within()
