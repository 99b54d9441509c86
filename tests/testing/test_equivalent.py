"""assert_equivalent across frameworks, on the conversion tests' architectures
(normbridge/conformance/conversion_models.py): a model, and its conversion by ``normbridge.convert`` into
another framework, are equivalent — or the report names what differs, in both models' own paths.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import normbridge
from normbridge.conformance import conversion_models as M
from normbridge.testing import assert_equivalent, check_equivalent


def _converted(arch: str, source: str, target: str):
    a = M.build(arch, source)
    pa, pb = M.probe(arch, source), M.probe(arch, target)
    b, _ = normbridge.convert(a, M.build(arch, target, seed=5), probe=(pa, pb))
    batches = [(pa, pb) if pa.shape != pb.shape else pa, (pa * 0.5, pb * 0.5) if pa.shape != pb.shape else pa * 0.5]
    if arch == "transformer":  # token ids
        batches = [pa, (pa + 1) % M.VOCAB]
    return a, b, batches


@pytest.mark.parametrize(
    ("arch", "source", "target"), [("mlp", "linen", "nnx"), ("transformer", "nnx", "equinox")], ids=str
)
def test_converted_model_is_equivalent_in_eval_and_training(arch, source, target):
    a, b, batches = _converted(arch, source, target)
    report = assert_equivalent(a, b, batches, train_steps=3)
    assert [c.title for c in report.checks] == [
        "models: parameters and statistics",
        "eval outputs",
        "gradients",
        "training step 1/3",
        "training step 2/3",
        "training step 3/3",
    ]
    assert len(report.checks[0].leaves) >= 10  # every layer's arrays were compared, not an empty pairing


def test_linen_nnx_pair_is_bitwise():
    a, b, batches = _converted("mlp", "linen", "nnx")
    assert assert_equivalent(a, b, batches, train_steps=3, rtol=0, atol=0)


@pytest.mark.parametrize("source", ["nnx", "treex"])
def test_equinox_ema_batchnorm_trains_differently(source):
    """Eval outputs and their gradients agree; training does not: Equinox's mode="ema" BatchNorm normalizes a
    training batch with the blend of batch and running statistics, flax's and treex's with the batch's."""
    a, b, batches = _converted("mlp", source, "equinox")
    assert assert_equivalent(a, b, batches)  # eval: values, outputs, gradients
    report = check_equivalent(a, b, batches, train_steps=3)
    assert [bool(c) for c in report.checks] == [True, True, True, False]
    assert report.failed.title == "training step 1/3"
    assert "train output" in report.failing_paths
    assert report.not_run == ("training step 2/3", "training step 3/3")


def test_failing_leaf_named_in_both_models_paths():
    a, b, batches = _converted("mlp", "linen", "nnx")
    b.bn.mean[...] = b.bn.mean[...].at[1].add(0.5)
    report = check_equivalent(a, b, batches)
    assert report.failing_paths == ("BatchNorm_0/mean",)  # linen's path; the NNX model calls it bn
    leaf = report.failed["BatchNorm_0/mean"]
    assert leaf.path_b == "bn/mean" and leaf.index == (1,) and leaf.value_a - leaf.value_b == pytest.approx(-0.5)
    with pytest.raises(AssertionError, match="bn/mean"):
        assert_equivalent(a, b, batches)


def test_same_framework_mapping_and_structure():
    class Two(nnx.Module):
        def __init__(self, rngs):
            self.first = nnx.Linear(3, 3, rngs=rngs)
            self.second = nnx.Linear(3, 2, rngs=rngs)

        def __call__(self, x):
            return self.second(self.first(x))

    class Renamed(nnx.Module):
        def __init__(self, rngs):
            self.one = nnx.Linear(3, 3, rngs=rngs)
            self.two = nnx.Linear(3, 2, rngs=rngs)

        def __call__(self, x):
            return self.two(self.one(x))

    a, b = Two(nnx.Rngs(0)), Renamed(nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)
    report = check_equivalent(a, b, x)
    assert set(report.failed.only_a) == {"first/kernel", "first/bias", "second/kernel", "second/bias"}
    assert assert_equivalent(a, b, [x, x * 2], mapping={"first": "one", "second": "two"}, train_steps=2)
