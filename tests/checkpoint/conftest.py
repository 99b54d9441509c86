"""Real checkpoint files of every format normbridge reads, written once per session by each library."""

from __future__ import annotations

import pathlib
import pickle
import shutil

import jax.numpy as jnp
import numpy as np
import pytest


def linen_variables() -> dict:
    rng = np.random.default_rng(0)
    return {
        "params": {
            "Dense_0": {"kernel": rng.standard_normal((5, 8)).astype(np.float32), "bias": np.zeros(8, np.float32)},
            "BatchNorm_0": {"scale": np.ones(8, np.float32), "bias": rng.standard_normal(8).astype(np.float32)},
            "LayerNorm_0": {"scale": np.ones(8, jnp.bfloat16), "bias": np.zeros(8, jnp.bfloat16)},
        },
        "batch_stats": {"BatchNorm_0": {"mean": rng.standard_normal(8).astype(np.float32),
                                        "var": rng.uniform(0.5, 2, 8).astype(np.float32)}},
    }


@pytest.fixture(scope="session")
def real_files(tmp_path_factory: pytest.TempPathFactory, treex_fixtures: pathlib.Path) -> dict[str, pathlib.Path]:
    """``{format: path}``: one real file (Orbax: directory) per format, written by its own library."""
    import equinox as eqx
    import jax

    from normbridge import checkpoint as ck

    d = tmp_path_factory.mktemp("real")
    tree = linen_variables()
    out = {}
    for fmt, name in [("msgpack", "linen.msgpack"), ("orbax", "linen.orbax"), ("safetensors", "t.safetensors"),
                      ("npz", "t.npz")]:
        ck.write_tree(d / name, tree, fmt)
        out[fmt] = d / name
    model = eqx.nn.Sequential([eqx.nn.Linear(5, 8, key=jax.random.key(0)), eqx.nn.LayerNorm(8)])
    bn_model, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(8, axis_name="batch")
    eqx.tree_serialise_leaves(d / "leaves.eqx", (model, bn_model, state))
    out["eqx-leaves"] = d / "leaves.eqx"
    ck.equinox_named.write(str(d / "named.nbeqx"), (model, bn_model), state)
    out["equinox"] = d / "named.nbeqx"
    shutil.copy(treex_fixtures / "batchnorm_default.pickle.pkl", d / "treex.pkl")
    out["pickle"] = d / "treex.pkl"
    shutil.copy(treex_fixtures / "batchnorm_default.cloudpickle_np.pkl", d / "treex_np.pkl")
    out["pickle-cloud"] = d / "treex_np.pkl"
    shutil.copy(treex_fixtures / "sequential_linear_bn_relu_linear_ln.state.msgpack", d / "treex.msgpack")
    out["msgpack-treex"] = d / "treex.msgpack"
    # a protocol-0 pickle of plain data (what an old treex-era script could have written)
    (d / "p0.pkl").write_bytes(pickle.dumps({"scale": [1.0, 2.0]}, protocol=0))
    out["pickle-0"] = d / "p0.pkl"
    return out
