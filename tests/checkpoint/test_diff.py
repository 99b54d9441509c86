"""``normbridge diff`` across frameworks: both files as canonical records (flax layouts), layers paired
by name after each framework's naming rules, compared with ``normbridge.testing``."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from normbridge import checkpoint as ck
from normbridge import cli

FACTORIES = "tests.checkpoint.diff_factories"


def _diff_json(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, dict]:
    capsys.readouterr()
    rc = cli.main(["diff", *args, "--json"])
    return rc, json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def linen_and_equinox(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, pathlib.Path, dict]:
    """A linen checkpoint with random weights and statistics, and its conversion to Equinox by
    normbridge.convert, each written in its own format; and the linen file's arrays."""
    import jax
    from flax import serialization

    import normbridge
    from normbridge.checkpoint import models
    from tests.checkpoint import diff_factories as f

    d = tmp_path_factory.mktemp("diff")
    module, abstract = f.linen_model()
    rng = np.random.default_rng(0)  # no two equal values: a transposition cannot hide
    variables = jax.tree_util.tree_map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(s.dtype), abstract)
    target, _ = normbridge.convert((module, variables), f.equinox_model(), probe=f.probes(), verify=False)
    linen, eqx_file = d / "net.msgpack", d / "net.nbeqx"
    linen.write_bytes(serialization.msgpack_serialize(serialization.to_state_dict(variables)))
    models.write_model(str(eqx_file), target, "equinox")
    # the Equinox file holds Equinox's layouts of the same numbers (checked here with numpy alone)
    p, (model, state) = variables["params"], target
    np.testing.assert_array_equal(model.conv.weight, np.transpose(p["conv"]["kernel"], (3, 2, 0, 1)))
    np.testing.assert_array_equal(model.conv.bias, p["conv"]["bias"].reshape(-1, 1, 1))
    np.testing.assert_array_equal(model.layers[1].weight, p["layers_1"]["kernel"].T)
    np.testing.assert_array_equal(state.get(model.bn.ema_state_index)[1], variables["batch_stats"]["bn"]["var"])
    return linen, eqx_file, {k: np.asarray(v) for k, v in ck.read(linen).leaves.items()}


def test_linen_and_its_equinox_conversion_are_equal(linen_and_equinox, capsys: pytest.CaptureFixture) -> None:
    linen, eqx_file, arrays = linen_and_equinox
    rc, data = _diff_json(capsys, str(linen), str(eqx_file), "--b-model", f"{FACTORIES}:equinox_model",
                          "--rtol", "0", "--atol", "0")
    assert rc == 0 and data["ok"], data
    # every array of the linen file is compared (under linen's names, without the collection)
    stored = {p.partition("/")[2] for p in arrays}
    assert {leaf["path"] for leaf in data["leaves"]} == stored and len(stored) == 13
    assert all(leaf["bitwise"] for leaf in data["leaves"])
    by_path = {leaf["path"]: leaf for leaf in data["leaves"]}
    assert by_path["layers_0/kernel"]["path_b"] == "layers/0/kernel"  # linen layers_0 is Equinox layers/0
    assert by_path["conv/kernel"]["shape_a"] == [3, 3, 3, 4]  # HWIO on both sides (Equinox stores OIHW)
    assert data["frameworks"] == ["linen", "equinox"] and not data["only_a"] and not data["only_b"]


def test_without_the_model_a_bias_free_conv_is_listed_unmapped(linen_and_equinox,
                                                               capsys: pytest.CaptureFixture) -> None:
    linen, eqx_file, _ = linen_and_equinox
    rc, data = _diff_json(capsys, str(linen), str(eqx_file))
    assert rc == 1 and not data["ok"]
    assert data["unmapped"]["a"] == {}
    assert list(data["unmapped"]["b"]) == ["model/conv2/weight"]
    assert "--b-model" in data["unmapped"]["b"]["model/conv2/weight"]
    assert data["only_a"] == ["conv2/kernel"] and data["failures"] == []  # everything else equal, bitwise
    assert len(data["leaves"]) == 12
    capsys.readouterr()
    assert cli.main(["diff", str(linen), str(eqx_file)]) == 1
    out = capsys.readouterr().out
    assert "1 arrays of" in out and "model/conv2/weight: a Conv without bias or an N-D norm" in out


def test_a_tampered_conv_weight_is_the_one_difference(linen_and_equinox, tmp_path: pathlib.Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    import equinox as eqx

    from normbridge.checkpoint import models
    from tests.checkpoint import diff_factories as f

    linen, eqx_file, arrays = linen_and_equinox
    model, state = models.load_into(ck.read(eqx_file), f.equinox_model())
    weight = np.array(model.conv.weight)  # OIHW
    weight[2, 1, 0, 2] += 0.5
    tampered = tmp_path / "tampered.nbeqx"
    models.write_model(str(tampered), (eqx.tree_at(lambda m: m.conv.weight, model, weight), state), "equinox")
    rc, data = _diff_json(capsys, str(linen), str(tampered), "--b-model", f"{FACTORIES}:equinox_model")
    assert rc == 1 and data["failures"] == ["conv/kernel"], data
    (leaf,) = [x for x in data["leaves"] if not x["ok"]]
    assert leaf["mismatched"] == 1 and leaf["index"] == [0, 2, 1, 2]  # the same element, HWIO
    assert leaf["value_a"] == pytest.approx(float(arrays["params/conv/kernel"][0, 2, 1, 2]))
    assert leaf["max_abs"] == pytest.approx(0.5, rel=1e-6)
    # two Equinox files: what neither maps alone (the bias-free conv2) is compared as stored
    conv2 = np.array(model.conv2.weight)
    conv2[0, 0, 1, 1] -= 1.0
    models.write_model(str(tampered), (eqx.tree_at(lambda m: m.conv2.weight, model, conv2), state), "equinox",
                       overwrite=True)
    rc, data = _diff_json(capsys, str(tampered), str(eqx_file))
    assert rc == 1 and data["failures"] == ["model/conv2/weight"] and not any(data["unmapped"].values())
    assert [x["index"] for x in data["leaves"] if not x["ok"]] == [[0, 0, 1, 1]]
    assert _diff_json(capsys, str(eqx_file), str(eqx_file))[0] == 0


def test_a_file_without_names_needs_its_model(linen_and_equinox, tmp_path: pathlib.Path,
                                              capsys: pytest.CaptureFixture) -> None:
    from normbridge.checkpoint import models
    from tests.checkpoint import diff_factories as f

    linen, eqx_file, _ = linen_and_equinox
    leaves = tmp_path / "net.eqx"
    models.write_model(str(leaves), models.load_into(ck.read(eqx_file), f.equinox_model()), "eqx-leaves")
    rc, data = _diff_json(capsys, str(leaves), str(linen))
    assert rc == 1 and not data["leaves"] and len(data["unmapped"]["a"]) == len(ck.read(leaves).leaves)
    assert all("holds no names" in why and "--a-model" in why for why in data["unmapped"]["a"].values())
    rc, data = _diff_json(capsys, str(leaves), str(linen), "--a-model", f"{FACTORIES}:equinox_model",
                          "--rtol", "0", "--atol", "0")
    assert rc == 0 and len(data["leaves"]) == 13, data


def test_a_linen_model_needs_a_probe_and_a_mapping_renames(linen_and_equinox, tmp_path: pathlib.Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    linen, eqx_file, _ = linen_and_equinox
    args = [str(linen), str(eqx_file), "--a-model", f"{FACTORIES}:linen_model",
            "--b-model", f"{FACTORIES}:equinox_model"]
    assert cli.main(["diff", *args]) == 2
    assert "--probe" in capsys.readouterr().err
    rc, data = _diff_json(capsys, *args, "--probe", "2,5,5,3")
    assert rc == 0 and len(data["leaves"]) == 13
    # a mapping pairs layers whose names differ (and one that names no layer is bad input)
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"ln": None, "re:layers_(\\d)": "layers/\\1"}))
    rc, data = _diff_json(capsys, str(linen), str(eqx_file), "--b-model", f"{FACTORIES}:equinox_model",
                          "--map", str(mapping))
    assert rc == 1 and data["only_b"] == ["ln/bias", "ln/scale"] and len(data["leaves"]) == 11
    assert {"ln/scale (mapping: skipped)", "ln/bias (mapping: skipped)"} <= set(data["not_compared"])
    for bad, message in (({"nothing_here": "ln"}, "nothing_here"), ({"ln": 3}, "layer paths or null"),
                         ({"re:(": "ln"}, "not a regular expression")):
        mapping.write_text(json.dumps(bad))
        assert cli.main(["diff", str(linen), str(eqx_file), "--map", str(mapping)]) == 2
        assert message in capsys.readouterr().err


def test_attention_heads_come_from_the_model(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture) -> None:
    """Equinox stores attention projections as (H·Dh, D): the file alone cannot split the heads, the
    model can; then every projection compares in linen's (D, H, Dh) layout."""
    import jax
    from flax import serialization

    import normbridge
    from normbridge.checkpoint import models
    from tests.checkpoint import diff_factories as f

    module, abstract = f.linen_attention()
    rng = np.random.default_rng(1)
    variables = jax.tree_util.tree_map(lambda s: rng.uniform(-1, 1, s.shape).astype(s.dtype), abstract)
    ids = jax.numpy.array([[1, 4, 6], [0, 2, 5]])
    target, _ = normbridge.convert((module, variables), f.equinox_attention(), probe=ids, verify=False)
    # head h, dimension d of the query projection is Equinox's row h * Dh + d (checked with numpy alone)
    dh = f.D // f.HEADS
    q = variables["params"]["attn"]["query"]["kernel"]  # (D, H, Dh)
    np.testing.assert_array_equal(target.attn.query_proj.weight[1 * dh + 3], q[:, 1, 3])
    linen, eqx_file = tmp_path / "att.msgpack", tmp_path / "att.nbeqx"
    linen.write_bytes(serialization.msgpack_serialize(serialization.to_state_dict(variables)))
    models.write_model(str(eqx_file), target, "equinox")

    rc, data = _diff_json(capsys, str(linen), str(eqx_file))
    assert rc == 1 and not data["leaves"] and len(data["only_a"]) == 9
    unmapped = data["unmapped"]["b"]
    assert sorted(unmapped) == sorted(p for p in ck.read(eqx_file).leaves)  # embedding and attention
    assert "number of heads" in unmapped["model/attn/query_proj/weight"]
    rc, data = _diff_json(capsys, str(linen), str(eqx_file), "--b-model", f"{FACTORIES}:equinox_attention",
                          "--rtol", "0", "--atol", "0")
    assert rc == 0 and len(data["leaves"]) == 9 and all(x["bitwise"] for x in data["leaves"]), data
    by_path = {x["path"]: x for x in data["leaves"]}
    assert by_path["attn/query/kernel"]["shape_b"] == [f.D, f.HEADS, dh]
    assert by_path["attn/out/kernel"]["shape_b"] == [f.HEADS, dh, f.D]


# ------------------------------------------- both models given: the engine's pairing (normbridge.convert's)
PROBES = {"mlp": "2,6", "resnet": "2,6,6,3"}  # conversion_models' inputs (the resnet's channels last)


@pytest.fixture(scope="module")
def auto_named(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[pathlib.Path, pathlib.Path, dict, tuple]]:
    """linen's MLP and ResNet of conversion_models (automatic names: ``Dense_0``, ``ResNetBlock_1/Conv_0``)
    with random state, and their conversions to the Equinox models (field names: ``dense1``,
    ``blocks/1/conv1``), each written in its own format; the linen variables and the Equinox target."""
    import jax
    from flax import serialization

    import normbridge
    from normbridge.checkpoint import models
    from normbridge.conformance import conversion_models as cm
    from tests.checkpoint import diff_factories as f

    d = tmp_path_factory.mktemp("auto_named")
    rng = np.random.default_rng(5)  # no two equal values: a transposition or a shifted pair cannot hide
    out = {}
    for arch in PROBES:
        module, abstract = getattr(f, f"linen_{arch}")()
        variables = jax.tree_util.tree_map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(s.dtype), abstract)
        target, _ = normbridge.convert((module, variables), getattr(f, f"equinox_{arch}")(),
                                       probe=cm.probe(arch, "linen"), verify=False)
        linen, eqx_file = d / f"{arch}.msgpack", d / f"{arch}.nbeqx"
        linen.write_bytes(serialization.msgpack_serialize(serialization.to_state_dict(variables)))
        models.write_model(str(eqx_file), target, "equinox")
        out[arch] = (linen, eqx_file, variables, target)
    # the Equinox files hold the same numbers under other names and layouts (checked with numpy alone)
    (_, _, v, (model, state)) = out["mlp"]
    np.testing.assert_array_equal(model.dense2.weight, np.asarray(v["params"]["Dense_1"]["kernel"]).T)
    np.testing.assert_array_equal(state.get(model.bn.ema_state_index)[0], v["batch_stats"]["BatchNorm_0"]["mean"])
    (_, _, v, (model, _)) = out["resnet"]
    np.testing.assert_array_equal(model.blocks[1].conv1.weight,
                                  np.transpose(v["params"]["ResNetBlock_1"]["Conv_0"]["kernel"], (3, 2, 0, 1)))
    return out


@pytest.mark.parametrize("arch", sorted(PROBES))
def test_both_models_pair_as_convert_does(arch: str, auto_named, capsys: pytest.CaptureFixture) -> None:
    linen, eqx_file, _, _ = auto_named[arch]
    rc, data = _diff_json(capsys, str(linen), str(eqx_file), "--a-model", f"{FACTORIES}:linen_{arch}",
                          "--b-model", f"{FACTORIES}:equinox_{arch}", "--probe", PROBES[arch],
                          "--rtol", "0", "--atol", "0")
    assert rc == 0 and data["ok"] and not data["problems"], data
    stored = {p.partition("/")[2] for p in ck.read(linen).leaves}  # every array of the linen file, compared
    assert {leaf["path"] for leaf in data["leaves"]} == stored and all(leaf["bitwise"] for leaf in data["leaves"])
    assert not data["only_a"] and not data["only_b"] and not any(data["unmapped"].values())
    by_path = {leaf["path"]: leaf["path_b"] for leaf in data["leaves"]}
    if arch == "mlp":
        assert len(stored) == 13 and by_path["Dense_1/kernel"] == "dense2/kernel"
        assert by_path["BatchNorm_0/var"] == "bn/var" and by_path["Dense_2/bias"] == "head/bias"
    else:
        assert by_path["ResNetBlock_1/Conv_0/kernel"] == "blocks/1/conv1/kernel"
        assert by_path["ResNetBlock_0/BatchNorm_1/mean"] == "blocks/0/bn2/mean"
    assert {p["how"] for p in data["pairs"]} <= {"name", "execution order"}


def test_without_both_models_the_names_do_not_pair(auto_named, capsys: pytest.CaptureFixture) -> None:
    linen, eqx_file, _, _ = auto_named["mlp"]
    rc, data = _diff_json(capsys, str(linen), str(eqx_file), "--b-model", f"{FACTORIES}:equinox_mlp")
    assert rc == 1 and "Dense_0/kernel" in data["only_a"] and "dense1/kernel" in data["only_b"]


def test_both_models_a_tampered_leaf_is_the_one_difference(auto_named, tmp_path: pathlib.Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    import equinox as eqx

    from normbridge.checkpoint import models

    linen, _, variables, (model, state) = auto_named["mlp"]
    weight = np.array(model.dense2.weight)  # (out, in)
    weight[1, 3] += 0.25
    tampered = tmp_path / "tampered.nbeqx"
    models.write_model(str(tampered), (eqx.tree_at(lambda m: m.dense2.weight, model, weight), state), "equinox")
    rc, data = _diff_json(capsys, str(linen), str(tampered), "--a-model", f"{FACTORIES}:linen_mlp",
                          "--b-model", f"{FACTORIES}:equinox_mlp", "--probe", PROBES["mlp"])
    assert rc == 1 and data["failures"] == ["Dense_1/kernel"], data
    (leaf,) = [x for x in data["leaves"] if not x["ok"]]
    assert leaf["path_b"] == "dense2/kernel" and leaf["mismatched"] == 1 and leaf["index"] == [3, 1]  # (in, out)
    assert leaf["value_a"] == pytest.approx(float(variables["params"]["Dense_1"]["kernel"][3, 1]))
    assert leaf["max_abs"] == pytest.approx(0.25, rel=1e-5)


def test_both_models_a_pairing_the_engine_refuses_is_listed(auto_named, tmp_path: pathlib.Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    """linen's third Dense (4 -> 3) would pair by execution order with Equinox's ``extra`` (4 -> 4):
    the engine refuses; diff lists its problem lines and compares nothing (no guessed pair)."""
    import equinox as eqx
    import jax

    from normbridge.checkpoint import models
    from normbridge.conversion import pair
    from normbridge.errors import ConversionError
    from tests.checkpoint import diff_factories as f

    linen, _, _, _ = auto_named["mlp"]
    other = tmp_path / "extra.nbeqx"
    models.write_model(str(other), eqx.nn.make_with_state(f._mlp_with_extra_cls())(jax.random.key(3)), "equinox")
    args = [str(linen), str(other), "--a-model", f"{FACTORIES}:linen_mlp",
            "--b-model", f"{FACTORIES}:equinox_mlp_with_extra", "--probe", PROBES["mlp"]]
    rc, data = _diff_json(capsys, *args)
    assert rc == 1 and not data["ok"] and data["leaves"] == [] and data["pairs"] == [], data
    assert any("'Dense_2'" in p and "'extra'" in p and "shapes differ" in p for p in data["problems"])
    assert any("'head'" in p and "not paired" in p for p in data["problems"])
    # the engine's own lines, verbatim
    loaded = (models.load_into(ck.read(linen), f.linen_mlp()),
              models.load_into(ck.read(other), f.equinox_mlp_with_extra()))
    with pytest.raises(ConversionError) as err:
        pair(*loaded, probe=cli._probe(PROBES["mlp"]))
    assert data["problems"] == err.value.problems
    # every leaf of both files is listed as not compared
    assert set(data["unmapped"]["a"]) == {p.partition("/")[2] for p in ck.read(linen).leaves}
    assert {leaf.split("/")[0] for leaf in data["unmapped"]["b"]} == {"dense1", "bn", "ln", "dense2", "rms", "extra",
                                                                       "head"}
    assert all("refused" in why for why in data["unmapped"]["b"].values())
    capsys.readouterr()
    assert cli.main(["diff", *args]) == 1
    text = capsys.readouterr().out
    assert "not compared: normbridge.conversion.pair refused" in text and "shapes differ" in text
    assert " match: " not in text
    # a mapping naming no layer of either model is bad input (exit 2)
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"nothing_here": "head"}))
    assert cli.main(["diff", *args, "--map", str(mapping)]) == 2
    assert "nothing_here" in capsys.readouterr().err
