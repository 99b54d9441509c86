"""Named checkpoints: loading by path survives field reordering; leaf-order files are checked, not trusted."""

from __future__ import annotations

import io
import json
import os
import zipfile

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normbridge.adapters.equinox as nb
from normbridge.adapters.equinox.checkpoint import CheckpointMismatchError, load, save
from normbridge.conformance import equinox_measure as em


class Old(eqx.Module):
    """Two same-shaped BatchNorms plus a SpectralNorm: the layout that wrote the checkpoint."""

    first: nb.BatchNorm
    second: nb.BatchNorm
    sn: nb.SpectralNorm

    def __init__(self, c: int = 3, c2: int = 3):
        self.first = nb.BatchNorm(c, "batch", mode="batch")
        self.second = nb.BatchNorm(c2, "batch", mode="batch")
        self.sn = nb.SpectralNorm(eqx.nn.Linear(c2, 2, key=jax.random.PRNGKey(0)), "weight", key=jax.random.PRNGKey(1))

    def __call__(self, x, state):
        # x has max(c, c2) entries; each BatchNorm sees its own slice
        _, state = self.first(x[: self.first.input_size], state)
        y, state = self.second(2 * x[-self.second.input_size :] + 1, state)
        return self.sn(y, state)


class New(eqx.Module):
    """The same model after a refactor that swapped the two field declarations."""

    second: nb.BatchNorm
    first: nb.BatchNorm
    sn: nb.SpectralNorm

    def __init__(self, c: int = 3, c2: int = 3):
        self.first = nb.BatchNorm(c, "batch", mode="batch")
        self.second = nb.BatchNorm(c2, "batch", mode="batch")
        self.sn = nb.SpectralNorm(eqx.nn.Linear(c2, 2, key=jax.random.PRNGKey(0)), "weight", key=jax.random.PRNGKey(1))

    __call__ = Old.__call__


def trained(c: int = 3, c2: int = 3):
    """An ``Old`` model after 2 training steps, with distinct statistics in ``first`` and ``second``."""
    model, state = eqx.nn.make_with_state(Old)(c, c2)
    model, _ = em.randomize(model, model, (0,))
    run = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    for step in range(2):
        _, state = run(em.data((step,), (6, max(c, c2)), jnp.float32, offset=3.0 * step + 1), state)
    return model, state


def stats(model, state):
    return {
        "first": [np.asarray(a) for a in state.get(model.first.batch_state_index)],
        "second": [np.asarray(a) for a in state.get(model.second.batch_state_index)],
        "first.weight": np.asarray(model.first.weight),
        "second.weight": np.asarray(model.second.weight),
    }


def assert_same(a, b) -> None:
    for k in a:
        for x, y in zip(np.atleast_1d(a[k]) if isinstance(a[k], np.ndarray) else a[k],
                        np.atleast_1d(b[k]) if isinstance(b[k], np.ndarray) else b[k]):
            np.testing.assert_array_equal(x, y, err_msg=k)


def test_reordered_state_entries_load_by_name(tmp_path) -> None:
    """Two same-shaped ``State`` entries swap places in the new class: the named format still loads them right."""
    old_model, old_state = trained()
    path = tmp_path / "model.nbeqx"
    save(path, old_model, old_state)
    like_model, like_state = eqx.nn.make_with_state(New)()
    model, state, report = load(path, like_model, like_state)
    assert report.ok, report.text()
    # the report names every entry whose position moved (what a leaf-order load would have swapped)
    assert "state/first/batch_state_index/0" in report.reordered
    assert "model/second/weight" in report.reordered
    assert_same(stats(old_model, old_state), stats(model, state))
    # while the statistics really differ between the two layers (the swap would be visible)
    assert not np.array_equal(stats(old_model, old_state)["first"][0], stats(old_model, old_state)["second"][0])


def test_native_leaf_order_silently_swaps_and_load_detects_by_shape(tmp_path) -> None:
    """Plain ``tree_serialise_leaves`` + reordered model: native swaps; ``load`` reports every mismatch by path."""
    old_model, old_state = trained(3, 4)
    plain = tmp_path / "model.eqx"
    eqx.tree_serialise_leaves(plain, (old_model, old_state))
    like_model, like_state = eqx.nn.make_with_state(New)(3, 4)
    # native: the shapes differ, so equinox at least raises somewhere; with equal shapes it would not (next test)
    with pytest.raises(Exception):  # noqa: B017 - whatever native raises, it names no path
        eqx.tree_deserialise_leaves(plain, (like_model, like_state))
    with pytest.raises(CheckpointMismatchError) as info:
        load(plain, like_model, like_state)
    report = info.value.report
    assert report.matched_by == "leaves"
    assert any(r.startswith("model/second/weight: file (3,) vs model (4,)") for r in report.reshaped), report.reshaped
    assert any(r.startswith("state/first/batch_state_index/0: file (4,)") for r in report.reshaped), report.reshaped
    assert "model/second/weight" in str(info.value)


def test_same_shaped_swap_in_leaf_file_is_undone_with_written_like(tmp_path) -> None:
    """Equal shapes: native loads the swapped values silently; ``load(written_like=...)`` maps them by path."""
    old_model, old_state = trained()
    plain = tmp_path / "model.eqx"
    eqx.tree_serialise_leaves(plain, (old_model, old_state))
    like_model, like_state = eqx.nn.make_with_state(New)()
    # native behaviour (upstream equinox #267/#914/#1093): no error, statistics of `first` land in `second`
    n_model, n_state = eqx.tree_deserialise_leaves(plain, (like_model, like_state))
    native_stats, true_stats = stats(n_model, n_state), stats(old_model, old_state)
    np.testing.assert_array_equal(native_stats["second"][0], true_stats["first"][0])
    assert not np.array_equal(native_stats["first"][0], true_stats["first"][0])
    # normbridge: given the writer's layout, records get their paths and land where they belong
    writer = eqx.nn.make_with_state(Old)()
    model, state, report = load(plain, like_model, like_state, written_like=writer)
    assert report.ok and report.matched_by == "leaves+written_like"
    assert "state/first/batch_state_index/0" in report.reordered
    assert_same(true_stats, stats(model, state))


def test_plain_file_same_layout_loads(tmp_path) -> None:
    """A plain file written by the same layout loads by position with a clean report (also bf16 leaves)."""
    model = nb.LayerNorm((2, 3), dtype=jnp.bfloat16)
    model, _ = em.randomize(model, model, (2,))
    plain = tmp_path / "ln.eqx"
    eqx.tree_serialise_leaves(plain, model)
    loaded, state, report = load(plain, nb.LayerNorm((2, 3), dtype=jnp.bfloat16))
    assert report.ok and state is None
    assert loaded.weight.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(loaded.weight, np.float32), np.asarray(model.weight, np.float32))


def test_report_lists_missing_extra_reshaped_retyped(tmp_path) -> None:
    """Non-strict load keeps ``like``'s values for every reported entry and loads the rest."""
    src = eqx.nn.Sequential([nb.LayerNorm(3), nb.GroupNorm(1, 4), nb.RMSNorm(2)])
    src, _ = em.randomize(src, src, (5,))
    path = tmp_path / "seq.nbeqx"
    save(path, src)
    like = eqx.nn.Sequential([nb.LayerNorm(3), nb.GroupNorm(1, 5), nb.RMSNorm(2, dtype=jnp.float16, use_bias=False)])
    like = eqx.nn.Sequential([*like.layers, nb.LayerNorm(7)])
    with pytest.raises(CheckpointMismatchError):
        load(path, like)
    model, _, report = load(path, like, strict=False)
    assert report.missing == ("model/layers/3/weight", "model/layers/3/bias")
    assert report.extra == ("model/layers/2/bias",)
    assert report.reshaped == (
        "model/layers/1/weight: file (4,) vs model (5,)",
        "model/layers/1/bias: file (4,) vs model (5,)",
    )
    assert report.retyped == ("model/layers/2/weight: file float32 vs model float16",)
    np.testing.assert_array_equal(model.layers[0].weight, src.layers[0].weight)
    np.testing.assert_array_equal(model.layers[1].weight, like.layers[1].weight)


def test_format_is_zip_of_npy_with_json_index_and_no_pickles(tmp_path) -> None:
    model, state = eqx.nn.make_with_state(nb.BatchNorm)(3, "batch", mode="ema", dtype=jnp.bfloat16)
    path = tmp_path / "bn.nbeqx"
    save(path, model, state)
    with zipfile.ZipFile(path) as zf:
        index = json.loads(zf.read("index.json"))
        paths = [e["path"] for e in index["entries"]]
        assert paths == [
            "model/weight",
            "model/bias",
            "model/inference",
            "state/ema_first_time_index",
            "state/ema_state_index/0",
            "state/ema_state_index/1",
        ]
        for e in index["entries"]:
            arr = np.load(io.BytesIO(zf.read(e["file"])), allow_pickle=False)
            assert list(arr.shape) == e["shape"]
    assert {e["dtype"] for e in index["entries"]} == {"bfloat16", "bool"}


def test_save_is_atomic(tmp_path, monkeypatch) -> None:
    """A failure while writing leaves the previous checkpoint intact and no temporary file behind."""
    model = nb.LayerNorm(3)
    path = tmp_path / "ln.nbeqx"
    save(path, model)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(np, "save", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save(path, nb.LayerNorm(3, use_bias=False))
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ln.nbeqx"]


def test_rejects_unknown_files(tmp_path) -> None:
    path = tmp_path / "junk.bin"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="neither a normbridge checkpoint"):
        load(path, nb.LayerNorm(3))
