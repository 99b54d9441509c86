"""``nnx.view_info`` and ``nnx.view`` see facade layers exactly as they see the native ones (all seven)."""

from __future__ import annotations

import inspect

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import normbridge.adapters.nnx as F

LAYERS = ("BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm", "SpectralNorm", "WeightNorm")


def build(ns, layer: str):
    rngs = nnx.Rngs(0)
    if layer in ("SpectralNorm", "WeightNorm"):
        return getattr(ns, layer)(nnx.Linear(4, 4, rngs=nnx.Rngs(1)), rngs=rngs)
    if layer == "GroupNorm":
        return ns.GroupNorm(4, num_groups=2, rngs=rngs)
    return getattr(ns, layer)(4, rngs=rngs)


def outcome(fn):
    try:
        return fn(), None
    except Exception as err:  # measured: both must fail the same way
        return None, err


class Model(nnx.Module):
    """A small model mixing a norm layer with native layers that also take views (Dropout)."""

    def __init__(self, ns, layer: str):
        self.drop = nnx.Dropout(0.5, rngs=nnx.Rngs(2))
        self.norm = build(ns, layer)


@pytest.mark.parametrize("layer", LAYERS)
def test_view_info_is_native_text(layer: str) -> None:
    native, facade = outcome(lambda: nnx.view_info(build(nnx, layer))), outcome(lambda: nnx.view_info(build(F, layer)))
    assert native[1] is None, native[1]
    assert facade == native
    composite = nnx.view_info(Model(nnx, layer)), nnx.view_info(Model(F, layer))
    assert composite[1] == composite[0]
    assert "Dropout:" in composite[0]


def test_batch_norm_set_view_documents_its_arguments_as_native() -> None:
    assert inspect.signature(F.BatchNorm.set_view) == inspect.signature(nnx.BatchNorm.set_view)
    assert inspect.getdoc(F.BatchNorm.set_view) == inspect.getdoc(nnx.BatchNorm.set_view)
    # every set_view argument is documented (what view_info reads)
    assert "use_running_average:" in nnx.view_info(F.BatchNorm(3, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("kwargs", [{"use_running_average": True}, {"use_running_average": False}, {}, {"bogus": 1}])
def test_view_behaves_as_native(layer: str, kwargs: dict) -> None:
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32))
    results = {}
    for name, ns in (("native", nnx), ("facade", F)):
        m = build(ns, layer)
        view, err = outcome(lambda m=m: nnx.view(m, **kwargs))
        if err is not None:
            results[name] = (type(err), str(err))
            continue
        before = getattr(m, "use_running_average", "absent")
        attr = getattr(view, "use_running_average", "absent")
        # BatchNorm: the view changes the flag on the copy only, and the copy normalizes accordingly
        y = view(x) if layer != "SpectralNorm" else view(x, update_stats=False)
        results[name] = (view is m, before, attr, getattr(m, "use_running_average", "absent"), np.asarray(y))
    n, f = results["native"], results["facade"]
    assert len(n) == len(f)
    for a, b in zip(n, f):
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b)
        else:
            assert a == b, (n, f)


def test_view_on_a_model_switches_the_facade_batch_norm() -> None:
    x = jnp.asarray(np.random.default_rng(1).normal(3.0, 2.0, size=(5, 4)).astype(np.float32))
    outs = {}
    for name, ns in (("native", nnx), ("facade", F)):
        model = Model(ns, "BatchNorm")
        ev = nnx.view(model, use_running_average=True, deterministic=True)
        tr = nnx.view(model, use_running_average=False, deterministic=True)
        outs[name] = (np.asarray(ev.norm(x)), np.asarray(tr.norm(x)), ev.norm.use_running_average,
                      tr.norm.use_running_average, model.norm.use_running_average)
    for a, b in zip(outs["native"], outs["facade"]):
        np.testing.assert_array_equal(a, b)
    # eval output uses the stored (0, 1) statistics: the input unchanged up to eps; train output is normalized
    assert not np.allclose(outs["facade"][0], outs["facade"][1])
