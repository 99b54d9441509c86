"""Linen → NNX whole-model checkpoint migration: a small ResNet-style model in native flax.linen,
migrated from a msgpack file and an Orbax directory into the NNX facade model; outputs equal in
eval mode and after 3 training steps; mismatched checkpoints fail naming every path, model untouched.
Without the linen module (deprecated) the checkpoint is paired by mapping and names only, never by order."""

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
from normbridge.conformance import conversion_models as M
from normbridge.conformance.measure import diff
from normbridge.conformance.nnx_cases import flat_state
from normbridge.conversion import pair

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


#: Every layer of the two models, mapped ``{nnx path: linen path}``: without the linen module only
#: mapping and equal names pair, and NnxNet's attribute names are not linen's.
FULL = {
    "conv1": "Conv_0",
    "conv2": "Conv_1",
    "bn1": "BatchNorm_0",
    "bn2": "BatchNorm_1",
    "gn": "GroupNorm_0",
    "ln": "LayerNorm_0",
    "sn": "SpectralNorm_0",
    "wn": "WeightNorm_0",
}


def _state(model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, (_, v) in flat_state(model).items()}


def _unchanged(before: dict[str, np.ndarray], model) -> bool:
    after = _state(model)
    return before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)


def test_variables_alone_take_each_layer_kind_from_the_nnx_layer(linen_run) -> None:
    """(Was: linen_layers/nnx_layers discovery by linen auto-names and definition order, removed.) The
    engine pairs variables without their module by mapping; kinds are the NNX layers', and the layers a
    SpectralNorm/WeightNorm wraps follow their wrapper (the scope its entries name)."""
    pairs = pair(linen_run[0], NnxNet(nnx.Rngs(0)), mapping={v: k for k, v in FULL.items()})
    got = {(p.source, p.target, p.kind, p.how) for p in pairs}
    assert ("SpectralNorm_0", "sn", "spectral_norm", "mapping") in got
    assert ("Dense_0", "sn/layer_instance", "dense", "wrapped by SpectralNorm_0") in got
    assert ("Dense_1", "wn/layer_instance", "dense", "wrapped by WeightNorm_0") in got
    assert ("BatchNorm_1", "bn2", "batch_norm", "mapping") in got and len(got) == 10


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
    elif how == "no_stats":
        return {"params": params}
    return {"params": params, "batch_stats": stats}


EXPECTED = {
    "missing": ["like 'conv2' (Conv: conv {'kernel': (3, 3, 8, 8), 'bias': (8,)}) is not paired"],
    "extra": ["source 'Dense_7' (variables {'params/bias': (3,), 'params/kernel': (3, 3)}) is not paired",
              "source 'GroupNorm_1'"],
    "shape": ["'BatchNorm_0' (linen variables) -> like 'bn1' (nnx BatchNorm): scale has 9 features in the source",
              "wrapped layer 'Dense_1' -> 'wn/layer_instance' shapes differ: {'bias': (3,), 'kernel': (8, 4)}"],
    "dtype": ["'BatchNorm_1' (variables) -> like 'bn2' (nnx BatchNorm): 'var' is bfloat16 in the source",
              "'Conv_0' (variables) -> like 'conv1' (nnx Conv): 'kernel' is float16 in the source"],
    # one line for the whole collection, not one per BatchNorm; SpectralNorm_0 keeps all it has there, so
    # that scope is gone (its mapping, its sn, its wrapped Dense_0 listed: 3 more lines)
    "no_stats": ["refused (4 problems)", "the source has no batch_stats collection (like's 'bn1', 'bn2' keep"],
}  # fmt: skip


@pytest.mark.parametrize("how", sorted(EXPECTED))
def test_mismatched_checkpoint_names_every_path_and_leaves_model_unchanged(how: str, linen_run) -> None:
    model = NnxNet(nnx.Rngs(3))
    before = _state(model)
    mapping = {k: v for k, v in FULL.items() if not (how == "missing" and k == "conv2")}
    with pytest.warns(DeprecationWarning), pytest.raises(F.MigrationError) as err:
        F.migrate_linen_checkpoint(_broken(linen_run[0], how), model, mapping=mapping)
    for needle in EXPECTED[how]:
        assert needle in str(err.value), str(err.value)
    assert _unchanged(before, model)


def test_explicit_mapping_overrides_order(linen_run) -> None:
    ckpt = linen_run[0]
    swapped = NnxNet(nnx.Rngs(0))
    # map bn1 <- BatchNorm_1 and bn2 <- BatchNorm_0: the values follow the mapping, not the order
    with pytest.warns(DeprecationWarning):
        F.migrate_linen_checkpoint(ckpt, swapped, mapping={**FULL, "bn1": "BatchNorm_1", "bn2": "BatchNorm_0"})
    assert np.array_equal(swapped.bn1.mean.get_value(), ckpt["batch_stats"]["BatchNorm_1"]["mean"])
    assert np.array_equal(swapped.bn2.scale.get_value(), ckpt["params"]["BatchNorm_0"]["scale"])
    with (
        pytest.warns(DeprecationWarning),
        pytest.raises(F.MigrationError, match="'Nope_0' is not a layer of the source"),
    ):
        F.migrate_linen_checkpoint(ckpt, NnxNet(nnx.Rngs(0)), mapping={**FULL, "bn1": "Nope_0"})


def test_custom_named_layer_pairs_by_name_or_mapping(linen_run) -> None:
    """(Was: a custom-named {scale, bias} layer is 'ambiguous'.) Its kind is the NNX layer's: it pairs
    with an NNX layer of the same name, or by mapping; otherwise both sides are listed unpaired."""
    ckpt = linen_run[0]
    params = dict(ckpt["params"])
    params["my_norm"] = params.pop("LayerNorm_0")
    renamed = {"params": params, "batch_stats": ckpt["batch_stats"]}
    rest = {k: v for k, v in FULL.items() if k != "ln"}
    with pytest.warns(DeprecationWarning), pytest.raises(F.MigrationError) as err:
        F.migrate_linen_checkpoint(renamed, NnxNet(nnx.Rngs(0)), mapping=rest)
    assert "source 'my_norm' (variables {'params/bias': (8,), 'params/scale': (8,)}) is not paired" in str(err.value)
    assert "like 'ln' (LayerNorm: layer_norm" in str(err.value) and "refused (2 problems)" in str(err.value)
    with pytest.warns(DeprecationWarning):
        model = F.migrate_linen_checkpoint(renamed, NnxNet(nnx.Rngs(0)), mapping={**rest, "ln": "my_norm"})
    assert np.array_equal(model.ln.scale.get_value(), ckpt["params"]["LayerNorm_0"]["scale"])
    params["ln"] = params.pop("my_norm")  # the NNX attribute's name: paired by name, no mapping
    with pytest.warns(DeprecationWarning):
        model = F.migrate_linen_checkpoint(renamed, NnxNet(nnx.Rngs(0)), mapping=rest)
    assert np.array_equal(model.ln.bias.get_value(), ckpt["params"]["LayerNorm_0"]["bias"])


def test_with_module_and_probe_pairs_by_execution_and_verifies(linen_run) -> None:
    ckpt, eval_before, _ = linen_run
    model = NnxNet(nnx.Rngs(42))
    assert F.migrate_linen_checkpoint(ckpt, model, module=LinenNet(), probe=X) is model
    model.eval()
    assert np.array_equal(np.asarray(model(X)), np.asarray(eval_before))
    # a wrong mapping is caught by the verification, never loaded
    fresh = NnxNet(nnx.Rngs(3))
    before = _state(fresh)
    with pytest.raises(F.MigrationError, match="outputs differ"):
        F.migrate_linen_checkpoint(
            ckpt, fresh, module=LinenNet(), probe=X, mapping={"bn1": "BatchNorm_1", "bn2": "BatchNorm_0"}
        )
    assert _unchanged(before, fresh)


def test_without_module_is_deprecated_and_never_pairs_by_order(linen_run) -> None:
    """(Was: order pairing within each kind, refusing same-shaped groups.) Without the linen module only
    mapping and names pair: every layer left unpaired is listed on both sides, nothing is written; fully
    mapped, the migrated model computes linen's outputs."""
    ckpt, eval_before, _ = linen_run
    model = NnxNet(nnx.Rngs(0))
    before = _state(model)
    with pytest.warns(DeprecationWarning, match="normbridge.convert"), pytest.raises(F.MigrationError) as err:
        F.migrate_linen_checkpoint(ckpt, model, mapping={"conv1": "Conv_0"})
    msg = str(err.value)
    unpaired = ["BatchNorm_0", "BatchNorm_1", "Conv_1", "GroupNorm_0", "LayerNorm_0", "SpectralNorm_0",
                "WeightNorm_0", "Dense_0", "Dense_1"]  # fmt: skip
    assert all(f"source {p!r} (variables" in msg for p in unpaired), msg
    assert all(f"like {p!r} (" in msg for p in FULL if p != "conv1"), msg
    assert f"refused ({len(unpaired) + len(FULL) - 1} problems)" in msg
    assert _unchanged(before, model)
    with pytest.warns(DeprecationWarning):
        F.migrate_linen_checkpoint(ckpt, model, mapping=FULL)
    model.eval()
    assert np.array_equal(np.asarray(model(X)), np.asarray(eval_before))


#: The issue's ResNet (normbridge.conformance.conversion_models): linen lists the stem conv_init/bn_init
#: after ResNetBlock_*, every BatchNorm has the same shape, and NnxBlock defines bn2 before bn1.
RESNET_BLOCKS = {
    f"blocks/{i}/{ours}": f"ResNetBlock_{i}/{linen}"
    for i in range(2)
    for ours, linen in (("conv1", "Conv_0"), ("bn1", "BatchNorm_0"), ("conv2", "Conv_1"), ("bn2", "BatchNorm_1"))
} | {"head": "Dense_0"}


def test_resnet_stem_sorted_after_the_blocks_never_loads_wrong_weights() -> None:
    """Without mapping, or with only ``conv_init`` mapped (accepted before, eval logits off by 45 %), the
    checkpoint alone is refused, naming every unpaired layer; the stem pairs by name, and with the blocks
    mapped the NNX model's eval logits equal linen's bitwise."""
    module, variables = M.build("resnet", "linen")
    x = M.probe("resnet", "nnx")
    want = M.outputs("linen", (module, variables), x)
    model = M.build("resnet", "nnx", seed=5)
    before, before_out = _state(model), M.outputs("nnx", model, x)
    for mapping in ({}, {"conv_init": "conv_init"}):
        with pytest.warns(DeprecationWarning), pytest.raises(F.MigrationError) as err:
            F.migrate_linen_checkpoint(variables, model, mapping=mapping)
        msg = str(err.value)
        assert "source 'ResNetBlock_0/BatchNorm_0'" in msg and "like 'blocks/1/bn2'" in msg, msg
        assert "refused (18 problems)" in msg  # 8 block layers + the Dense head, on both sides
        assert err.value.__cause__.mapping == {"conv_init": "conv_init", "bn_init": "bn_init"}
        assert _unchanged(before, model)
    with pytest.warns(DeprecationWarning):
        F.migrate_linen_checkpoint(variables, model, mapping=RESNET_BLOCKS)
    assert np.array_equal(M.outputs("nnx", model, x), want)
    assert not np.array_equal(before_out, want)  # the weights did move
