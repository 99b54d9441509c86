"""NNX facade vs installed flax.nnx: hypothesis over shapes, axes, dtypes, flags, masks, jit, steps.

Each example runs :func:`normbridge.conformance.nnx_cases.measure_norm` / ``measure_wrapper``
(the same functions ``normbridge check`` runs on its fixed grid): init state (paths, Variable
types, shapes, dtypes, values), every train step's output and updated statistics, the eval
output and the gradients, facade vs native with the same key, inputs and parameters.
"""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from normbridge.conformance.nnx_cases import (
    LAYERS,
    NormCase,
    WrapperCase,
    failures,
    measure_norm,
    measure_wrapper,
    mode_checks,
    signature_checks,
)

# Every example compiles fresh programs (native and facade; train, eval, grad): half the profile's examples.
HALF = settings(max_examples=max(2, settings().max_examples // 2))
DTYPES = st.sampled_from(["float32", "bfloat16", "float16"])
DIM = st.sampled_from([2, 3])
CHANNELS = st.sampled_from([4, 6])


@st.composite
def shapes(draw, min_ndim: int = 1, max_ndim: int = 4) -> tuple[int, ...]:
    ndim = draw(st.integers(min_ndim, max_ndim))
    return (*[draw(DIM) for _ in range(ndim - 1)], draw(CHANNELS))


@st.composite
def common(draw) -> dict:
    return dict(
        dtype=draw(DTYPES),
        mask=draw(st.booleans()),
        use_jit=draw(st.booleans()),
        steps=draw(st.sampled_from([2, 5])),
        seed=draw(st.integers(0, 50)),
    )


def _flags(draw, *names: str) -> list[tuple[str, object]]:
    return [(n, draw(st.booleans())) for n in names]


@st.composite
def batch_norm_cases(draw) -> NormCase:
    shape = draw(shapes())
    kw = [("momentum", draw(st.sampled_from([0.9, 0.99])))]
    if len(shape) >= 3 and draw(st.booleans()):
        kw.append(("axis", 1))
    kw += _flags(draw, "use_bias", "use_scale", "use_fast_variance")
    kw.append(("dtype", draw(st.sampled_from([None, jnp.bfloat16, jnp.float32]))))
    kw.append(("param_dtype", draw(st.sampled_from([jnp.float32, jnp.bfloat16]))))
    return NormCase("BatchNorm", shape, kwargs=tuple(kw), **draw(common()))


@st.composite
def layer_norm_cases(draw, layer: str) -> NormCase:
    shape = draw(shapes())
    k = draw(st.integers(1, len(shape)))
    trailing = tuple(range(len(shape) - k, len(shape)))
    red = -1 if k == 1 else trailing
    feat = draw(st.sampled_from([-1, red]))
    kw = [("reduction_axes", red), ("feature_axes", feat), ("epsilon", draw(st.sampled_from([1e-6, 1e-3])))]
    kw += _flags(draw, "use_scale", "use_fast_variance") + ([] if layer == "RMSNorm" else _flags(draw, "use_bias"))
    kw.append(("dtype", draw(st.sampled_from([None, jnp.bfloat16]))))
    return NormCase(layer, shape, kwargs=tuple(kw), **draw(common()))


@st.composite
def group_norm_cases(draw) -> NormCase:
    shape = draw(shapes(min_ndim=2))
    c = shape[-1]
    if draw(st.booleans()):
        kw = [("num_groups", draw(st.sampled_from([g for g in (1, 2, 3, c) if c % g == 0])))]
    else:
        kw = [("num_groups", None), ("group_size", draw(st.sampled_from([g for g in (1, 2, c) if c % g == 0])))]
    kw += _flags(draw, "use_bias", "use_scale", "use_fast_variance")
    return NormCase("GroupNorm", shape, kwargs=tuple(kw), **draw(common()))


@st.composite
def instance_norm_cases(draw) -> NormCase:
    shape = draw(shapes(min_ndim=2))
    kw = _flags(draw, "use_bias", "use_scale", "use_fast_variance")
    if len(shape) == 4 and draw(st.booleans()):
        kw.append(("feature_axes", (2, 3)))
    return NormCase("InstanceNorm", shape, kwargs=tuple(kw), **draw(common()))


def _assert(checks) -> None:
    bad = failures(checks)
    assert checks and not bad, "\n".join(bad)


@HALF
@given(batch_norm_cases())
def test_batch_norm_matches_native(case: NormCase) -> None:
    _assert(measure_norm(case))


@pytest.mark.parametrize("layer", ["LayerNorm", "RMSNorm"])
@HALF
@given(data=st.data())
def test_layer_and_rms_norm_match_native(layer: str, data) -> None:
    _assert(measure_norm(data.draw(layer_norm_cases(layer))))


@HALF
@given(group_norm_cases())
def test_group_norm_matches_native(case: NormCase) -> None:
    # Default reduction axes on ≥2-D input: where native nnx is right (see test_nnx_deviations.py).
    _assert(measure_norm(case))


@HALF
@given(instance_norm_cases())
def test_instance_norm_matches_native(case: NormCase) -> None:
    _assert(measure_norm(case))


@st.composite
def wrapper_cases(draw, layer: str) -> WrapperCase:
    inner = draw(st.sampled_from(["Linear", "Tensor3"]))
    if layer == "SpectralNorm":
        kw = [("n_steps", draw(st.integers(0, 3))), ("epsilon", draw(st.sampled_from([1e-12, 1e-4])))]
        if draw(st.booleans()):
            kw.append(("dtype", jnp.bfloat16))
    else:
        kw = [("feature_axes", draw(st.sampled_from([-1, None, 0]))), ("use_scale", draw(st.booleans()))]
    return WrapperCase(
        layer,
        inner=inner,
        features=(draw(st.sampled_from([3, 4])), draw(st.sampled_from([2, 4]))),
        kwargs=tuple(kw),
        use_jit=draw(st.booleans()),
        steps=draw(st.sampled_from([1, 3])),
        seed=draw(st.integers(0, 50)),
    )


@pytest.mark.parametrize("layer", ["SpectralNorm", "WeightNorm"])
@HALF
@given(data=st.data())
def test_wrappers_match_native(layer: str, data) -> None:
    _assert(measure_wrapper(data.draw(wrapper_cases(layer))))


@pytest.mark.parametrize("layer", LAYERS)
def test_signatures_match_native(layer: str) -> None:
    _assert(signature_checks(layer))


@pytest.mark.parametrize("layer", ["BatchNorm", "SpectralNorm"])
def test_train_eval_flags_match_native(layer: str) -> None:
    _assert(mode_checks(layer))


def test_measurement_detects_a_wrong_facade() -> None:
    # The comparison is sensitive: a facade with another epsilon or another parameter dtype fails it.
    from flax import nnx

    import normbridge.adapters.nnx as F

    class WrongEps(F.LayerNorm):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.epsilon = self.epsilon * 10

    class WrongDtype(F.LayerNorm):
        def __init__(self, *a, **k):
            super().__init__(*a, param_dtype=jnp.bfloat16, **k)

    case = NormCase("LayerNorm", (2, 6), kwargs=(("epsilon", 1e-3),))
    bad_eps = failures(measure_norm(case, native_cls=nnx.LayerNorm, facade_cls=WrongEps))
    assert any(b.startswith("outputs/") for b in bad_eps), bad_eps
    bad_dtype = failures(measure_norm(case, native_cls=nnx.LayerNorm, facade_cls=WrongDtype))
    assert any(b.startswith("state layout/") for b in bad_dtype), bad_dtype


# --------------------------------------------------- strict dtype promotion (tests/conformance/conftest.py)
#: A quarter of the profile's examples: the same strategies, run again under jax_numpy_dtype_promotion="strict".
STRICT_EXAMPLES = settings(max_examples=max(2, settings().max_examples // 4))
NORM_STRATEGIES = {
    "BatchNorm": batch_norm_cases, "LayerNorm": lambda: layer_norm_cases("LayerNorm"),
    "RMSNorm": lambda: layer_norm_cases("RMSNorm"), "GroupNorm": group_norm_cases, "InstanceNorm": instance_norm_cases,
}  # fmt: skip


def _norm_alone(case: NormCase, impl: str):
    """One implementation alone: train call, eval call, gradients (what ``measure_norm`` does per side)."""
    from flax import nnx

    import normbridge.adapters.nnx as F
    from normbridge.conformance.nnx_cases import _caller, _grads, build_norm, make_input, make_mask

    def run():
        m = build_norm(getattr(nnx if impl == "native" else F, case.layer), case)
        x = make_input(case.shape, case.dtype, case.seed + 100)
        mask = make_mask(case.shape, case.seed) if case.mask else None
        call = _caller(case.layer, case.use_jit)
        call(m, x, mask, True)
        call(m, x, mask, False)
        _grads(m, x, mask, case.layer, case.use_jit)

    return run


def _wrapper_alone(case: WrapperCase, impl: str):
    from flax import nnx

    import normbridge.adapters.nnx as F
    from normbridge.conformance.nnx_cases import build_wrapper, make_input

    def run():
        m = build_wrapper(getattr(nnx if impl == "native" else F, case.layer), case)
        x = make_input(case.input_shape(), case.dtype, case.seed + 100)
        kw = {"update_stats": True} if case.layer == "SpectralNorm" else {}
        m(x, **kw)
        nnx.grad(lambda m: jnp.sum(m(x, **kw).astype(jnp.float32)))(m)

    return run


def check_strict(run_strict, case) -> str:
    if isinstance(case, WrapperCase):
        measure, alone = measure_wrapper, _wrapper_alone
    else:
        measure, alone = measure_norm, _norm_alone
    kind, checks = run_strict(lambda: measure(case), alone(case, "native"), alone(case, "facade"))
    if kind == "compared":
        _assert(checks)
    return kind


@pytest.mark.parametrize("layer", list(NORM_STRATEGIES))
@STRICT_EXAMPLES
@given(data=st.data())
def test_norms_match_native_under_strict_promotion(layer: str, data, strict_promotion) -> None:
    """Outputs, statistics and gradients as in standard mode, or native's own error (same type and text)."""
    check_strict(strict_promotion, data.draw(NORM_STRATEGIES[layer]()))


@pytest.mark.parametrize("layer", ["SpectralNorm", "WeightNorm"])
@STRICT_EXAMPLES
@given(data=st.data())
def test_wrappers_match_native_under_strict_promotion(layer: str, data, strict_promotion) -> None:
    check_strict(strict_promotion, data.draw(wrapper_cases(layer)))


def test_strict_promotion_grid_compares_half_precision_and_errors(strict_promotion) -> None:
    """Fixed cases so that both outcomes are exercised: bf16 input with dtype=float32 runs, bf16 x f32 raises."""
    grid = [
        NormCase("BatchNorm", (4, 6), kwargs=(("dtype", jnp.float32),), dtype="bfloat16", steps=2),
        NormCase("LayerNorm", (2, 6), kwargs=(("dtype", jnp.float32), ("param_dtype", jnp.bfloat16)),
                 dtype="bfloat16", mask=True, steps=1),
        NormCase("GroupNorm", (2, 3, 6), kwargs=(("num_groups", 2),), dtype="bfloat16", steps=1),
        WrapperCase("SpectralNorm", kwargs=(("dtype", jnp.bfloat16),), steps=1),
    ]
    kinds = [check_strict(strict_promotion, case) for case in grid]
    assert kinds.count("compared") >= 2 and "raised" in kinds, kinds
