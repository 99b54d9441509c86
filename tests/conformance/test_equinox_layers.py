"""Property tests: every equinox facade layer against the installed ``equinox.nn`` layer.

Each example draws a configuration (shapes 1-D..4-D, float32/bfloat16/float16,
flags, modes, jit or eager) and runs the same measuring function that
``normbridge check`` uses (:mod:`normbridge.conformance.equinox_measure`): outputs
and updated state in training and inference, ≥ 5 training steps for BatchNorm,
gradients, layouts and checkpoint round trips. Shapes come from small menus so
that compiled kernels are reused across examples (runtime budget).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from normbridge.conformance import equinox_measure as em

DTYPES = st.sampled_from(["float32", "bfloat16", "float16"])
# The two slowest tests run 5/8 of the profile's examples (5 in CI): each example is 5+ eager training steps.
SLOW = settings(max_examples=max(1, settings.default.max_examples * 5 // 8))
USE_JIT = st.sampled_from([False, False, False, True])  # a jit compile costs more than cached eager kernels


def assert_all(accs: em.Accs, *columns: str) -> None:
    """Every requested column ran at least one case and none failed."""
    for col in columns:
        acc = accs[col]
        assert acc.cases > 0, f"{col}: no case ran"
        assert acc.ok, f"{col}: {acc.text()}"


ALL = ("state layout", "train/eval semantics", "outputs", "gradients", "checkpoint round trip")


def test_signatures_and_fields_match_equinox() -> None:
    accs = em.new_accs()
    em.measure_signatures(accs)
    assert_all(accs, "signature")


@SLOW
@given(
    mode=st.sampled_from(["ema", "batch"]),
    dtype=DTYPES,
    state_dtype=st.sampled_from([None, "same"]),
    channels=st.just(3),
    spatial=st.sampled_from([(), (2, 3)]),
    affine=st.booleans(),
    momentum=st.sampled_from([0.9, 0.99]),
    eps=st.sampled_from([1e-5, 1e-3]),
    use_jit=USE_JIT,
    seed=st.integers(0, 3),
)
def test_batch_norm(mode, dtype, state_dtype, channels, spatial, affine, momentum, eps, use_jit, seed) -> None:
    """5 training steps (outputs, exact state), inference 3 ways, gradients, checkpoints.

    bf16/f16 input with the default f32 state in mode='ema' raises TypeError natively;
    the measure then requires the facade to raise the same type.
    """
    cfg = em.BNConfig(
        channels=channels,
        spatial=spatial,
        dtype=dtype,
        state_dtype=dtype if state_dtype == "same" else None,
        mode=mode,
        channelwise_affine=affine,
        momentum=momentum,
        eps=eps,
        steps=5,
        use_jit=use_jit,
        seed=seed,
    )
    accs = em.new_accs()
    em.measure_batch_norm(cfg, accs)
    raises_natively = mode == "ema" and dtype != "float32" and state_dtype is None
    assert_all(accs, "state layout", "outputs", *(() if raises_natively else ALL))
    if raises_natively:
        # the first step is the only case: both raised (the same type), so nothing else ran
        assert accs["outputs"].cases == 1 and accs["train/eval semantics"].cases == 0


@pytest.mark.parametrize("mode", ["batch", "ema"])
def test_batch_norm_pmap_tuple_axis_name(mode: str) -> None:
    """``pmap(vmap(bn))`` over 4 fake devices with ``axis_name=('dev','batch')`` equals native and a flat vmap."""
    accs = em.new_accs()
    em.measure_batch_norm_pmap(accs, mode=mode, devices=4, steps=2)
    assert_all(accs, "train/eval semantics", "outputs")


SHAPES = {
    "LayerNorm": [(5,), (4, 3), (2, 2, 2, 2)],
    "RMSNorm": [(5,), (2, 3, 2)],
    "GroupNorm": [(4,), (4, 2, 2), (4, 2, 2, 2)],
    "InstanceNorm": [(4, 3), (2, 2, 2)],
}


@pytest.mark.parametrize("layer", ["LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm"])
@given(data=st.data(), dtype=DTYPES, param_dtype=st.sampled_from([None, "same"]), use_jit=USE_JIT)
def test_norm(layer: str, data, dtype, param_dtype, use_jit) -> None:
    """Outputs (input dtype), (out, state) pass-through, gradients, layouts, checkpoints.

    InstanceNorm is compared with ``vmap(eqx.nn.GroupNorm(C, C))``.
    """
    shape = data.draw(st.sampled_from(SHAPES[layer]), label="shape")
    groups = data.draw(st.sampled_from([1, 2, 4]), label="groups")
    cfg = em.NormConfig(
        layer=layer,
        shape=shape,
        groups=groups,
        dtype=dtype,
        param_dtype=dtype if param_dtype == "same" else None,
        use_weight=data.draw(st.booleans(), label="use_weight"),
        use_bias=data.draw(st.booleans(), label="use_bias"),
        eps=data.draw(st.sampled_from([1e-5, 1e-2]), label="eps"),
        batch=3,
        use_jit=use_jit,
        seed=data.draw(st.integers(0, 3), label="seed"),
    )
    accs = em.new_accs()
    em.measure_norm(cfg, accs)
    assert_all(accs, *ALL)


@SLOW
@given(
    layer=st.sampled_from(["Linear", "Conv2d"]),
    dtype=DTYPES,
    iters=st.sampled_from([0, 1, 2]),
    eps=st.sampled_from([1e-12, 1e-4]),
    use_jit=USE_JIT,
    seed=st.integers(0, 3),
)
def test_spectral_norm(layer, dtype, iters, eps, use_jit, seed) -> None:
    """Init (15 iterations), 3 training steps with exact (u, v), inference, gradients, checkpoints."""
    cfg = em.WrapConfig(layer=layer, dtype=dtype, num_power_iterations=iters, eps=eps, steps=3, use_jit=use_jit,
                        seed=seed)
    accs = em.new_accs()
    em.measure_spectral_norm(cfg, accs)
    assert_all(accs, *ALL)


@given(
    layer=st.sampled_from(["Linear", "Conv2d"]),
    dtype=DTYPES,
    axis=st.sampled_from([0, 1, -1, None]),
    use_jit=USE_JIT,
    seed=st.integers(0, 3),
)
def test_weight_norm(layer, dtype, axis, use_jit, seed) -> None:
    """``g`` init (layer unchanged), outputs with random ``g``/``v``, gradients, checkpoints."""
    cfg = em.WrapConfig(layer=layer, dtype=dtype, axis=axis, use_jit=use_jit, seed=seed)
    accs = em.new_accs()
    em.measure_weight_norm(cfg, accs)
    assert_all(accs, *ALL)


# --------------------------------------------------- strict dtype promotion (tests/conformance/conftest.py)
#: A quarter of the profile's examples: equinox's own test configuration, jax_numpy_dtype_promotion="strict".
STRICT_EXAMPLES = settings(max_examples=max(2, settings().max_examples // 4))


def _norm_alone(cfg: em.NormConfig, impl: str):
    """One side alone (the measure compares errors itself; this is the fallback when it cannot)."""

    def run():
        ncls, nargs, fcls, fargs = em._build_norm(cfg)
        model = em.make(ncls, *nargs)[0] if impl == "native" else em.make(fcls, *fargs)[0]
        em._norm_apply(model, em.data((cfg.seed, 1), (cfg.batch, *cfg.shape), em.DTYPES[cfg.dtype]), None, False)

    return run


@pytest.mark.parametrize("layer", ["LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm"])
@STRICT_EXAMPLES
@given(data=st.data(), dtype=DTYPES, param_dtype=st.sampled_from([None, "same"]), use_jit=USE_JIT)
def test_norm_under_strict_promotion(layer: str, data, dtype, param_dtype, use_jit, strict_promotion) -> None:
    """Half-precision input under strict promotion: equinox upcasts in a "standard" scope; so must the facade."""
    cfg = em.NormConfig(
        layer=layer,
        shape=data.draw(st.sampled_from(SHAPES[layer]), label="shape"),
        groups=data.draw(st.sampled_from([1, 2, 4]), label="groups"),
        dtype=dtype,
        param_dtype=dtype if param_dtype == "same" else None,
        use_weight=data.draw(st.booleans(), label="use_weight"),
        use_bias=data.draw(st.booleans(), label="use_bias"),
        batch=3,
        use_jit=use_jit,
        seed=data.draw(st.integers(0, 3), label="seed"),
    )
    accs = em.new_accs()
    kind, _ = strict_promotion(lambda: em.measure_norm(cfg, accs), _norm_alone(cfg, "native"),
                               _norm_alone(cfg, "facade"))
    assert kind == "compared"  # equinox never raises here: the measure compares (and any error types) itself
    assert_all(accs, *ALL)


@STRICT_EXAMPLES
@given(mode=st.sampled_from(["ema", "batch"]), dtype=DTYPES, state_dtype=st.sampled_from([None, "same"]),
       use_jit=USE_JIT, seed=st.integers(0, 3))
def test_batch_norm_under_strict_promotion(mode, dtype, state_dtype, use_jit, seed, strict_promotion) -> None:
    cfg = em.BNConfig(channels=3, spatial=(2,), dtype=dtype, state_dtype=dtype if state_dtype == "same" else None,
                      mode=mode, steps=2, use_jit=use_jit, seed=seed)
    accs = em.new_accs()
    strict_promotion(lambda: em.measure_batch_norm(cfg, accs), lambda: None, lambda: None)
    mixed = dtype != "float32" and state_dtype is None  # bf16/f16 input, f32 state: native raises in both modes
    assert_all(accs, "state layout", "outputs", *(() if mixed else ALL))


@pytest.mark.parametrize("wrapper", ["SpectralNorm", "WeightNorm"])
@STRICT_EXAMPLES
@given(layer=st.sampled_from(["Linear", "Conv2d"]), dtype=DTYPES, iters=st.sampled_from([0, 1]),
       axis=st.sampled_from([0, -1, None]), use_jit=USE_JIT, seed=st.integers(0, 3))
def test_wrappers_under_strict_promotion(wrapper, layer, dtype, iters, axis, use_jit, seed, strict_promotion) -> None:
    if wrapper == "SpectralNorm":
        measure = em.measure_spectral_norm
        cfg = em.WrapConfig(layer=layer, dtype=dtype, num_power_iterations=iters, steps=1, use_jit=use_jit, seed=seed)
    else:
        measure, cfg = em.measure_weight_norm, em.WrapConfig(layer=layer, dtype=dtype, axis=axis, use_jit=use_jit,
                                                              seed=seed)
    accs = em.new_accs()
    strict_promotion(lambda: measure(cfg, accs), lambda: None, lambda: None)
    assert_all(accs, *ALL)
