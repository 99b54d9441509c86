"""Measured conformance of the treex facade.

* ``BatchNorm``, ``LayerNorm``, ``GroupNorm`` and ``Sequential`` (with ``Linear``
  and ``Lambda``): measured against the checkpoints written by the **real treex
  0.6.12** (treex no longer imports): every fixture file is loaded and its
  recorded outputs, statistics, flags and layout are reproduced
  (:mod:`normbridge.conformance.treex_fixtures`).
* ``RMSNorm``, ``InstanceNorm``, ``SpectralNorm``, ``WeightNorm`` (additions
  treex never had), and the three treex layers a second time: measured against
  **native flax.linen configured the way treex configured flax** (same momentum
  array, epsilon, axes, ``dtype=float32``), by :func:`compare_with_linen`; the
  pytest suite drives the same function with hypothesis-drawn configurations,
  against native linen and against the linen facade.
"""

from __future__ import annotations

import inspect
import io
import itertools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from normbridge.conformance import Cell, Row, measured
from normbridge.conformance import treex_fixtures as tf
from normbridge.conformance.measure import Accumulator, Diff, diff

EVIDENCE_FIXTURES = "verified against real treex 0.6.12 fixtures (shipped in normbridge/conformance/fixtures/treex)"
EVIDENCE_LINEN = "measured against native flax.linen {version} configured as treex configured flax"

#: treex 0.6.12 constructor signatures (keyword-only, defaults), from the seed docs and the fixtures' manifest.
TREEX_SIGNATURES: dict[str, dict[str, Any]] = {
    "BatchNorm": {
        "axis": -1, "momentum": 0.99, "epsilon": 1e-5, "dtype": jnp.float32, "use_bias": True, "use_scale": True,
        "bias_init": jax.nn.initializers.zeros, "scale_init": jax.nn.initializers.ones, "axis_name": None,
        "axis_index_groups": None,
    },
    "LayerNorm": {
        "epsilon": 1e-5, "dtype": jnp.float32, "use_bias": True, "use_scale": True,
        "bias_init": jax.nn.initializers.zeros, "scale_init": jax.nn.initializers.ones,
    },
    "GroupNorm": {
        "num_groups": 32, "group_size": None, "epsilon": 1e-5, "dtype": jnp.float32, "use_bias": True,
        "use_scale": True, "bias_init": jax.nn.initializers.zeros, "scale_init": jax.nn.initializers.ones,
    },
}  # fmt: skip

ADDITIONS = ("RMSNorm", "InstanceNorm", "SpectralNorm", "WeightNorm")
LAYERS = ("BatchNorm", "LayerNorm", "GroupNorm", *ADDITIONS)


# ================================================================ signatures
def signature_problems(layer: str) -> list[str]:
    """Differences between the facade constructor and treex's (keyword-only, names, defaults)."""
    from normbridge.adapters import treex as tx

    params = dict(inspect.signature(getattr(tx, layer).__init__).parameters)
    params.pop("self")
    want = TREEX_SIGNATURES[layer]
    problems = []
    if list(params) != list(want):
        problems.append(f"arguments {list(params)} != {list(want)}")
    for name, p in params.items():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY:
            problems.append(f"{name} is not keyword-only")
        if name in want and p.default is not want[name] and p.default != want[name]:
            problems.append(f"{name} default {p.default!r} != {want[name]!r}")
    return problems


def addition_signature_problems(layer: str) -> list[str]:
    """An addition's constructor: keyword-only (but the wrapped ``layer``), every argument a linen field with
    linen's default, except treex's conventions ``epsilon=1e-5`` (norms) and ``dtype=float32``."""
    import dataclasses

    import flax.linen as nn

    from normbridge.adapters import treex as tx

    params = dict(inspect.signature(getattr(tx, layer).__init__).parameters)
    params.pop("self")
    fields = {f.name: f for f in dataclasses.fields(getattr(nn, layer))}
    problems = []
    for name, p in params.items():
        if name == "layer":
            if "layer_instance" not in fields or p.kind is inspect.Parameter.KEYWORD_ONLY:
                problems.append("layer must be the positional wrapped module (linen layer_instance)")
            continue
        if p.kind is not inspect.Parameter.KEYWORD_ONLY:
            problems.append(f"{name} is not keyword-only")
        if name not in fields:
            problems.append(f"{name} is not a linen {layer} field")
            continue
        f = fields[name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if name == "epsilon" and layer in ("RMSNorm", "InstanceNorm"):
            default = 1e-5
        if name == "dtype":
            default = jnp.float32
        if p.default is not default and p.default != default:
            problems.append(f"{name} default {p.default!r} != {default!r}")
    return problems


# ======================================================= facade vs flax.linen
def _linen(impl: str) -> Any:
    if impl == "facade":
        import normbridge.adapters.linen as nnf

        return nnf
    import flax.linen as nn

    return nn


def _dense(features: int) -> Any:
    import flax.linen as nn

    return nn.Dense(features)  # Dense is not a normalization layer: native for both linen implementations


def build_pair(layer: str, cfg: dict[str, Any], impl: str = "native") -> tuple[Any, Any]:
    """``(treex facade module, linen module)`` configured alike (treex's way of configuring flax)."""
    from normbridge.adapters import treex as tx

    nn = _linen(impl)
    cfg = dict(cfg)
    if layer == "BatchNorm":
        t = tx.BatchNorm(**cfg)
        lcfg = {k: v for k, v in cfg.items()}
        lcfg["momentum"] = t.momentum  # treex passed its 0-d array momentum into flax
        lcfg.setdefault("epsilon", 1e-5)
        lcfg.setdefault("dtype", jnp.float32)
        return t, nn.BatchNorm(**lcfg)
    if layer in ("LayerNorm", "GroupNorm", "RMSNorm", "InstanceNorm"):
        t = getattr(tx, layer)(**cfg)
        lcfg = {"epsilon": 1e-5, "dtype": jnp.float32, **cfg}
        return t, getattr(nn, layer)(**lcfg)
    features = cfg.pop("features")
    if layer == "SpectralNorm":
        t = tx.SpectralNorm(tx.Linear(features), **cfg)
        return t, nn.SpectralNorm(_dense(features), **cfg)
    if layer == "WeightNorm":
        t = tx.WeightNorm(tx.Linear(features), **cfg)
        return t, nn.WeightNorm(_dense(features), **cfg)
    raise ValueError(f"unknown layer {layer!r}")


def _treex_leaves(layer: str, m: Any) -> dict[str, Any]:
    """The facade's leaves under linen's variable paths (``params/...``, ``batch_stats/...``)."""
    if layer == "SpectralNorm":
        out = {"params/layer_instance/kernel": m.layer.kernel}
        if m.layer.bias is not None:
            out["params/layer_instance/bias"] = m.layer.bias
        if m.u is not None:
            out["batch_stats/layer_instance/kernel/u"] = m.u
            out["batch_stats/layer_instance/kernel/sigma"] = m.sigma
        return out
    if layer == "WeightNorm":
        out = {"params/layer_instance/kernel": m.layer.kernel, "params/layer_instance/bias": m.layer.bias}
        if m.scale is not None:
            out["params/layer_instance/kernel/scale"] = m.scale
        return out
    out = {}
    for name, col in (("scale", "params"), ("bias", "params"), ("mean", "batch_stats"), ("var", "batch_stats")):
        v = getattr(m, name, None)
        if v is not None:
            out[f"{col}/{name}"] = v
    return out


def _linen_leaves(variables: Any) -> dict[str, Any]:
    out = {}
    for col, tree in variables.items():
        for path, leaf in jax.tree_util.tree_flatten_with_path(dict(tree))[0]:
            out[col + "/" + "/".join(str(getattr(k, "key", k)) for k in path)] = leaf
    return out


def _set_leaves(layer: str, m: Any, leaves: dict[str, Any]) -> Any:
    m = m.copy()
    for path, v in leaves.items():
        parts = path.split("/")
        if layer in ("SpectralNorm", "WeightNorm"):
            if parts[-1] in ("u", "sigma", "scale") and len(parts) == 4:
                m.__dict__[parts[-1]] = v
            else:
                m.layer.__dict__[parts[-1]] = v
        else:
            m.__dict__[parts[-1]] = v
    return m


def _perturb(leaves: dict[str, Any], seed: int) -> dict[str, Any]:
    """Random but fixed values for every float leaf (so scale/bias/statistics are not trivially 1/0)."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in sorted(leaves.items()):
        noise = rng.uniform(0.5, 1.5, size=v.shape).astype(np.float32)
        out[k] = jnp.asarray(noise if k.endswith("var") else np.asarray(v, np.float32) + noise - 1.0, v.dtype)
    return out


def _call_linen(layer: str, lm: Any, variables: Any, x: Any, training: bool) -> tuple[Any, dict[str, Any]]:
    if layer == "BatchNorm":
        if training:
            y, upd = lm.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
            return y, _linen_leaves({**variables, **upd})
        return lm.apply(variables, x, use_running_average=True), _linen_leaves(variables)
    if layer == "SpectralNorm":
        y, upd = lm.apply(variables, x, update_stats=training, mutable=["batch_stats"])
        return y, _linen_leaves({**variables, **upd})
    return lm.apply(variables, x), _linen_leaves(variables)


def _nest(layer: str, flat: dict[str, Any]) -> dict[str, Any]:
    """Flat ``col/path`` leaves → linen's nested variable dicts (wrapper paths keep their ``/`` names)."""
    nest: dict[str, Any] = {}
    for k, v in flat.items():
        col, rest = k.split("/", 1)
        node = nest.setdefault(col, {})
        if layer in ("SpectralNorm", "WeightNorm") and col == "params" and not rest.endswith("scale"):
            node.setdefault("layer_instance", {})[rest.split("/")[-1]] = v
        else:
            node[rest] = v
    return nest


def compare_with_linen(
    layer: str,
    cfg: dict[str, Any],
    x: np.ndarray,
    *,
    training: bool = True,
    impl: str = "native",
    use_jit: bool = False,
    seed: int = 0,
) -> dict[str, list[tuple[str, Diff | bool, str]]]:
    """Run the treex facade and linen (``impl="native"`` or ``"facade"``) on the same parameters and input.

    Returns, per matrix column, ``(name, Diff or bool, detail)`` entries:
    ``state layout`` (facade leaves at init vs linen variables: paths, shapes,
    dtypes, values for deterministic inits), ``outputs``, ``train/eval
    semantics`` (the state after the call, in ``training`` or eval mode) and
    ``gradients`` (of ``<y, c>`` w.r.t. the input and every parameter). Outputs
    come from an eager call unless ``use_jit``; gradients are always jitted.
    """
    t, lm = build_pair(layer, cfg, impl)
    x = jnp.asarray(x)
    init_kwargs: dict[str, Any] = {}
    if layer == "SpectralNorm":
        init_kwargs = {"update_stats": False}  # treex style: nothing is updated while initializing
    elif layer == "BatchNorm":
        init_kwargs = {"use_running_average": True}
    variables = jax.jit(lambda k, xx: lm.init(k, xx, **init_kwargs))(jax.random.PRNGKey(seed), x)
    t = jax.jit(lambda xx: t.init(seed, xx))(x)
    out: dict[str, list[tuple[str, Diff | bool, str]]] = {
        "state layout": [], "train/eval semantics": [], "outputs": [], "gradients": []
    }  # fmt: skip
    native = _linen_leaves(variables)
    mine = _treex_leaves(layer, t)
    out["state layout"].append(("paths", sorted(native) == sorted(mine), f"{sorted(mine)} vs {sorted(native)}"))
    for k in sorted(set(native) & set(mine)):
        a, b = native[k], mine[k]
        layout_ok = a.shape == b.shape and a.dtype == b.dtype
        out["state layout"].append((f"{k} shape/dtype", layout_ok, f"{b.shape} {b.dtype} vs {a.shape} {a.dtype}"))
        if not (k.endswith("/kernel") or k.endswith("/u")):
            # deterministic initializers (zeros/ones) agree bitwise; random ones (kernels, u) cannot
            out["state layout"].append((f"init {k}", diff(a, b), "init value"))
    # The same (perturbed) values in both; SpectralNorm keeps linen's random u.
    if layer == "SpectralNorm":
        values = {**native, **_perturb({k: v for k, v in native.items() if k.startswith("params")}, seed)}
    else:
        values = _perturb(native, seed)
    t = _set_leaves(layer, t, values).train(training)
    params = {k: v for k, v in values.items() if k.startswith("params")}
    y_shape = jax.eval_shape(lambda xx: _call_linen(layer, lm, variables, xx, False)[0], x).shape
    c = jnp.asarray(np.random.default_rng(seed + 1).normal(size=y_shape).astype(np.float32))

    def facade_apply(p: dict[str, Any], xx: Any) -> tuple[Any, Any]:
        m = _set_leaves(layer, t, {**values, **p})
        y = m(xx)
        return y, _treex_leaves(layer, m)

    def linen_apply(p: dict[str, Any], xx: Any) -> tuple[Any, Any]:
        return _call_linen(layer, lm, _nest(layer, {**values, **p}), xx, training)

    def loss_of(apply: Callable[..., Any]) -> Callable[..., Any]:
        def loss(p: dict[str, Any], xx: Any) -> tuple[Any, Any]:
            y, state = apply(p, xx)
            return jnp.sum(y.astype(jnp.float32) * c), (y, state)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

    (_, (y_l, s_l)), g_l = loss_of(linen_apply)(params, x)
    (_, (y_t, s_t)), g_t = loss_of(facade_apply)(params, x)
    if not use_jit:
        # The eager path is what most users run; compare it with linen run eagerly too (XLA fuses a
        # jitted program differently, so eager-vs-jit differs by ~1e-5 for native linen alone).
        y_t, s_t = facade_apply(params, x)
        y_l, s_l = linen_apply(params, x)
    out["outputs"].append(("y", diff(y_l, y_t), "output"))
    for k in sorted(s_l):
        if k.startswith("batch_stats"):
            d = diff(s_l[k], s_t[k])
            out["train/eval semantics"].append((f"{k} after {'training' if training else 'eval'} call", d, ""))
    if not any(k.startswith("batch_stats") for k in s_l):
        stateless = not any(k.startswith("batch_stats") for k in s_t)
        out["train/eval semantics"].append(("stateless in train and eval (as linen)", stateless, str(sorted(s_t))))
    if layer in ("BatchNorm", "SpectralNorm"):
        changed = any(not np.array_equal(np.asarray(s_t[k]), np.asarray(values[k])) for k in s_t if "batch" in k)
        out["train/eval semantics"].append(("state updated iff training", changed == training, f"changed={changed}"))
    out["gradients"].append(("d/dx", diff(g_l[1], g_t[1]), ""))
    for k in sorted(g_l[0]):
        out["gradients"].append((f"d/d{k}", diff(g_l[0][k], g_t[0][k]), ""))
    return out


def round_trip(module: Any, x: Any) -> list[tuple[str, Diff | bool, str]]:
    """save → load in every format: leaves bitwise, flags kept by pickles, outputs bitwise."""
    from normbridge.adapters import treex as tx

    results: list[tuple[str, Diff | bool, str]] = []
    ref = tx.state_dict(module)
    y_ref = module.copy()(x)
    for fmt in ("pickle", "cloudpickle", "msgpack", "npz"):
        data = tx.dumps(module, fmt)
        loaded = tx.load(io.BytesIO(data), template=None if fmt in ("pickle", "cloudpickle") else module)
        a = jax.tree_util.tree_leaves_with_path(ref)
        b = jax.tree_util.tree_leaves_with_path(tx.state_dict(loaded))
        results.append((f"{fmt} paths", [p for p, _ in a] == [p for p, _ in b], ""))
        for (p, u), (_, v) in zip(a, b):
            where = f"{fmt} {jax.tree_util.keystr(p)}"
            results.append((where, diff(u, v), ""))
            results.append((f"{where} shape", u.shape == v.shape, f"{v.shape} != {u.shape}"))
            results.append((f"{where} weak_type", bool(u.weak_type == v.weak_type), ""))
        flags = (loaded.training, loaded.frozen, loaded.initialized)
        results.append((f"{fmt} flags", flags == (module.training, module.frozen, module.initialized), str(flags)))
        results.append((f"{fmt} output", diff(y_ref, loaded.copy()(x)), ""))
    return results


# ======================================================== fixed grids (rows)
def _grid(layer: str) -> list[tuple[dict[str, Any], tuple[int, ...]]]:
    if layer == "BatchNorm":
        return [({}, (6, 4)), ({"axis": 1, "momentum": 0.8, "use_bias": False}, (4, 3, 2)),
                ({"momentum": 0.9, "epsilon": 1e-3}, (2, 3, 3, 5))]  # fmt: skip
    if layer == "LayerNorm":
        return [({}, (5, 6)), ({"use_scale": False, "epsilon": 0.1}, (2, 3, 4))]
    if layer == "GroupNorm":
        return [({"num_groups": 2}, (2, 3, 4)), ({"num_groups": None, "group_size": 3, "use_bias": False}, (3, 5, 6))]
    if layer == "RMSNorm":
        return [({}, (5, 6)), ({"use_scale": False, "epsilon": 1e-3}, (2, 3, 4))]
    if layer == "InstanceNorm":
        return [({}, (2, 3, 4)), ({"use_bias": False}, (2, 3, 3, 5))]
    if layer == "SpectralNorm":
        return [({"features": 4}, (3, 5)), ({"features": 3, "n_steps": 2}, (2, 4))]
    if layer == "WeightNorm":
        return [({"features": 4}, (3, 5)), ({"features": 3, "feature_axes": None}, (2, 4))]
    raise ValueError(layer)


def _acc_cells(layer: str, impl: str = "native", modes: tuple[bool, ...] = (True, False)) -> dict[str, Accumulator]:
    accs = {c: Accumulator() for c in ("state layout", "train/eval semantics", "outputs", "gradients")}
    rng = np.random.default_rng(0)
    for i, ((cfg, shape), training) in enumerate(itertools.product(_grid(layer)[:2], modes)):
        x = rng.normal(size=shape).astype(np.float32) * 2 + 0.5
        # jit only: the eager path is exercised by the pytest property tests (use_jit is drawn there)
        res = compare_with_linen(layer, cfg, x, training=training, impl=impl, use_jit=True, seed=i)
        for col, entries in res.items():
            for name, d, detail in entries:
                if isinstance(d, Diff):
                    accs[col].add(f"{cfg}{shape}{'train' if training else 'eval'} {name}", d)
                else:
                    accs[col].check(f"{cfg}{shape} {name}", bool(d), detail)
    return accs


def _round_trip_cell(layer: str) -> Cell:
    from normbridge.adapters import treex as tx

    acc = Accumulator()
    for cfg, shape in _grid(layer):
        x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
        cfg = dict(cfg)
        if layer in ("SpectralNorm", "WeightNorm"):
            features = cfg.pop("features")
            m = getattr(tx, layer)(tx.Linear(features), **cfg)
        else:
            m = getattr(tx, layer)(**cfg)
        m = m.init(0, x).eval()
        for name, d, detail in round_trip(m, x):
            if isinstance(d, Diff):
                acc.add(name, d, exact=True)
            else:
                acc.check(name, bool(d), detail)
    return Cell(acc.ok, acc.text())


def _fixture_cells(layer: str) -> dict[str, Cell]:
    folder = tf.fixtures_dir()
    layout, sem, outs, init = Accumulator(), Accumulator(), Accumulator(), Accumulator()
    n_files = 0
    for fx, fl in tf.fixture_files(folder):
        if not fx["layer"].endswith("." + layer):
            continue
        n_files += 1
        exp = tf.expected(folder, fx)
        module = tf.load_file(folder, fx, fl)
        problems = tf.layout(fx, fl, module)
        layout.check(fl["file"], not problems, "; ".join(problems[:2]))
        for name, d, tol in tf.reproduce(fx, module, exp):
            target = outs if name in ("y_as_saved", "y_eval", "y_train") else sem
            target.add(f"{fl['file']} {name}", d, rel_tol=tol)
    for fx in tf.manifest(folder):
        if fx["layer"].endswith("." + layer) and fx.get("static_fields"):
            for name, d, tol in tf.reproduce_init(fx, tf.expected(folder, fx)):
                init.add(f"{fx['name']} {name}", d, rel_tol=tol)
    cells = {
        "state layout": Cell(layout.ok and (init.ok or layer == "Sequential"),
                             f"{n_files} files: {layout.text()}"
                             + (f"; init {init.text()}" if layer != "Sequential" else "")),
        "train/eval semantics": Cell(sem.ok, sem.text()),
        "outputs": Cell(outs.ok, outs.text()),
    }  # fmt: skip
    return cells


def _equinox_cell(layer: str) -> Cell:
    folder = tf.fixtures_dir()
    acc = Accumulator()
    for fx in tf.manifest(folder):
        if fx["layer"].endswith("." + layer):
            fmt = "pickle" if (folder / f"{fx['name']}.pickle.pkl").is_file() else "flax_msgpack_state_dict"
            fl = next(f for f in fx["files"] if f["format"] == fmt)
            name, d, tol = tf.equinox_eval(fx, tf.load_file(folder, fx, fl), tf.expected(folder, fx))
            acc.add(f"{fx['name']} {name}", d, rel_tol=tol)
    return Cell(acc.ok, acc.text())


def _linen_version() -> str:
    try:
        import importlib.metadata

        return importlib.metadata.version("flax")
    except Exception:  # pragma: no cover
        return "?"


def _row_treex_layer(layer: str) -> Row:
    cells: dict[str, Cell] = {}
    cells["signature"] = measured(
        lambda: Cell(not signature_problems(layer), "; ".join(signature_problems(layer)) or "treex 0.6.12 ctor")
    )
    fixture = {}
    try:
        fixture = _fixture_cells(layer)
    except Exception as err:  # fixtures missing: failing cells that say so
        fixture = {c: Cell(False, f"error: {type(err).__name__}: {err}"[:300]) for c in
                   ("state layout", "train/eval semantics", "outputs")}  # fmt: skip
    cells.update(fixture)
    accs: dict[str, Accumulator] = {}

    def grads() -> Cell:
        accs.update(_acc_cells(layer, modes=(True,)))  # the fixtures cover the rest; training has the gradients
        a = accs["gradients"]
        return Cell(a.ok, f"vs linen: {a.text()}")

    cells["gradients"] = measured(grads)
    cells["checkpoint round trip"] = measured(lambda: _round_trip_cell(layer))
    eqx_cell = measured(lambda: _equinox_cell(layer))
    notes = f"treex→Equinox (to_equinox) on the fixtures: {eqx_cell.status} {eqx_cell.text}."
    if accs:
        notes += f" vs native linen (treex config): outputs {accs['outputs'].text()}."
    if not eqx_cell.ok:
        cells["checkpoint round trip"] = Cell(False, f"to_equinox failed: {eqx_cell.text}")
    return Row("treex", layer, cells, evidence=EVIDENCE_FIXTURES, notes=notes)


def _row_sequential() -> Row:
    cells: dict[str, Cell] = {}
    try:
        cells.update(_fixture_cells("Sequential"))
    except Exception as err:
        cells["outputs"] = Cell(False, f"error: {type(err).__name__}: {err}"[:300])
    eqx_cell = measured(lambda: _equinox_cell("Sequential"))
    cells["checkpoint round trip"] = measured(_sequential_round_trip)
    notes = (
        f"treex→Equinox (to_equinox) on the fixture: {eqx_cell.status} {eqx_cell.text}. The fixture's cloudpickles "
        "(code by value; not shipped) name only GLOBALs the safe loader now resolves."
    )
    return Row("treex", "Sequential (Linear, Lambda)", cells, evidence=EVIDENCE_FIXTURES, notes=notes)


def _sequential_round_trip() -> Cell:
    folder = tf.fixtures_dir()
    fx = next(f for f in tf.manifest(folder) if f["layer"].endswith(".Sequential"))
    fl = next(f for f in fx["files"] if f["format"] == "npz_state_dict")
    module = tf.load_file(folder, fx, fl)
    acc = Accumulator()
    for name, d, detail in round_trip(module.eval(), tf.expected(folder, fx)["x"]):
        if isinstance(d, Diff):
            acc.add(name, d, exact=True)
        else:
            acc.check(name, bool(d), detail)
    return Cell(acc.ok, f"save→load: {acc.text()}")


def _row_addition(layer: str) -> Row:
    cells: dict[str, Cell] = {}
    accs: dict[str, Accumulator] = {}

    def run(col: str) -> Cell:
        if not accs:
            accs.update(_acc_cells(layer))
        a = accs[col]
        return Cell(a.ok, a.text())

    def signature() -> Cell:
        problems = addition_signature_problems(layer)
        return Cell(not problems, "; ".join(problems) or "treex style; linen's defaults, eps 1e-5, dtype float32")

    cells["signature"] = measured(signature)
    for col in ("state layout", "train/eval semantics", "outputs", "gradients"):
        cells[col] = measured(lambda col=col: run(col))
    cells["checkpoint round trip"] = measured(lambda: _round_trip_cell(layer))
    return Row("treex", f"{layer} (addition)", cells, evidence=EVIDENCE_LINEN.format(version=_linen_version()),
               notes="not in treex 0.6.12; treex-style facade computing flax.linen's math")  # fmt: skip


def rows() -> list[Row]:
    """One row per treex layer (norm-layer and whole-model fixtures), per layer without a fixture
    (flax.linen, which treex wrapped) and per addition (native linen)."""
    out = [_row_treex_layer(layer) for layer in ("BatchNorm", "LayerNorm", "GroupNorm")]
    out.append(_row_sequential())
    out += [_row_model_layer(label) for label in MODEL_LAYERS]
    out += [_row_flax_only(cls) for cls in ("ConvTranspose", "Embed")]
    out += [_row_addition(layer) for layer in ADDITIONS]
    return out


# ============================================================ whole-model layers
EVIDENCE_MODELS = (
    "verified against real treex fixtures (treex 0.6.12 whole models, shipped in "
    "normbridge/conformance/fixtures/treex-models)"
)
#: Model-fixture layers: the facade class, and the fixtures' class name.
MODEL_LAYERS = {"Conv": "Conv", "Dropout, KeySeq": "Dropout", "Flatten": "Flatten", "MLP": "MLP"}
_SKIP_STATIC = {"_training", "_frozen", "_initialized", "_subtrees"}


def _static_value(v: Any) -> Any:
    """A facade static value as the manifest writes it (functions and dtypes by name)."""
    import functools

    if isinstance(v, functools.partial):
        return f"functools.partial({_static_value(v.func)})"
    for mod, names in (("jax.numpy", ("float32", "float16", "bfloat16", "float64")),):
        for n in names:
            if v is getattr(jnp, n):
                return f"{mod}.{n}"
    if v is jax.nn.initializers.zeros:
        return "jax.nn.initializers.zeros"
    if v is jax.nn.initializers.ones:
        return "jax.nn.initializers.ones"
    if isinstance(v, tuple):
        return list(v)
    return v


def _static_problems(tree: dict[str, Any], module: Any, path: str = "") -> list[str]:
    """Static fields of ``module`` (plain values: numbers, strings, lists) against the manifest's module tree."""
    problems: list[str] = []
    cls = tree["class"].rsplit(".", 1)[-1]
    if type(module).__name__ != cls:
        return [f"{path or '<root>'}: {type(module).__name__} != {cls}"]
    for k, want in tree.get("static", {}).items():
        if k in _SKIP_STATIC:
            continue
        have = getattr(module, k, "<missing>")
        if isinstance(want, str) and ("(" in want or want.startswith("jax.")):
            named = want.startswith(("jax.numpy.", "jax.nn.initializers.")) and " " not in want
            if named and _static_value(have) != want:
                problems.append(f"{path}/{k}: {have!r} != {want}")
            continue  # functions stored by value / partials: compared by the loader's resolution tests
        if _static_value(have) != want:
            problems.append(f"{path}/{k}: {have!r} != {want!r}")
    for k, sub in tree.get("nodes", {}).items():
        if isinstance(sub, dict) and "class" in sub:
            problems += _static_problems(sub, getattr(module, k), f"{path}/{k}")
        elif isinstance(sub, list):
            for i, s in enumerate(sub):
                if isinstance(s, dict) and "class" in s:
                    problems += _static_problems(s, getattr(module, k)[i], f"{path}/{k}/{i}")
    return problems


def _subtrees_with(tree: dict[str, Any], cls: str) -> bool:
    if tree.get("class", "").endswith("." + cls):
        return True
    for sub in tree.get("nodes", {}).values():
        items = sub if isinstance(sub, list) else [sub]
        if any(isinstance(s, dict) and _subtrees_with(s, cls) for s in items):
            return True
    return False


def _model_cells(cls: str) -> dict[str, Cell]:
    folder = tf.fixtures_dir(name="treex-models")
    signature, layout, sem, outs, init, trip = (Accumulator() for _ in range(6))
    n_files = 0
    for fx in tf.manifest(folder):
        if not _subtrees_with(fx["module_tree"], cls):
            continue
        exp = tf.expected(folder, fx)
        fresh = tf.build_model(fx).init(tf.init_seed(fx), exp["x"])
        problems = _static_problems(fx["module_tree"], fresh)  # defaults and configuration as real treex's
        signature.check(f"{fx['name']} fresh", not problems, "; ".join(problems[:2]))
        for name, d, tol in tf.reproduce_model_init(fx, exp):
            init.add(f"{fx['name']} {name}", d, rel_tol=tol)
        for fx2, fl in tf.fixture_files(folder):
            if fx2["name"] != fx["name"]:
                continue
            n_files += 1
            module = tf.load_model_file(folder, fx, fl)
            problems = tf.state_problems(folder, fx, module)
            if fl["format"] not in tf.LEAF_FORMATS:
                problems += _static_problems(fx["module_tree"], module)
            layout.check(fl["file"], not problems, "; ".join(problems[:2]))
            for name, d, tol in tf.reproduce_model(folder, fx, module, exp):
                if name.startswith("state "):
                    layout.add(f"{fl['file']} {name}", d, exact=True)
                elif name == "y_eval":
                    outs.add(f"{fl['file']} {name}", d, rel_tol=tol)
                else:
                    sem.add(f"{fl['file']} {name}", d, rel_tol=tol)
            if fl["format"] == "cloudpickle":
                for name, d, detail in round_trip(module.eval(), exp["x"]):
                    if isinstance(d, Diff):
                        trip.add(f"{fl['file']} {name}", d, exact=True)
                    else:
                        trip.check(f"{fl['file']} {name}", bool(d), detail)
    return {
        "signature": Cell(signature.ok, f"treex 0.6.12 fields and defaults: {signature.text()}"),
        "state layout": Cell(layout.ok and init.ok, f"{n_files} files: {layout.text()}; init {init.text()}"),
        "train/eval semantics": Cell(sem.ok, sem.text()),
        "outputs": Cell(outs.ok, outs.text()),
        "checkpoint round trip": Cell(trip.ok, f"save→load: {trip.text()}"),
    }


def _flax_grads_cell(cls: str) -> Cell:
    """Gradients of the facade layer against flax.linen's layer with the same parameters (treex wrapped it)."""
    import flax.linen as nn

    from normbridge.adapters import treex as tx

    rng = np.random.default_rng(0)
    acc = Accumulator()
    if cls == "Conv":
        x = rng.normal(size=(2, 7, 7, 3)).astype(np.float32)
        cases = [(tx.Conv(4, [3, 3], strides=[2, 2]), nn.Conv(4, (3, 3), strides=(2, 2)), x)]
    elif cls == "MLP":
        x = rng.normal(size=(3, 5)).astype(np.float32)
        cases = [(tx.Linear(4), nn.Dense(4), x)]
    elif cls == "ConvTranspose":
        x = rng.normal(size=(2, 5, 5, 3)).astype(np.float32)
        cases = [(tx.ConvTranspose(4, [3, 3], strides=[2, 2]), nn.ConvTranspose(4, (3, 3), strides=(2, 2)), x)]
    else:
        ids = rng.integers(0, 9, size=(3, 4)).astype(np.int32)
        cases = [(tx.Embed(9, 4), nn.Embed(9, 4), ids)]
    for facade, native, xx in cases:
        m = facade.init(0, xx)
        names = ["embedding"] if cls == "Embed" else ["kernel", "bias"]
        params = {n: getattr(m, n) for n in names}
        with jax.threefry_partitionable(False):
            want_init = native.init(jax.random.split(jax.random.PRNGKey(0))[0], xx)["params"]
        for n in names:
            acc.add(f"init {n}", diff(want_init[n], params[n]), exact=True)

        def f_loss(p: dict[str, Any], m: Any = m, xx: Any = xx) -> Any:
            mm = m.copy()
            mm.__dict__.update(p)
            return jnp.sum(jnp.sin(mm(xx)))

        def n_loss(p: dict[str, Any], native: Any = native, xx: Any = xx) -> Any:
            return jnp.sum(jnp.sin(native.apply({"params": p}, xx)))

        acc.add("outputs", diff(native.apply({"params": params}, xx), m(xx)), exact=True)
        gf, gn = jax.grad(f_loss)(params), jax.grad(n_loss)(params)
        for n in names:
            acc.add(f"grad {n}", diff(gn[n], gf[n]), exact=True)
    return Cell(acc.ok, f"vs flax.linen: {acc.text()}")


def _row_model_layer(label: str) -> Row:
    cls = MODEL_LAYERS[label]
    cells: dict[str, Cell] = {}
    try:
        cells.update(_model_cells(cls))
    except Exception as err:  # fixtures missing or broken: failing cells that say so
        cells = {c: Cell(False, f"error: {type(err).__name__}: {err}"[:300])
                 for c in ("signature", "state layout", "train/eval semantics", "outputs")}  # fmt: skip
    if cls in ("Conv", "MLP"):
        cells["gradients"] = measured(lambda: _flax_grads_cell(cls))
    notes = {
        "Conv": "HWIO kernel, flax 0.4.1 lax.conv_general_dilated; to_equinox → eqx.nn.Conv (OIHW, bias (out,1,1)).",
        "Dropout, KeySeq": "Rng leaf next_key/key; masks and key advance reproduce real treex's (RNG-dependent outputs "
        "too, on jax's non-partitionable threefry); to_equinox → eqx.nn.Dropout(inference=True).",
        "Flatten": "to_equinox flattens in treex's channels-last order.",
        "MLP": "@compact children linear, linear2, ... (_subtrees); gradients measured on its Linear.",
    }[label]
    if cls == "Conv":
        eqx_cell = measured(_cnn_equinox_cell)
        notes += f" CNN fixtures → Equinox: {eqx_cell.status} {eqx_cell.text}."
    return Row("treex", label, cells, evidence=EVIDENCE_MODELS, notes=notes)


def _cnn_equinox_cell() -> Cell:
    from normbridge.adapters import treex as tx

    folder = tf.fixtures_dir(name="treex-models")
    acc = Accumulator()
    for fx in tf.manifest(folder):
        if fx["name"].startswith("cnn"):
            fl = next(f for f in fx["files"] if f["format"] == "cloudpickle")
            name, d, tol = tf.equinox_model_eval(tx.load(folder / fl["file"]), tf.expected(folder, fx))
            acc.add(f"{fx['name']} {name}", d, rel_tol=tol)
    return Cell(acc.ok, acc.text())


def _row_flax_only(cls: str) -> Row:
    cells = {"outputs": measured(lambda: _flax_grads_cell(cls))}
    cells["gradients"] = cells["outputs"]
    notes = "treex 0.6.12 wrapped flax 0.4.1's layer; measured against flax.linen's (same params, init key)"
    return Row(
        "treex", f"{cls} (no fixture)", cells, evidence=EVIDENCE_LINEN.format(version=_linen_version()), notes=notes
    )
