"""Measured conformance of :mod:`normbridge.adapters.linen` against the installed ``flax.linen``.

One implementation of "compare facade and native for configuration X", two drivers:
:func:`rows` runs a small fixed grid for ``normbridge check``; ``tests/conformance/test_linen_*.py``
runs the same functions on hypothesis-drawn configurations.

Every comparison gives both implementations the same init key, input, mask and variables.
State (init variables, updated statistics) must be exact; outputs and gradients must be
bitwise for float32 (the facade keeps linen's operation order) — :data:`STRICT` — and the
project tolerance otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from normbridge.conformance import COLUMNS, Cell, Row, measured
from normbridge.conformance.measure import Accumulator, diff, shape_dtype_tree, tree_diff

LAYERS: tuple[str, ...] = (
    "BatchNorm",
    "LayerNorm",
    "RMSNorm",
    "GroupNorm",
    "InstanceNorm",
    "SpectralNorm",
    "WeightNorm",
)
WRAPPERS: tuple[str, ...] = ("SpectralNorm", "WeightNorm")
IMPLS: tuple[str, ...] = ("native", "facade")
#: Outputs and gradients must be bitwise too, not only within tolerance: the facade keeps linen's operation order.
STRICT = True


def _nn() -> Any:
    import flax.linen as nn

    return nn


def namespace(impl: str) -> Any:
    """``flax.linen`` for ``"native"``, :mod:`normbridge.adapters.linen` for ``"facade"``."""
    if impl == "native":
        return _nn()
    from normbridge.adapters import linen

    return linen


# --------------------------------------------------------------------------------------------- configurations


@dataclasses.dataclass(frozen=True)
class Config:
    """One facade-vs-native comparison: layer, input, constructor options and how to run it."""

    layer: str
    shape: tuple[int, ...]
    x_dtype: str = "float32"
    options: tuple[tuple[str, Any], ...] = ()
    mask: bool = False
    use_jit: bool = False
    #: SpectralNorm/WeightNorm: wrapped layer, ``"dense"``, ``"conv"`` or ``"nested"`` (two Dense in a module).
    inner: str = "dense"
    features: int = 3
    seed: int = 0

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.options)

    def label(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options)
        extra = f" inner={self.inner}" if self.layer in WRAPPERS else ""
        return (
            f"{self.layer}{self.shape} {self.x_dtype}{' mask' if self.mask else ''}{' jit' if self.use_jit else ''}"
            f"{extra} [{opts}]"
        )


@functools.cache
def _nested_class() -> type:
    nn = _nn()

    class Nested(nn.Module):
        """Two Dense layers, one named ``kernel_proj`` (WeightNorm's filter is a substring test)."""

        features: int

        @nn.compact
        def __call__(self, x):
            x = nn.Dense(self.features, name="kernel_proj")(x)
            return nn.Dense(self.features, name="inner")(x)

    return Nested


def _inner(cfg: Config) -> Any:
    nn = _nn()
    if cfg.inner == "dense":
        return nn.Dense(cfg.features)
    if cfg.inner == "conv":
        return nn.Conv(cfg.features, (2, 2))
    if cfg.inner == "nested":
        return _nested_class()(cfg.features)
    raise ValueError(f"unknown inner layer {cfg.inner!r}")


def build(cfg: Config, impl: str) -> Any:
    """The module of ``cfg`` from ``impl`` (the wrapped layer of SpectralNorm/WeightNorm is a plain linen layer)."""
    cls = getattr(namespace(impl), cfg.layer)
    if cfg.layer in WRAPPERS:
        return cls(_inner(cfg), **cfg.kwargs)
    return cls(**cfg.kwargs)


def mode_kwargs(cfg: Config, train: bool) -> dict[str, Any]:
    """Call-time mode flags: BatchNorm ``use_running_average``, SpectralNorm ``update_stats``."""
    if cfg.layer == "BatchNorm" and cfg.kwargs.get("use_running_average") is None:
        return {"use_running_average": not train}
    if cfg.layer == "SpectralNorm":
        return {"update_stats": train}
    return {}


def mutable(cfg: Config, train: bool) -> Any:
    if not train:
        return False
    if cfg.layer == "BatchNorm":
        return ["batch_stats"]
    if cfg.layer == "SpectralNorm":
        return [cfg.kwargs.get("collection_name", "batch_stats")]
    return False


def inputs(cfg: Config, step: int = 0) -> tuple[jax.Array, jax.Array | None]:
    """Input ``N(0.5, 2²)`` (shifted per step) in ``cfg.x_dtype`` and an optional boolean mask (80% True)."""
    rng = np.random.default_rng(cfg.seed * 1000 + step)
    x = rng.normal(0.5 + step, 2.0 + 0.5 * step, size=cfg.shape).astype(np.float32)
    mask = jnp.asarray(rng.random(cfg.shape) < 0.8) if cfg.mask else None
    return jnp.asarray(x, cfg.x_dtype), mask


def _maybe_jit(cfg: Config, fn: Callable) -> Callable:
    return jax.jit(fn) if cfg.use_jit else fn


def _mask_kw(mask: Any) -> dict[str, Any]:
    return {} if mask is None else {"mask": mask}


def stateful(cfg: Config) -> bool:
    """Layers with a train/eval mode (the others have one behaviour and no eval call of their own)."""
    return cfg.layer in ("BatchNorm", "SpectralNorm")


class _Runner:
    """The functions of one module, each jitted once if ``cfg.use_jit`` (one compile per implementation).

    ``first(key, x, mask)`` does everything on the first batch in one function: ``init`` from
    ``key``, a train-mode apply of those variables, an eval-mode apply with the updated ones
    (stateful layers), and the gradients of ``Σ y·ct`` (train mode, ``ct`` drawn from a fixed
    key) w.r.t. params and input. ``train`` is reused for the multi-step checks.
    """

    def __init__(self, cfg: Config, mod: Any) -> None:
        train_mut = mutable(cfg, True)

        def apply(train, variables, x, mask):
            mut = train_mut if train else False
            out = mod.apply(variables, x, **mode_kwargs(cfg, train), **_mask_kw(mask), mutable=mut)
            return out if mut else (out, {})

        def first(key, x, mask):
            variables = mod.init(key, x, **mode_kwargs(cfg, True), **_mask_kw(mask))
            y, updates = apply(True, variables, x, mask)
            y_eval = apply(False, {**variables, **updates}, x, mask)[0] if stateful(cfg) else None
            ct = jax.random.normal(jax.random.key(cfg.seed + 7), y.shape, jnp.float32)
            rest = {k: v for k, v in variables.items() if k != "params"}

            def loss(params, x):
                out, _ = apply(True, {**rest, "params": params}, x, mask)
                return jnp.sum(out.astype(jnp.float32) * ct)

            grads = jax.grad(loss, argnums=(0, 1))(variables.get("params", {}), x)
            return variables, (y, updates), y_eval, grads

        self.first = _maybe_jit(cfg, first)
        self.train = _maybe_jit(cfg, functools.partial(apply, True))
        self.eval = _maybe_jit(cfg, functools.partial(apply, False))


def compare(acc: Accumulator, name: str, native: Any, facade: Any, *, exact: bool) -> None:
    """Add a tree comparison: layout (paths, shapes, dtypes) and values (exact or within tolerance)."""
    la, lb = shape_dtype_tree(native), shape_dtype_tree(facade)
    if la != lb:
        acc.check(f"{name} layout", False, f"native {la} vs facade {lb}"[:200])
        return
    acc.add(name, tree_diff(native, facade), exact=exact)


# ----------------------------------------------------------------------------------------------- measurements


def new_accumulators() -> dict[str, Accumulator]:
    return {c: Accumulator() for c in COLUMNS if c != "signature"}


def measure_case(cfg: Config, accs: dict[str, Accumulator] | None = None, *, steps: int = 0) -> dict[str, Accumulator]:
    """Run one configuration on native and facade; fill the per-column accumulators.

    * state layout: ``init`` variables from the same key (paths, shapes, dtypes, values: exact);
    * outputs: train-mode output and updated statistics, then eval-mode output (stateful layers);
    * gradients: w.r.t. params and input of ``Σ y·ct`` in train mode;
    * train/eval semantics: ``steps`` training steps, each implementation from its own state,
      compared after every step, then an eval output; stateless layers must return no updates;
    * checkpoint round trip: native subtree → record → facade subtree exactly, and back.

    Both implementations init from the same key; everything after uses each one's own init,
    which the first comparison requires to be bit-identical to the native one.
    """
    accs = accs if accs is not None else new_accumulators()
    tag = cfg.label()
    key = jax.random.key(cfg.seed)
    x, mask = inputs(cfg)
    mods = {impl: build(cfg, impl) for impl in IMPLS}
    run = {impl: _Runner(cfg, mods[impl]) for impl in IMPLS}
    res = {impl: run[impl].first(key, x, mask) for impl in IMPLS}
    (init_n, train_n, eval_n, grad_n), (init_f, train_f, eval_f, grad_f) = res["native"], res["facade"]
    init = {"native": init_n, "facade": init_f}
    compare(accs["state layout"], f"{tag} init", init_n, init_f, exact=True)
    strict = STRICT
    compare(accs["outputs"], f"{tag} train y", train_n[0], train_f[0], exact=strict)
    compare(accs["train/eval semantics"], f"{tag} train updates", train_n[1], train_f[1], exact=True)
    if stateful(cfg):
        compare(accs["outputs"], f"{tag} eval y", eval_n, eval_f, exact=strict)
    compare(accs["gradients"], f"{tag} grad", grad_n, grad_f, exact=strict)

    states = dict(init)
    for step in range(1, steps + 1):
        xs, ms = inputs(cfg, step)
        outs = {impl: run[impl].train(states[impl], xs, ms) for impl in IMPLS}
        sem = accs["train/eval semantics"]
        compare(sem, f"{tag} step {step} y", outs["native"][0], outs["facade"][0], exact=strict)
        compare(sem, f"{tag} step {step} state", outs["native"][1], outs["facade"][1], exact=True)
        states = {impl: {**states[impl], **outs[impl][1]} for impl in IMPLS}
    if steps:
        ev = {impl: run[impl].eval(states[impl], x, mask)[0] for impl in IMPLS}
        compare(accs["train/eval semantics"], f"{tag} eval after {steps}", ev["native"], ev["facade"], exact=strict)

    roundtrip(cfg, mods, init, accs["checkpoint round trip"])
    return accs


def layer_subtree(cfg: Config, variables: Any) -> Any:
    """The subtree of a top-level layer's variables that :func:`to_canonical` takes."""
    if cfg.layer == "SpectralNorm":
        return dict(variables.get(cfg.kwargs.get("collection_name", "batch_stats"), {}))
    if cfg.layer == "WeightNorm":
        return {k: v for k, v in variables.get("params", {}).items() if k != "layer_instance"}
    return {k: dict(v) for k, v in variables.items()}


def roundtrip(cfg: Config, mods: dict[str, Any], init: dict[str, Any], acc: Accumulator) -> None:
    """native subtree → ``to_canonical`` → ``from_canonical`` (facade module) is the native subtree, bit for bit."""
    from normbridge.adapters.linen import from_canonical, to_canonical

    tag = cfg.label()
    native_sub = layer_subtree(cfg, init["native"])
    record = to_canonical(native_sub, mods["native"])
    back = from_canonical(record, mods["facade"])
    compare(acc, f"{tag} native→record→facade", native_sub, back, exact=True)
    facade_record = to_canonical(layer_subtree(cfg, init["facade"]), mods["facade"])
    compare(acc, f"{tag} records", record.arrays(), facade_record.arrays(), exact=True)
    if cfg.layer == "SpectralNorm":
        for path, vec in record.spectral.items():
            acc.check(f"{tag} canonical u {path} is (out,)", vec.u is not None and vec.u.ndim == 1)


# ---------------------------------------------------------------------------------------- signature and errors


def _fields(cls: type) -> list[tuple[str, Any]]:
    return [
        (f.name, f.default if f.default is not dataclasses.MISSING else "<factory>") for f in dataclasses.fields(cls)
    ]


def measure_signature(layer: str, acc: Accumulator | None = None) -> Accumulator:
    """``inspect.signature`` of the class and of ``__call__``, and the dataclass fields, equal native."""
    acc = acc or Accumulator()
    nat, fac = getattr(namespace("native"), layer), getattr(namespace("facade"), layer)
    for what, a, b in (
        ("class", inspect.signature(nat), inspect.signature(fac)),
        ("__call__", inspect.signature(nat.__call__), inspect.signature(fac.__call__)),
        ("fields", _fields(nat), _fields(fac)),
    ):
        acc.check(f"{layer} {what}", a == b, f"native {a} vs facade {b}"[:200])
    acc.check(f"{layer} is a linen Module", issubclass(fac, _nn().Module))
    return acc


def _misuse_cases(layer: str) -> list[tuple[str, Callable[[Any], Any], bool]]:
    """``(name, run(namespace), facade message must name the layer)`` for each misuse of ``layer``."""
    nn = _nn()
    key = jax.random.key(0)
    x = jnp.ones((2, 3, 4), jnp.float32)
    x6 = jnp.ones((2, 3, 6), jnp.float32)
    cases: list[tuple[str, Callable[[Any], Any], bool]] = []
    if layer == "BatchNorm":

        def both(ns):
            bn = ns.BatchNorm(use_running_average=True)
            return bn.init(key, x, use_running_average=False)

        def neither(ns):
            return ns.BatchNorm().init(key, x)

        def immutable(ns):
            bn = ns.BatchNorm()
            v = bn.init(key, x, use_running_average=False)
            return bn.apply(v, x, use_running_average=False)

        cases += [
            ("use_running_average in ctor and call", both, True),
            ("use_running_average in neither", neither, True),
            ("train without mutable", immutable, False),
        ]
    elif layer == "GroupNorm":
        cases += [
            ("num_groups=None and group_size=None", lambda ns: ns.GroupNorm(None).init(key, x6), True),
            ("num_groups and group_size", lambda ns: ns.GroupNorm(2, 3).init(key, x6), True),
            ("num_groups does not divide C", lambda ns: ns.GroupNorm(4).init(key, x6), True),
            ("num_groups=0", lambda ns: ns.GroupNorm(0).init(key, x6), True),
            ("group_size does not divide C", lambda ns: ns.GroupNorm(None, 4).init(key, x6), True),
            ("reduction_axes without last", lambda ns: ns.GroupNorm(2, reduction_axes=(1,)).init(key, x6), True),
        ]
    elif layer == "InstanceNorm":
        cases += [
            ("feature_axes contains 0", lambda ns: ns.InstanceNorm(feature_axes=(0, -1)).init(key, x), True),
            ("feature_axes=-3 is axis 0", lambda ns: ns.InstanceNorm(feature_axes=-3).init(key, x), True),
        ]
    elif layer in ("LayerNorm", "RMSNorm"):
        bad = jnp.ones((3, 3), bool)
        cases += [("mask of wrong shape", lambda ns: getattr(ns, layer)().init(key, x, mask=bad), False)]
    elif layer == "SpectralNorm":

        def missing(ns):
            return ns.SpectralNorm(nn.Dense(3)).init(key, x)

        def non_matrix(ns):
            return ns.SpectralNorm(nn.Conv(3, (2, 2)), error_on_non_matrix=True).init(
                key, jnp.ones((1, 4, 4, 2)), update_stats=False
            )

        def immutable(ns):
            sn = ns.SpectralNorm(nn.Dense(3))
            v = sn.init(key, x, update_stats=False)
            return sn.apply(v, x, update_stats=True)

        cases += [
            ("update_stats missing", missing, False),
            ("error_on_non_matrix with a conv kernel", non_matrix, True),
            ("update_stats without mutable", immutable, False),
        ]
    elif layer == "WeightNorm":
        cases += [
            (
                "feature_axes out of range",
                lambda ns: ns.WeightNorm(nn.Dense(3), feature_axes=5).init(key, x),
                False,
            )
        ]
    return cases


def _raised(fn: Callable[[], Any]) -> BaseException | None:
    try:
        fn()
    except Exception as err:
        return err
    return None


def measure_errors(layer: str, acc: Accumulator | None = None) -> Accumulator:
    """Each misuse raises the same exception type in native and facade; facade messages name the layer."""
    acc = acc or Accumulator()
    for name, run, named in _misuse_cases(layer):
        nat = _raised(lambda run=run: run(namespace("native")))
        fac = _raised(lambda run=run: run(namespace("facade")))
        acc.check(f"{layer} {name}: native raises", nat is not None, "native did not raise")
        acc.check(
            f"{layer} {name}: same type",
            nat is not None and fac is not None and type(nat) is type(fac),
            f"native {type(nat).__name__} vs facade {type(fac).__name__}: {fac}"[:200],
        )
        if named and fac is not None:
            acc.check(f"{layer} {name}: message names the layer", layer in str(fac), str(fac)[:200])
    return acc


# -------------------------------------------------------------------------------------------- cross-device


def _devices(n: int) -> list[Any]:
    devs = jax.devices()
    if len(devs) < n:
        raise RuntimeError(f"need {n} devices for the axis_name checks, found {len(devs)} (set XLA_FLAGS)")
    return devs[:n]


def measure_axis_name(
    acc: Accumulator | None = None,
    *,
    n_devices: int = 8,
    per_device: int = 2,
    use_fast_variance: bool = True,
    how: str = "pmap",
    seed: int = 0,
) -> Accumulator:
    """BatchNorm(axis_name) on ``n_devices``: native == facade exactly, and the synced statistics equal
    the single-device statistics of the whole batch (within 1e-6 relative), as native linen does."""
    acc = acc or Accumulator()
    tag = f"BatchNorm axis_name {how} {n_devices}dev fast={use_fast_variance}"
    rng = np.random.default_rng(seed)
    xg = jnp.asarray(rng.normal(0.5, 2.0, size=(n_devices * per_device, 3, 4)).astype(np.float32))
    xs = xg.reshape(n_devices, per_device, 3, 4)
    devs = _devices(n_devices)
    res = {}
    for impl in IMPLS:
        ns = namespace(impl)
        bn = ns.BatchNorm(use_running_average=False, axis_name="batch", use_fast_variance=use_fast_variance)
        v = bn.init(jax.random.key(0), xs[0])  # init skips the pmean: no named axis needed

        def step(v, x, bn=bn):
            return bn.apply(v, x, mutable=["batch_stats"])

        if how == "pmap":
            y, upd = jax.pmap(step, axis_name="batch", in_axes=(None, 0), devices=devs)(v, xs)
            y = y.reshape(xg.shape)
            stats = jax.tree_util.tree_map(lambda a: a[0], upd)
            spread = max(float(jnp.max(jnp.abs(a - a[0]))) for a in jax.tree_util.tree_leaves(upd))
            acc.check(f"{tag} {impl}: every device holds the same statistics", spread == 0.0, f"spread {spread}")
        else:
            mesh = jax.sharding.Mesh(np.array(devs), ("batch",))
            P = jax.sharding.PartitionSpec
            fn = jax.shard_map(step, mesh=mesh, in_specs=(P(), P("batch")), out_specs=(P("batch"), P()))
            y, stats = jax.jit(fn)(v, xg)
        single = ns.BatchNorm(use_running_average=False, use_fast_variance=use_fast_variance)
        y1, stats1 = single.apply(v, xg, mutable=["batch_stats"])
        res[impl] = (y, stats)
        acc.add(f"{tag} {impl}: synced stats vs whole batch", tree_diff(stats1, stats), rel_tol=1e-6)
        acc.add(f"{tag} {impl}: synced output vs whole batch", diff(y1, y), rel_tol=1e-6)
    compare(acc, f"{tag} native vs facade", res["native"], res["facade"], exact=True)
    return acc


def measure_axis_index_groups(acc: Accumulator | None = None, *, seed: int = 0) -> Accumulator:
    """``axis_index_groups=[[0..3],[4..7]]`` under pmap: each half gets its own statistics, native == facade."""
    acc = acc or Accumulator()
    rng = np.random.default_rng(seed)
    xs = jnp.asarray(rng.normal(0.5, 2.0, size=(8, 2, 5)).astype(np.float32))
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    res = {}
    for impl in IMPLS:
        ns = namespace(impl)
        bn = ns.BatchNorm(use_running_average=False, axis_name="b", axis_index_groups=groups)
        v = bn.init(jax.random.key(0), xs[0])
        y, upd = jax.pmap(
            lambda v, x, bn=bn: bn.apply(v, x, mutable=["batch_stats"]), "b", in_axes=(None, 0), devices=_devices(8)
        )(v, xs)
        single = ns.BatchNorm(use_running_average=False)
        for g, idx in enumerate(groups):
            _, s1 = single.apply(v, xs[idx[0] : idx[-1] + 1].reshape(-1, 5), mutable=["batch_stats"])
            acc.add(
                f"axis_index_groups {impl} group {g}",
                tree_diff(s1, jax.tree_util.tree_map(lambda a, i=idx[0]: a[i], upd)),
                rel_tol=1e-6,
            )
        res[impl] = (y, upd)
    compare(acc, "axis_index_groups native vs facade", res["native"], res["facade"], exact=True)
    return acc


def measure_sharded_features(acc: Accumulator | None = None, *, layer: str = "LayerNorm", seed: int = 0) -> Accumulator:
    """LayerNorm/RMSNorm with features sharded over 4 devices (pmap, ``axis_name``) equal the unsharded layer."""
    acc = acc or Accumulator()
    n = 4
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(0.5, 2.0, size=(3, n * 2)).astype(np.float32))
    xs = jnp.stack(jnp.split(x, n, axis=-1))  # (n, 3, 2): device d holds features [2d, 2d+2)
    res = {}
    for impl in IMPLS:
        ns = namespace(impl)
        no_affine = {"use_scale": False, **({"use_bias": False} if layer == "LayerNorm" else {})}
        mod = getattr(ns, layer)(axis_name="f", **no_affine)
        y = jax.pmap(lambda x, mod=mod: mod.apply({}, x), "f", devices=_devices(n))(xs)
        y = jnp.concatenate(list(y), axis=-1)
        y1 = getattr(ns, layer)(**no_affine).apply({}, x)
        acc.add(f"{layer} sharded features {impl} vs unsharded", diff(y1, y), rel_tol=1e-6)
        res[impl] = y
    compare(acc, f"{layer} sharded features native vs facade", res["native"], res["facade"], exact=True)
    return acc


# ------------------------------------------------------------------------------------------ composite models


@functools.cache
def _composite_classes() -> tuple[type, type]:
    nn = _nn()

    class MLP(nn.Module):
        """Dense → BatchNorm → relu → Dense → LayerNorm."""

        impl: str

        @nn.compact
        def __call__(self, x, train: bool):
            ns = namespace(self.impl)
            x = nn.Dense(8)(x)
            x = ns.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = nn.relu(x)
            x = nn.Dense(4)(x)
            return ns.LayerNorm()(x)

    class ConvNet(nn.Module):
        """Conv → GroupNorm → SpectralNorm(Dense) → WeightNorm(Dense)."""

        impl: str

        @nn.compact
        def __call__(self, x, train: bool):
            ns = namespace(self.impl)
            x = nn.Conv(4, (3, 3))(x)
            x = ns.GroupNorm(num_groups=2)(x)
            x = x.reshape(x.shape[0], -1)
            x = ns.SpectralNorm(nn.Dense(6), n_steps=2)(x, update_stats=train)
            x = nn.relu(x)
            return ns.WeightNorm(nn.Dense(3))(x)

    return MLP, ConvNet


@functools.cache
def train_composite(model: str, impl: str, *, steps: int = 3, lr: float = 0.1, use_jit: bool = True) -> Any:
    """Init ``model`` (``"mlp"`` or ``"conv"``) from a fixed key, train ``steps`` SGD steps (cached).

    Returns the variables after init and after every step, and the final eval-mode output.
    """
    mlp, conv = _composite_classes()
    mod = (mlp if model == "mlp" else conv)(impl)
    rng = np.random.default_rng(3)
    shape = (6, 5) if model == "mlp" else (2, 4, 4, 2)
    x = jnp.asarray(rng.normal(0.5, 2.0, size=shape).astype(np.float32))
    target = jnp.asarray(rng.normal(size=(shape[0], 4 if model == "mlp" else 3)).astype(np.float32))
    variables = mod.init(jax.random.key(42), x, train=False)

    def step(variables, x):
        def loss(params):
            y, upd = mod.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
            return jnp.mean((y - target) ** 2), upd

        grads, upd = jax.grad(loss, has_aux=True)(variables["params"])
        params = jax.tree_util.tree_map(lambda p, g: p - lr * g, variables["params"], grads)
        return {**variables, **upd, "params": params}

    step = jax.jit(step) if use_jit else step
    trace = [variables]
    for i in range(steps):
        variables = step(variables, x * (1 + 0.1 * i))
        trace.append(variables)
    eval_y = mod.apply(variables, x, train=False)
    return trace, eval_y


def measure_composite(model: str, acc: Accumulator | None = None, *, use_jit: bool = True) -> Accumulator:
    """Native and facade composite models trained from the same init: identical variables after every step."""
    acc = acc or Accumulator()
    (tn, yn), (tf, yf) = (train_composite(model, impl, use_jit=use_jit) for impl in IMPLS)
    for i, (a, b) in enumerate(zip(tn, tf)):
        compare(acc, f"{model} after {i} SGD steps", a, b, exact=True)
    compare(acc, f"{model} eval output", yn, yf, exact=STRICT)
    return acc


# ------------------------------------------------------------------------------------------------------ grid


def grid(layer: str) -> list[Config]:
    """The fixed configurations ``normbridge check`` measures for ``layer``: f32/bf16/f16, jit and eager."""
    bf, f16, c = "bfloat16", "float16", Config
    grids = {
        "BatchNorm": [
            c(layer, (4, 3), use_jit=True),
            c(layer, (2, 3, 4), bf, (("momentum", 0.9), ("use_fast_variance", False)), mask=True),
            c(layer, (2, 2, 3, 4), f16, (("axis", (1, 3)), ("param_dtype", bf), ("use_bias", False)), use_jit=True),
        ],
        "LayerNorm": [
            c(layer, (4, 5), use_jit=True),
            c(layer, (2, 3, 4), bf, (("reduction_axes", (1, 2)), ("feature_axes", (1, 2))), mask=True),
            c(layer, (5,), f16, (("dtype", jnp.float32), ("use_fast_variance", False), ("use_scale", False))),
        ],
        "GroupNorm": [
            c(layer, (2, 3, 6), options=(("num_groups", 3),), use_jit=True),
            c(layer, (2, 2, 2, 4), bf, (("num_groups", None), ("group_size", 2)), mask=True),
            c(layer, (3, 4, 6), f16, (("num_groups", 2), ("reduction_axes", (2,)), ("use_fast_variance", False))),
        ],
        "InstanceNorm": [
            c(layer, (2, 4, 3), use_jit=True),
            c(layer, (2, 3, 4, 5), bf, (("feature_axes", (1, 3)),), mask=True),
            c(layer, (3, 4), f16, (("use_fast_variance", False), ("param_dtype", jnp.float16))),
        ],
        "SpectralNorm": [
            c(layer, (4, 5), use_jit=True),
            c(layer, (2, 4, 4, 2), bf, (("n_steps", 2),), inner="conv"),
            c(layer, (3, 4), f16, (("collection_name", "spectral"), ("dtype", jnp.float32)), inner="nested"),
        ],
        "WeightNorm": [
            c(layer, (4, 5), use_jit=True),
            c(layer, (2, 4, 4, 2), bf, (("feature_axes", None),), inner="conv"),
            c(
                layer,
                (3, 4),
                f16,
                (("variable_filter", None), ("param_dtype", bf), ("use_scale", False)),
                inner="nested",
            ),
        ],
    }
    grids["RMSNorm"] = [dataclasses.replace(cfg, layer=layer) for cfg in grids["LayerNorm"]]
    if layer not in grids:
        raise ValueError(f"unknown layer {layer!r}")
    return grids[layer]


def _cell(fn: Callable[[], Accumulator]) -> Cell:
    def run() -> Cell:
        acc = fn()
        return Cell(acc.ok, acc.text())

    return measured(run)


def rows() -> list[Row]:
    """One row per layer; every cell measured now against the installed flax.linen."""
    import flax

    out: list[Row] = []
    for layer in LAYERS:
        configs = grid(layer)
        accs = new_accumulators()
        steps = 5 if layer in ("BatchNorm", "SpectralNorm") else 1

        def run_grid(configs=configs, accs=accs, steps=steps) -> Cell:
            for cfg in configs:
                measure_case(cfg, accs, steps=steps)
            return Cell(True, "")

        crashed = measured(run_grid)
        if not crashed.ok:  # a crash in the grid fails every measured column
            cells = {c: crashed for c in accs}
        else:
            cells = {c: Cell(a.ok, a.text()) for c, a in accs.items()}
            sem = accs["train/eval semantics"]
            cells["train/eval semantics"] = _cell(lambda sem=sem, layer=layer: _semantics(layer, sem))
        cells["signature"] = measured(lambda layer=layer: _signature_cell(layer))
        out.append(
            Row(
                facade="linen",
                layer=layer,
                cells={c: cells[c] for c in COLUMNS},
                evidence=f"flax.linen {flax.__version__}, {len(configs)} configs (jit and eager, f32/bf16/f16)",
                notes=_NOTES.get(layer, ""),
            )
        )
    return out


def _signature_cell(layer: str) -> Cell:
    acc = measure_signature(layer)
    return Cell(acc.ok, "identical: class, __call__, dataclass fields" if acc.ok else acc.text())


def measure_group_norm_broadcast_mask(acc: Accumulator | None = None) -> Accumulator:
    """Documented deviation: native GroupNorm crashes on a mask broadcastable to ``x`` (its docs allow it);
    the facade equals native given the explicitly broadcast mask."""
    acc = acc or Accumulator()
    nn = _nn()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32))
    mask = jnp.asarray([True, False]).reshape(2, 1, 1)
    err = _raised(lambda: nn.GroupNorm(num_groups=2).init(jax.random.key(0), x, mask=mask))
    acc.check("GroupNorm broadcast mask: native raises TypeError", isinstance(err, TypeError), repr(err))
    full = jnp.broadcast_to(mask, x.shape)
    native, _ = nn.GroupNorm(num_groups=2).init_with_output(jax.random.key(0), x, mask=full)
    facade, _ = namespace("facade").GroupNorm(num_groups=2).init_with_output(jax.random.key(0), x, mask=mask)
    acc.add("GroupNorm broadcast mask: facade vs native with broadcast mask", diff(native, facade), exact=True)
    return acc


def _semantics(layer: str, acc: Accumulator) -> Accumulator:
    measure_errors(layer, acc)
    if layer == "BatchNorm":
        measure_axis_name(acc, how="pmap")
        measure_axis_name(acc, how="shard_map", use_fast_variance=False)
        measure_axis_index_groups(acc)
        measure_composite("mlp", acc)
    elif layer == "LayerNorm":
        measure_sharded_features(acc, layer="LayerNorm")
    elif layer == "GroupNorm":
        measure_group_norm_broadcast_mask(acc)
    elif layer == "RMSNorm":
        measure_sharded_features(acc, layer="RMSNorm")
    elif layer == "SpectralNorm":
        measure_composite("conv", acc, use_jit=False)
    return acc


_NOTES: dict[str, str] = {
    "GroupNorm": (
        "Deviation (documented intent followed): linen documents `mask` as broadcastable to the input, but "
        "GroupNorm reshapes the raw mask and raises TypeError unless its last axis has all C channels; the "
        "facade broadcasts first (bitwise equal to linen given the full mask)."
    ),
    "BatchNorm": (
        "5 training steps per config; axis_name checked with pmap and jax.shard_map on 8 devices. The max rel in "
        "train/eval semantics is synced-per-device vs whole-batch statistics (another reduction order, as in "
        "native); facade vs native is bitwise there too."
    ),
    "LayerNorm": "The max rel in train/eval semantics is features sharded over 4 devices vs unsharded (as native).",
    "SpectralNorm": "5 update_stats steps per config; composite Conv→GroupNorm→SpectralNorm→WeightNorm, 3 SGD steps.",
}
