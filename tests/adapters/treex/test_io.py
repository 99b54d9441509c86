"""save / load round trips (bit-exact), template checks, atomic writes, flax msgpack compatibility."""

from __future__ import annotations

import io
import os
import pathlib

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from normbridge.adapters import treex as tx
from normbridge.conformance.measure import diff
from normbridge.conformance.treex import round_trip

FORMATS = ["pickle", "cloudpickle", "msgpack", "npz"]


@st.composite
def modules(draw: st.DrawFn) -> tuple[tx.Module, np.ndarray]:
    kind = draw(st.sampled_from(["BatchNorm", "LayerNorm", "GroupNorm", "RMSNorm", "InstanceNorm", "SpectralNorm",
                                 "WeightNorm", "Sequential"]))  # fmt: skip
    c = draw(st.integers(1, 3)) * 2
    x = np.random.default_rng(draw(st.integers(0, 99))).normal(size=(3, 2, c)).astype(np.float32)
    if kind == "BatchNorm":
        m = tx.BatchNorm(momentum=draw(st.sampled_from([0.9, 0.99])), use_bias=draw(st.booleans()))
    elif kind == "GroupNorm":
        m = tx.GroupNorm(num_groups=2, use_scale=draw(st.booleans()))
    elif kind == "LayerNorm":
        m = tx.LayerNorm(use_scale=draw(st.booleans()), dtype=draw(st.sampled_from([jnp.float32, jnp.float16])))
    elif kind in ("RMSNorm", "InstanceNorm"):
        m = getattr(tx, kind)()
    elif kind == "SpectralNorm":
        m = tx.SpectralNorm(tx.Linear(3), n_steps=draw(st.integers(1, 2)))
    elif kind == "WeightNorm":
        m = tx.WeightNorm(tx.Linear(3), feature_axes=draw(st.sampled_from([-1, None])))
    else:
        m = tx.Sequential(tx.Linear(4), tx.BatchNorm(), jax.nn.gelu, tx.LayerNorm())
    m = m.init(draw(st.integers(0, 5)), x)
    if kind in ("BatchNorm", "SpectralNorm", "Sequential"):
        m(x)  # non-trivial statistics
    m = m.train(draw(st.booleans())).freeze(draw(st.booleans()))
    return m, x


@given(item=modules())
def test_round_trip_every_format_is_bit_exact(item: tuple[tx.Module, np.ndarray]) -> None:
    module, x = item
    results = round_trip(module, x)
    assert len(results) >= 4 * 3
    bad = [name for name, d, _ in results if not (d.bitwise if hasattr(d, "bitwise") else d)]
    assert bad == []


def test_save_is_atomic_and_leaves_no_temporary(tmp_path: pathlib.Path) -> None:
    x = np.ones((2, 3), np.float32)
    bn = tx.BatchNorm().init(0, x)
    target = tmp_path / "bn.pkl"
    for fmt in FORMATS:
        tx.save(bn, target, format=fmt)
        assert os.listdir(tmp_path) == ["bn.pkl"]
        loaded = tx.load(target, template=bn)
        np.testing.assert_array_equal(loaded.var, bn.var)
    before = target.read_bytes()
    custom = tx.BatchNorm(scale_init=lambda k, s, d: jnp.full(s, 2.0, d)).init(0, x)
    with pytest.raises(tx.CheckpointError, match="cannot be saved by name"):
        tx.save(custom, target, format="pickle")
    assert target.read_bytes() == before and os.listdir(tmp_path) == ["bn.pkl"]  # old file intact, no temp left
    tx.save(custom, target, format="msgpack")  # leaves only: fine


def test_template_mismatches_are_reported_by_path() -> None:
    x = np.ones((2, 3), np.float32)
    bn = tx.BatchNorm().init(0, x)
    data = tx.dumps(bn, "msgpack")
    with pytest.raises(tx.CheckpointError, match=r"bias: shape/dtype \(3,\) float32 in the file, \(4,\)"):
        tx.load(io.BytesIO(data), template=tx.BatchNorm().init(0, np.ones((2, 4), np.float32)))
    with pytest.raises(tx.CheckpointError, match="unexpected entries"):
        tx.load(io.BytesIO(data), template=tx.LayerNorm().init(0, x))
    no_bias = tx.BatchNorm(use_bias=False).init(0, x)
    with pytest.raises(tx.CheckpointError, match="bias: the checkpoint has None"):
        tx.load(io.BytesIO(tx.dumps(no_bias, "msgpack")), template=bn)
    with pytest.raises(tx.CheckpointError, match="bias: missing from the checkpoint"):
        tx.load(io.BytesIO(tx.dumps(no_bias, "npz")), template=bn)
    half = tx.LayerNorm().init(0, x)
    half.scale = half.scale.astype(jnp.float16)
    with pytest.raises(tx.CheckpointError, match="scale: shape/dtype"):
        tx.load(io.BytesIO(tx.dumps(tx.LayerNorm().init(0, x), "npz")), template=half)
    with pytest.raises(tx.CheckpointError, match="template has None"):
        tx.load(io.BytesIO(data), template=tx.BatchNorm())  # uninitialized template
    with pytest.raises(tx.CheckpointError):
        tx.load(io.BytesIO(tx.dumps(bn, "pickle")), template=tx.LayerNorm().init(0, x))


def test_msgpack_is_flax_to_bytes_compatible() -> None:
    x = np.ones((2, 3), np.float32)
    m = tx.Sequential(tx.Linear(2), tx.BatchNorm(use_bias=False), jax.nn.relu).init(0, x)
    ours = tx.dumps(m, "msgpack")
    theirs = flax.serialization.to_bytes(m.to_dict(static_fields=False))
    assert ours == theirs
    restored = flax.serialization.msgpack_restore(ours)
    assert sorted(restored["layers"]) == ["0", "1", "2"] and restored["layers"]["1"]["bias"] is None
    loaded = tx.load(io.BytesIO(theirs), template=m)
    assert diff(m.copy()(x), loaded(x)).bitwise


def test_unknown_format_and_text_file(tmp_path: pathlib.Path) -> None:
    p = tmp_path / "notes.txt"
    p.write_text("hello")
    with pytest.raises(tx.CheckpointError, match="unknown checkpoint format"):
        tx.load(p)
    with pytest.raises(ValueError, match="unknown format"):
        tx.dumps(tx.LayerNorm().init(0, np.ones((1, 2), np.float32)), "hdf5")  # type: ignore[arg-type]
