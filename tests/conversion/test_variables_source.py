"""``normbridge.convert`` from linen variables without their module (a checkpoint with no architecture):
paired by mapping and names only, kinds from ``like``, unverifiable — refused with ``verify=True``,
unverified and saying why with ``verify=False``. Outputs are computed with each framework's own API."""

from __future__ import annotations

import flax
import numpy as np
import pytest

import normbridge
from normbridge.conformance import conversion_models as M

#: linen's construction-order names -> NnxTransformer's attributes; pos_embedding pairs by name.
TRANSFORMER = {
    "Embed_0": "embed",
    "LayerNorm_0": "ln1",
    "MultiHeadDotProductAttention_0": "attn",
    "LayerNorm_1": "ln2",
    "Dense_0": "down",
    "Dense_1": "up",
    "RMSNorm_0": "final",
}

#: linen ResNet scopes -> EqxResNet's attributes (the stem pairs by name).
RESNET_TO_EQUINOX = {
    f"ResNetBlock_{i}/{linen}": f"blocks/{i}/{ours}"
    for i in range(2)
    for ours, linen in (("conv1", "Conv_0"), ("bn1", "BatchNorm_0"), ("conv2", "Conv_1"), ("bn2", "BatchNorm_1"))
} | {"Dense_0": "head"}


@pytest.fixture(scope="module")
def transformer():
    module, variables = M.build("transformer", "linen")
    x = M.probe("transformer", "nnx")
    return variables, M.outputs("linen", (module, variables), x), x


def test_frozen_variables_convert_to_nnx_bitwise_unverified(transformer) -> None:
    variables, want, x = transformer
    like = M.build("transformer", "nnx", seed=5)
    before = M.arrays("nnx", like)
    target, report = normbridge.convert(flax.core.freeze(variables), like, mapping=TRANSFORMER, verify=False)
    assert np.array_equal(M.outputs("nnx", target, x), want)
    kinds = {p.source: (p.target, p.kind, p.how) for p in report.pairs}
    assert kinds["MultiHeadDotProductAttention_0"] == ("attn", "attention", "mapping")
    assert kinds["pos_embedding"] == ("pos_embedding", "param", "name")
    assert report.verification is None and not report.verified
    assert "unverified: the source is variables without a module (pass (module, variables) to verify)" in str(report)
    after = M.arrays("nnx", like)
    assert all(np.array_equal(before[k], after[k]) for k in before)  # like is not mutated


@pytest.mark.parametrize("verify", [True, "train"])
def test_verify_cannot_pass_silently(transformer, verify) -> None:
    variables, _, x = transformer
    with pytest.raises(normbridge.ConversionError) as err:
        normbridge.convert(variables, M.build("transformer", "nnx"), mapping=TRANSFORMER, probe=x, verify=verify)
    assert err.value.problems == [
        f"verify={verify!r} runs both models, but the source is variables without a module: pass (module, "
        "variables) to verify, or verify=False for an unverified conversion"
    ]


def test_unpaired_and_misfitting_scopes_are_each_listed(transformer) -> None:
    variables, _, _ = transformer
    mapping = {**TRANSFORMER, "Dense_0": "up", "Dense_1": None, "LayerNorm_1": "final"}  # 'down', 'ln2' unmapped
    with pytest.raises(normbridge.ConversionError) as err:
        normbridge.convert(variables, M.build("transformer", "nnx"), mapping=mapping, verify=False)
    assert err.value.problems == [
        "source 'LayerNorm_1' (variables) -> like 'final' (nnx RMSNorm): to_canonical(rms_norm): unexpected "
        "entries ['params/bias'] [paired by mapping]",
        "source 'Dense_0' (linen variables) -> like 'up' (nnx Linear): parameter shapes differ: source "
        "{'bias': (8,), 'kernel': (16, 8)}, like {'kernel': (8, 16), 'bias': (16,)} [paired by mapping]",
        "like 'down' (Linear: dense {'kernel': (16, 8), 'bias': (8,)}) is not paired with any layer of the "
        "source; map it, or pass (module, variables) and probe= to pair by execution order",
        "like 'ln2' (LayerNorm: layer_norm {'scale': (8,), 'bias': (8,)}) is not paired with any layer of the "
        "source; map it, or pass (module, variables) and probe= to pair by execution order",
    ]


def test_like_must_be_a_model(transformer) -> None:
    variables, _, _ = transformer
    with pytest.raises(normbridge.ConversionError, match="like gives the target's architecture"):
        normbridge.convert(variables, variables, verify=False)


def test_a_probe_given_with_bare_variables_is_not_adapted_to_a_layout() -> None:
    """Bare variables cannot run, so a probe given with ``verify=False`` is not tried on them in another layout
    (which used to refuse a linen -> Equinox conversion that needs no probe at all)."""
    _, variables = M.build("resnet", "linen")
    like = M.build("resnet", "equinox", seed=5)
    _, report = normbridge.convert(
        variables, like, mapping=RESNET_TO_EQUINOX, probe=M.probe("resnet", "linen"), verify=False
    )
    assert not report.verified and "unverified: the source is variables without a module" in str(report)
