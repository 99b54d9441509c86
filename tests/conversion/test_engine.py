"""normbridge.convert on whole models: every ordered framework pair of the test architectures
(conversion_models.py), native and facade layers; outputs compared with each framework's own API
(independently of the engine's verification); A → B → A bit-exact; refusals list every problem and
mutate nothing."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import normbridge
from normbridge.conformance import conversion_models as M
from normbridge.conformance.measure import tree_diff
from normbridge.conversion import CROSS_RTOL, ConversionReport, pair

FLAX = ("linen", "nnx", "treex")


@functools.cache
def model(arch: str, fw: str, flavor: str = "native", seed: int = 0):
    return M.build(arch, fw, flavor, seed)


state = M.arrays


def _bound(a: str, b: str, arch: str) -> float | None:
    """None: bitwise required (flax family, no attention); else relative bound."""
    return None if a in FLAX and b in FLAX and arch != "transformer" else CROSS_RTOL


def _check_outputs(arch, a, src, b, tgt):
    ya = M.outputs(a, src, M.probe(arch, a))
    yb = M.outputs(b, tgt, M.probe(arch, b))
    bound = _bound(a, b, arch)
    if bound is None:
        assert np.array_equal(ya, yb), np.abs(ya - yb).max()
    else:
        assert np.abs(ya - yb).max() <= bound * np.abs(ya).max(), np.abs(ya - yb).max()


CONVERTIBLE = [
    (arch, a, b)
    for arch, fws in M.ARCHS.items()
    for a in fws
    for b in fws
    if a != b and not (arch == "sngn" and a == "equinox")
]
#: flax SpectralNorm -> Equinox stores flax's iterated (u, v); flax re-iterates from there: one way
#: (the treex facade's SpectralNorm follows flax).
ONE_WAY = {("sngn", "linen", "equinox"), ("sngn", "nnx", "equinox"), ("sngn", "treex", "equinox")}


@functools.cache
def converted(arch: str, a: str, b: str, flavor_b: str = "native"):
    src = model(arch, a)
    like = model(arch, b, flavor_b, seed=5)
    return normbridge.convert(src, like, probe=(M.probe(arch, a), M.probe(arch, b)))


@pytest.mark.parametrize("arch,a,b", CONVERTIBLE)
def test_pair_converts_verified_and_round_trips(arch: str, a: str, b: str) -> None:
    src = model(arch, a)
    before = state(a, src)
    tgt, report = converted(arch, a, b)
    assert isinstance(report, ConversionReport) and report.verified, str(report)
    assert report.verification.bitwise or _bound(a, b, arch) is not None
    _check_outputs(arch, a, src, b, tgt)
    if (arch, a, b) in ONE_WAY:  # the way back is refused, never accepted wrongly
        with pytest.raises(normbridge.ConversionError, match="stored \\(u, v\\) at inference"):
            normbridge.convert(tgt, model(arch, a, seed=9), probe=(M.probe(arch, b), M.probe(arch, a)))
        return
    # A -> B -> A: into a differently initialised A, every array back bit for bit
    back, _ = normbridge.convert(tgt, model(arch, a, seed=9), probe=(M.probe(arch, b), M.probe(arch, a)))
    d = tree_diff(before, state(a, back))
    assert d.exact(), d.text()
    assert tree_diff(before, state(a, src)).exact()  # the source is untouched


FACADE = [(arch, fw) for arch, fws in M.ARCHS.items() for fw in fws if fw != "treex"]


@pytest.mark.parametrize("arch,fw", FACADE)
def test_native_to_facade_and_back_within_one_framework(arch: str, fw: str) -> None:
    src = model(arch, fw)
    x = M.probe(arch, fw)
    facade, report = normbridge.convert(src, model(arch, fw, "facade", seed=5), probe=x)
    assert report.verified and report.verification.bitwise, str(report)
    assert all(p.how == "name" for p in report.pairs if not p.how.startswith("wrapped"))
    back, report = normbridge.convert(facade, model(arch, fw, seed=9), probe=x)
    assert report.verification.bitwise
    assert tree_diff(state(fw, src), state(fw, back)).exact()


@pytest.mark.parametrize("b", ["linen", "nnx", "equinox"])
def test_facade_source_to_other_framework(b: str) -> None:
    arch = "resnet"
    src = model(arch, "nnx", "facade")
    tgt, report = normbridge.convert(src, model(arch, b, seed=5), probe=(M.probe(arch, "nnx"), M.probe(arch, b)))
    assert report.verified
    _check_outputs(arch, "nnx", src, b, tgt)


def test_linen_resnet_to_nnx_without_mapping_is_bitwise_and_paired_by_execution() -> None:
    tgt, report = converted("resnet", "linen", "nnx")
    assert report.verification.bitwise
    how = {p.source: (p.target, p.how) for p in report.pairs}
    assert how["conv_init"] == ("conv_init", "name") and how["bn_init"] == ("bn_init", "name")
    # nnx blocks define bn2 before bn1: pairing follows calls, not definitions
    assert how["ResNetBlock_0/BatchNorm_0"] == ("blocks/0/bn1", "execution order")
    assert how["ResNetBlock_1/BatchNorm_1"] == ("blocks/1/bn2", "execution order")
    src = model("resnet", "linen")
    assert np.array_equal(
        np.asarray(tgt.blocks[0].bn1.mean.get_value()),
        np.asarray(src[1]["batch_stats"]["ResNetBlock_0"]["BatchNorm_0"]["mean"]),
    )


def test_linen_resnet_to_treex_pairs_the_blocks_by_execution() -> None:
    """The treex ResNet's blocks also define bn2 before bn1; its attribute walk lists bn2 first."""
    tgt, report = converted("resnet", "linen", "treex")
    how = {p.source: (p.target, p.how) for p in report.pairs}
    assert how["bn_init"] == ("bn_init", "name")
    assert how["ResNetBlock_0/BatchNorm_0"] == ("blocks/0/bn1", "execution order")
    assert how["ResNetBlock_1/BatchNorm_1"] == ("blocks/1/bn2", "execution order")
    src = model("resnet", "linen")
    np.testing.assert_array_equal(tgt.blocks[1].bn2.var, src[1]["batch_stats"]["ResNetBlock_1"]["BatchNorm_1"]["var"])


def test_partial_mapping_of_the_stem_is_still_correct() -> None:
    """The issue's trap: mapping only conv_init must not shift the BatchNorms."""
    src, like = model("resnet", "linen"), model("resnet", "nnx", seed=5)
    tgt, report = normbridge.convert(src, like, probe=M.probe("resnet", "linen"), mapping={"conv_init": "conv_init"})
    assert report.verification.bitwise
    _check_outputs("resnet", "linen", src, "nnx", tgt)


def test_a_wrong_mapping_is_refused_by_verification_never_accepted() -> None:
    src, like = model("resnet", "linen"), model("resnet", "nnx", seed=5)
    wrong = {"bn_init": "blocks/0/bn1", "ResNetBlock_0/BatchNorm_0": "bn_init"}
    with pytest.raises(normbridge.ConversionError) as err:
        normbridge.convert(src, like, probe=M.probe("resnet", "linen"), mapping=wrong)
    assert "outputs differ" in str(err.value) and err.value.measured.max_abs > 0
    assert tree_diff(state("nnx", model("resnet", "nnx", seed=5)), state("nnx", like)).exact()


def test_transformer_with_linen_attention_converts_to_nnx_and_equinox() -> None:
    for b in ("nnx", "equinox"):
        _, report = converted("transformer", "linen", b)
        kinds = {p.kind for p in report.pairs}
        assert {"attention", "embed", "layer_norm", "rms_norm", "dense", "param"} <= kinds
        assert report.verified, str(report)


@pytest.mark.parametrize("b,sn", [("linen", "SpectralNorm_0"), ("treex", "sn")])
def test_equinox_spectral_norm_not_converged_is_refused_by_verification_with_the_reason(b: str, sn: str) -> None:
    """treex's SpectralNorm follows flax (power iteration from ``u`` on every call): refused like linen/NNX."""
    src, like = model("sngn", "equinox"), model("sngn", b, seed=5)
    before = state(b, like)
    with pytest.raises(normbridge.ConversionError) as err:
        normbridge.convert(src, like, probe=(M.probe("sngn", "equinox"), M.probe("sngn", b)))
    assert "outputs differ" in str(err.value) and "stored (u, v) at inference" in str(err.value)
    assert err.value.measured.max_rel > 1e-2  # measured, far beyond the bound
    assert err.value.mapping["sn"] == sn
    assert tree_diff(before, state(b, like)).exact()


def test_flax_spectral_and_weight_norm_to_equinox_record_what_was_done() -> None:
    _, report = converted("sngn", "linen", "equinox")
    how = {p.source: p.transform for p in report.pairs}
    assert any("power iteration" in t for t in how["SpectralNorm_0"]) and report.verified


# --------------------------------------------------------------------------- refusals


class Identity(nnx.Module):
    """A layer kind normbridge does not know (it holds a BatchStat), computing the identity."""

    def __init__(self):
        self.count = nnx.BatchStat(jnp.zeros((), jnp.int32))

    def __call__(self, x):
        return x


class NnxMlpVariant(nnx.Module):
    def __init__(self, how: str, rngs: nnx.Rngs):
        c = M.C + 1 if how == "channels" else M.C
        self.dense1 = nnx.Linear(6, M.C, rngs=rngs)
        self.bn = nnx.BatchNorm(M.C, momentum=0.9, rngs=rngs)
        self.ln = nnx.LayerNorm(M.C, epsilon=1e-3 if how == "eps" else 1e-6, rngs=rngs)
        self.dense2 = nnx.Linear(M.C, c, rngs=rngs)
        self.rms = None if how == "missing" else nnx.RMSNorm(c, rngs=rngs)
        self.extra = Identity() if how == "unknown" else None
        self.head = nnx.Linear(c, M.CLASSES, rngs=rngs)

    def __call__(self, x):
        x = self.ln(nnx.relu(self.bn(self.dense1(x))))
        x = self.dense2(x)
        x = x if self.rms is None else self.rms(x)
        x = x if self.extra is None else self.extra(x)
        return self.head(x)


EXPECTED = {
    "missing": ["source 'RMSNorm_0'", "not paired"],
    "channels": ["'Dense_1'", "'dense2'", "parameter shapes differ", "'RMSNorm_0'", "'rms'", "'Dense_2'", "'head'"],
    "eps": ["like 'ln': epsilon is 0.001 but the source 'LayerNorm_0' has 1e-06", "epsilon=1e-06"],
    "unknown": ["like 'extra/count'", "layer kind unknown"],
}


@pytest.mark.parametrize("how", sorted(EXPECTED))
def test_mismatched_target_is_refused_with_every_problem_and_nothing_mutated(how: str) -> None:
    src = model("mlp", "linen")
    like = NnxMlpVariant(how, nnx.Rngs(3))
    before_src, before_like = state("linen", src), state("nnx", like)
    with pytest.raises(normbridge.ConversionError) as err:
        normbridge.convert(src, like, probe=M.probe("mlp", "linen"))
    text = str(err.value)
    for needle in EXPECTED[how]:
        assert needle in text, text
    assert all(p in text for p in err.value.problems)
    assert tree_diff(before_src, state("linen", src)).exact()
    assert tree_diff(before_like, state("nnx", like)).exact()


def test_unknown_layer_skipped_explicitly_and_the_rest_converts() -> None:
    src = model("mlp", "linen")
    tgt, report = normbridge.convert(
        src, NnxMlpVariant("unknown", nnx.Rngs(3)), probe=M.probe("mlp", "linen"), mapping={"extra/count": None}
    )
    assert report.verification.bitwise
    _check_outputs("mlp", "linen", src, "nnx", tgt)


def test_keep_like_converts_and_records_the_measured_change() -> None:
    src = model("mlp", "linen")
    tgt, report = normbridge.convert(
        src, NnxMlpVariant("eps", nnx.Rngs(3)), probe=M.probe("mlp", "linen"), on_mismatch="keep_like"
    )
    assert tgt.ln.epsilon == 1e-3
    assert any("kept as like's 0.001" in n for n in report.notes)
    assert not report.verification.bitwise and report.verification.max_abs > 0


def test_without_probe_equal_names_pair_and_linen_asks_for_a_probe() -> None:
    tgt, report = normbridge.convert(model("resnet", "nnx"), model("resnet", "equinox", seed=5), verify=False)
    assert {p.how for p in report.pairs} == {"name"} and not report.verified
    _check_outputs("resnet", "nnx", model("resnet", "nnx"), "equinox", tgt)
    with pytest.raises(normbridge.ConversionError) as err:
        normbridge.convert(model("mlp", "nnx"), model("mlp", "linen", seed=5), verify=False)
    assert "a linen model's layers exist only while it runs: pass probe=" in str(err.value)


@pytest.mark.parametrize("arch,a,b", [("mlp", "linen", "nnx"), ("resnet", "linen", "equinox")])
def test_without_probe_a_probe_is_built_from_parameter_shapes(arch: str, a: str, b: str) -> None:
    """No probe: built from the first layers' parameter shapes (NnxResNet/EqxResNet define their Linear head
    first: its (N, 4) input does not run, conv_init's image does); the outputs are then checked on the test's
    own inputs, with each framework's API."""
    src = model(arch, a)
    tgt, report = normbridge.convert(src, model(arch, b, seed=5))
    assert report.verified, str(report)
    want = {
        "mlp": "probe built from parameter shapes: (2, 6) float32 (from like 'dense1' (dense))",
        "resnet": "probe built from parameter shapes: (2, 8, 8, 3) float32 (from like 'conv_init' (conv)); "
        "like gets it channels first: (2, 3, 8, 8)",
    }[arch]
    assert want in report.notes and want in str(report)
    _check_outputs(arch, a, src, b, tgt)


def test_one_probe_for_two_layouts_is_given_to_equinox_channels_first() -> None:
    src = model("resnet", "linen")
    tgt, report = normbridge.convert(src, model("resnet", "equinox", seed=5), probe=M.probe("resnet", "linen"))
    assert report.verified
    assert "probe for like (equinox): the given probe (2, 6, 6, 3) with channels last -> first" in str(report)
    _check_outputs("resnet", "linen", src, "equinox", tgt)


def test_no_probe_that_runs_is_refused_listing_what_was_tried() -> None:
    module = NeedsMask()
    variables = module.init(jax.random.key(0), M.features(), jnp.ones((1, 3)))
    with pytest.raises(normbridge.ConversionError) as err:
        normbridge.convert((module, variables), (module, variables))
    text = str(err.value)
    assert "verify=True needs an input: pass probe=" in text
    assert "tried (2, 6) float32 (from source 'Dense_0' (dense)): source: TypeError" in text


def test_unverified_conversion_says_so() -> None:
    _, report = normbridge.convert(model("mlp", "nnx"), model("mlp", "nnx", "facade", seed=5), verify=False)
    assert report.verification is None and not report.verified
    assert "unverified" in str(report) and "unverified" in json.loads(report.to_json())["notes"][0]


def test_report_and_pair_api() -> None:
    _, report = converted("resnet", "linen", "equinox")
    data = json.loads(report.to_json())
    assert data["source_framework"] == "linen" and data["target_framework"] == "equinox" and data["verified"]
    conv = next(p for p in data["pairs"] if p["source"] == "conv_init")
    assert conv["target"] == "conv_init" and any("HWIO" in t for t in conv["transform"])
    assert "conv_init" in str(report) and "passed" in str(report)
    pairs = pair(
        model("resnet", "linen"),
        model("resnet", "equinox", seed=5),
        probe=(M.probe("resnet", "linen"), M.probe("resnet", "equinox")),
    )
    assert [(p.source, p.target, p.how) for p in pairs] == [(p.source, p.target, p.how) for p in report.pairs]


def test_abstract_like_from_eval_shape() -> None:
    src = model("mlp", "linen")
    abstract = nnx.eval_shape(lambda: M.NnxMlp(nnx, nnx.Rngs(0)))
    tgt, report = normbridge.convert(src, abstract, probe=M.probe("mlp", "linen"))
    assert report.verification.bitwise
    _check_outputs("mlp", "linen", src, "nnx", tgt)


def test_user_call_hooks() -> None:
    src = model("mlp", "linen")

    def linen_fn(m, x, train):
        module, variables = m
        return module.apply(variables, x, train=train)

    _, report = normbridge.convert(
        src, model("mlp", "nnx", seed=5), probe=M.probe("mlp", "linen"), call=(linen_fn, None)
    )
    assert report.verification.bitwise


def test_import_normbridge_imports_no_framework() -> None:
    code = (
        "import sys, normbridge; assert not [m for m in sys.modules if m.split('.')[0] in ('flax', 'equinox', 'jax')]"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_linen_needs_a_module_and_variables() -> None:
    with pytest.raises(normbridge.ConversionError, match="linen model is passed as"):
        normbridge.convert(nn.Dense(3), model("mlp", "nnx"))


def test_verify_train_compares_train_outputs_updated_statistics_and_gradients() -> None:
    src = model("resnet", "linen")
    tgt, report = normbridge.convert(
        src, model("resnet", "nnx", seed=5), probe=M.probe("resnet", "linen"), verify="train"
    )
    assert report.train.passed and report.train.bitwise and report.verified
    assert report.gradients.passed and report.gradients.bitwise
    # every parameter array of the 11 paired layers (9 convs/BNs/Dense with 2 arrays, 4 convs without bias)
    assert "train gradients (18 parameter arrays of 11 layers)" in str(report)
    assert "train (outputs, updated statistics)" in str(report)
    assert json.loads(report.to_json())["gradients"]["bitwise"] is True
    # the claim, measured with each framework's own API: linen's and NNX's train-mode gradients are bitwise equal
    x = M.probe("resnet", "linen")
    module, variables = src
    c = jax.random.normal(jax.random.key(3), (M.N, M.CLASSES))

    def linen_loss(params):
        y, _ = module.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(y * c)

    def nnx_loss(m):
        return jnp.sum(m(x) * c)

    g_linen = jax.grad(linen_loss)(variables["params"])
    m = nnx.clone(tgt)
    m.train()
    g_nnx = nnx.grad(nnx_loss)(m)
    assert np.array_equal(g_linen["conv_init"]["kernel"], g_nnx["conv_init"]["kernel"].get_value())
    assert np.array_equal(
        g_linen["ResNetBlock_1"]["BatchNorm_0"]["scale"], g_nnx["blocks"][1]["bn1"]["scale"].get_value()
    )


class NnxMlpStopGradient(nnx.Module):
    """NnxMlp's forward pass, but no gradient flows into dense1: eval and train outputs are the same."""

    def __init__(self, rngs: nnx.Rngs):
        self.dense1 = nnx.Linear(6, M.C, rngs=rngs)
        self.bn = nnx.BatchNorm(M.C, momentum=0.9, rngs=rngs)
        self.ln = nnx.LayerNorm(M.C, rngs=rngs)
        self.dense2 = nnx.Linear(M.C, M.C, rngs=rngs)
        self.rms = nnx.RMSNorm(M.C, rngs=rngs)
        self.head = nnx.Linear(M.C, M.CLASSES, rngs=rngs)

    def __call__(self, x):
        x = self.ln(nnx.relu(self.bn(jax.lax.stop_gradient(self.dense1(x)))))
        return self.head(self.rms(self.dense2(x)))


def test_verify_train_refuses_a_target_whose_gradients_differ() -> None:
    """Outputs (eval and train) and statistics agree bit for bit; only the gradients show the difference."""
    src = model("mlp", "linen")
    _, report = normbridge.convert(src, NnxMlpStopGradient(nnx.Rngs(3)), probe=M.probe("mlp", "linen"))
    assert report.verification.bitwise  # eval mode cannot see it
    with pytest.raises(normbridge.ConversionError) as err:
        normbridge.convert(src, NnxMlpStopGradient(nnx.Rngs(3)), probe=M.probe("mlp", "linen"), verify="train")
    text = str(err.value)
    assert "in train mode the gradients differ" in text and "train gradients" in text
    measured = err.value.measured
    assert not measured.passed and measured.max_abs > 1e-3 and measured.max_rel == 1.0  # target's gradient is 0
    assert set(measured.worst) <= {"dense1/kernel", "dense1/bias"} and "dense1/kernel" in measured.worst


def test_verify_train_notes_an_array_only_one_framework_differentiates() -> None:
    """Native nnx.WeightNorm keeps its scales as plain arrays (not nnx.Param: nnx.grad skips them), linen's are
    params: that gradient exists on one side only and is noted; every other gradient is compared, bitwise."""
    like = model("sngn", "nnx", seed=5)
    assert not isinstance(like.wn.scales[("kernel",)], nnx.Variable)  # measured on flax 0.12.8
    _, report = normbridge.convert(model("sngn", "linen"), like, probe=M.probe("sngn", "linen"), verify="train")
    assert report.verified and report.gradients.bitwise and "8 parameter arrays of 4 layers" in report.gradients.mode
    note = "gradient of wn/weight_scales/kernel not compared: a parameter of the source (linen) but not of like (nnx)"
    assert any(note in n for n in report.notes), report.notes


def _linen_hook(returns_updates: bool):
    def hook(m, x, train):
        module, variables = m
        if not train:
            return module.apply(variables, x, train=False)
        y, updates = module.apply(variables, x, train=True, mutable=["batch_stats"])
        return (y, updates) if returns_updates else y

    return hook


def test_verify_train_with_call_hooks() -> None:
    """Hooks run with train=True; a linen hook that returns (y, updates) has its statistics compared too."""
    src, x = model("mlp", "linen"), M.probe("mlp", "linen")
    nnx_hook = lambda m, x, train: m(x)  # noqa: E731 (NNX: the engine sets .train()/.eval())
    _, report = normbridge.convert(
        src, model("mlp", "nnx", seed=5), probe=x, verify="train", call=(_linen_hook(True), nnx_hook)
    )
    assert report.verified and report.train.mode == "train (outputs, updated statistics)" and report.train.bitwise
    assert report.gradients.bitwise and "11 parameter arrays" in report.gradients.mode
    _, report = normbridge.convert(
        src, model("mlp", "nnx", seed=5), probe=x, verify="train", call=(_linen_hook(False), None)
    )
    assert report.verified and report.train.mode == "train (outputs)" and report.gradients.bitwise
    assert any("updated statistics not compared: the source call hook returns no state" in n for n in report.notes)


def test_verify_train_refuses_flax_to_equinox_batch_norm_and_says_why() -> None:
    """Equinox mode="ema" normalises with running statistics in training: eval converts, train does not."""
    with pytest.raises(normbridge.ConversionError) as err:
        normbridge.convert(
            model("mlp", "linen"), model("mlp", "equinox", seed=5), probe=M.probe("mlp", "linen"), verify="train"
        )
    assert "in train mode the converted model differs" in str(err.value)
    assert "normalises with its running statistics in training" in str(err.value)
    assert err.value.measured.max_abs > 1e-2


def test_mapping_patterns_and_explicit_skips() -> None:
    src, like = model("resnet", "linen"), model("resnet", "nnx", seed=5)
    mapping = {
        r"re:ResNetBlock_(\d+)/BatchNorm_0": r"blocks/\1/bn1",
        r"re:ResNetBlock_(\d+)/BatchNorm_1": r"blocks/\1/bn2",
    }
    _, report = normbridge.convert(src, like, probe=M.probe("resnet", "linen"), mapping=mapping)
    how = {p.source: (p.target, p.how) for p in report.pairs}
    assert how["ResNetBlock_1/BatchNorm_0"] == ("blocks/1/bn1", "mapping") and report.verification.bitwise
    with pytest.raises(normbridge.ConversionError, match="matches no source layer"):
        normbridge.convert(src, like, probe=M.probe("resnet", "linen"), mapping={"re:nope_.*": "x"})


def test_other_result_changing_options_are_refused() -> None:
    src = model("mlp", "linen")
    like = M.NnxMlp(nnx, nnx.Rngs(0))
    like.ln.use_fast_variance = not like.ln.use_fast_variance
    with pytest.raises(normbridge.ConversionError, match="use_fast_variance is") as err:
        normbridge.convert(src, like, probe=M.probe("mlp", "linen"))
    assert "use_fast_variance=" in str(err.value)


@pytest.mark.parametrize("b", ["linen", "equinox"])
def test_abstract_linen_and_equinox_like(b: str) -> None:
    src = model("mlp", "nnx")
    x = M.probe("mlp", b)
    if b == "linen":
        module = M.LinenMlp(nn)
        like = (module, jax.eval_shape(lambda: module.init(jax.random.key(0), x)))
    else:
        like = eqx.filter_eval_shape(lambda: eqx.nn.make_with_state(M.EqxMlp)(eqx.nn, jax.random.key(0)))
    tgt, report = normbridge.convert(src, like, probe=x)
    assert report.verified, str(report)
    _check_outputs("mlp", "nnx", src, b, tgt)


def test_a_failing_call_hook_is_a_conversion_error_naming_it() -> None:
    def broken(m, x, train):
        raise RuntimeError("user code broke")

    with pytest.raises(normbridge.ConversionError, match="RuntimeError: user code broke") as err:
        normbridge.convert(
            model("mlp", "nnx"), model("mlp", "nnx", "facade", seed=5), probe=M.probe("mlp", "nnx"), call=(None, broken)
        )
    assert "pass call=" not in str(err.value)  # a hook was given: no hint to give one


class LinenSetupOrder(nn.Module):
    """Two same-shaped BatchNorms defined (setup) in the opposite order to their calls, names unlike NNX's."""

    def setup(self):
        self.z_dense = nn.Dense(M.C)
        self.norm_late = nn.BatchNorm(use_running_average=True)
        self.norm_early = nn.BatchNorm(use_running_average=True)

    def __call__(self, x):
        return self.norm_late(nn.relu(self.norm_early(self.z_dense(x))))


class NnxCallOrder(nnx.Module):
    def __init__(self, rngs):
        self.b = nnx.BatchNorm(M.C, rngs=rngs)
        self.a = nnx.BatchNorm(M.C, rngs=rngs)
        self.lin = nnx.Linear(6, M.C, rngs=rngs)

    def __call__(self, x):
        return self.b(nnx.relu(self.a(self.lin(x))))


def test_same_shaped_layers_defined_out_of_call_order_pair_by_calls() -> None:
    x = M.features()
    module = LinenSetupOrder()
    variables = M._randomize_tree(module.init(jax.random.key(0), x), 1, M._is_var)
    tgt, report = normbridge.convert((module, variables), NnxCallOrder(nnx.Rngs(0)), probe=x)
    how = {p.source: p.target for p in report.pairs}
    assert how == {"z_dense": "lin", "norm_early": "a", "norm_late": "b"}
    tgt.eval()
    assert np.array_equal(np.asarray(tgt(x)), np.asarray(module.apply(variables, x)))


class NeedsMask(nn.Module):
    @nn.compact
    def __call__(self, x, mask):
        return nn.Dense(3)(x) * mask


def test_a_model_not_callable_the_default_way_asks_for_a_call_hook() -> None:
    x = M.features()
    module = NeedsMask()
    variables = module.init(jax.random.key(0), x, jnp.ones((1, 3)))
    with pytest.raises(normbridge.ConversionError, match=r"pass call=\(source_fn, like_fn\)"):
        normbridge.convert((module, variables), (module, variables), probe=x)
    hook = lambda m, x, train: m[0].apply(m[1], x, jnp.ones((1, 3)))  # noqa: E731
    _, report = normbridge.convert((module, variables), (module, variables), probe=x, call=(hook, hook))
    assert report.verification.bitwise


def _treex_dropout_mlp(seed: int):
    from normbridge.adapters import treex as tx

    return tx.Sequential(tx.Linear(5), tx.Dropout(0.5), jax.nn.relu, tx.Linear(3)).init(seed, M.features())


class NnxDropoutMlp(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.lin1 = nnx.Linear(6, 5, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.lin2 = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x):
        return self.lin2(jax.nn.relu(self.drop(self.lin1(x))))


def _equinox_dropout_mlp(seed: int):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return eqx.nn.Sequential(
        [eqx.nn.Linear(6, 5, key=k1), eqx.nn.Dropout(0.5), eqx.nn.Lambda(jax.nn.relu), eqx.nn.Linear(5, 3, key=k2)]
    )


def _rng_values(fw: str, obj) -> list[np.ndarray]:
    if fw == "treex":
        return [np.asarray(obj.layers[1].next_key.key)]
    if fw == "nnx":
        rngs = obj.drop.rngs
        return [np.asarray(jax.random.key_data(rngs.key.get_value())), np.asarray(rngs.count.get_value())]
    return []


@pytest.mark.parametrize("b", ["treex", "nnx", "equinox"])
def test_dropout_rng_state_is_stateless_for_pairing_and_reported(b: str) -> None:
    """A treex Dropout's key (``Rng`` leaf of its ``KeySeq``) and an NNX Dropout's ``rngs`` are RNG state: no
    mapping needed, never converted (the target keeps like's), listed in ``report.skipped_state``; the
    target's eval outputs, computed with the target framework's own API, are the source's."""
    x = M.features()
    src = _treex_dropout_mlp(0)
    like = {"treex": lambda: _treex_dropout_mlp(3), "nnx": lambda: NnxDropoutMlp(nnx.Rngs(5)),
            "equinox": lambda: _equinox_dropout_mlp(5)}[b]()  # fmt: skip
    src_keys, like_keys = _rng_values("treex", src), _rng_values(b, like)
    tgt, report = normbridge.convert(src, like, probe=x)
    assert report.verified, str(report)
    assert "source layers/1/next_key/key" in report.skipped_state and "source layers/1" in report.skipped
    want_like = {"treex": ["like layers/1/next_key/key"], "nnx": ["like drop/rngs/count", "like drop/rngs/key"],
                 "equinox": []}[b]  # fmt: skip
    assert [p for p in report.skipped_state if p.startswith("like")] == want_like
    assert len(report.pairs) == 2 and {p.kind for p in report.pairs} == {"dense"}
    y_src = np.asarray(src.eval()(x))
    if b == "treex":
        y_tgt = np.asarray(tgt.eval()(x))
    elif b == "nnx":
        tgt.eval()
        y_tgt = np.asarray(tgt(x))
    else:
        y_tgt = np.asarray(jax.vmap(eqx.nn.inference_mode(tgt))(x))
    bound = 0.0 if b != "equinox" else CROSS_RTOL * np.abs(y_src).max()
    assert np.abs(y_tgt - y_src).max() <= bound
    for kept, was in zip(_rng_values(b, tgt), like_keys):  # like's RNG state, not the source's
        np.testing.assert_array_equal(kept, was)
    for now, was in zip(_rng_values("treex", src), src_keys):
        np.testing.assert_array_equal(now, was)
    # and back into treex: the source's RNG state is again skipped, like's kept
    back, report = normbridge.convert(tgt, _treex_dropout_mlp(9), probe=x)
    assert report.verified and "like layers/1/next_key/key" in report.skipped_state
    np.testing.assert_array_equal(back.layers[1].next_key.key, _treex_dropout_mlp(9).layers[1].next_key.key)
