"""Measuring functions for the NNX facade: facade vs installed ``flax.nnx`` for one configuration.

One implementation, two drivers: :mod:`normbridge.conformance.nnx` runs a fixed grid for
``normbridge check``; ``tests/conformance/test_nnx_*.py`` draws configurations with
hypothesis. Every function returns a list of :class:`Check` (column, name, measurement);
:func:`failures` turns them into readable failures and :func:`accumulate` into matrix cells.
Native layers are used here on purpose: this is the measuring side, not the library.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from normbridge.adapters import nnx as facade
from normbridge.conformance import COLUMNS, Cell
from normbridge.conformance.measure import Accumulator, Diff, TreeDiff, diff, tree_diff

NORMS: tuple[str, ...] = ("BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm")
WRAPPERS: tuple[str, ...] = ("SpectralNorm", "WeightNorm")
LAYERS: tuple[str, ...] = NORMS + WRAPPERS


@dataclasses.dataclass(frozen=True)
class Check:
    """One measurement for a matrix column: a :class:`Diff`/:class:`TreeDiff` or a boolean with detail."""

    column: str
    name: str
    result: Diff | TreeDiff | bool
    exact: bool = False
    detail: str = ""

    def ok(self) -> bool:
        if isinstance(self.result, bool):
            return self.result
        if isinstance(self.result, TreeDiff):
            return self.result.exact() if self.exact else self.result.within()
        d = self.result
        return (d.bitwise and d.same_shape and d.same_dtype) if self.exact else d.within()

    def text(self) -> str:
        if isinstance(self.result, bool):
            return self.detail or ("ok" if self.result else "failed")
        return self.result.text()


def failures(checks: Iterable[Check]) -> list[str]:
    """``"column/name: what differs"`` for every failed check."""
    return [f"{c.column}/{c.name}: {c.text()}" for c in checks if not c.ok()]


def accumulate(checks: Iterable[Check], columns: Sequence[str] = COLUMNS) -> dict[str, Cell]:
    """One :class:`Cell` per column that has checks."""
    checks = list(checks)
    accs: dict[str, Accumulator] = {}
    for c in checks:
        acc = accs.setdefault(c.column, Accumulator())
        if isinstance(c.result, bool):
            acc.check(c.name, c.result, c.detail)
        else:
            acc.add(c.name, c.result, exact=c.exact)
    only_flags = {c.column for c in checks if isinstance(c.result, bool)} - {
        c.column for c in checks if not isinstance(c.result, bool)
    }
    cells = {}
    for col in columns:
        if col not in accs:
            continue
        acc = accs[col]
        text = f"identical ({acc.cases} checks)" if col in only_flags and acc.ok else acc.text()
        cells[col] = Cell(acc.ok, text)
    return cells


# --------------------------------------------------------------------------- state helpers


def flat_state(module: Any, *filters: Any) -> dict[str, tuple[str, jax.Array]]:
    """``{"a/b": (Variable type name, value)}`` of ``nnx.state(module, *filters)`` (plain arrays: ``"Array"``)."""
    out = {}
    for path, leaf in nnx.to_flat_state(nnx.state(module, *filters)):
        key = "/".join(str(p) for p in path)
        if isinstance(leaf, nnx.Variable):
            out[key] = (type(leaf).__name__, leaf.get_value())
        else:
            out[key] = ("Array", leaf)
    return out


def _values(flat: dict[str, tuple[str, Any]]) -> dict[str, Any]:
    return {k: v for k, (_, v) in flat.items()}


def state_diff(a: Any, b: Any, *filters: Any) -> TreeDiff:
    """Values of two modules' states by path (types are checked by :func:`layout_checks`)."""
    return tree_diff(_values(flat_state(a, *filters)), _values(flat_state(b, *filters)))


def array_diff(a: Any, b: Any) -> Diff:
    return diff(a, b)


def layout_checks(native: Any, fac: Any, name: str, *, ignore_types: Iterable[str] = ()) -> list[Check]:
    """Same state paths, Variable types, shapes, dtypes and values (exact)."""
    n, f = flat_state(native), flat_state(fac)
    ignore = set(ignore_types)
    types_n = {k: t for k, (t, _) in n.items() if k not in ignore}
    types_f = {k: t for k, (t, _) in f.items() if k not in ignore}
    shapes_n = {k: (np.shape(v), str(v.dtype)) for k, (_, v) in n.items()}
    shapes_f = {k: (np.shape(v), str(v.dtype)) for k, (_, v) in f.items()}
    bad = sorted(k for k in set(types_n) | set(types_f) if types_n.get(k) != types_f.get(k))
    badshape = sorted(k for k in set(shapes_n) | set(shapes_f) if shapes_n.get(k) != shapes_f.get(k))
    return [
        Check("state layout", f"{name} types", not bad, detail=f"Variable types differ at {bad[:4]}" if bad else ""),
        Check("state layout", f"{name} shapes", not badshape, detail=f"shape/dtype differ at {badshape[:4]}"),
        Check("state layout", f"{name} values", tree_diff(_values(n), _values(f)), exact=True),
    ]


def randomize_params(modules: Sequence[Any], key: jax.Array) -> None:
    """Give the same random values to the Params (and WeightNorm gains) of structurally identical modules."""
    ref = flat_state(modules[0])
    keys = jax.random.split(key, max(len(ref), 1))
    values = {}
    for k, (path, (typ, v)) in zip(keys, sorted(ref.items())):
        if typ == "Param" or path.startswith("scales/"):
            values[path] = (0.5 + jax.random.uniform(k, v.shape, jnp.float32)).astype(v.dtype)
            if "bias" in path:
                values[path] = jax.random.normal(k, v.shape, jnp.float32).astype(v.dtype)
    for m in modules:
        for path, leaf in nnx.to_flat_state(nnx.state(m)):
            key_ = "/".join(str(p) for p in path)
            if key_ not in values:
                continue
            if isinstance(leaf, nnx.Variable):
                leaf.set_value(values[key_])
            else:  # native WeightNorm: a plain array in a dict
                m.scales[path[1]] = values[key_]


def make_input(shape: Sequence[int], dtype: str, seed: int) -> jax.Array:
    """``N(0.5, 2²)`` data in ``dtype``."""
    return (jax.random.normal(jax.random.key(seed), tuple(shape), jnp.float32) * 2 + 0.5).astype(dtype)


def make_mask(shape: Sequence[int], seed: int) -> jax.Array:
    """A boolean mask with about 80% True."""
    return jax.random.uniform(jax.random.key(seed + 7), tuple(shape)) < 0.8


# --------------------------------------------------------------------------- norm layers


@dataclasses.dataclass(frozen=True)
class NormCase:
    """One configuration of a BatchNorm/LayerNorm/RMSNorm/GroupNorm/InstanceNorm comparison."""

    layer: str
    shape: tuple[int, ...]
    kwargs: tuple[tuple[str, Any], ...] = ()
    dtype: str = "float32"
    mask: bool = False
    use_jit: bool = False
    steps: int = 2
    seed: int = 0

    def ctor(self) -> dict[str, Any]:
        return dict(self.kwargs)


def num_features(layer: str, shape: Sequence[int], kwargs: dict[str, Any]) -> int:
    """nnx's ``num_features``: the product of the feature-axis sizes (1-D params)."""
    ndim = len(shape)
    if layer == "BatchNorm":
        axes: Any = kwargs.get("axis", -1)
    elif layer in ("LayerNorm", "RMSNorm", "InstanceNorm"):
        axes = kwargs.get("feature_axes", -1)
    else:
        axes = -1
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    return math.prod(shape[a % ndim] for a in axes)


def build_norm(cls: Callable[..., Any], case: NormCase, rngs_seed: int | None = None) -> Any:
    kw = case.ctor()
    return cls(
        num_features(case.layer, case.shape, kw), **kw, rngs=nnx.Rngs(case.seed if rngs_seed is None else rngs_seed)
    )


def _caller(layer: str, use_jit: bool) -> Callable[..., Any]:
    def call(m: Any, x: jax.Array, mask: Any, train: Any) -> jax.Array:
        if layer == "BatchNorm":
            return m(x, use_running_average=train is False, mask=mask)
        return m(x, mask=mask)

    if use_jit:
        return nnx.jit(call, static_argnums=(3,))
    return call


def _grads(m: Any, x: jax.Array, mask: Any, layer: str, use_jit: bool) -> Any:
    def loss(mod: Any) -> jax.Array:
        y = mod(x, use_running_average=True, mask=mask) if layer == "BatchNorm" else mod(x, mask=mask)
        w = jnp.linspace(-1.0, 1.0, y.size, dtype=jnp.float32).reshape(y.shape)
        return jnp.sum(y.astype(jnp.float32) * w)

    g = nnx.grad(loss)
    if use_jit:
        g = nnx.jit(g)
    return g(m)


def measure_norm(case: NormCase, *, native_cls: Any = None, facade_cls: Any = None) -> list[Check]:
    """Init state, ``steps`` train calls (outputs + updated stats), eval output and gradients."""
    native_cls = native_cls or getattr(nnx, case.layer)
    facade_cls = facade_cls or getattr(facade, case.layer)
    native, fac = build_norm(native_cls, case), build_norm(facade_cls, case)
    name = f"{case.layer}{case.shape}{dict(case.kwargs)} {case.dtype}{' mask' if case.mask else ''}"
    checks = layout_checks(native, fac, name)
    randomize_params([native, fac], jax.random.key(case.seed + 1))
    call = _caller(case.layer, case.use_jit)
    mask = make_mask(case.shape, case.seed) if case.mask else None
    for step in range(case.steps):
        x = make_input(case.shape, case.dtype, case.seed + 100 + step)
        yn, yf = call(native, x, mask, True), call(fac, x, mask, True)
        checks.append(Check("outputs", f"{name} train step {step}", diff(yn, yf)))
        if case.layer == "BatchNorm":
            checks.append(
                Check("train/eval semantics", f"{name} stats step {step}", state_diff(native, fac, nnx.BatchStat), True)
            )
    x = make_input(case.shape, case.dtype, case.seed + 99)
    checks.append(Check("outputs", f"{name} eval", diff(call(native, x, mask, False), call(fac, x, mask, False))))
    gn = _grads(native, x, mask, case.layer, case.use_jit)
    gf = _grads(fac, x, mask, case.layer, case.use_jit)
    checks.append(Check("gradients", name, tree_diff(nnx.to_pure_dict(gn), nnx.to_pure_dict(gf))))
    return checks


# --------------------------------------------------------------------------- wrappers


@dataclasses.dataclass(frozen=True)
class WrapperCase:
    """SpectralNorm/WeightNorm around a ``Linear(in, out)`` or a ``Conv(in, out, (k, k))``."""

    layer: str
    inner: str = "Linear"  # or "Conv", or "Tensor3" (a 3-D kernel without convolution: cheap to compile)
    features: tuple[int, int] = (3, 4)
    kwargs: tuple[tuple[str, Any], ...] = ()
    dtype: str = "float32"
    use_jit: bool = False
    steps: int = 2
    seed: int = 0

    def input_shape(self) -> tuple[int, ...]:
        if self.inner == "Conv":
            return (2, 5, 5, self.features[0])
        return (2, self.features[0])


class Tensor3(nnx.Module):
    """``y[n, j, k] = Σ_i x[n, i] kernel[i, j, k]`` with a ``(in, 2, out)`` kernel: a >2-D weight for the wrappers."""

    def __init__(self, din: int, dout: int, *, rngs: nnx.Rngs):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (din, 2, dout)) / din)
        self.bias = nnx.Param(jnp.zeros((dout,)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("ni,ijk->njk", x, self.kernel[...]) + self.bias[...]


def build_inner(case: WrapperCase) -> Any:
    rngs = nnx.Rngs(case.seed)
    if case.inner == "Linear":
        return nnx.Linear(*case.features, rngs=rngs)
    if case.inner == "Tensor3":
        return Tensor3(*case.features, rngs=rngs)
    return nnx.Conv(*case.features, kernel_size=(3, 3), rngs=rngs)


def build_wrapper(cls: Callable[..., Any], case: WrapperCase) -> Any:
    return cls(build_inner(case), **dict(case.kwargs), rngs=nnx.Rngs(case.seed + 1))


def _raw_kernel_reset(native: Any, raw: dict[tuple, jax.Array]) -> None:
    """Undo native's kernel write-back, so that each native call starts from the raw weights (as linen does)."""
    for path, leaf in nnx.to_flat_state(nnx.state(native.layer_instance, nnx.Param)):
        leaf.set_value(raw[path])


def measure_wrapper(case: WrapperCase) -> list[Check]:
    """State at init, ``steps`` calls (outputs, u/σ), eval and gradients w.r.t. the wrapped layer's Params.

    Native nnx overwrites the wrapped kernel after every call (google/flax#5576); the
    facade does not. To compare the math, the native kernel is reset to the raw value
    before each native call, which is exactly the state the facade keeps.
    """
    native_cls, facade_cls = getattr(nnx, case.layer), getattr(facade, case.layer)
    native, fac = build_wrapper(native_cls, case), build_wrapper(facade_cls, case)
    name = f"{case.layer}({case.inner}{case.features}){dict(case.kwargs)} {case.dtype}"
    wn = case.layer == "WeightNorm"
    checks = layout_checks(native, fac, name, ignore_types=[k for k in flat_state(fac) if k.startswith("scales/")])
    if wn:
        checks.append(
            Check(
                "state layout",
                f"{name} scales",
                tree_diff(_values(flat_state(native)), _values(flat_state(fac))),
                exact=True,
            )
        )
    randomize_params([native, fac], jax.random.key(case.seed + 1))
    raw = {p: leaf.get_value() for p, leaf in nnx.to_flat_state(nnx.state(native.layer_instance, nnx.Param))}

    def call(m: Any, x: jax.Array, train: bool) -> jax.Array:
        if case.layer == "SpectralNorm":
            return m(x, update_stats=train)
        return m(x)

    if case.use_jit:
        call = nnx.jit(call, static_argnums=(2,))
    for step in range(case.steps):
        x = make_input(case.input_shape(), case.dtype, case.seed + 100 + step)
        _raw_kernel_reset(native, raw)
        yn, yf = call(native, x, True), call(fac, x, True)
        checks.append(Check("outputs", f"{name} call {step}", diff(yn, yf)))
        if not wn:
            checks.append(
                Check("train/eval semantics", f"{name} u/sigma {step}", state_diff(native, fac, nnx.BatchStat), True)
            )
    x = make_input(case.input_shape(), case.dtype, case.seed + 99)
    _raw_kernel_reset(native, raw)
    checks.append(Check("outputs", f"{name} eval", diff(call(native, x, False), call(fac, x, False))))
    if not wn:
        checks.append(
            Check("train/eval semantics", f"{name} eval keeps u", state_diff(native, fac, nnx.BatchStat), True)
        )

    def loss(m: Any) -> jax.Array:
        y = call(m, x, False)
        return jnp.sum(y.astype(jnp.float32) * jnp.linspace(-1.0, 1.0, y.size).reshape(y.shape))

    _raw_kernel_reset(native, raw)
    gn = nnx.to_pure_dict(nnx.grad(loss)(native))
    gf = nnx.to_pure_dict(nnx.grad(loss)(fac))
    checks.append(Check("gradients", f"{name} layer_instance", tree_diff(gn["layer_instance"], gf["layer_instance"])))
    return checks


# --------------------------------------------------------------------------- signatures and modes


def _same_default(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if callable(a) and callable(b):
        return getattr(a, "__name__", None) == getattr(b, "__name__", None)
    try:
        return bool(a == b)
    except Exception:  # pragma: no cover - incomparable defaults
        return False


def signature_checks(layer: str) -> list[Check]:
    """``__init__``/``__call__``/``set_view`` parameter names, kinds and defaults equal native's."""
    checks = []
    n_cls, f_cls = getattr(nnx, layer), getattr(facade, layer)
    for meth in ("__init__", "__call__", "set_view"):
        if not hasattr(n_cls, meth):
            checks.append(Check("signature", f"{layer}.{meth}", not hasattr(f_cls, meth), detail="extra method"))
            continue
        sn = inspect.signature(getattr(n_cls, meth)).parameters
        sf = inspect.signature(getattr(f_cls, meth)).parameters
        names_ok = list(sn) == list(sf)
        kinds_ok = names_ok and all(sn[k].kind == sf[k].kind for k in sn)
        bad = [k for k in sn if k in sf and not _same_default(sn[k].default, sf[k].default)]
        checks.append(
            Check(
                "signature",
                f"{layer}.{meth}",
                names_ok and kinds_ok and not bad,
                detail=f"names {list(sf)} vs {list(sn)}, defaults differ {bad}",
            )
        )
    return checks


def mode_checks(layer: str) -> list[Check]:
    """``use_running_average``/``update_stats`` at construction and call, ``.train()/.eval()``, ``nnx.view``."""
    checks: list[Check] = []
    if layer == "BatchNorm":
        case = NormCase("BatchNorm", (6, 4))
        x = make_input(case.shape, "float32", 3)

        def run(cls: Any, action: Callable[[Any], jax.Array]) -> tuple[jax.Array, Any]:
            m = build_norm(cls, case)
            y = action(m)
            return y, m

        actions: dict[str, Callable[[Any], Any]] = {
            "default (train)": lambda m: m(x),
            "call True": lambda m: m(x, True),
            "ctor True, call False": lambda m: (setattr(m, "use_running_average", True), m(x, False))[1],
            ".eval()": lambda m: (m.eval(), m(x))[1],
            ".eval().train()": lambda m: (m.eval(), m.train(), m(x))[-1],
            "nnx.view True": lambda m: nnx.view(m, use_running_average=True)(x),
            "set_view True": lambda m: (m.set_view(use_running_average=True), m(x))[1],
        }
        for label, act in actions.items():
            yn, mn = run(nnx.BatchNorm, act)
            yf, mf = run(facade.BatchNorm, act)
            checks.append(Check("train/eval semantics", f"BatchNorm {label} output", diff(yn, yf)))
            checks.append(Check("train/eval semantics", f"BatchNorm {label} stats", state_diff(mn, mf), True))
            checks.append(
                Check(
                    "train/eval semantics",
                    f"BatchNorm {label} flag",
                    mn.use_running_average == mf.use_running_average,
                    detail=f"{mf.use_running_average} vs native {mn.use_running_average}",
                )
            )
        for cls_name in ("native", "facade"):
            cls = nnx.BatchNorm if cls_name == "native" else facade.BatchNorm
            m = cls(4, use_running_average=None, rngs=nnx.Rngs(0))
            try:
                m(x)
                raised = False
            except ValueError:
                raised = True
            checks.append(Check("train/eval semantics", f"BatchNorm no flag raises ({cls_name})", raised))
    elif layer == "SpectralNorm":
        case = WrapperCase("SpectralNorm")
        x = make_input(case.input_shape(), "float32", 3)
        for label, act in {
            "ctor update_stats=False": ("ctor", None),
            ".eval()": ("eval", None),
            ".eval() call True": ("eval", True),
            "default": (None, None),
        }.items():
            outs = []
            for cls in (nnx.SpectralNorm, facade.SpectralNorm):
                kw = {"update_stats": False} if act[0] == "ctor" else {}
                m = build_wrapper(lambda inner, rngs, cls=cls, kw=kw: cls(inner, rngs=rngs, **kw), case)
                if act[0] == "eval":
                    m.eval()
                m(x, act[1])
                outs.append(m)
            checks.append(
                Check("train/eval semantics", f"SpectralNorm {label} u/sigma", state_diff(*outs, nnx.BatchStat), True)
            )
        for cls in (nnx.SpectralNorm, facade.SpectralNorm):
            m = build_wrapper(cls, case)
            try:
                nnx.view(m, use_running_average=True)
                raised = False
            except ValueError:
                raised = True
            checks.append(
                Check("train/eval semantics", f"SpectralNorm nnx.view unused key raises ({cls.__module__})", raised)
            )
    return checks


# --------------------------------------------------------------------------- deviations (native bug vs facade = linen)


def _raises(fn: Callable[[], Any]) -> str | None:
    """The exception type name ``fn`` raises, or ``None``."""
    try:
        jax.block_until_ready(fn())
    except Exception as err:
        return type(err).__name__
    return None


def _linen_apply(module: Any, variables: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
    return module.apply(variables, *args, **kwargs)


def groupnorm_deviation(
    configs: Sequence[tuple[tuple[int, ...], Any, int]] | None = None,
) -> tuple[list[Check], list[Check]]:
    """nnx GroupNorm repeats group statistics along axis 1 (layouts §0.14); the facade repeats along -1 like linen.

    Returns ``(native_quirk, facade_follows_linen)``: the first shows native crashing or
    differing from linen on each configuration, the second the facade equal to linen.
    """
    import flax.linen as nn

    configs = configs or [((6,), None, 3), ((2, 3, 4, 6), (2, 3), 2), ((2, 3, 6), (0, 1, 2), 3)]
    quirk, follows = [], []
    for shape, red, groups in configs:
        c = shape[-1]
        x = make_input(shape, "float32", 11)
        scale = 0.5 + jax.random.uniform(jax.random.key(1), (c,))
        bias = jax.random.normal(jax.random.key(2), (c,))
        lin = nn.GroupNorm(num_groups=groups, reduction_axes=red)
        y_linen = lin.apply({"params": {"scale": scale, "bias": bias}}, x)
        mods = []
        for cls in (nnx.GroupNorm, facade.GroupNorm):
            m = cls(c, num_groups=groups, reduction_axes=red, rngs=nnx.Rngs(0))
            m.scale.set_value(scale)
            m.bias.set_value(bias)
            mods.append(m)
        label = f"GroupNorm{shape} reduction_axes={red} G={groups}"
        err = _raises(lambda m=mods[0], x=x: m(x))
        if err is not None:
            quirk.append(Check("outputs", f"{label}: native raises {err}", True))
        else:
            d = diff(y_linen, mods[0](x))
            quirk.append(Check("outputs", f"{label}: native differs from linen ({d.text()})", not d.within()))
        follows.append(Check("outputs", f"{label}: facade vs linen", diff(y_linen, mods[1](x)), exact=True))
    return quirk, follows


def _linen_wrapped(kind: str, out: int, linen_ns: Any = None) -> Any:
    import flax.linen as nn

    ns = linen_ns or nn

    class Wrapped(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array, update_stats: bool = True) -> jax.Array:
            if kind == "SpectralNorm":
                return ns.SpectralNorm(nn.Dense(out))(x, update_stats=update_stats)
            return ns.WeightNorm(nn.Dense(out))(x)

    return Wrapped()


def wrapper_deviation(layer: str, steps: int = 3, linen_ns: Any = None) -> tuple[list[Check], list[Check]]:
    """nnx SpectralNorm/WeightNorm overwrite the wrapped kernel on every call (google/flax#5576);
    nnx WeightNorm's gains are plain arrays, so ``nnx.grad`` never sees them. The facade keeps
    the raw kernel and trainable ``nnx.Param`` gains and reproduces linen's ``apply`` on
    ``steps`` successive calls (outputs, u/σ) and linen's gradients (kernel, bias, gains).
    ``linen_ns`` replaces ``flax.linen`` for the wrapper class (e.g. the linen facade).
    """
    case = WrapperCase(layer, features=(3, 4))
    native, fac = build_wrapper(getattr(nnx, layer), case), build_wrapper(getattr(facade, layer), case)
    randomize_params([native, fac], jax.random.key(5))
    k0 = fac.layer_instance.kernel.get_value()
    b0 = fac.layer_instance.bias.get_value()
    lin = _linen_wrapped(layer, 4, linen_ns)
    variables = jax.tree.map(lambda a: a, lin.init(jax.random.key(0), jnp.ones((2, 3))))
    params = variables["params"]
    params["Dense_0"] = {"kernel": k0, "bias": b0}
    if layer == "SpectralNorm":
        variables["batch_stats"]["SpectralNorm_0"] = {
            "Dense_0/kernel/u": fac.batch_stats[("kernel", "u")].get_value(),
            "Dense_0/kernel/sigma": fac.batch_stats[("kernel", "sigma")].get_value(),
        }
    else:
        params["WeightNorm_0"] = {"Dense_0/kernel/scale": fac.scales[("kernel",)].get_value()}
    quirk, follows = [], []
    for step in range(steps):
        x = make_input((2, 3), "float32", 40 + step)
        if layer == "SpectralNorm":
            y_linen, upd = lin.apply(variables, x, update_stats=True, mutable=["batch_stats"])
            variables = {**variables, **upd}
        else:
            y_linen = lin.apply(variables, x)
        native(x)  # native keeps overwriting its kernel
        y_fac = fac(x)
        follows.append(Check("outputs", f"{layer} call {step}: facade vs linen", diff(y_linen, y_fac), exact=True))
        if layer == "SpectralNorm":
            u_l = variables["batch_stats"]["SpectralNorm_0"]["Dense_0/kernel/u"]
            follows.append(
                Check(
                    "train/eval semantics",
                    f"call {step}: u facade vs linen",
                    diff(u_l, fac.batch_stats[("kernel", "u")].get_value()),
                    exact=True,
                )
            )
        follows.append(
            Check(
                "state layout",
                f"{layer} call {step}: facade kernel stays raw",
                diff(k0, fac.layer_instance.kernel.get_value()),
                exact=True,
            )
        )
        changed = not diff(k0, native.layer_instance.kernel.get_value()).bitwise
        quirk.append(Check("state layout", f"{layer} call {step}: native kernel overwritten", changed))
    # Gradients: linen differentiates through the normalization into the raw kernel (and the gains).
    x = make_input((2, 3), "float32", 60)

    def loss_linen(p: Any) -> jax.Array:
        out = (
            lin.apply({**variables, "params": p}, x, update_stats=False)
            if layer == "SpectralNorm"
            else lin.apply({**variables, "params": p}, x)
        )
        return jnp.sum(out * jnp.linspace(-1.0, 1.0, out.size).reshape(out.shape))

    def loss_nnx(m: Any) -> jax.Array:
        out = m(x, update_stats=False) if layer == "SpectralNorm" else m(x)
        return jnp.sum(out * jnp.linspace(-1.0, 1.0, out.size).reshape(out.shape))

    g_linen = jax.grad(loss_linen)(variables["params"])
    g_fac = nnx.to_pure_dict(nnx.grad(loss_nnx)(fac))
    follows.append(
        Check(
            "gradients",
            f"{layer} kernel grad facade vs linen",
            diff(g_linen["Dense_0"]["kernel"], g_fac["layer_instance"]["kernel"]),
        )
    )
    if layer == "WeightNorm":
        follows.append(
            Check(
                "gradients",
                "WeightNorm gain grad facade vs linen",
                diff(g_linen["WeightNorm_0"]["Dense_0/kernel/scale"], g_fac["scales"][("kernel",)]),
            )
        )
        native_params = flat_state(native, nnx.Param)
        quirk.append(
            Check(
                "gradients",
                "native WeightNorm gains are not nnx.Param (never trained)",
                not any(k.startswith("scales") for k in native_params),
            )
        )
        quirk.append(
            Check(
                "state layout", "native gains are plain arrays", flat_state(native)["scales/('kernel',)"][0] == "Array"
            )
        )
    return quirk, follows


def mask_deviation(
    layers: Sequence[str] = ("BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm"),
) -> tuple[list[Check], list[Check]]:
    """nnx passes a mask to ``jnp.mean(where=)``, so a 0/1 float mask raises; the facade casts it to bool (linen)."""
    quirk, follows = [], []
    for layer in layers:
        kwargs = (("num_groups", 2),) if layer == "GroupNorm" else ()
        case = NormCase(layer, (2, 3, 4), kwargs=kwargs)
        native, fac = build_norm(getattr(nnx, layer), case), build_norm(getattr(facade, layer), case)
        x = make_input(case.shape, "float32", 3)
        mask = make_mask(case.shape, 3)
        fmask = mask.astype(jnp.float32)
        err = _raises(lambda native=native, x=x, fmask=fmask: native(x, mask=fmask))
        quirk.append(Check("outputs", f"{layer}: native float mask raises {err}", err == "ValueError"))
        y_bool = native(x, mask=mask)
        follows.append(
            Check(
                "outputs",
                f"{layer}: facade(float mask) vs native(bool mask)",
                diff(y_bool, fac(x, mask=fmask)),
                exact=True,
            )
        )
    return quirk, follows
