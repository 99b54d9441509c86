"""Facade vs real flax.linen, per layer, on hypothesis-drawn configurations.

Each example runs :func:`normbridge.conformance.linen.measure_case`: same init key, input
and variables for both; init variables (paths, shapes, dtypes, values) exact; train output
and updated statistics, eval output, gradients w.r.t. params and input bitwise; for
BatchNorm and SpectralNorm 5 training steps from each implementation's own state; and the
checkpoint round trip native → canonical record → facade subtree, bit for bit.
``use_jit`` is drawn, so examples run both under ``jax.jit`` and eagerly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.nn import initializers

from normbridge.conformance.linen import Config, measure_case

#: The wrapper and stateful layers compile several times per example (train, grads, 5 steps, jit or eager):
#: they run half the profile's examples (relative, so ``thorough`` still runs many).
heavy = settings(max_examples=max(3, settings().max_examples // 2))

X_DTYPES = st.sampled_from(["float32", "bfloat16", "float16"])
DTYPES = st.sampled_from([None, jnp.float32, jnp.bfloat16, jnp.float16])
PARAM_DTYPES = st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16])


def shapes(min_dims: int = 1, max_dims: int = 4, max_side: int = 3) -> st.SearchStrategy[tuple[int, ...]]:
    return st.lists(st.integers(1, max_side), min_size=min_dims, max_size=max_dims).map(tuple)


@st.composite
def axes(draw, ndim: int, allowed: list[int] | None = None, *, as_int_ok: bool = True):
    """A non-empty set of axes of an ``ndim`` array, each written positive or negative, as an int or a tuple."""
    pool = list(range(ndim)) if allowed is None else allowed
    chosen = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=len(pool), unique=True))
    written = tuple(draw(st.sampled_from([a, a - ndim])) for a in chosen)
    if as_int_ok and len(written) == 1 and draw(st.booleans()):
        return written[0]
    return written


def common(draw, *, bias: bool = True) -> list[tuple[str, object]]:
    opts: list[tuple[str, object]] = [
        ("epsilon", draw(st.sampled_from([1e-6, 1e-5, 1e-3]))),
        ("dtype", draw(DTYPES)),
        ("param_dtype", draw(PARAM_DTYPES)),
        ("use_scale", draw(st.booleans())),
        ("use_fast_variance", draw(st.booleans())),
        ("force_float32_reductions", draw(st.booleans())),
    ]
    if bias:
        opts.append(("use_bias", draw(st.booleans())))
    if draw(st.booleans()):
        opts.append(("scale_init", initializers.normal(0.5)))
    return opts


def finish(draw, layer: str, shape: tuple[int, ...], opts: list, **extra) -> Config:
    return Config(
        layer,
        shape,
        draw(X_DTYPES),
        tuple(opts),
        mask=layer not in ("SpectralNorm", "WeightNorm") and draw(st.booleans()),
        use_jit=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
        **extra,
    )


@st.composite
def batch_norm(draw) -> Config:
    shape = draw(shapes())
    opts = common(draw)
    opts += [("axis", draw(axes(len(shape)))), ("momentum", draw(st.sampled_from([0.0, 0.5, 0.9, 0.99])))]
    return finish(draw, "BatchNorm", shape, opts)


@st.composite
def layer_norm(draw, layer: str = "LayerNorm") -> Config:
    shape = draw(shapes())
    opts = common(draw, bias=layer == "LayerNorm")
    opts += [("reduction_axes", draw(axes(len(shape)))), ("feature_axes", draw(axes(len(shape))))]
    return finish(draw, layer, shape, opts)


@st.composite
def group_norm(draw) -> Config:
    lead = draw(shapes(0, 3))
    groups = draw(st.integers(1, 3))
    size = draw(st.integers(1, 3))
    shape = (*lead, groups * size)
    opts = common(draw)
    if draw(st.booleans()):
        opts += [("num_groups", None), ("group_size", size)]
    else:
        opts += [("num_groups", groups)]
    ndim = len(shape)
    if ndim > 1 and draw(st.booleans()):
        others = draw(st.lists(st.sampled_from(range(ndim - 1)), unique=True))
        opts.append(("reduction_axes", (*others, draw(st.sampled_from([-1, ndim - 1])))))
    return finish(draw, "GroupNorm", shape, opts)


@st.composite
def instance_norm(draw) -> Config:
    shape = draw(shapes(2, 4))
    opts = common(draw)
    opts.append(("feature_axes", draw(axes(len(shape), list(range(1, len(shape)))))))
    return finish(draw, "InstanceNorm", shape, opts)


def wrapped_shape(draw, inner: str) -> tuple[int, ...]:
    if inner == "conv":
        return (draw(st.integers(1, 2)), draw(st.integers(2, 3)), draw(st.integers(2, 3)), draw(st.integers(1, 3)))
    return (draw(st.integers(1, 3)), draw(st.integers(1, 4)))


@st.composite
def spectral_norm(draw) -> Config:
    inner = draw(st.sampled_from(["dense", "conv", "nested"]))
    opts = [
        ("n_steps", draw(st.integers(0, 3))),
        ("epsilon", draw(st.sampled_from([1e-12, 1e-4]))),
        ("dtype", draw(DTYPES)),
        ("param_dtype", draw(PARAM_DTYPES)),
        ("collection_name", draw(st.sampled_from(["batch_stats", "spectral"]))),
    ]
    if inner != "conv":
        opts.append(("error_on_non_matrix", draw(st.booleans())))
    return finish(draw, "SpectralNorm", wrapped_shape(draw, inner), opts, inner=inner, features=draw(st.integers(1, 4)))


@st.composite
def weight_norm(draw) -> Config:
    inner = draw(st.sampled_from(["dense", "conv", "nested"]))
    filt = draw(st.sampled_from([{"kernel"}, None, {"bias"}, {"kernel_proj"}, {"layer_instance"}, {"inner", "bias"}]))
    feature_choices: list[object] = [-1, None, 0]
    if filt == {"kernel"} and inner != "nested":
        # 2-D feature axes only fit kernels; in the nested layer 'kernel' also matches 'kernel_proj/bias' (1-D),
        # where linen's out-of-range axis -2 crashes or, for size 1, makes a (1, 1) scale.
        feature_choices.append((-2, -1) if inner == "dense" else (2, 3))
    opts = [
        ("epsilon", draw(st.sampled_from([1e-12, 1e-4]))),
        ("dtype", draw(DTYPES)),
        ("param_dtype", draw(PARAM_DTYPES)),
        ("use_scale", draw(st.booleans())),
        ("feature_axes", draw(st.sampled_from(feature_choices))),
        ("variable_filter", filt),
    ]
    if draw(st.booleans()):
        opts.append(("scale_init", initializers.normal(0.5)))
    return finish(draw, "WeightNorm", wrapped_shape(draw, inner), opts, inner=inner, features=draw(st.integers(1, 4)))


def check(cfg: Config, steps: int = 0) -> None:
    accs = measure_case(cfg, steps=steps)
    failed = {col: acc.text() for col, acc in accs.items() if not acc.ok}
    assert not failed, f"{cfg.label()}: {failed}"


@heavy
@given(batch_norm())
def test_batch_norm_matches_linen(cfg: Config) -> None:
    check(cfg, steps=5)


@pytest.mark.parametrize("layer", ["LayerNorm", "RMSNorm"])
@given(data=st.data())
def test_layer_and_rms_norm_match_linen(layer: str, data: st.DataObject) -> None:
    check(data.draw(layer_norm(layer)))


@given(group_norm())
def test_group_norm_matches_linen(cfg: Config) -> None:
    check(cfg)


@given(instance_norm())
def test_instance_norm_matches_linen(cfg: Config) -> None:
    check(cfg)


@heavy
@given(spectral_norm())
def test_spectral_norm_matches_linen(cfg: Config) -> None:
    check(cfg, steps=5)


@heavy
@given(weight_norm())
def test_weight_norm_matches_linen(cfg: Config) -> None:
    check(cfg)


# --------------------------------------------------- strict dtype promotion (tests/conformance/conftest.py)
#: A quarter of the profile's examples: the same strategies, run again under jax_numpy_dtype_promotion="strict".
STRICT_EXAMPLES = settings(max_examples=max(2, settings().max_examples // 4))
STRATEGIES = {
    "BatchNorm": batch_norm, "LayerNorm": layer_norm, "RMSNorm": lambda: layer_norm("RMSNorm"),
    "GroupNorm": group_norm, "InstanceNorm": instance_norm, "SpectralNorm": spectral_norm, "WeightNorm": weight_norm,
}  # fmt: skip


def _first_call(cfg: Config, impl: str):
    """One implementation alone: init, train apply, eval apply, gradients (what ``measure_case`` starts with)."""
    from normbridge.conformance.linen import _Runner, build, inputs

    x, mask = inputs(cfg)
    return lambda: _Runner(cfg, build(cfg, impl)).first(jax.random.key(cfg.seed), x, mask)


def check_strict(run_strict, cfg: Config) -> str:
    steps = 1 if cfg.layer in ("BatchNorm", "SpectralNorm") else 0
    kind, accs = run_strict(
        lambda: measure_case(cfg, steps=steps), _first_call(cfg, "native"), _first_call(cfg, "facade")
    )
    if kind == "compared":
        failed = {col: acc.text() for col, acc in accs.items() if not acc.ok}
        assert not failed, f"strict promotion, {cfg.label()}: {failed}"
    return kind


@pytest.mark.parametrize("layer", list(STRATEGIES))
@STRICT_EXAMPLES
@given(data=st.data())
def test_layers_match_linen_under_strict_promotion(layer: str, data: st.DataObject, strict_promotion) -> None:
    """Outputs, gradients, statistics and state as in standard mode, or native's own error (same type and text)."""
    check_strict(strict_promotion, data.draw(STRATEGIES[layer]()))


def test_strict_promotion_grid_compares_half_precision_and_errors(strict_promotion) -> None:
    """Fixed cases so that both outcomes are exercised: bf16 all the way (compared) and bf16 x f32 (native raises)."""
    bf16_all = (("param_dtype", jnp.bfloat16), ("force_float32_reductions", False))
    grid = [
        Config("LayerNorm", (2, 3, 4), "bfloat16", bf16_all),
        Config("BatchNorm", (4, 3), "bfloat16", (*bf16_all, ("momentum", 0.9))),
        Config("LayerNorm", (2, 3), "bfloat16", ()),
        Config("SpectralNorm", (2, 3), "float32", (("param_dtype", jnp.bfloat16),)),
    ]
    kinds = [check_strict(strict_promotion, cfg) for cfg in grid]
    assert kinds.count("compared") >= 2 and "raised" in kinds, kinds
