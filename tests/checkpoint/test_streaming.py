"""The no-copy path a large conversion takes (benchmarks/checkpoint_scale.py measures its speed):
msgpack and safetensors arrays read as views of a memory map, msgpack written header then buffer
byte for byte as flax writes it, pages dropped once used, and the CLI's bitwise read-back check."""

from __future__ import annotations

import mmap
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

from normbridge import checkpoint as ck
from normbridge.checkpoint import flax_msgpack


def _tree() -> dict:
    rng = np.random.default_rng(0)
    tree = {
        "zero_d": np.array(1.5),
        "scalar": np.float32(3.0),
        "empty": np.zeros((0, 5), np.float32),
        "transposed": np.arange(60, dtype=np.int64).reshape(3, 4, 5).T,  # not C-contiguous
        "bf16": np.asarray(jnp.ones((3, 2), jnp.bfloat16)),
        "bool": np.array([True, False, True]),
        "complex": (rng.standard_normal(4) + 1j).astype(np.complex64),
        "nan": np.array([np.nan, -np.inf, 0.0], np.float32),
        "int": 7,
        "nested": {"kernel": rng.standard_normal((9, 7)).astype(np.float32)},
    }
    # every ext and bin header length class msgpack has (fixext 1..16, ext/bin 8, 16, 32)
    for n in [*range(0, 20), *range(225, 262), 65_500, 65_535, 65_536, 65_600, 70_000]:
        tree[f"u8_{n}"] = rng.integers(0, 255, n, dtype=np.uint8)
    return dict(sorted(tree.items()))  # normbridge writes a dict's keys sorted (as jax flattens it)


def _mapped(arr: np.ndarray) -> bool:
    base = arr
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(getattr(base, "obj", base), mmap.mmap)


def test_msgpack_writer_matches_flax_byte_for_byte(tmp_path):
    tree = _tree()
    p = tmp_path / "t.msgpack"
    flax_msgpack.write(str(p), tree)
    assert p.read_bytes() == serialization.to_bytes(tree)


def test_msgpack_read_as_flax_reads_it_without_copies(tmp_path):
    tree = _tree()
    p = tmp_path / "t.msgpack"
    p.write_bytes(serialization.to_bytes(tree))  # written by flax itself
    want = serialization.msgpack_restore(p.read_bytes())
    got = ck.read(p)
    assert list(got.tree) == list(want)
    want = ck.flatten(want)
    assert list(got.leaves) == list(want)
    for k, w in want.items():
        g = ck.flatten(got.tree)[k]
        assert type(g) is type(w) and np.asarray(g).dtype == np.asarray(w).dtype, k
        assert np.asarray(g).shape == np.asarray(w).shape, k
        assert np.asarray(g).tobytes() == np.asarray(w).tobytes(), k
    big = got.leaves["nested/kernel"]
    assert _mapped(big) and not big.flags.writeable  # a view of the file's map, not a copy


def test_safetensors_read_without_copies(tmp_path):
    from safetensors.numpy import load_file

    arrays = {k: v for k, v in ck.flatten(_tree()).items() if isinstance(v, np.ndarray) and v.size}
    arrays["transposed"] = np.ascontiguousarray(arrays["transposed"])
    p = tmp_path / "t.safetensors"
    ck.write_tree(p, arrays, "safetensors")
    want = load_file(str(p))  # the safetensors package's own reader
    got = ck.read(p).leaves
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        assert got[k].dtype == w.dtype and got[k].shape == w.shape and got[k].tobytes() == w.tobytes(), k
        assert _mapped(got[k]), k


def _rss_file_kb() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("RssFile:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RssFile from /proc/self/status")
def test_release_drops_a_mapped_arrays_resident_pages(tmp_path):
    p = tmp_path / "big.safetensors"
    ck.write_tree(p, {"a": np.ones(8 * 2**20 // 4, np.float32), "b": np.full(8 * 2**20 // 4, 2, np.float32)},
                  "safetensors")
    leaves = ck.read(p).leaves
    before = _rss_file_kb()
    assert float(leaves["a"].sum()) == 2**21 and float(leaves["b"].sum()) == 2**22  # touches every page
    touched = _rss_file_kb()
    assert touched - before > 12_000  # ~16 MB of file pages now resident in this process
    assert ck.release(leaves["a"]) and ck.release(leaves["b"])
    assert touched - _rss_file_kb() > 12_000
    assert float(leaves["a"][-1]) == 1.0  # still readable: faulted back in from the file
    assert not ck.release(np.ones(3))  # an array of its own memory is left alone


def test_readback_check_is_bitwise():
    from normbridge.cli import _readback

    a = np.array([1.0, np.nan, 3.0], np.float32)
    other_nan = a.copy()
    other_nan.view(np.uint32)[1] ^= 1  # still NaN, other bits: a tolerance check would call it equal
    assert _readback({"x": a}, {"x": a.copy()}) == []
    assert _readback({"x": a}, {"x": other_nan}) == ["x: written ((3,), 'float32'), read back with other bytes"]
    assert _readback({"x": a}, {"x": a.astype(np.float64)})[0].endswith("read back ((3,), 'float64')")
    assert _readback({"x": a, "y": a}, {"x": a, "z": a}) == [
        "y: written ((3,), 'float32'), read back nothing", "z: read back, never written"]
    big = np.arange(3 * 2**20 + 5, dtype=np.uint8)  # several compare chunks, odd length
    flipped = big.copy()
    flipped[-1] ^= 0x80
    assert _readback({"b": big}, {"b": big.copy()}) == [] and len(_readback({"b": big}, {"b": flipped})) == 1
