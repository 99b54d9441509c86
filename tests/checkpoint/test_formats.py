"""Readers and writers of every format: round trips, detection from content, atomic writes,
size checks before allocation, zip member paths, errors that name the file."""

from __future__ import annotations

import io
import os
import pathlib
import struct
import zipfile

import numpy as np
import pytest

from normbridge import checkpoint as ck
from normbridge.checkpoint import _common
from normbridge.errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError
from tests.checkpoint.conftest import linen_variables

TREE_FORMATS = ["msgpack", "orbax", "safetensors", "npz", "eqx-leaves", "equinox"]


@pytest.mark.parametrize("fmt", TREE_FORMATS)
def test_round_trip_and_detection(tmp_path, fmt):
    tree = linen_variables()
    path = tmp_path / "ck"
    ck.write_tree(path, tree, fmt)
    assert ck.detect_format(path) == fmt
    got = ck.read(path)
    want = ck.flatten(tree)
    if fmt == "eqx-leaves":  # no names: jax leaf order
        import jax

        assert [np.asarray(a).tobytes() for a in got.leaves.values()] == \
            [np.asarray(a).tobytes() for a in jax.tree_util.tree_leaves(tree)]
        return
    names = {k.removeprefix("model/"): v for k, v in got.leaves.items()}
    assert set(names) == set(want)
    for k, v in want.items():
        a = names[k]
        assert a.shape == v.shape and a.tobytes() == v.tobytes(), k
        if fmt != "npz":  # np.savez writes bfloat16 as raw 2-byte void: the format cannot say bfloat16
            assert a.dtype == v.dtype, k


@pytest.mark.parametrize("fmt", TREE_FORMATS)
def test_existing_destination_refused_then_replaced_whole(tmp_path, fmt):
    path = tmp_path / "ck"
    ck.write_tree(path, {"a": np.zeros(3, np.float32)}, fmt)
    with pytest.raises(FileExistsError):
        ck.write_tree(path, {"a": np.ones(3, np.float32)}, fmt)
    assert np.asarray(next(iter(ck.read(path).leaves.values()))).tolist() == [0, 0, 0]
    ck.write_tree(path, {"a": np.ones(3, np.float32)}, fmt, overwrite=True)
    assert np.asarray(next(iter(ck.read(path).leaves.values()))).tolist() == [1, 1, 1]
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no temporary left behind


def test_a_failing_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "x.msgpack"
    path.write_bytes(b"old")

    def boom(fh):
        fh.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _common.atomic_file(str(path), boom, overwrite=True)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["x.msgpack"]


def test_a_failing_orbax_write_leaves_no_directory(tmp_path):
    def boom(tmp):
        os.makedirs(tmp)
        (pathlib.Path(tmp) / "half").write_bytes(b"x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        _common.atomic_directory(str(tmp_path / "ck"), boom)
    assert os.listdir(tmp_path) == []


def test_unknown_content_is_named(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello, not a checkpoint")
    with pytest.raises(CorruptCheckpointError, match=r"notes\.txt: not a checkpoint of any") as e:
        ck.read(p)
    assert e.value.file == str(p) and "first bytes" in e.value.found


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        ck.read(tmp_path / "nothing.msgpack")


def _npy(shape_text: str, body: bytes) -> bytes:
    header = ("{'descr': '<f4', 'fortran_order': False, 'shape': " + shape_text + ", }").encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + body


def test_declared_size_checked_before_allocation(tmp_path):
    """A 16-byte file declaring a 4 TB array is refused from its header, nothing allocated."""
    p = tmp_path / "huge.eqx"
    p.write_bytes(_npy("(1000000, 1000000)", b"\x00" * 16))
    with pytest.raises(CorruptCheckpointError, match="array larger than the bytes present") as e:
        ck.read(p)
    assert "4000000000000 bytes" in e.value.expected and e.value.path == "<record 0>"
    z = tmp_path / "huge.npz"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("a.npy", _npy("(1000000, 1000000)", b"\x00" * 16))
    with pytest.raises(CorruptCheckpointError, match="array larger than its zip member"):
        ck.read(z)


def test_safetensors_huge_header_refused(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", 2**40) + b'{"a":' + b" " * 64)
    with pytest.raises(CheckpointError, match=r"x\.safetensors"):
        ck.read(p, format="safetensors")


@pytest.mark.parametrize("name", ["../evil.npy", "/abs.npy", "a/../../b.npy", "..\\win.npy"])
def test_zip_members_outside_the_archive_refused(tmp_path, name):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(name, _npy("(2,)", b"\x00" * 8))
    p = tmp_path / "evil.npz"
    p.write_bytes(buf.getvalue())
    with pytest.raises(UnsafeCheckpointError, match="zip member outside the archive") as e:
        ck.read(p)
    assert e.value.path == name


def test_object_arrays_are_not_unpickled(tmp_path):
    p = tmp_path / "obj.eqx"
    np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    os.replace(str(p) + ".npy", p)
    with pytest.raises(UnsafeCheckpointError, match="object array"):
        ck.read(p)


def test_truncated_files_name_the_file_and_the_format(tmp_path, real_files):
    expected = {"msgpack": "flax.serialization msgpack", "equinox": "zip", "eqx-leaves": ".npy",
                "safetensors": "safetensors", "pickle": "pickle"}
    for name, what in expected.items():
        data = real_files[name].read_bytes()
        p = tmp_path / f"cut-{name}"
        p.write_bytes(data[: len(data) * 2 // 3])
        with pytest.raises(CorruptCheckpointError) as e:
            ck.read(p, format=None if name != "safetensors" else "safetensors")
        assert str(p) in str(e.value) and what in str(e.value), str(e.value)


def test_truncated_orbax_names_the_directory(tmp_path, real_files):
    import shutil

    d = tmp_path / "orbax"
    shutil.copytree(real_files["orbax"], d)
    victim = d / "manifest.ocdbt"
    victim.write_bytes(victim.read_bytes()[:20])
    with pytest.raises(CorruptCheckpointError, match="Orbax checkpoint") as e:
        ck.read(d)
    assert str(d) in str(e.value) and len(str(e.value)) < 800  # not TensorStore's several KB
    assert e.value.__cause__ is not None
