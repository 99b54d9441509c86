"""Measuring functions: the equinox facade against the installed ``equinox.nn`` on one configuration.

Each ``measure_<layer>(cfg, acc)`` builds the native layer and the facade with
the same arguments (through ``eqx.nn.make_with_state``), gives both the same
random parameters, runs both on the same inputs and adds every comparison to
``acc`` (one :class:`~normbridge.conformance.measure.Accumulator` per matrix
column). ``normbridge check`` drives them over a small fixed grid
(:mod:`normbridge.conformance.equinox`); the pytest suite drives the same
functions with hypothesis-drawn configurations.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import os
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

import normbridge.adapters.equinox as nb
from normbridge.adapters.equinox import canonical, checkpoint
from normbridge.adapters.equinox._common import sentinel as nb_sentinel
from normbridge.conformance import COLUMNS
from normbridge.conformance.measure import Accumulator, diff, shape_dtype_tree, tree_diff

Accs = dict[str, Accumulator]

try:  # equinox's private default for the optional `state` argument of LayerNorm & co.
    from equinox._custom_types import sentinel as _EQX_SENTINEL
except ImportError:  # pragma: no cover - private location moved
    _EQX_SENTINEL = object()

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

#: Outputs and gradients must be bitwise, in every dtype, not only within tolerance: the facade keeps
#: equinox's operation order (two-pass statistics as equinox writes them, its normalize and affine order).
STRICT = True


def new_accs() -> Accs:
    return {c: Accumulator() for c in COLUMNS}


# ---------------------------------------------------------------------------------------------
# generic helpers


def make(cls: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """``eqx.nn.make_with_state(cls)(*args, **kwargs)`` with equinox's mode warning silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return eqx.nn.make_with_state(cls)(*args, **kwargs)


def arrays(tree: Any) -> Any:
    return eqx.filter(tree, eqx.is_array)


def statics(tree: Any) -> list[Any]:
    """Non-array leaves (``axis_name``, ``inference``, ...) that must agree too, functions excluded."""
    return [leaf for leaf in jtu.tree_leaves(tree) if not eqx.is_array(leaf) and not callable(leaf)]


def clone(state: Any) -> Any:
    """A fresh copy of a ``State`` (``State.set`` invalidates the object it is called on)."""
    leaves, treedef = jtu.tree_flatten(state)
    return jtu.tree_unflatten(treedef, leaves)


def state_dict(state: Any) -> dict[str, Any]:
    """``{marker: value}`` of an ``eqx.nn.State`` (markers are strings after make_with_state)."""
    values, markers = state.tree_flatten()
    return {str(m): v for m, v in zip(markers, values)}


def _rng(seed: int | tuple[int, ...]) -> np.random.Generator:
    """numpy generator: host-side test data needs no XLA compilation (and is the same on every backend)."""
    return np.random.default_rng(seed if isinstance(seed, int) else list(seed))


def randomize(native: Any, facade: Any, key: int | tuple[int, ...], *, positive: bool = False) -> tuple[Any, Any]:
    """Replace every float array of ``native`` by random values and copy the same arrays into ``facade``.

    Fails (ValueError) when the two do not have the same array leaves in the same order.
    """
    rng = _rng(key)
    n_leaves, n_def = jtu.tree_flatten(native)
    f_leaves, f_def = jtu.tree_flatten(facade)
    n_idx = [i for i, leaf in enumerate(n_leaves) if eqx.is_array(leaf)]
    f_idx = [i for i, leaf in enumerate(f_leaves) if eqx.is_array(leaf)]
    if [n_leaves[i].shape for i in n_idx] != [f_leaves[i].shape for i in f_idx]:
        raise ValueError("randomize: native and facade have different array leaves")
    for i, k in zip(n_idx, f_idx):
        leaf = n_leaves[i]
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            r = rng.standard_normal(leaf.shape).astype(np.float32)
            r = np.abs(r) + 0.5 if positive else 1.0 + 0.5 * r
            n_leaves[i] = jnp.asarray(r).astype(leaf.dtype)
        f_leaves[k] = n_leaves[i]
    return jtu.tree_unflatten(n_def, n_leaves), jtu.tree_unflatten(f_def, f_leaves)


def data(key: int | tuple[int, ...], shape: tuple[int, ...], dtype: Any, *,
          offset: float = 0.5, scale: float = 2.0) -> Any:
    """Inputs ~ N(offset, scale²) in ``dtype`` (drawn on the host)."""
    r = _rng(key).standard_normal(shape).astype(np.float32) * scale + offset
    return jnp.asarray(r).astype(dtype)


def outcome(fn: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    try:
        return fn(), None
    except Exception as err:  # measured: both sides must fail the same way
        return None, err


def add_pair(acc: Accumulator, name: str, native: Any, facade: Any, *, exact: bool = STRICT) -> None:
    """Compare two results that may be exceptions (then the types must agree)."""
    (n_val, n_err), (f_val, f_err) = native, facade
    if n_err is not None or f_err is not None:
        same = n_err is not None and f_err is not None and type(n_err) is type(f_err)
        acc.check(
            f"{name} raises",
            same,
            f"native {type(n_err).__name__ if n_err else 'ok'} vs facade {type(f_err).__name__ if f_err else 'ok'}"
            + (f" ({f_err})" if f_err and not same else ""),
        )
        return
    acc.add(name, tree_diff(n_val, f_val), exact=exact)


def add_states(
    acc: Accumulator, name: str, native_state: Any, facade_state: Any, *, undefined: tuple[str, ...] = ()
) -> None:
    """Stored state must be identical: same markers, shapes, dtypes and bits.

    Entries whose marker contains a string in ``undefined`` hold values native leaves undefined
    (equinox fills the BatchNorm ema statistics with ``jnp.empty``, which is uninitialized memory
    from jax 0.11 on, jax-ml/jax#38674): only their shapes and dtypes are compared.
    """
    n, f = state_dict(native_state), state_dict(facade_state)
    acc.check(f"{name} markers", list(n) == list(f), f"native {list(n)} vs facade {list(f)}")
    loose = [k for k in n if any(u in k for u in undefined)]
    for k in loose:
        if k in f:
            same = shape_dtype_tree(n.pop(k)) == shape_dtype_tree(f.pop(k))
            acc.check(f"{name} {k} shape/dtype (values undefined in native)", same)
    acc.add(name, tree_diff(n, f), exact=True)


def add_gradients(
    acc: Accumulator, name: str, grad: Callable[..., Any], native_args: tuple, facade_args: tuple
) -> None:
    """Gradients of native and facade, both taken eagerly with the same ``grad`` function."""
    add_pair(acc, name, outcome(lambda: grad(*native_args)), outcome(lambda: grad(*facade_args)))


# ---------------------------------------------------------------------------------------------
# signature and layout


def _fields(cls: Any) -> list[tuple[str, bool]]:
    return [(f.name, bool(f.metadata.get("static", False))) for f in dataclasses.fields(cls)]


def _params(fn: Any) -> list[tuple[str, Any, Any]]:
    out = []
    for p in inspect.signature(fn).parameters.values():
        default = p.default
        # Both sides use a private "no state passed" sentinel object: compare its role, not its identity.
        if default is _EQX_SENTINEL or default is nb_sentinel:
            default = "<sentinel>"
        out.append((p.name, p.kind, default))
    return out


def measure_signature(native_cls: Any, facade_cls: Any, acc: Accumulator) -> None:
    """Constructor and call parameters (names, kinds, defaults), dataclass fields (names, order, static)."""
    name = native_cls.__name__
    n, f = _params(native_cls.__init__), _params(facade_cls.__init__)
    acc.check(f"{name}.__init__", n == f, f"native {n} vs facade {f}")
    n, f = _params(native_cls.__call__), _params(facade_cls.__call__)
    acc.check(f"{name}.__call__", n == f, f"native {n} vs facade {f}")
    n, f = _fields(native_cls), _fields(facade_cls)
    acc.check(f"{name} fields", n == f, f"native {n} vs facade {f}")
    acc.check(f"{name} class name", native_cls.__name__ == facade_cls.__name__)
    for base in (eqx.nn.StatefulLayer, eqx.Module):
        acc.check(f"{name} is {base.__name__}", issubclass(native_cls, base) == issubclass(facade_cls, base))


def measure_layout(
    native: tuple[Any, Any], facade: tuple[Any, Any], acc: Accumulator, name: str, *, undefined: tuple[str, ...] = ()
) -> None:
    """Model arrays (paths, shapes, dtypes, values), non-array leaves and ``State`` entries, exactly
    (``undefined``: see :func:`add_states`)."""
    (nm, ns), (fm, fs) = native, facade
    acc.add(f"{name} params", tree_diff(arrays(nm), arrays(fm)), exact=True)
    acc.check(f"{name} static leaves", statics(nm) == statics(fm), f"{statics(nm)} vs {statics(fm)}")
    n_paths = [jtu.keystr(p) for p, _ in jtu.tree_flatten_with_path(nm)[0]]
    f_paths = [jtu.keystr(p) for p, _ in jtu.tree_flatten_with_path(fm)[0]]
    acc.check(f"{name} leaf paths", n_paths == f_paths, f"{n_paths} vs {f_paths}")
    add_states(acc, f"{name} state", ns, fs, undefined=undefined)


def measure_checkpoint(
    native: tuple[Any, Any], facade: tuple[Any, Any], acc: Accumulator, name: str, run: Callable[[Any, Any], Any]
) -> None:
    """Native ``tree_serialise_leaves`` → facade (and back) and the named format, then run both.

    ``run(model, state)`` returns the outputs compared after each round trip.
    """
    (nm, ns), (fm, fs) = native, facade
    ref = run(nm, ns)

    def same(label: str, model: Any, state: Any, source: tuple[Any, Any]) -> None:
        acc.add(f"{label} params", tree_diff(arrays(source[0]), arrays(model)), exact=True)
        if state is not None:
            acc.add(f"{label} state", tree_diff(state_dict(source[1]), state_dict(state)), exact=True)
        acc.add(f"{label} outputs", tree_diff(ref, run(model, state)), exact=STRICT)

    buf = io.BytesIO()
    eqx.tree_serialise_leaves(buf, (nm, ns))
    buf.seek(0)
    fm2, fs2 = eqx.tree_deserialise_leaves(buf, (fm, fs))
    same(f"{name} native file → facade", fm2, fs2, (nm, ns))
    buf = io.BytesIO()
    eqx.tree_serialise_leaves(buf, (fm, fs))
    buf.seek(0)
    nm2, ns2 = eqx.tree_deserialise_leaves(buf, (nm, ns))
    same(f"{name} facade file → native", nm2, ns2, (fm, fs))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ckpt.nbeqx")
        checkpoint.save(path, fm, fs)
        fm3, fs3, report = checkpoint.load(path, fm, fs)
        acc.check(f"{name} named report", report.ok and not report.reordered, report.text())
        same(f"{name} named round trip", fm3, fs3, (fm, fs))
        plain = os.path.join(tmp, "native.eqx")
        eqx.tree_serialise_leaves(plain, (nm, ns))
        fm4, fs4, report = checkpoint.load(plain, fm, fs)
        acc.check(f"{name} plain file report", report.ok, report.text())
        same(f"{name} native plain file via load", fm4, fs4, (nm, ns))
    # canonical record: native and facade give the same record, and it round-trips into the other side.
    n_layer, f_layer = nm, fm
    n_state = ns if _stateful(n_layer) else None
    f_state = fs if _stateful(f_layer) else None
    rec_n = canonical.to_canonical(n_layer, n_state)
    rec_f = canonical.to_canonical(f_layer, f_state)
    acc.add(f"{name} canonical native vs facade", tree_diff(rec_n, rec_f), exact=True)
    acc.check(f"{name} canonical config", jtu.tree_structure(rec_n) == jtu.tree_structure(rec_f))
    # from_canonical invalidates the state it gets
    f_layer2, f_state2 = canonical.from_canonical(rec_n, f_layer, clone(fs) if f_state is not None else None)
    acc.add(
        f"{name} canonical → facade",
        tree_diff(rec_n, canonical.to_canonical(f_layer2, f_state2)),
        exact=True,
    )
    n_layer2, n_state2 = canonical.from_canonical(rec_f, n_layer, clone(ns) if n_state is not None else None)
    acc.add(f"{name} canonical → native", tree_diff(rec_f, canonical.to_canonical(n_layer2, n_state2)), exact=True)


def _stateful(layer: Any) -> bool:
    return type(layer).__name__ in ("BatchNorm", "SpectralNorm")


# ---------------------------------------------------------------------------------------------
# BatchNorm


@dataclasses.dataclass(frozen=True)
class BNConfig:
    channels: int = 3
    spatial: tuple[int, ...] = (4,)
    batch: int = 4
    dtype: str = "float32"
    state_dtype: str | None = None
    mode: str = "batch"
    channelwise_affine: bool = True
    momentum: float = 0.9
    eps: float = 1e-5
    steps: int = 5
    use_jit: bool = False
    seed: int = 0


def _bn_apply(model: Any, state: Any, x: jax.Array, inference: bool | None, jit: bool) -> tuple[Any, Any]:
    def f(m, x, s):
        return jax.vmap(lambda xi, si: m(xi, si, inference=inference), axis_name="batch", in_axes=(0, None),
                        out_axes=(0, None))(x, s)

    return (eqx.filter_jit(f) if jit else f)(model, x, state)


def measure_batch_norm(cfg: BNConfig, accs: Accs) -> None:
    """BatchNorm: layout, ``cfg.steps`` training steps + inference (3 ways), gradients, checkpoints."""
    key = (cfg.seed,)
    args = (cfg.channels, "batch", cfg.eps, cfg.channelwise_affine, cfg.momentum, False, cfg.state_dtype, cfg.mode)
    native = make(eqx.nn.BatchNorm, *args)
    facade = make(nb.BatchNorm, *args)
    name = f"BN[{cfg.mode},{cfg.dtype},{cfg.state_dtype}]"
    measure_layout(native, facade, accs["state layout"], name, undefined=("ema_state_index",))
    (nm, ns), (fm, fs) = native, facade
    nm, fm = randomize(nm, fm, key)
    dtype = DTYPES[cfg.dtype]
    shape = (cfg.batch, cfg.channels, *cfg.spatial)
    sem, outs = accs["train/eval semantics"], accs["outputs"]
    failed = False
    for step in range(cfg.steps):
        x = data((cfg.seed, 100 + step), shape, dtype, offset=0.5 + step)
        n = outcome(lambda x=x, ns=ns: _bn_apply(nm, ns, x, None, cfg.use_jit))
        f = outcome(lambda x=x, fs=fs: _bn_apply(fm, fs, x, None, cfg.use_jit))
        add_pair(outs, f"{name} train out step {step}", (n[0] and n[0][0], n[1]), (f[0] and f[0][0], f[1]))
        if n[1] is not None or f[1] is not None:
            failed = True
            break
        add_states(sem, f"{name} state after step {step}", n[0][1], f[0][1])
        ns, fs = n[0][1], f[0][1]
    if failed:
        return
    x = data((cfg.seed, 7), shape, dtype)
    for how in ("argument", "field", "inference_mode"):
        if how == "argument":
            n = outcome(lambda: _bn_apply(nm, ns, x, True, cfg.use_jit))
            f = outcome(lambda: _bn_apply(fm, fs, x, True, cfg.use_jit))
        else:
            ni = eqx.nn.inference_mode(nm) if how == "inference_mode" else eqx.tree_at(lambda m: m.inference, nm, True)
            fi = eqx.nn.inference_mode(fm) if how == "inference_mode" else eqx.tree_at(lambda m: m.inference, fm, True)
            n = outcome(lambda ni=ni: _bn_apply(ni, ns, x, None, cfg.use_jit))
            f = outcome(lambda fi=fi: _bn_apply(fi, fs, x, None, cfg.use_jit))
        add_pair(sem, f"{name} inference ({how})", n, f)
    # train with the field set to inference but the call argument False: the argument wins
    ni, fi = eqx.nn.inference_mode(nm), eqx.nn.inference_mode(fm)
    add_pair(sem, f"{name} inference=False overrides field",
             outcome(lambda: _bn_apply(ni, ns, x, False, cfg.use_jit)),
             outcome(lambda: _bn_apply(fi, fs, x, False, cfg.use_jit)))

    cot = data((cfg.seed, 9), shape, jnp.float32, offset=0.0, scale=1.0)

    def loss(m, x, s):
        y, _ = _bn_apply(m, s, x, None, False)
        return jnp.sum(y.astype(jnp.float32) * cot)

    add_gradients(accs["gradients"], f"{name} grad (params, x)", jax.grad(_split_loss(loss), argnums=(0, 1)),
                  (arrays(nm), x, nm, ns), (arrays(fm), x, fm, fs))

    def run(m, s):
        return _bn_apply(m, s, x, None, False)

    measure_checkpoint((nm, ns), (fm, fs), accs["checkpoint round trip"], name, run)


def _split_loss(loss: Callable[..., Any]) -> Callable[..., Any]:
    """``loss(model, x, state)`` as a function of ``(model arrays, x)`` for ``jax.grad``."""

    def f(params, x, model, state):
        return loss(eqx.combine(params, model), x, state)

    return f


# ---------------------------------------------------------------------------------------------
# LayerNorm, RMSNorm, GroupNorm, InstanceNorm


@dataclasses.dataclass(frozen=True)
class NormConfig:
    layer: str = "LayerNorm"  # LayerNorm | RMSNorm | GroupNorm | InstanceNorm
    shape: tuple[int, ...] = (4, 3)  # one example; channels first for GroupNorm/InstanceNorm
    groups: int = 2
    dtype: str = "float32"
    param_dtype: str | None = None
    use_weight: bool = True
    use_bias: bool = True
    eps: float = 1e-5
    batch: int = 3
    use_jit: bool = False
    seed: int = 0


def _build_norm(cfg: NormConfig) -> tuple[Any, Any, Any, Any]:
    """``(native_cls, native_args, facade_cls, facade_args)``; InstanceNorm's native is ``GroupNorm(C, C)``."""
    pd = None if cfg.param_dtype is None else DTYPES[cfg.param_dtype]
    affine = cfg.use_weight and cfg.use_bias
    if cfg.layer in ("LayerNorm", "RMSNorm"):
        args = (cfg.shape, cfg.eps, cfg.use_weight, cfg.use_bias, pd)
        return getattr(eqx.nn, cfg.layer), args, getattr(nb, cfg.layer), args
    c = cfg.shape[0]
    if cfg.layer == "GroupNorm":
        args = (cfg.groups, c, cfg.eps, affine, pd)
        return eqx.nn.GroupNorm, args, nb.GroupNorm, args
    return eqx.nn.GroupNorm, (c, c, cfg.eps, affine, pd), nb.InstanceNorm, (c, cfg.eps, affine, pd)


def _norm_apply(model: Any, x: jax.Array, state: Any, jit: bool) -> Any:
    def f(m, x):
        if state is None:
            return jax.vmap(m)(x)
        return jax.vmap(lambda xi: m(xi, state), out_axes=(0, None))(x)

    return (eqx.filter_jit(f) if jit else f)(model, x)


def measure_norm(cfg: NormConfig, accs: Accs) -> None:
    """LN/RMS/GN (vs the same native class) or InstanceNorm (vs native ``GroupNorm(C, C)``)."""
    key = (cfg.seed,)
    ncls, nargs, fcls, fargs = _build_norm(cfg)
    native, facade = make(ncls, *nargs), make(fcls, *fargs)
    name = f"{cfg.layer}{cfg.shape}[{cfg.dtype}]"
    if cfg.layer != "InstanceNorm":
        measure_layout(native, facade, accs["state layout"], name)
    else:
        accs["state layout"].add(f"{name} params", tree_diff(arrays(native[0]), arrays(facade[0])), exact=True)
    (nm, ns), (fm, fs) = native, facade
    nm, fm = randomize(nm, fm, key)
    dtype = DTYPES[cfg.dtype]
    x = data((cfg.seed, 1), (cfg.batch, *cfg.shape), dtype)
    n = outcome(lambda: _norm_apply(nm, x, None, cfg.use_jit))
    f = outcome(lambda: _norm_apply(fm, x, None, cfg.use_jit))
    add_pair(accs["outputs"], f"{name} out", n, f)
    if n[1] is None and f[1] is None:
        accs["outputs"].check(f"{name} out dtype", n[0].dtype == f[0].dtype == x.dtype, f"{n[0].dtype} {f[0].dtype}")
    # with a state: (out, same state) — Sequential compatibility
    n = outcome(lambda: _norm_apply(nm, x, ns, cfg.use_jit))
    f = outcome(lambda: _norm_apply(fm, x, fs, cfg.use_jit))
    add_pair(accs["train/eval semantics"], f"{name} (out, state) with state", n, f)
    # wrong shape: same exception type (LN/RMS: ValueError without vmap)
    bad = data(key, (cfg.batch + 1, *cfg.shape), dtype)
    if cfg.layer in ("LayerNorm", "RMSNorm"):
        add_pair(accs["train/eval semantics"], f"{name} unbatched input error", outcome(lambda: nm(bad)),
                 outcome(lambda: fm(bad)))
    cot = data((cfg.seed, 2), x.shape, jnp.float32, offset=0.0, scale=1.0)

    def loss(params, x, model):
        y = _norm_apply(eqx.combine(params, model), x, None, False)
        return jnp.sum(y.astype(jnp.float32) * cot)

    add_gradients(accs["gradients"], f"{name} grad (params, x)", jax.grad(loss, argnums=(0, 1)),
                  (arrays(nm), x, nm), (arrays(fm), x, fm))
    if cfg.layer == "InstanceNorm":
        # no native InstanceNorm: the round trip is the facade's own, compared with GroupNorm(C, C) outputs
        ref = _norm_apply(nm, x, None, False)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "in.nbeqx")
            checkpoint.save(path, fm)
            fm2, _, report = checkpoint.load(path, fm)
            accs["checkpoint round trip"].check(f"{name} named report", report.ok, report.text())
            accs["checkpoint round trip"].add(f"{name} named round trip", diff(ref, _norm_apply(fm2, x, None, False)),
                                              exact=STRICT)
        rec = canonical.to_canonical(fm)
        fm3, _ = canonical.from_canonical(rec, fm)
        accs["checkpoint round trip"].add(f"{name} canonical", tree_diff(rec, canonical.to_canonical(fm3)), exact=True)
        return

    def run(m, s):
        return _norm_apply(m, x, None, False)

    measure_checkpoint((nm, ns), (fm, fs), accs["checkpoint round trip"], name, run)


# ---------------------------------------------------------------------------------------------
# SpectralNorm, WeightNorm


@dataclasses.dataclass(frozen=True)
class WrapConfig:
    layer: str = "Linear"  # Linear | Conv2d
    in_features: int = 5
    out_features: int = 4
    dtype: str = "float32"
    num_power_iterations: int = 1
    eps: float = 1e-12
    axis: int | None = 0  # WeightNorm
    steps: int = 3
    use_jit: bool = False
    seed: int = 0


def _inner(cfg: WrapConfig, key: jax.Array) -> tuple[Any, tuple[int, ...]]:
    """The wrapped layer, with parameters drawn on the host (``eqx.filter_eval_shape`` skips the random init)."""
    dtype = DTYPES[cfg.dtype]
    if cfg.layer == "Linear":
        make_layer = lambda: eqx.nn.Linear(cfg.in_features, cfg.out_features, key=key, dtype=dtype)  # noqa: E731
        xshape: tuple[int, ...] = (cfg.in_features,)
    else:
        make_layer = lambda: eqx.nn.Conv2d(cfg.in_features, cfg.out_features, 3, padding=1, key=key,  # noqa: E731
                                           dtype=dtype)
        xshape = (cfg.in_features, 5, 5)
    abstract = eqx.filter_eval_shape(make_layer)
    rng = _rng((cfg.seed, 99))
    leaves, treedef = jtu.tree_flatten(abstract)
    leaves = [
        jnp.asarray((rng.standard_normal(leaf.shape) / np.sqrt(cfg.in_features)).astype(np.float32)).astype(leaf.dtype)
        if isinstance(leaf, jax.ShapeDtypeStruct) else leaf
        for leaf in leaves
    ]
    return jtu.tree_unflatten(treedef, leaves), xshape


def measure_spectral_norm(cfg: WrapConfig, accs: Accs) -> None:
    """SpectralNorm: init (15 iterations), training steps, inference, gradients, checkpoints."""
    inner, xshape = _inner(cfg, jax.random.PRNGKey(cfg.seed))
    args = (inner, "weight", cfg.num_power_iterations, cfg.eps)
    native = make(eqx.nn.SpectralNorm, *args, key=jax.random.PRNGKey(cfg.seed + 1))
    facade = make(nb.SpectralNorm, *args, key=jax.random.PRNGKey(cfg.seed + 1))
    name = f"SN[{cfg.layer},{cfg.dtype},k={cfg.num_power_iterations}]"
    measure_layout(native, facade, accs["state layout"], name)
    (nm, ns), (fm, fs) = native, facade
    dtype = DTYPES[cfg.dtype]

    def apply(m, s, x, inference):
        def f(m, x, s):
            return m(x, s, inference=inference)

        return (eqx.filter_jit(f) if cfg.use_jit else f)(m, x, clone(s))

    for step in range(cfg.steps):
        x = data((cfg.seed, 10 + step), xshape, dtype)
        n = outcome(lambda x=x, ns=ns: apply(nm, ns, x, None))
        f = outcome(lambda x=x, fs=fs: apply(fm, fs, x, None))
        add_pair(accs["outputs"], f"{name} train out {step}", (n[0] and n[0][0], n[1]), (f[0] and f[0][0], f[1]))
        if n[1] is not None or f[1] is not None:
            return
        add_states(accs["train/eval semantics"], f"{name} (u, v) after step {step}", n[0][1], f[0][1])
        ns, fs = n[0][1], f[0][1]
    x = data((cfg.seed, 5), xshape, dtype)
    add_pair(accs["train/eval semantics"], f"{name} inference (argument)", outcome(lambda: apply(nm, ns, x, True)),
             outcome(lambda: apply(fm, fs, x, True)))
    add_pair(accs["train/eval semantics"], f"{name} inference_mode",
             outcome(lambda: apply(eqx.nn.inference_mode(nm), ns, x, None)),
             outcome(lambda: apply(eqx.nn.inference_mode(fm), fs, x, None)))

    def loss(params, x, model, state):
        y, _ = eqx.combine(params, model)(x, clone(state))
        return jnp.sum(y.astype(jnp.float32) ** 2)

    add_gradients(accs["gradients"], f"{name} grad (params, x)", jax.grad(loss, argnums=(0, 1)),
                  (arrays(nm), x, nm, ns), (arrays(fm), x, fm, fs))
    def run(m, s):
        return m(x, clone(s), inference=True)

    measure_checkpoint((nm, ns), (fm, fs), accs["checkpoint round trip"], name, run)


def measure_weight_norm(cfg: WrapConfig, accs: Accs) -> None:
    """WeightNorm: ``g`` init, outputs (unchanged at init), after perturbing ``g``/``v``, gradients, checkpoints."""
    inner, xshape = _inner(cfg, jax.random.PRNGKey(cfg.seed))
    native = make(eqx.nn.WeightNorm, inner, "weight", cfg.axis)
    facade = make(nb.WeightNorm, inner, "weight", cfg.axis)
    name = f"WN[{cfg.layer},{cfg.dtype},axis={cfg.axis}]"
    measure_layout(native, facade, accs["state layout"], name)
    (nm, ns), (fm, fs) = native, facade
    dtype = DTYPES[cfg.dtype]
    x = data((cfg.seed, 3), xshape, dtype)

    def apply(m, x):
        return (eqx.filter_jit(lambda m, x: m(x)) if cfg.use_jit else (lambda m, x: m(x)))(m, x)

    add_pair(accs["outputs"], f"{name} out at init", outcome(lambda: apply(nm, x)), outcome(lambda: apply(fm, x)))
    # "unchanged at init" holds up to rounding of v·g/‖v‖: the facade may deviate from the bare layer no more
    # than native does
    bare = inner(x).astype(jnp.float32)
    dev_n = float(jnp.max(jnp.abs(apply(nm, x).astype(jnp.float32) - bare)))
    dev_f = float(jnp.max(jnp.abs(apply(fm, x).astype(jnp.float32) - bare)))
    slack = 1e-6 * float(jnp.max(jnp.abs(bare)))
    accs["train/eval semantics"].check(
        f"{name} unchanged at init", dev_f <= dev_n + slack, f"facade {dev_f:.2g} vs native {dev_n:.2g}"
    )
    nm, fm = randomize(nm, fm, (cfg.seed, 4))
    add_pair(accs["outputs"], f"{name} out (random g, v)", outcome(lambda: apply(nm, x)),
             outcome(lambda: apply(fm, x)))

    def loss(params, x, model):
        return jnp.sum(eqx.combine(params, model)(x).astype(jnp.float32) ** 2)

    add_gradients(accs["gradients"], f"{name} grad (params, x)", jax.grad(loss, argnums=(0, 1)),
                  (arrays(nm), x, nm), (arrays(fm), x, fm))
    measure_checkpoint((nm, ns), (fm, fs), accs["checkpoint round trip"], name, lambda m, s: m(x))


def measure_signatures(accs: Accs) -> None:
    for cls in ("BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm", "SpectralNorm", "WeightNorm"):
        measure_signature(getattr(eqx.nn, cls), getattr(nb, cls), accs["signature"])


# ---------------------------------------------------------------------------------------------
# multi-device


def measure_batch_norm_pmap(accs: Accs, *, mode: str = "batch", devices: int = 4, steps: int = 2) -> None:
    """``pmap(vmap(bn))`` with ``axis_name=('dev', 'batch')``: statistics over every device and example.

    The facade must equal native (``mode="batch"``) and a single ``vmap`` over the
    flattened batch (the documented meaning of a tuple ``axis_name``). Native
    ``mode="ema"`` raises ``ValueError`` under ``pmap`` (its ``State.set`` of a fresh
    ``jnp.array(False)`` does not match the pmap-typed stored flag); the facade
    follows the documented intent instead, which is what the ema case measures.
    """
    n_dev = min(devices, jax.local_device_count())
    acc = accs["train/eval semantics"]
    if n_dev < 2:
        acc.check("BN pmap", False, f"needs ≥ 2 devices, have {jax.local_device_count()}")
        return
    c = 3
    native = make(eqx.nn.BatchNorm, c, ("dev", "batch"), momentum=0.9, mode=mode)
    facade = make(nb.BatchNorm, c, ("dev", "batch"), momentum=0.9, mode=mode)
    flat = make(nb.BatchNorm, c, "batch", momentum=0.9, mode=mode)
    (nm, ns), (fm, fs), (lm, ls) = native, facade, flat
    nm, fm = randomize(nm, fm, (7,))
    lm = eqx.tree_at(lambda m: (m.weight, m.bias), lm, (fm.weight, fm.bias))

    def apply(m, x, s):
        inner = jax.vmap(m, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
        return jax.pmap(inner, axis_name="dev", in_axes=(0, None), out_axes=(0, None))(x, s)

    for step in range(steps):
        x = data((8, step), (n_dev, 2, c, 4), jnp.float32, offset=step)
        yf, fs = apply(fm, x, fs)
        yl, ls = jax.vmap(lm, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x.reshape(-1, c, 4), ls)
        accs["outputs"].add(f"BN[{mode}] pmap×vmap out == flat vmap out, step {step}", diff(yl, yf.reshape(yl.shape)))
        acc.add(f"BN[{mode}] pmap×vmap state == flat vmap state, step {step}",
                tree_diff(list(state_dict(ls).values()), list(state_dict(fs).values())))
        n = outcome(lambda x=x, ns=ns: apply(nm, x, ns))
        if mode == "ema":
            acc.check(f"BN[ema] native pmap raises ValueError (equinox bug), step {step}",
                      isinstance(n[1], ValueError), repr(n[1]))
            continue
        if n[1] is not None:
            acc.check(f"BN[{mode}] native pmap", False, repr(n[1]))
            return
        yn, ns = n[0]
        accs["outputs"].add(f"BN[{mode}] pmap×vmap out vs native, step {step}", diff(yn, yf), exact=STRICT)
        add_states(acc, f"BN[{mode}] pmap×vmap state vs native, step {step}", ns, fs)
