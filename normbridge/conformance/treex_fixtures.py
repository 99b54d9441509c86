"""Measuring the treex facade against checkpoints written by the real treex 0.6.12.

The fixtures (``<name>.{pickle,cloudpickle,pickle_np,cloudpickle_np}.pkl``,
``<name>.state.{msgpack,npz}``, ``<name>.expected.npz`` and ``manifest.json``)
are the ground truth. Each function here loads a fixture through
:func:`normbridge.adapters.treex.load` and returns named comparisons against the
recorded outputs and statistics; ``tests/conformance/test_treex_fixtures.py``
asserts on every one, ``normbridge.conformance.treex.rows`` summarizes them.

Tolerances (from the issue): float32 within 1e-6 relative to max |expected|,
float16 within 1e-3; saved leaves and freshly initialized leaves bitwise.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import pathlib
import warnings
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from normbridge.conformance.measure import Diff, diff

#: Relative tolerance per output dtype for fixture reproduction.
FIXTURE_TOL = {"float32": 1e-6, "float16": 1e-3}
PICKLE_FORMATS = ("pickle", "cloudpickle", "pickle_np", "cloudpickle_np")
LEAF_FORMATS = ("flax_msgpack_state_dict", "npz_state_dict")


class FixturesNotFound(FileNotFoundError):
    """The treex fixture folder is missing."""


#: Fixture sets shipped as package data: ``treex`` (single norm layers), ``treex-models`` (whole models).
FIXTURE_SETS = ("treex", "treex-models")
_ENV = {"treex": "NORMBRIDGE_TREEX_FIXTURES", "treex-models": "NORMBRIDGE_TREEX_MODEL_FIXTURES"}


def packaged_dir(name: str = "treex") -> pathlib.Path:
    """The folder of a fixture set shipped inside the installed ``normbridge`` package."""
    if name not in FIXTURE_SETS:
        raise ValueError(f"unknown fixture set {name!r}; expected one of {FIXTURE_SETS}")
    # The package is installed as plain files (no zip import), so the resource is a real folder.
    return pathlib.Path(str(importlib.resources.files("normbridge.conformance") / "fixtures" / name))


def fixtures_dir(explicit: str | os.PathLike | None = None, *, name: str = "treex") -> pathlib.Path:
    """``explicit``, else ``$NORMBRIDGE_TREEX_FIXTURES`` (``..._MODEL_FIXTURES`` for ``treex-models``),
    else the copy shipped in the package."""
    candidates = []
    if explicit is not None:
        candidates.append(pathlib.Path(explicit))
    elif os.environ.get(_ENV[name]):
        candidates.append(pathlib.Path(os.environ[_ENV[name]]))
    else:
        candidates.append(packaged_dir(name))
    for c in candidates:
        if (c / "manifest.json").is_file():
            return c
    raise FixturesNotFound(
        f"the {name} fixtures (manifest.json with the checkpoints written by real treex 0.6.12) were not found in "
        + ", ".join(str(c) for c in candidates)
        + f"; reinstall normbridge (they ship inside the package), or point ${_ENV[name]} at a folder that has them"
    )


def manifest(folder: pathlib.Path) -> list[dict[str, Any]]:
    with open(folder / "manifest.json", encoding="utf-8") as fh:
        return json.load(fh)["fixtures"]


def fixture_files(folder: pathlib.Path) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """``(fixture, file)`` for every checkpoint file listed in the manifest and present on disk."""
    for fx in manifest(folder):
        for fl in fx["files"]:
            if fl["format"] != "expected_npz" and (folder / fl["file"]).is_file():
                yield fx, fl


def expected(folder: pathlib.Path, fx: dict[str, Any]) -> dict[str, np.ndarray]:
    with np.load(folder / f"{fx['name']}.expected.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# ------------------------------------------------------------- configurations
_NAMES = {
    "jax.numpy.float32": jnp.float32,
    "jax.numpy.float16": jnp.float16,
    "jax.nn.initializers.zeros": jax.nn.initializers.zeros,
    "jax.nn.initializers.ones": jax.nn.initializers.ones,
}


def _config(layer: str, static: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    from normbridge.adapters import treex as tx

    cls = getattr(tx, layer)
    import inspect

    params = inspect.signature(cls.__init__).parameters
    cfg = {k: _NAMES.get(v, v) if isinstance(v, str) else v for k, v in static.items() if k in params}
    cfg.update({k: v for k, v in extra.items() if k in params and k not in cfg})
    return cfg


def build(fx: dict[str, Any]) -> Any:
    """A fresh facade module with the fixture's configuration (what a user would write as a template)."""
    from normbridge.adapters import treex as tx

    layer = fx["layer"].rsplit(".", 1)[-1]
    if layer == "Sequential":
        layers = []
        for sub in fx["sublayers"]:
            cls = sub["class"].rsplit(".", 1)[-1]
            st = sub["static_fields"]
            if cls == "Linear":
                layers.append(tx.Linear(st["features_out"], use_bias=st["use_bias"]))
            elif cls == "Lambda":
                layers.append(tx.Lambda(getattr(jax.nn, st["f"].rsplit(".", 1)[-1])))
            else:
                momentum = 0.9 if "momentum=0.9" in fx["config"]["layers"][sub["index"]] else 0.99
                layers.append(getattr(tx, cls)(**_config(cls, st, {"momentum": momentum})))
        return tx.Sequential(*layers)
    return getattr(tx, layer)(**_config(layer, fx["static_fields"], fx["config"]))


def init_seed(fx: dict[str, Any]) -> int:
    """The seed of ``.init(seed, x_init)`` recorded in the notes."""
    note = fx["notes"]
    return int(note.split(".init(", 1)[1].split(",", 1)[0])


def template(fx: dict[str, Any], exp: dict[str, np.ndarray]) -> Any:
    """``build(fx).init(seed, x_init)`` with the saved flags: the template for leaves-only formats."""
    fresh = build(fx)
    # jit: the lazy init of a whole model runs many small ops (a compile each when eager)
    module = jax.jit(lambda x: fresh.init(init_seed(fx), x))(exp["x_init"])
    flags = fx["saved_flags"]
    module = module.train(flags["training"]).freeze(flags["frozen"])
    return module


def load_file(folder: pathlib.Path, fx: dict[str, Any], fl: dict[str, Any]) -> Any:
    """Load one fixture file as a facade module (leaves-only formats through :func:`template`)."""
    from normbridge.adapters import treex as tx

    path = folder / fl["file"]
    if fl["format"] in LEAF_FORMATS:
        return tx.load(path, template=template(fx, expected(folder, fx)))
    return tx.load(path)


# ------------------------------------------------------------------ measuring
Case = tuple[str, Diff, float]


def _case(name: str, want: np.ndarray, got: Any, tol: float | None = None) -> Case:
    want, got = np.asarray(want), np.asarray(got)
    return name, diff(want, got), tol if tol is not None else FIXTURE_TOL.get(str(want.dtype), 1e-6)


def ok(case: Case) -> bool:
    _, d, tol = case
    return d.within(tol)


def _bn(module: Any) -> Any:
    return module.layers[1] if type(module).__name__ == "Sequential" else module


def reproduce(fx: dict[str, Any], module: Any, exp: dict[str, np.ndarray]) -> list[Case]:
    """Outputs and statistics of ``module`` (as loaded) against the recorded ones; ``module`` is not changed."""
    x = exp["x"]
    seq = fx["layer"].endswith("Sequential")
    pre = "bn_" if seq else ""
    has_stats = f"{pre}mean_saved" in exp
    cases: list[Case] = []
    # saved leaves, bitwise
    for leaf in ("scale", "bias", "mean", "var"):
        if f"{pre}{leaf}_saved" in exp:
            cases.append(_case(f"{leaf}_saved", exp[f"{pre}{leaf}_saved"], getattr(_bn(module), leaf), 0.0))
    m = module.copy()
    cases.append(_case("y_as_saved", exp["y_as_saved"], m(x)))
    if has_stats and f"{pre}mean_after_as_saved_call" in exp:
        cases.append(_case("mean_after_as_saved_call", exp[f"{pre}mean_after_as_saved_call"], _bn(m).mean))
        cases.append(_case("var_after_as_saved_call", exp[f"{pre}var_after_as_saved_call"], _bn(m).var))
    m = module.train().unfreeze()
    cases.append(_case("y_train", exp["y_train"], m(x)))
    if has_stats:
        cases.append(_case("mean_after_train_call", exp[f"{pre}mean_after_train_call"], _bn(m).mean))
        cases.append(_case("var_after_train_call", exp[f"{pre}var_after_train_call"], _bn(m).var))
    m = module.eval()
    cases.append(_case("y_eval", exp["y_eval"], m(x)))
    if has_stats:
        cases.append(_case("eval leaves stats unchanged", exp[f"{pre}mean_saved"], _bn(m).mean, 0.0))
    if "y_frozen_train" in exp:
        m = module.train().freeze()
        cases.append(_case("y_frozen_train", exp["y_frozen_train"], m(x)))
        cases.append(_case("frozen leaves stats unchanged", exp["var_saved"], m.var, 0.0))
    if "y_use_running_average_true" in exp:
        m = module.train().unfreeze()
        cases.append(_case("y_use_running_average_true", exp["y_use_running_average_true"], m(x, True)))
        m = module.eval()
        cases.append(_case("y_use_running_average_false", exp["y_use_running_average_false"], m(x, False)))
        cases.append(_case("mean_after_use_running_average_false", exp["mean_after_use_running_average_false"], m.mean))
        cases.append(_case("var_after_use_running_average_false", exp["var_after_use_running_average_false"], m.var))
    return cases


def reproduce_init(fx: dict[str, Any], exp: dict[str, np.ndarray]) -> list[Case]:
    """Fresh facade ``init`` leaves against ``init_*`` (bitwise), and the 3 recorded training calls' statistics."""
    module = build(fx).init(init_seed(fx), exp["x_init"])
    cases = [_case(f"init_{k[5:]}", exp[k], getattr(module, k[5:]), 0.0) for k in sorted(exp) if k.startswith("init_")]
    if "train_batch_0" in exp and "mean_saved" in exp:
        m = module.copy()
        for i in range(3):
            m(exp[f"train_batch_{i}"])
        cases.append(_case("mean after 3 training calls", exp["mean_saved"], m.mean))
        cases.append(_case("var after 3 training calls", exp["var_saved"], m.var))
    return cases


def layout(fx: dict[str, Any], fl: dict[str, Any], module: Any) -> list[str]:
    """Mismatches between the loaded module and the manifest: flags, static fields, leaves (kind, shape, dtype)."""
    from normbridge.adapters.treex.module import Module

    problems: list[str] = []
    flags = fx["saved_flags"]
    got = {"training": module.training, "frozen": module.frozen, "initialized": module.initialized}
    if got != flags:
        problems.append(f"flags {got} != saved {flags}")
    static = fx.get("static_fields") or {}
    if fl["format"] in LEAF_FORMATS:
        static = {}  # leaves-only formats take their configuration from the template
    for k, v in static.items():
        have = getattr(module, k, "<missing>")
        want = _NAMES.get(v, v) if isinstance(v, str) else v
        if have is not want and have != want:
            problems.append(f"static {k}: {have!r} != {v!r}")
    jax_leaves = fl["format"] in ("pickle", "cloudpickle")
    for leaf in fx["leaves"]:
        obj: Any = module
        *parents, name = leaf["path"].split("/")
        for p in parents:
            obj = obj[int(p)] if isinstance(obj, list) else getattr(obj, p)
        value = getattr(obj, name, "<missing>")
        if "value" in leaf:
            if value is not None:
                problems.append(f"{leaf['path']}: expected None")
            continue
        if not isinstance(value, jax.Array):
            problems.append(f"{leaf['path']}: not a jax array ({type(value).__name__})")
            continue
        if list(value.shape) != leaf["shape"] or str(value.dtype) != leaf["dtype"]:
            problems.append(f"{leaf['path']}: {value.shape} {value.dtype} != {leaf['shape']} {leaf['dtype']}")
        if jax_leaves and bool(value.weak_type) != leaf["weak_type"]:
            problems.append(f"{leaf['path']}: weak_type {value.weak_type} != {leaf['weak_type']}")
        assert isinstance(obj, Module)
        kind = obj._field_metadata[name].kind
        want_kind = leaf["kind"].rsplit(".", 1)[-1] if leaf["kind"].startswith("treex.types.") else "NoneType"
        if kind.__name__ != want_kind:
            problems.append(f"{leaf['path']}: kind {kind.__name__} != {want_kind}")
    return problems


def quiet_load_dict(path: pathlib.Path) -> Any:
    """``load`` without a template (expects and swallows the UserWarning)."""
    from normbridge.adapters import treex as tx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return tx.load(path)


def channels_first(fx: dict[str, Any], module: Any, x: np.ndarray) -> bool:
    """Whether ``x`` must be moved to ``(N, C, ...)`` for the Equinox equivalent of ``module``."""
    layer = fx["layer"].rsplit(".", 1)[-1]
    if layer == "GroupNorm":
        return x.ndim > 2
    if layer == "BatchNorm":
        return x.ndim > 2 and module.axis in (-1, x.ndim - 1)
    return False


def equinox_eval(fx: dict[str, Any], module: Any, exp: dict[str, np.ndarray], backend: str = "equinox") -> Case:
    """``to_equinox(module)`` run on the fixture's ``x`` (vmapped, channels first where needed) against ``y_eval``."""
    from normbridge.adapters.treex.to_equinox import to_equinox

    model, state = to_equinox(module, backend=backend)  # type: ignore[arg-type]
    x = exp["x"]
    move = channels_first(fx, module, x)
    xe = np.moveaxis(x, -1, 1) if move else x
    if fx["layer"].endswith("LayerNorm") and x.ndim > 2:
        raise NotImplementedError("LayerNorm fixtures are 2-D")
    # One compiled call (the model is a closure constant: its Lambda holds a plain function).
    run = jax.jit(lambda xx, st: jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(xx, st))
    y, _ = run(xe, state)
    y = np.moveaxis(np.asarray(y), 1, -1) if move else np.asarray(y)
    return _case(f"equinox[{backend}] y_eval", exp["y_eval"], y)


# ---------------------------------------------------------- whole-model fixtures
#: The model fixtures' keys that are RNG-dependent (real treex's Dropout masks); reproduced too.
RNG_PREFIXES = ("y_train_rng", "y_as_saved_rng", "after_train_rng_call/")


def build_model(fx: dict[str, Any]) -> Any:
    """The facade model of a ``treex-models`` fixture, written as its README says the user wrote it."""
    import functools

    from normbridge.adapters import treex as tx

    name = fx["name"]
    byref = "byref" in name
    if name.startswith("cnn_mnist"):
        act = jax.nn.gelu if byref else jax.nn.relu
        kw = {"kernel_init": jax.nn.initializers.zeros} if byref else {}

        def conv(n: int) -> Any:
            return tx.Conv(n, [3, 3], strides=[2, 2], **kw)

        return tx.Sequential(
            conv(8), tx.BatchNorm(), tx.Dropout(0.05), act,
            conv(16), tx.BatchNorm(), tx.Dropout(0.1), act,
            conv(32), functools.partial(jnp.mean, axis=(1, 2)), tx.Linear(10, **kw),
        )  # fmt: skip
    if name.startswith("mlp_flatten_ln"):
        if byref:
            zeros = functools.partial(jax.nn.initializers.zeros)
            mlp = tx.MLP([8, 8], activation=functools.partial(jax.nn.gelu), kernel_init=zeros, bias_init=zeros)
            return tx.Sequential(
                tx.Flatten(), mlp, tx.LayerNorm(), jax.nn.gelu, tx.Linear(10, kernel_init=jax.nn.initializers.zeros)
            )
        return tx.Sequential(tx.Flatten(), tx.MLP([8, 8]), tx.LayerNorm(), jax.nn.relu, tx.Linear(10))
    raise ValueError(f"no facade builder for the model fixture {name!r}")


def model_template(fx: dict[str, Any], exp: dict[str, np.ndarray]) -> Any:
    """``build_model(fx).init(seed, x)`` with the saved flags: the template for leaves-only formats."""
    module = build_model(fx).init(init_seed(fx), exp["x"])
    flags = fx["saved_flags"]
    return module.train(flags["training"]).freeze(flags["frozen"])


def load_model_file(folder: pathlib.Path, fx: dict[str, Any], fl: dict[str, Any]) -> Any:
    """Load one model fixture file as a facade module (leaves-only formats through :func:`model_template`)."""
    from normbridge.adapters import treex as tx

    path = folder / fl["file"]
    if fl["format"] in LEAF_FORMATS:
        return tx.load(path, template=model_template(fx, expected(folder, fx)))
    return tx.load(path)


def flat_leaves(module: Any) -> dict[str, np.ndarray]:
    """Every leaf of ``module`` by its ``/`` path (the npz state layout), as numpy arrays."""
    from normbridge.adapters.treex.serialization import state_dict

    out: dict[str, np.ndarray] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}/{k}" if path else str(k))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{path}/{i}" if path else str(i))
        elif node is not None:
            out[path] = np.asarray(node)

    walk(state_dict(module), "")
    return out


def _at(module: Any, path: str) -> Any:
    obj = module
    *parents, name = path.split("/")
    for p in parents:
        obj = obj[int(p)] if isinstance(obj, list) else getattr(obj, p)
    return getattr(obj, name)


def _dropout_off(module: Any) -> Any:
    """``module.train()`` with every Dropout (and its KeySeq) in eval mode: BatchNorm on batch statistics."""
    from normbridge.adapters.treex.dropout import Dropout

    m = module.train()
    for layer in m.layers:
        if isinstance(layer, Dropout):
            layer.eval(inplace=True)
    return m


def saved_state(folder: pathlib.Path, fx: dict[str, Any]) -> dict[str, np.ndarray]:
    """The leaves real treex saved (``<name>.state.npz``, ``/`` paths)."""
    with np.load(folder / f"{fx['name']}.state.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def state_problems(folder: pathlib.Path, fx: dict[str, Any], module: Any) -> list[str]:
    """Leaf paths, shapes and dtypes of ``module`` that differ from what real treex saved."""
    saved, have = saved_state(folder, fx), flat_leaves(module)
    problems = [f"missing leaf {p}" for p in sorted(set(saved) - set(have))]
    problems += [f"extra leaf {p}" for p in sorted(set(have) - set(saved))]
    for p in sorted(set(saved) & set(have)):
        if saved[p].shape != have[p].shape or saved[p].dtype != have[p].dtype:
            problems.append(f"{p}: {have[p].shape} {have[p].dtype} != saved {saved[p].shape} {saved[p].dtype}")
    return problems


def reproduce_model(folder: pathlib.Path, fx: dict[str, Any], module: Any, exp: dict[str, np.ndarray]) -> list[Case]:
    """A loaded model fixture against real treex: saved state (bitwise, from ``<name>.state.npz``),
    every deterministic output and the statistics it leaves, and the RNG-dependent Dropout outputs."""
    x = exp["x"]
    cases: list[Case] = []
    saved = saved_state(folder, fx)
    have = flat_leaves(module)
    for path, want in saved.items():
        if path in have:
            cases.append(_case(f"state {path}", want, have[path], 0.0))
    cases.append(_case("y_eval", exp["y_eval"], module.eval()(x)))
    if "y_train" in exp:
        cases.append(_case("y_train", exp["y_train"], module.train()(x)))
    if "y_as_saved" in exp:
        cases.append(_case("y_as_saved", exp["y_as_saved"], module.copy()(x)))
    if "y_train_dropout_off" in exp:
        m = _dropout_off(module)
        cases.append(_case("y_train_dropout_off", exp["y_train_dropout_off"], m(x)))
        for k in sorted(exp):
            if k.startswith("after_train_dropout_off_call/"):
                cases.append(_case(k, exp[k], _at(m, k.split("/", 1)[1])))
    if "y_train_rng" in exp:
        m = module.train()
        cases.append(_case("y_train_rng", exp["y_train_rng"], m(x)))
        for k in sorted(exp):
            if k.startswith("after_train_rng_call/"):
                tol = 0.0 if k.endswith("/key") else None
                cases.append(_case(k, exp[k], _at(m, k.split("/", 1)[1]), tol))
    if "y_as_saved_rng" in exp:
        cases.append(_case("y_as_saved_rng", exp["y_as_saved_rng"], module.copy()(x)))
    return cases


def reproduce_model_init(fx: dict[str, Any], exp: dict[str, np.ndarray]) -> list[Case]:
    """``build_model(fx).init(seed, x)`` against the recorded ``init/<path>`` leaves (real treex's init)."""
    init = [k for k in sorted(exp) if k.startswith("init/")]
    if not init or "byref" in fx["name"]:
        return []  # _byref kernels were overwritten after init by the fixture generator
    have = flat_leaves(build_model(fx).init(init_seed(fx), exp["x"]))
    return [_case(k, exp[k], have.get(k[5:], np.full(exp[k].shape, np.nan)), 1e-6) for k in init]


def equinox_model_eval(module: Any, exp: dict[str, np.ndarray], backend: str = "equinox") -> Case:
    """``to_equinox(module)`` on the fixture's NHWC ``x`` moved to NCHW, per example, against ``y_eval``."""
    from normbridge.adapters.treex.to_equinox import to_equinox

    model, state = to_equinox(module, backend=backend)  # type: ignore[arg-type]
    xe = np.moveaxis(exp["x"], -1, 1)
    run = jax.jit(lambda xx, st: jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(xx, st))
    y, _ = run(xe, state)
    return _case(f"equinox[{backend}] y_eval", exp["y_eval"], np.asarray(y), 1e-5)
