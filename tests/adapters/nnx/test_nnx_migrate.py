"""Linen → NNX whole-model checkpoint migration: a small ResNet-style model in native flax.linen,
migrated from a msgpack file and an Orbax directory into the NNX facade model; outputs equal in
eval mode and after 3 training steps; mismatched checkpoints fail naming every path, model untouched."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx, serialization

import normbridge.adapters.nnx as F
from normbridge.conformance.measure import diff
from normbridge.conformance.nnx_cases import flat_state

C = 8


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        h = nn.Conv(C, (3, 3))(x)
        h = nn.relu(nn.BatchNorm(use_running_average=not train)(h))
        h = nn.Conv(C, (3, 3))(h)
        h = nn.BatchNorm(use_running_average=not train)(h)
        h = nn.relu(h + x)
        h = nn.GroupNorm(num_groups=4)(h)
        h = h.mean(axis=(1, 2))
        h = nn.LayerNorm()(h)
        h = nn.relu(nn.SpectralNorm(nn.Dense(C))(h, update_stats=train))
        return nn.WeightNorm(nn.Dense(3))(h)


class NnxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(C, C, (3, 3), rngs=rngs)
        self.bn1 = F.BatchNorm(C, rngs=rngs)
        self.conv2 = nnx.Conv(C, C, (3, 3), rngs=rngs)
        self.bn2 = F.BatchNorm(C, rngs=rngs)
        self.gn = F.GroupNorm(C, num_groups=4, rngs=rngs)
        self.ln = F.LayerNorm(C, rngs=rngs)
        self.sn = F.SpectralNorm(nnx.Linear(C, C, rngs=rngs), rngs=rngs)
        self.wn = F.WeightNorm(nnx.Linear(C, 3, rngs=rngs), rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        h = nnx.relu(h + x)
        h = self.gn(h).mean(axis=(1, 2))
        h = nnx.relu(self.sn(self.ln(h)))
        return self.wn(h)


X = jax.random.normal(jax.random.key(1), (4, 6, 6, C)) * 2 + 0.5
TARGET = jax.random.normal(jax.random.key(2), (4, 3))
TX = optax.sgd(0.05)


@pytest.fixture(scope="module")
def linen_run():
    """Linen variables after init and one training step (non-trivial stats), eval outputs before/after 3 steps."""
    model = LinenNet()
    variables = model.init(jax.random.key(0), X, train=False)

    @jax.jit
    def train_step(params, batch_stats, opt_state):
        def loss_fn(p):
            y, upd = model.apply({"params": p, "batch_stats": batch_stats}, X, train=True, mutable=["batch_stats"])
            return jnp.mean((y - TARGET) ** 2), upd

        (_, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = TX.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), upd["batch_stats"], opt_state

    params, stats = variables["params"], variables["batch_stats"]
    params, stats, _ = train_step(params, stats, TX.init(params))  # a checkpoint with non-trivial stats
    ckpt = {"params": params, "batch_stats": stats}
    eval_before = model.apply(ckpt, X, train=False)
    opt_state = TX.init(params)
    for _ in range(3):
        params, stats, opt_state = train_step(params, stats, opt_state)
    eval_after = model.apply({"params": params, "batch_stats": stats}, X, train=False)
    return ckpt, eval_before, eval_after


def _train_nnx(model: NnxNet) -> None:
    model.train()
    opt = nnx.Optimizer(model, TX, wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        def loss_fn(m):
            return jnp.mean((m(X) - TARGET) ** 2)

        grads = nnx.grad(loss_fn)(model)
        opt.update(model, grads)

    for _ in range(3):
        step(model, opt)
    model.eval()


def _close(linen_out, nnx_out) -> None:
    # Project tolerance (float32: 1e-6 relative); measured bitwise on CPU with jax 0.10.2.
    d = diff(linen_out, nnx_out)
    assert d.within(), d.text()


@pytest.mark.parametrize("fmt", ["msgpack", "orbax"])
def test_migrated_model_matches_linen(fmt: str, linen_run, tmp_path) -> None:
    ckpt, eval_before, eval_after = linen_run
    if fmt == "msgpack":
        src = tmp_path / "ckpt.msgpack"
        src.write_bytes(serialization.msgpack_serialize(jax.device_get(ckpt)))
    else:
        src = tmp_path / "orbax"
        ck = ocp.StandardCheckpointer()
        ck.save(src, ckpt)
        ck.wait_until_finished()
    model = NnxNet(nnx.Rngs(42))
    F.migrate_linen_checkpoint(src, model, module=LinenNet(), probe=X)
    model.eval()
    _close(model(X), eval_before)
    _train_nnx(model)
    _close(model(X), eval_after)


def test_linen_layer_discovery(linen_run) -> None:
    layers = F.migrate.linen_layers(linen_run[0])
    kinds = {p: e["kind"] for p, e in layers.items()}
    assert kinds["Conv_0"] == "conv" and kinds["BatchNorm_1"] == "batch_norm"
    assert kinds["SpectralNorm_0"] == "spectral_norm" and layers["SpectralNorm_0"]["wrapped"] == "Dense_0"
    assert layers["WeightNorm_0"]["wrapped"] == "Dense_1"
    assert list(F.migrate.nnx_layers(NnxNet(nnx.Rngs(0)))) == ["conv1", "bn1", "conv2", "bn2", "gn", "ln", "sn", "wn"]


#: The same-shaped layers of the two models, mapped: without the linen module the checkpoint alone
#: cannot say which of two same-shaped BatchNorms (or Convs) is which.
SAME_SHAPED = {"conv1": "Conv_0", "conv2": "Conv_1", "bn1": "BatchNorm_0", "bn2": "BatchNorm_1"}


def _broken(ckpt, how: str):
    params = dict(ckpt["params"])
    stats = dict(ckpt["batch_stats"])
    if how == "missing":
        del params["Conv_1"]
    elif how == "extra":
        params["Dense_7"] = {"kernel": jnp.zeros((3, 3)), "bias": jnp.zeros((3,))}
        params["GroupNorm_1"] = dict(params["GroupNorm_0"])
    elif how == "shape":
        params["BatchNorm_0"] = {**params["BatchNorm_0"], "scale": jnp.ones((C + 1,))}
        params["Dense_1"] = {**params["Dense_1"], "kernel": jnp.ones((C, 4))}
    elif how == "dtype":
        stats["BatchNorm_1"] = {**stats["BatchNorm_1"], "var": stats["BatchNorm_1"]["var"].astype(jnp.bfloat16)}
        params["Conv_0"] = {**params["Conv_0"], "kernel": params["Conv_0"]["kernel"].astype(jnp.float16)}
    return {"params": params, "batch_stats": stats}


EXPECTED = {
    "missing": ["unmatched nnx layers ['conv2']"],
    "extra": ["Dense_7", "GroupNorm_1"],
    "shape": ["BatchNorm_0", "'scale' has shape (9,)", "Dense_1/kernel"],
    "dtype": ["BatchNorm_1", "'var' has dtype bfloat16", "Conv_0/kernel: dtype float16"],
}


@pytest.mark.parametrize("how", sorted(EXPECTED))
def test_mismatched_checkpoint_names_every_path_and_leaves_model_unchanged(how: str, linen_run) -> None:
    model = NnxNet(nnx.Rngs(3))
    before = {k: np.asarray(v) for k, (_, v) in flat_state(model).items()}
    mapping = {k: v for k, v in SAME_SHAPED.items() if not (how == "missing" and k == "conv2")}
    with pytest.raises(F.MigrationError) as err:
        F.migrate_linen_checkpoint(_broken(linen_run[0], how), model, mapping=mapping)
    for needle in EXPECTED[how]:
        assert needle in str(err.value), str(err.value)
    after = {k: np.asarray(v) for k, (_, v) in flat_state(model).items()}
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)


def test_explicit_mapping_overrides_order(linen_run) -> None:
    ckpt = linen_run[0]
    swapped = NnxNet(nnx.Rngs(0))
    # map bn1 <- BatchNorm_1 and bn2 <- BatchNorm_0: the values follow the mapping, not the order
    F.migrate_linen_checkpoint(ckpt, swapped, mapping={**SAME_SHAPED, "bn1": "BatchNorm_1", "bn2": "BatchNorm_0"})
    assert np.array_equal(swapped.bn1.mean.get_value(), ckpt["batch_stats"]["BatchNorm_1"]["mean"])
    assert np.array_equal(swapped.bn2.scale.get_value(), ckpt["params"]["BatchNorm_0"]["scale"])
    with pytest.raises(F.MigrationError, match="not a layer of the checkpoint"):
        F.migrate_linen_checkpoint(ckpt, NnxNet(nnx.Rngs(0)), mapping={**SAME_SHAPED, "bn1": "Nope_0"})


def test_ambiguous_custom_named_layer_needs_mapping(linen_run) -> None:
    ckpt = linen_run[0]
    params = dict(ckpt["params"])
    params["my_norm"] = params.pop("LayerNorm_0")  # {scale, bias} under a custom name: LN, GN or IN?
    renamed = {"params": params, "batch_stats": ckpt["batch_stats"]}
    with pytest.raises(F.MigrationError) as err:
        F.migrate_linen_checkpoint(renamed, NnxNet(nnx.Rngs(0)), mapping=SAME_SHAPED)
    assert "ambiguous linen layers" in str(err.value) and "'my_norm'" in str(err.value)
    assert "unmatched nnx layers ['ln']" in str(err.value)
    model = F.migrate_linen_checkpoint(renamed, NnxNet(nnx.Rngs(0)), mapping={**SAME_SHAPED, "ln": "my_norm"})
    assert np.array_equal(model.ln.scale.get_value(), ckpt["params"]["LayerNorm_0"]["scale"])


def test_with_module_and_probe_pairs_by_execution_and_verifies(linen_run) -> None:
    ckpt, eval_before, _ = linen_run
    model = NnxNet(nnx.Rngs(42))
    assert F.migrate_linen_checkpoint(ckpt, model, module=LinenNet(), probe=X) is model
    model.eval()
    assert np.array_equal(np.asarray(model(X)), np.asarray(eval_before))
    # a wrong mapping is caught by the verification, never loaded
    fresh = NnxNet(nnx.Rngs(3))
    before = {k: np.asarray(v) for k, (_, v) in flat_state(fresh).items()}
    with pytest.raises(F.MigrationError, match="outputs differ"):
        F.migrate_linen_checkpoint(
            ckpt, fresh, module=LinenNet(), probe=X, mapping={"bn1": "BatchNorm_1", "bn2": "BatchNorm_0"}
        )
    after = {k: np.asarray(v) for k, (_, v) in flat_state(fresh).items()}
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_order_pairing_without_module_is_deprecated_and_refuses_same_shaped_layers(linen_run) -> None:
    """The issue's trap: pairing same-shaped layers by order is a guess shape checks cannot catch.

    Without the linen module it is refused, listing every such group, and nothing is written; with
    the module and a probe the engine pairs by execution and verifies (test above)."""
    model = NnxNet(nnx.Rngs(0))
    before = {k: np.asarray(v) for k, (_, v) in flat_state(model).items()}
    with pytest.warns(DeprecationWarning, match="module= and probe="), pytest.raises(F.MigrationError) as err:
        F.migrate_linen_checkpoint(linen_run[0], model, mapping={"conv1": "Conv_0"})
    msg = str(err.value)
    assert "batch_norm: linen layers ['BatchNorm_0', 'BatchNorm_1'] have the same shapes" in msg
    assert "conv" not in msg.replace("batch_norm", "")  # the one remaining Conv pairs unambiguously
    after = {k: np.asarray(v) for k, (_, v) in flat_state(model).items()}
    assert all(np.array_equal(before[k], after[k]) for k in before)
    with pytest.warns(DeprecationWarning):
        F.migrate_linen_checkpoint(linen_run[0], NnxNet(nnx.Rngs(0)), mapping=SAME_SHAPED)  # fully mapped: fine
