"""Property tests: the treex facade computes what flax.linen computes when configured the way treex configured it.

Real treex wrapped flax modules (momentum passed as its 0-d array, epsilon 1e-5, ``dtype=float32``), so the
treex facade must agree with native ``flax.linen`` — and with the linen facade — on outputs, updated
statistics and gradients, over drawn shapes, axes, dtypes and flags. One implementation of the comparison,
:func:`normbridge.conformance.treex.compare_with_linen`, also fills the conformance matrix.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from normbridge.conformance import treex as T
from normbridge.conformance.measure import REL_TOL, Diff

DTYPES = st.sampled_from([np.float32, jnp.bfloat16, np.float16])


@st.composite
def configs(draw: st.DrawFn, layer: str) -> tuple[dict, tuple[int, ...]]:
    dims = st.integers(1, 4)
    if layer in ("SpectralNorm", "WeightNorm"):
        cfg: dict = {"features": draw(st.integers(1, 4))}
        if layer == "SpectralNorm":
            cfg["n_steps"] = draw(st.integers(1, 3))
        else:
            cfg["feature_axes"] = draw(st.sampled_from([-1, None]))
            cfg["use_scale"] = draw(st.booleans())
        return cfg, (draw(dims), draw(st.integers(1, 5)))
    ndim = draw(st.integers(2 if layer in ("BatchNorm", "GroupNorm", "InstanceNorm") else 1, 4))
    shape = [draw(dims) for _ in range(ndim)]
    cfg = {"epsilon": draw(st.sampled_from([1e-5, 1e-3, 0.1]))}
    if layer != "RMSNorm":
        cfg["use_bias"] = draw(st.booleans())
    cfg["use_scale"] = draw(st.booleans())
    if layer == "BatchNorm":
        cfg["axis"] = draw(st.integers(-ndim, ndim - 1))
        cfg["momentum"] = draw(st.sampled_from([0.99, 0.9, 0.5]))
    if layer == "GroupNorm":
        groups, size = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        shape[-1] = groups * size
        if draw(st.booleans()):
            cfg.update(num_groups=groups)
        else:
            cfg.update(num_groups=None, group_size=size)
    return cfg, tuple(shape)


def _check(result: dict) -> list[str]:
    bad = []
    for col, entries in result.items():
        for name, d, detail in entries:
            if isinstance(d, Diff):
                tol = REL_TOL.get(d.dtype, 1e-6)
                if not d.within(tol):
                    bad.append(f"{col} {name}: {d.text()}")
            elif not d:
                bad.append(f"{col} {name}: {detail}")
    return bad


@given(data=st.data())
def test_treex_facade_matches_linen(data: st.DataObject) -> None:
    layer = data.draw(st.sampled_from(T.LAYERS), label="layer")
    cfg, shape = data.draw(configs(layer), label="config")
    dtype = data.draw(DTYPES, label="dtype") if layer not in ("SpectralNorm", "WeightNorm") else np.float32
    training = data.draw(st.booleans(), label="training")
    impl = data.draw(st.sampled_from(["native", "facade"]), label="linen")
    use_jit = data.draw(st.booleans(), label="use_jit")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=shape) * 3 + 1).astype(np.float32).astype(dtype)
    result = T.compare_with_linen(layer, cfg, x, training=training, impl=impl, use_jit=use_jit, seed=seed)
    assert result["outputs"] and result["gradients"] and result["state layout"]
    assert _check(result) == []


@pytest.mark.parametrize("layer", T.LAYERS)
def test_every_layer_matches_linen_on_its_grid_config(layer: str) -> None:
    """Every layer in every CI run (the property test above draws the layer), native linen, training mode."""
    cfg, shape = T._grid(layer)[0]
    x = (np.random.default_rng(3).normal(size=shape) * 2 + 0.5).astype(np.float32)
    result = T.compare_with_linen(layer, cfg, x, training=True, impl="native", use_jit=True, seed=3)
    assert _check(result) == []


def test_comparison_detects_a_wrong_epsilon() -> None:
    """The measuring function is not vacuous: a facade configured differently from linen is reported."""
    import flax.linen as nn

    from normbridge.adapters import treex as tx

    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    t = tx.LayerNorm(epsilon=0.5).init(0, x)
    native = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32)
    v = native.init(__import__("jax").random.PRNGKey(0), x)
    from normbridge.conformance.measure import diff

    assert not diff(native.apply(v, x), t(x)).within(1e-6)


@pytest.mark.parametrize("layer", ["BatchNorm", "LayerNorm", "GroupNorm"])
def test_treex_signatures(layer: str) -> None:
    assert T.signature_problems(layer) == []


@pytest.mark.parametrize("layer", T.ADDITIONS)
def test_addition_signatures(layer: str) -> None:
    assert T.addition_signature_problems(layer) == []


# --------------------------------------------------- strict dtype promotion (tests/conformance/conftest.py)
#: A quarter of the profile's examples: the same strategies, run again under jax_numpy_dtype_promotion="strict".
STRICT_EXAMPLES = settings(max_examples=max(2, settings().max_examples // 4))


def _alone(layer: str, cfg: dict, x: np.ndarray, training: bool, impl: str):
    """One side alone: linen configured as treex (``impl="native"``), or the treex facade."""
    import jax

    def run():
        t, lm = T.build_pair(layer, cfg, "native")
        xx = jnp.asarray(x)
        if impl == "facade":
            return t.init(0, xx).train(training)(xx)
        kw = {"update_stats": False} if layer == "SpectralNorm" else {}
        kw = {"use_running_average": True} if layer == "BatchNorm" else kw
        return T._call_linen(layer, lm, lm.init(jax.random.PRNGKey(0), xx, **kw), xx, training)

    return run


def check_strict(run_strict, layer: str, cfg: dict, x: np.ndarray, training: bool, use_jit: bool, seed: int) -> str:
    kind, result = run_strict(
        lambda: T.compare_with_linen(layer, cfg, x, training=training, impl="native", use_jit=use_jit, seed=seed),
        _alone(layer, cfg, x, training, "native"),
        _alone(layer, cfg, x, training, "facade"),
    )
    if kind == "compared":
        assert result["outputs"] and result["gradients"] and result["state layout"]
        assert _check(result) == []
    return kind


@STRICT_EXAMPLES
@given(data=st.data())
def test_treex_facade_matches_linen_under_strict_promotion(data: st.DataObject, strict_promotion) -> None:
    """Same outputs, statistics and gradients as linen configured as treex, or linen's own error."""
    layer = data.draw(st.sampled_from(T.LAYERS), label="layer")
    cfg, shape = data.draw(configs(layer), label="config")
    # the wrappers wrap treex's Linear, which casts its input to float32 explicitly as flax 0.4.1's Dense did;
    # today's linen Dense (the reference's inner layer) promotes instead: only float32 compares the wrappers
    dtype = data.draw(DTYPES, label="dtype") if layer not in ("SpectralNorm", "WeightNorm") else np.float32
    seed = data.draw(st.integers(0, 2**16), label="seed")
    x = (np.random.default_rng(seed).normal(size=shape) * 3 + 1).astype(np.float32).astype(dtype)
    check_strict(strict_promotion, layer, cfg, x, data.draw(st.booleans(), label="training"),
                 data.draw(st.booleans(), label="use_jit"), seed)


def test_strict_promotion_grid_compares_and_errors(strict_promotion) -> None:
    """Both outcomes exercised: float32 compares; bfloat16 input raises in linen (dtype=float32 output) and here."""
    x32 = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    kinds = [
        check_strict(strict_promotion, "BatchNorm", {}, x32, True, True, 0),
        check_strict(strict_promotion, "GroupNorm", {"num_groups": 2}, x32, False, True, 1),
        check_strict(strict_promotion, "LayerNorm", {}, x32.astype(jnp.bfloat16), True, False, 2),
    ]
    assert kinds == ["compared", "compared", "raised"], kinds
