"""normbridge.testing.tree_diff / DiffReport / assert_trees_close: structure, values, tolerances, output."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from normbridge.testing import DEFAULT_TOLERANCES, assert_trees_close, tree_diff, ulp_distance

FLOATS = [np.float64, np.float32, np.float16, jnp.bfloat16]


def _up(x: np.ndarray, k: int) -> np.ndarray:
    """``x`` moved ``k`` representable values towards +inf (numpy's nextafter, not the code under test)."""
    for _ in range(k):
        x = np.nextafter(x, np.array(np.inf, x.dtype))
    return x


def _tree(dtype=np.float32) -> dict:
    rng = np.random.default_rng(0)
    return {
        "params": {"Dense_0": {"kernel": rng.normal(size=(3, 4)).astype(dtype), "bias": np.zeros(4, dtype)}},
        "batch_stats": {"BatchNorm_0": {"mean": rng.normal(size=4).astype(dtype), "var": np.ones(4, dtype)}},
        "step": np.array(3, np.int32),
    }


def test_equal_trees_report_true_and_bitwise():
    a = _tree()
    report = tree_diff(a, jax.tree_util.tree_map(np.copy, a))
    assert bool(report) and report.bitwise and report.failures == () and report.failing_paths == ()
    assert "match: 5 leaves" in str(report)


@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("k", [1, 3])
def test_k_ulp_change_is_measured_in_every_float_dtype(dtype, k):
    a = _tree(dtype)
    b = jax.tree_util.tree_map(np.copy, a)
    b["batch_stats"]["BatchNorm_0"]["var"][2] = _up(b["batch_stats"]["BatchNorm_0"]["var"][2], k)
    bitwise = tree_diff(b, a, rtol=0, atol=0)
    assert bitwise.failing_paths == ("batch_stats/BatchNorm_0/var",)
    leaf = bitwise["batch_stats/BatchNorm_0/var"]
    assert (leaf.mismatched, leaf.size, leaf.index, leaf.max_ulp) == (1, 4, (2,), k)
    assert leaf.max_abs == pytest.approx(k * float(ml_dtypes.finfo(dtype).eps))
    assert leaf.value_b == 1.0 and leaf.value_a == pytest.approx(1.0 + k * float(ml_dtypes.finfo(dtype).eps))
    # max_ulp admits exactly k ulps
    assert tree_diff(b, a, max_ulp=k)
    assert tree_diff(b, a, max_ulp=k - 1).failing_paths == ("batch_stats/BatchNorm_0/var",)


@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: np.dtype(d).name)
def test_default_tolerance_admits_one_ulp_and_rejects_a_real_difference(dtype):
    a = _tree(dtype)
    b = jax.tree_util.tree_map(np.copy, a)
    b["params"]["Dense_0"]["kernel"][0, 0] = _up(b["params"]["Dense_0"]["kernel"][0, 0], 1)
    assert tree_diff(b, a), tree_diff(b, a)
    kernel = b["params"]["Dense_0"]["kernel"]
    kernel[0, 0] += np.asarray(0.05 * np.abs(kernel.astype(np.float64)).max(), dtype)  # 5 % of the leaf's scale
    assert tree_diff(b, a).failing_paths == ("params/Dense_0/kernel",)


def test_default_tolerances_are_the_documented_ones():
    table = {k: (t.rtol, t.atol_scale, t.max_ulp) for k, t in DEFAULT_TOLERANCES.items()}
    assert table["float32"] == (0.0, 1e-6, None)
    assert table["float64"] == (0.0, 1e-12, None)
    assert table["float16"] == (0.0, 2.0**-10, None)
    assert table["bfloat16"] == (0.0, 2.0**-7, None)


def test_default_float32_bound_is_relative_to_the_leafs_largest_magnitude():
    b = {"x": np.array([1000.0, 1e-3], np.float32)}
    near_bound = {"x": np.array([1000.0, 1e-3 + 0.9e-3], np.float32)}  # 0.9e-3 <= 1e-6 * 1000
    beyond = {"x": np.array([1000.0, 1e-3 + 1.1e-3], np.float32)}
    assert tree_diff(near_bound, b)
    assert not tree_diff(beyond, b)
    # an explicit rtol is elementwise (|a-b| <= rtol * |b|), atol then 0
    assert not tree_diff(near_bound, b, rtol=1e-6)
    assert tree_diff(near_bound, b, rtol=1.0)


def test_rtol_atol_rule_elementwise():
    b = {"x": np.array([1.0, 10.0, 0.0], np.float64)}
    a = {"x": np.array([1.1, 10.5, 0.05], np.float64)}
    r = tree_diff(a, b, rtol=0.06, atol=0.0)  # 0.1 > 0.06, 0.5 <= 0.6, 0.05 > 0
    assert r["x"].mismatched == 2
    r = tree_diff(a, b, rtol=0.06, atol=0.05)  # 0.1 <= 0.11, 0.05 <= 0.05
    assert r["x"].mismatched == 0
    assert r["x"].max_rel == np.inf  # 0.05 against an exact 0
    assert r["x"].max_abs == pytest.approx(0.5) and r["x"].index == (1,)


def test_nan_rules():
    b = {"x": np.array([np.nan, 1.0, 2.0], np.float32)}
    same_nan = {"x": np.array([np.nan, 1.0, 2.0], np.float32)}
    r = tree_diff(same_nan, b, rtol=0, atol=0)
    assert r and r["x"].nan_matched == 1 and r["x"].nan_mismatched == 0
    one_side = {"x": np.array([np.nan, np.nan, 2.0], np.float32)}
    r = tree_diff(one_side, b, rtol=1e9, atol=1e9)  # no tolerance admits a one-sided NaN
    assert not r and r["x"].nan_mismatched == 1 and r["x"].mismatched == 1 and r["x"].index == (1,)
    assert "1 NaN on one side" in r.render("plain")


def test_inf_rules():
    b = {"x": np.array([np.inf, -np.inf, 1.0], np.float32)}
    assert tree_diff({"x": b["x"].copy()}, b, rtol=0, atol=0)
    r = tree_diff({"x": np.array([np.inf, np.inf, 1.0], np.float32)}, b, rtol=1e9, atol=1e9)
    assert r["x"].inf_mismatched == 1 and r["x"].mismatched == 1 and r["x"].max_abs == np.inf
    r = tree_diff({"x": np.array([np.finfo(np.float32).max, -np.inf, 1.0], np.float32)}, b, max_ulp=10)
    assert r["x"].inf_mismatched == 1 and not r  # one ulp below inf is still not inf


def test_signed_zero_is_bitwise_different_but_equal_in_value():
    b, a = {"x": np.array([0.0], np.float32)}, {"x": np.array([-0.0], np.float32)}
    assert not tree_diff(a, b, rtol=0, atol=0)
    assert tree_diff(a, b) and tree_diff(a, b, max_ulp=0)


def test_structure_shape_dtype_and_sorting_worst_first():
    a = _tree()
    b = jax.tree_util.tree_map(np.copy, a)
    del b["params"]["Dense_0"]["bias"]
    b["extra"] = np.zeros(2, np.float32)
    b["params"]["Dense_0"]["kernel"] = b["params"]["Dense_0"]["kernel"][:, :3]
    b["batch_stats"]["BatchNorm_0"]["var"] = b["batch_stats"]["BatchNorm_0"]["var"].astype(np.float16)
    b["batch_stats"]["BatchNorm_0"]["mean"] = b["batch_stats"]["BatchNorm_0"]["mean"] * 1.5
    b["step"] = np.array(4, np.int32)
    r = tree_diff(a, b)
    assert r.only_a == ("params/Dense_0/bias",) and r.only_b == ("extra",)
    assert [leaf.path for leaf in r.failures] == [
        "params/Dense_0/kernel",  # shape
        "batch_stats/BatchNorm_0/var",  # dtype
        "batch_stats/BatchNorm_0/mean",  # 1/3 relative to its scale
        "step",  # 3 vs 4: 1/4
    ]
    kinds = {leaf.path: leaf.kind for leaf in r.failures}
    assert kinds == {
        "params/Dense_0/kernel": "shape",
        "batch_stats/BatchNorm_0/var": "dtype",
        "batch_stats/BatchNorm_0/mean": "values",
        "step": "values",
    }
    norm = [leaf.norm_rel for leaf in r.failures if leaf.kind == "values"]
    assert norm == sorted(norm, reverse=True)
    text = r.render("plain")
    for p in r.failing_paths:
        assert p in text
    assert "only in a" in text and "only in b" in text and "(3, 4) vs (3, 3)" in text


def test_int_and_bool_leaves_compare_exactly_by_default():
    assert not tree_diff({"n": np.array([1, 2])}, {"n": np.array([1, 3])})
    assert tree_diff({"n": np.array([1, 2])}, {"n": np.array([1, 3])}, atol=1)
    assert not tree_diff({"m": np.array([True])}, {"m": np.array([False])})


def test_non_array_leaves_and_prng_keys():
    assert tree_diff({"s": "relu"}, {"s": "relu"})
    r = tree_diff({"s": "relu"}, {"s": "gelu"})
    assert r.failing_paths == ("s",) and "relu" in r.render("plain")
    k = jax.random.key(0)
    assert tree_diff({"k": k}, {"k": k}) and not tree_diff({"k": k}, {"k": jax.random.key(1)})


def test_jax_arrays_and_python_scalars():
    assert tree_diff({"x": jnp.ones(3)}, {"x": np.ones(3, np.float32)})
    assert tree_diff([1.0, 2], [1.0, 2])


def test_to_json_is_strict_and_complete():
    a = _tree()
    b = jax.tree_util.tree_map(np.copy, a)
    b["params"]["Dense_0"]["bias"][0] = np.nan
    b["params"]["Dense_0"]["kernel"][1, 1] = np.inf
    data = json.loads(tree_diff(a, b).to_json())  # json.loads accepts only what to_json emits
    assert data["ok"] is False
    assert set(data["failures"]) == {"params/Dense_0/bias", "params/Dense_0/kernel"}
    assert len(data["leaves"]) == 5
    kernel = next(leaf for leaf in data["leaves"] if leaf["path"] == "params/Dense_0/kernel")
    assert kernel["max_abs"] == "inf" and kernel["index"] == [1, 1] and kernel["inf_mismatched"] == 1
    with pytest.raises(ValueError):
        json.dumps({"x": float("nan")}, allow_nan=False)  # what the encoding avoids


def test_str_is_plain_in_logs_and_rich_on_demand():
    a = _tree()
    b = jax.tree_util.tree_map(np.copy, a)
    b["step"] = np.array(9, np.int32)
    r = tree_diff(a, b)
    assert str(r) == r.render("plain")  # pytest captures stdout: not a terminal
    assert "\x1b[" not in str(r) and "step" in str(r)
    rich_text = r.render("rich")
    assert "\x1b[" in rich_text and "┃" in rich_text and "step" in rich_text
    assert repr(r) == "DiffReport(1 differ: step)"


def test_assert_trees_close_lists_every_bad_leaf():
    a = _tree()
    b = jax.tree_util.tree_map(np.copy, a)
    b["params"]["Dense_0"]["bias"][0] = 1.0
    b["batch_stats"]["BatchNorm_0"]["var"][3] = np.nan
    b["step"] = np.array(5, np.int32)
    with pytest.raises(AssertionError) as info:
        assert_trees_close(a, b)
    msg = str(info.value)
    for p in ("params/Dense_0/bias", "batch_stats/BatchNorm_0/var", "step"):
        assert p in msg
    assert "params/Dense_0/kernel" not in msg and "3 of 5 leaves differ" in msg
    assert assert_trees_close(a, a)


def test_ulp_distance_known_values():
    one = np.array([1.0], np.float32)
    assert ulp_distance(one, np.array([2.0], np.float32))[0] == 2**23  # one binade of float32
    tiny = np.array([np.finfo(np.float32).smallest_subnormal], np.float32)
    assert ulp_distance(-tiny, tiny)[0] == 2  # across zero: -s, 0, +s
    assert ulp_distance(np.array([-0.0]), np.array([0.0]))[0] == 0
    bf = np.array([1.0], jnp.bfloat16)
    assert ulp_distance(bf, np.array([2.0], jnp.bfloat16))[0] == 2**7
    big = np.array([np.finfo(np.float64).max])
    assert ulp_distance(-big, big)[0] == pytest.approx(2.0 * float(big.view(np.int64)[0]))
    with pytest.raises(TypeError):
        ulp_distance(one, one.astype(np.float64))


@given(
    st.sampled_from(FLOATS),
    st.integers(1, 40),
    st.floats(-1e4, 1e4, allow_nan=False, width=16),
    st.integers(0, 9),
)
def test_ulp_distance_matches_nextafter_steps(dtype, n, start, k):
    x = np.full(n, start, dtype)
    assert (ulp_distance(_up(x, k), x) == k).all()
    assert (ulp_distance(x, _up(x, k)) == k).all()
