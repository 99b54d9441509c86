"""Hostile pickles: the restricted unpickler refuses them, names the GLOBAL and the file, and runs nothing."""

from __future__ import annotations

import io
import os
import pathlib
import pickle
import subprocess

import cloudpickle
import jax
import numpy as np
import pytest

from normbridge.adapters import treex as tx
from normbridge.adapters.treex import _unpickle as up


class _Payload:
    """Unpickling this object runs ``func(*args)`` (the classic pickle exploit)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _write(tmp_path: pathlib.Path, name: str, data: bytes) -> pathlib.Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


@pytest.fixture
def spy_unpickler(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every time the unpickler starts building objects."""
    calls: list[str] = []
    original = up.SafeUnpickler.load

    def load(self):
        calls.append(self.source)
        return original(self)

    monkeypatch.setattr(up.SafeUnpickler, "load", load)
    return calls


def test_payload_is_live_with_plain_pickle(tmp_path: pathlib.Path) -> None:
    """Positive control: the same kind of payload really has a side effect under pickle.loads."""
    target = tmp_path / "pwned_by_plain_pickle"
    pickle.loads(pickle.dumps(_Payload(os.mkdir, str(target))))
    assert target.is_dir()


@pytest.mark.parametrize(
    ("func", "global_name"),
    [
        (os.mkdir, ("posix.mkdir",)),
        (os.system, ("posix.system",)),
        (eval, ("builtins.eval", "__builtin__.eval")),  # protocols < 3 write Python 2 names
        (subprocess.Popen, ("subprocess.Popen", "commands.Popen")),
        (exec, ("builtins.exec", "__builtin__.exec")),
    ],
)
@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_hostile_global_refused_before_anything_is_built(
    tmp_path: pathlib.Path, spy_unpickler: list[str], func, global_name: tuple[str, ...], protocol: int
) -> None:
    target = tmp_path / "pwned"
    if func is os.mkdir:
        args: tuple = (str(target),)
    elif func is os.system:
        args = (f"mkdir {target}",)
    elif func is subprocess.Popen:
        args = (["mkdir", str(target)],)
    else:
        args = (f"__import__('os').mkdir({str(target)!r})",)
    path = _write(tmp_path, "evil.pkl", pickle.dumps(_Payload(func, *args), protocol=protocol))
    with pytest.raises(tx.UnsafePickleError) as err:
        tx.load(path, format="pickle")
    msg = str(err.value)
    assert any(f"GLOBAL '{g}'" in msg for g in global_name) and str(path) in msg
    assert not target.exists()
    assert spy_unpickler == []  # refused by the pre-scan: the unpickler never started


def test_payload_hidden_after_allowed_treex_globals(tmp_path: pathlib.Path, spy_unpickler: list[str]) -> None:
    """A real treex-layout module followed by a payload in the same pickle is refused as a whole, unbuilt."""
    from normbridge.adapters.treex import serialization as ser

    target = tmp_path / "pwned"
    bn = tx.BatchNorm().init(0, np.zeros((2, 3), np.float32))
    buf = io.BytesIO()
    ser._TreexPickler(buf, protocol=4).dump([ser._plan(bn, ""), _Payload(os.mkdir, str(target))])
    data = buf.getvalue()
    assert data.index(b"treex.nn.norm") < data.index(b"mkdir")  # the allowed GLOBALs come first
    path = _write(tmp_path, "evil_bn.pkl", data)
    with pytest.raises(tx.UnsafePickleError, match=r"posix\.mkdir"):
        tx.load(path)
    assert not target.exists() and spy_unpickler == []


def _memo_exploit(target: pathlib.Path) -> bytes:
    """``posix.mkdir(target)`` through STACK_GLOBAL whose operands are fetched back from the memo."""
    t = str(target).encode()
    return (
        pickle.PROTO + b"\x04"
        + pickle.SHORT_BINUNICODE + bytes([5]) + b"posix" + pickle.MEMOIZE
        + pickle.SHORT_BINUNICODE + bytes([5]) + b"mkdir" + pickle.MEMOIZE
        + pickle.POP + pickle.POP
        + pickle.BINGET + b"\x00" + pickle.BINGET + b"\x01" + pickle.STACK_GLOBAL
        + pickle.SHORT_BINUNICODE + bytes([len(t)]) + t + pickle.TUPLE1
        + pickle.REDUCE + pickle.STOP
    )  # fmt: skip


def test_memoized_stack_global_operands_are_tracked(tmp_path: pathlib.Path, spy_unpickler: list[str]) -> None:
    """STACK_GLOBAL whose module/name strings come from the memo (BINGET) is still resolved and refused."""
    control = tmp_path / "control"
    pickle.loads(_memo_exploit(control))  # the crafted bytes are a working exploit for plain pickle
    assert control.is_dir()
    target = tmp_path / "pwned"
    path = _write(tmp_path, "memo.pkl", _memo_exploit(target))
    with pytest.raises(tx.UnsafePickleError, match=r"posix\.mkdir"):
        tx.load(path)
    assert not target.exists() and spy_unpickler == []


def test_cloudpickle_code_object_refused(tmp_path: pathlib.Path, spy_unpickler: list[str]) -> None:
    """cloudpickle ships functions by value (code objects): refused, naming cloudpickle's GLOBAL."""
    target = tmp_path / "pwned"

    def evil(x, _t=str(target)):
        os.mkdir(_t)
        return x

    path = _write(tmp_path, "evil.cloudpickle.pkl", cloudpickle.dumps(tx.Lambda(evil)))
    with pytest.raises(tx.UnsafePickleError) as err:
        tx.load(path)
    assert "cloudpickle" in str(err.value) or "normbridge" in str(err.value)
    assert not target.exists() and spy_unpickler == []


def test_every_fixture_global_is_allowed_and_nothing_else_new(
    treex_fixtures: pathlib.Path, treex_model_fixtures: pathlib.Path
) -> None:
    """Every GLOBAL of every real-treex fixture file (manifests) is allowed; beyond those, the allow-list
    holds only the documented aliases (other jax/numpy versions' names, normbridge's additions) and the
    two layers reproduced without a fixture (ConvTranspose, Embed)."""
    import json
    import re

    needed: set[str] = set()
    for folder in (treex_fixtures, treex_model_fixtures):
        for f in json.loads((folder / "manifest.json").read_text())["fixtures"]:
            for fl in f["files"]:
                needed |= set(fl.get("pickle_globals", []))
    assert needed - set(up.ALLOWED) == set()
    aliases = re.compile(
        r"^(jax\.nn|jax\._src\.nn\.functions|jax\.numpy|jax\._src\.numpy\.ufuncs)\.(" + "|".join(up.ACTIVATIONS)
        + r")$|^jax\._src\.nn\.initializers\.(zeros|ones)$|^jax\.numpy\.bfloat16$|^numpy\._core\."
        r"|^jax\._src\.device_array\.|^normbridge\.adapters\.treex\.|^treex\.nn\.(batch_norm|layer_norm|group_norm)\."
        r"|^treex\.types\.(Cache|ModelState|OptState|State|TreePart)$"
    )  # fmt: skip
    extra = {n for n in set(up.ALLOWED) - needed if not aliases.match(n)}
    assert extra == {"treex.nn.conv.ConvTranspose", "treex.nn.embed.Embed"}


def test_allowed_value_global_cannot_be_called(tmp_path: pathlib.Path) -> None:
    """REDUCE on an allowed name that is only a value (an initializer) is refused: Refs are not callable."""
    ops = (
        pickle.PROTO + b"\x04"
        + pickle.GLOBAL + b"jax.nn.initializers\nzeros\n"
        + pickle.MARK + pickle.NONE + pickle.MARK + pickle.BININT + (10**9).to_bytes(4, "little") + pickle.TUPLE
        + pickle.TUPLE + pickle.REDUCE + pickle.STOP
    )  # fmt: skip
    with pytest.raises(tx.UnsafePickleError, match=r"jax\.nn\.initializers\.zeros may be referenced but not called"):
        tx.load(_write(tmp_path, "call.pkl", ops))


def test_builtins_type_only_maps_none(tmp_path: pathlib.Path) -> None:
    ops = pickle.PROTO + b"\x04" + pickle.GLOBAL + b"builtins\ntype\n" + pickle.BININT1 + b"\x01" + pickle.TUPLE1
    ops += pickle.REDUCE + pickle.STOP
    with pytest.raises(tx.UnsafePickleError, match="type\\(None\\)"):
        tx.load(_write(tmp_path, "type.pkl", ops))


def test_object_dtype_arrays_refused(tmp_path: pathlib.Path) -> None:
    """numpy object arrays unpickle arbitrary objects: only numeric dtypes are allowed."""
    data = pickle.dumps(np.array([1, "a"], dtype=object), protocol=4)
    with pytest.raises(tx.UnsafePickleError, match="numeric"):
        tx.load(_write(tmp_path, "obj.pkl", data))


def test_array_size_mismatch_refused(tmp_path: pathlib.Path) -> None:
    good = pickle.dumps(np.arange(4, dtype=np.float32), protocol=2)
    raw = np.arange(4, dtype=np.float32).tobytes()
    bad = good.replace(raw, raw[:8])
    bad = bad.replace(bytes([len(raw)]), bytes([8]), 1) if bad != good else bad
    with pytest.raises((tx.UnsafePickleError, tx.CheckpointError, pickle.UnpicklingError)):
        tx.load(_write(tmp_path, "short.pkl", bad))


@pytest.mark.parametrize("opcode", [pickle.EXT1 + b"\x01", pickle.BINPERSID])
def test_extension_and_persistent_opcodes_refused(tmp_path: pathlib.Path, opcode: bytes) -> None:
    ops = pickle.PROTO + b"\x04" + pickle.NONE + opcode + pickle.STOP
    with pytest.raises(tx.UnsafePickleError, match="not allowed"):
        tx.load(_write(tmp_path, "ext.pkl", ops))


def test_refusal_from_file_object_names_it() -> None:
    buf = io.BytesIO(pickle.dumps(_Payload(os.getcwd)))
    buf.name = "in-memory.pkl"
    with pytest.raises(tx.UnsafePickleError, match=r"in-memory\.pkl.*posix\.getcwd"):
        tx.load(buf)


def test_non_module_pickle_is_a_checkpoint_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises(tx.CheckpointError, match="does not hold a treex module"):
        tx.load(_write(tmp_path, "list.pkl", pickle.dumps([1, 2, 3])))


@pytest.mark.parametrize(
    "rename",
    [
        {"jax._src.array._reconstruct_array": "jax._src.device_array.reconstruct_device_array"},  # jax 0.3.14-0.3.25
        {
            "jax.nn.initializers.zeros": "jax._src.nn.initializers.zeros",  # jax < 0.4.13 initializer names
            "jax.nn.initializers.ones": "jax._src.nn.initializers.ones",
            "jax.nn.gelu": "jax._src.nn.functions.gelu",
        },
    ],
    ids=["device_array", "old_initializer_names"],
)
def test_older_jax_encodings_load(rename: dict[str, str]) -> None:
    """Checkpoints written by older jax versions (other GLOBAL names, same layout) load to the same module."""
    from normbridge.adapters.treex import serialization as ser

    class OldPickler(ser._TreexPickler):
        def save(self, obj, save_persistent_id=True):
            if isinstance(obj, ser._Glob) and obj.qualname in rename:
                obj = ser._Glob(rename[obj.qualname])
            super().save(obj, save_persistent_id)

    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    model = tx.Sequential(tx.Linear(3), tx.BatchNorm(momentum=0.9), jax.nn.gelu, tx.LayerNorm()).init(0, x)
    model(x)
    buf = io.BytesIO()
    OldPickler(buf, protocol=4).dump(ser._plan(model, ""))
    data = buf.getvalue()
    names = up.scan_globals(data)
    assert all(new in names for new in rename.values()) and not any(old in names for old in rename)
    loaded = tx.load(io.BytesIO(data))
    assert loaded.layers[2].f is jax.nn.gelu and loaded.layers[1].scale_init is jax.nn.initializers.ones
    assert loaded.layers[1].momentum.weak_type
    for a, b in zip(jax.tree_util.tree_leaves(model), jax.tree_util.tree_leaves(loaded)):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    np.testing.assert_array_equal(model.copy()(x), loaded(x))
