"""The accuracy contract of fast mode, measured: fast vs exact, and both vs a float64 reference.

For one case (facade, layer, input layout, conditioning) the same facade layer, with the same
parameters and input, runs three times, each in one jitted function that returns the output, the
gradients w.r.t. the parameters and the input (of ``sum(y * c)`` for a fixed random ``c``) and the
updated state (batch statistics, power-iteration vectors):

* ``exact`` mode (bitwise the native library, proven by the rest of the conformance suite);
* ``fast`` mode (``normbridge.fast()``);
* exact mode in float64 (parameters and input converted, ``jax.enable_x64``): the reference.

The contract (issue 16): on well-conditioned inputs fast is within :data:`REL_TOL` of exact
(relative to the largest exact value, per output / gradient / statistic, as everywhere in the
conformance suite); on every input, fast is no further from the float64 reference than exact,
i.e. than the native library (:func:`FastMeasure.no_worse`). :func:`column` renders one facade
layer's cell of ``compat_matrix.md``; ``tests/core/test_fast_*.py`` drive :func:`measure` with
hypothesis.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from normbridge.conformance import Cell
from normbridge.conformance.measure import REL_TOL, TreeDiff, tree_diff, tree_paths
from normbridge.core.config import fast

#: Layers of each facade measured in fast mode (SpectralNorm/WeightNorm never compute moments, so
#: fast mode leaves their programs unchanged; they are measured to show it).
FACADE_LAYERS: dict[str, tuple[str, ...]] = {
    "linen": ("BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm", "SpectralNorm", "WeightNorm"),
    "nnx": ("BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm", "SpectralNorm", "WeightNorm"),
    "equinox": ("BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm", "SpectralNorm", "WeightNorm"),
    "treex": ("BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm"),
}
WRAPPERS = ("SpectralNorm", "WeightNorm")

#: Input conditionings: (offset, scale) of ``offset + scale * N(0, 1)``.
CONDITIONING: dict[str, tuple[float, float]] = {
    "well": (0.5, 1.0),
    # mean/std = 300: the one-pass E[x²] − E[x]² of flax keeps ~2 digits here
    "large_mean": (30.0, 0.1),
    # tiny variance next to eps: rsqrt(var + eps) dominated by eps
    "tiny_var": (0.0, 3e-3),
}

#: Slack of "no further from float64 than exact", in units of the case dtype's machine epsilon (one ulp
#: of the largest value, to which every error here is relative): ``fast_err <= exact_err + NO_WORSE_ULPS
#: * eps``. Fast mode computes the same formula as native (flax's one-pass E[x²] − E[x]², or two-pass)
#: and only sums in a different order, so its result may round differently by an ulp, no more: measured
#: on hypothesis draws of every layer of every facade (well, large mean, tiny variance, groups of two;
#: float32 and bfloat16), ``fast_err − exact_err`` is at most 0 (the two-level channels-last sums round
#: better; every other layer is bitwise exact mode).
NO_WORSE_ULPS = 2


@dataclasses.dataclass(frozen=True)
class FastCase:
    facade: str
    layer: str
    #: ``"rows"``: (N, C); ``"conv"``: (N, H, W, C) channels-last (equinox gets it channels-first)
    layout: str = "conv"
    conditioning: str = "well"
    #: GroupNorm group size (2 = the ill-conditioned "groups of two elements" on rows)
    group_size: int = 4
    dtype: str = "float32"
    seed: int = 0
    batch: int = 4
    spatial: int = 5
    channels: int = 8

    @property
    def elements_per_statistic(self) -> int:
        """How many elements each mean / variance is taken over."""
        conv = self.layout == "conv" and self.layer not in WRAPPERS
        spatial = self.spatial**2 if conv else 1
        if self.layer == "BatchNorm":
            return self.batch * spatial
        if self.layer == "GroupNorm":
            return self.group_size * spatial
        if self.layer == "InstanceNorm":
            return spatial
        if self.layer in ("LayerNorm", "RMSNorm"):
            return self.channels * (spatial if self.facade == "equinox" else 1)
        return self.channels

    @property
    def well_conditioned(self) -> bool:
        """Centred data of unit spread, at least 4 elements per statistic. Two elements (a group of two,
        a batch of two) are ill-conditioned: there exact mode itself is ~1e-4 from float64."""
        return self.conditioning == "well" and (self.elements_per_statistic >= 4 or self.layer == "InstanceNorm")

    def shape(self) -> tuple[int, ...]:
        if self.layout == "rows" or self.layer in WRAPPERS:
            return (self.batch, self.channels)
        return (self.batch, self.spatial, self.spatial, self.channels)


@dataclasses.dataclass(frozen=True)
class FastMeasure:
    """Fast vs exact (per leaf, :class:`TreeDiff`) and the worst relative error of each vs float64."""

    case: FastCase
    vs_exact: TreeDiff
    exact_err64: float
    fast_err64: float

    @property
    def deviation(self) -> float:
        """Largest relative deviation of fast from exact over outputs, gradients and state (0 = bitwise)."""
        return self.vs_exact.worst()

    def within(self, rel_tol: float | None = None) -> bool:
        """Fast within ``rel_tol`` (default: the dtype's :data:`REL_TOL`) of exact, same structure."""
        return self.vs_exact.within(REL_TOL[self.case.dtype] if rel_tol is None else rel_tol)

    @property
    def excess_ulps(self) -> float:
        """``(fast_err − exact_err) / eps`` of the case dtype: how much further from float64 fast is than
        exact (the native library), in ulps of the largest value; ≤ 0 where fast is at least as accurate."""
        return (self.fast_err64 - self.exact_err64) / float(jnp.finfo(self.case.dtype).eps)

    def no_worse(self) -> bool:
        """Fast no further from float64 than exact (the native library), up to :data:`NO_WORSE_ULPS` ulps."""
        return self.excess_ulps <= NO_WORSE_ULPS


def _input(case: FastCase, dtype: Any) -> jax.Array:
    offset, scale = CONDITIONING[case.conditioning]
    rng = np.random.default_rng(case.seed)
    x = offset + scale * rng.standard_normal(case.shape())
    return jnp.asarray(x.astype(np.float32)).astype(dtype)


def _randomized(tree: Any, seed: int) -> Any:
    """Parameters = their init plus N(0, 0.1²) noise, so scale and bias are not trivially 1 and 0."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    rng = np.random.default_rng(seed + 1)
    out = []
    for leaf in leaves:
        if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jnp.floating):
            noise = 0.1 * rng.standard_normal(leaf.shape).astype(np.float32)
            leaf = (leaf + jnp.asarray(noise)).astype(leaf.dtype)
        out.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, out)


def _to(tree: Any, dtype: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


Apply = Callable[[Any, Any, jax.Array], tuple[jax.Array, Any]]


def _linen(case: FastCase, x: jax.Array) -> tuple[Apply, Any, Any]:
    import flax.linen as nn

    F = importlib.import_module("normbridge.adapters.linen")
    c = x.shape[-1]
    kw: dict[str, Any] = {}
    mutable: list[str] = []
    if case.layer == "BatchNorm":
        m, mutable = F.BatchNorm(use_running_average=False, momentum=0.9), ["batch_stats"]
    elif case.layer == "GroupNorm":
        m = F.GroupNorm(num_groups=None, group_size=case.group_size)
    elif case.layer == "SpectralNorm":
        m, mutable, kw = F.SpectralNorm(nn.Dense(c)), ["batch_stats"], {"update_stats": True}
    elif case.layer == "WeightNorm":
        m = F.WeightNorm(nn.Dense(c))
    else:
        m = getattr(F, case.layer)()
    variables = dict(m.init(jax.random.PRNGKey(case.seed), x, **kw))
    params = variables.pop("params", {})

    def apply(params: Any, state: Any, x: jax.Array) -> tuple[jax.Array, Any]:
        if mutable:
            return m.apply({"params": params, **state}, x, mutable=mutable, **kw)
        return m.apply({"params": params, **state}, x, **kw), {}

    return apply, params, variables


def _nnx(case: FastCase, x: jax.Array) -> tuple[Apply, Any, Any]:
    from flax import nnx

    F = importlib.import_module("normbridge.adapters.nnx")
    c = x.shape[-1]
    rngs = nnx.Rngs(case.seed)
    if case.layer == "BatchNorm":
        m = F.BatchNorm(c, use_running_average=False, momentum=0.9, rngs=rngs)
    elif case.layer == "GroupNorm":
        m = F.GroupNorm(c, num_groups=None, group_size=case.group_size, rngs=rngs)
    elif case.layer in WRAPPERS:
        m = getattr(F, case.layer)(nnx.Linear(c, c, rngs=rngs), rngs=rngs)
    else:
        m = getattr(F, case.layer)(c, rngs=rngs)
    graphdef, params, state = nnx.split(m, nnx.Param, ...)

    def apply(params: Any, state: Any, x: jax.Array) -> tuple[jax.Array, Any]:
        # Fresh Variables from pure values in this trace (nnx refuses to mutate outer ones).
        p, s = jax.tree_util.tree_map(lambda a: a, (graphdef_params, graphdef_state))
        nnx.replace_by_pure_dict(p, params)
        nnx.replace_by_pure_dict(s, state)
        module = nnx.merge(graphdef, p, s)
        y = module(x)
        return y, nnx.to_pure_dict(nnx.state(module, nnx.Not(nnx.Param)))

    graphdef_params, graphdef_state = params, state
    return apply, nnx.to_pure_dict(params), nnx.to_pure_dict(state)


def _equinox(case: FastCase, x: jax.Array) -> tuple[Apply, Any, Any]:
    import equinox as eqx

    F = importlib.import_module("normbridge.adapters.equinox")
    xc = x if x.ndim == 2 else jnp.moveaxis(x, -1, 1)  # equinox layers see one channels-first example
    c = xc.shape[1]
    key = jax.random.PRNGKey(case.seed)
    state = None
    if case.layer == "BatchNorm":
        model, state = eqx.nn.make_with_state(F.BatchNorm)(c, axis_name="batch", momentum=0.9, mode="batch")
    elif case.layer == "GroupNorm":
        model = F.GroupNorm(c // case.group_size, c)
    elif case.layer == "SpectralNorm":
        model, state = eqx.nn.make_with_state(F.SpectralNorm)(eqx.nn.Linear(c, c, key=key), "weight", key=key)
    elif case.layer == "WeightNorm":
        model = F.WeightNorm(eqx.nn.Linear(c, c, key=key))
    else:
        model = getattr(F, case.layer)(xc.shape[1:])
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def apply(params: Any, state: Any, x: jax.Array) -> tuple[jax.Array, Any]:
        model = eqx.combine(params, static)
        xc = x if x.ndim == 2 else jnp.moveaxis(x, -1, 1)
        if state is None:
            y = jax.vmap(model)(xc)
        else:
            y, state = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(xc, state)
        return (y if y.ndim == 2 else jnp.moveaxis(y, 1, -1)), state

    return apply, params, state


def _treex(case: FastCase, x: jax.Array) -> tuple[Apply, Any, Any]:
    T = importlib.import_module("normbridge.adapters.treex")
    kw = {"dtype": x.dtype if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != jnp.bfloat16 else jnp.float32}
    if case.layer == "BatchNorm":
        m = T.BatchNorm(momentum=0.9, **kw)
    elif case.layer == "GroupNorm":
        m = T.GroupNorm(num_groups=None, group_size=case.group_size, **kw)
    else:
        m = getattr(T, case.layer)(**kw)
    m = m.init(jax.random.PRNGKey(case.seed), x).train()

    def apply(params: Any, module: Any, x: jax.Array) -> tuple[jax.Array, Any]:
        module = module.merge(params)
        y = module(x)
        return y, module

    return apply, m.parameters(), m


_BUILDERS = {"linen": _linen, "nnx": _nnx, "equinox": _equinox, "treex": _treex}


def _outputs(apply: Apply, params: Any, state: Any, x: jax.Array, cot: jax.Array) -> dict[str, Any]:
    """Output, gradients w.r.t. (params, x) of ``sum(y * cot)`` and the updated state, in one jit."""

    def loss(params: Any, x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, Any]]:
        y, new_state = apply(params, state, x)
        return jnp.sum(y.astype(cot.dtype) * cot), (y, new_state)

    @jax.jit
    def run(params: Any, x: jax.Array) -> dict[str, Any]:
        (_, (y, new_state)), (g_params, g_x) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
        return {"y": y, "grad_params": g_params, "grad_x": g_x, "state": new_state}

    return run(params, x)


def _floating(tree: Any) -> dict[str, np.ndarray]:
    out = {}
    for path, leaf in tree_paths(tree).items():
        a = np.asarray(leaf)
        if a.dtype.kind == "f" or a.dtype == jnp.bfloat16:
            out[path] = a.astype(np.float64)
    return out


def _err64(result: dict[str, Any], ref: dict[str, Any]) -> float:
    """Worst relative error (per leaf, vs max |reference|) of a float32 result against float64."""
    a, b = _floating(result), _floating(ref)
    worst = 0.0
    for path, r in b.items():
        if path not in a or a[path].shape != r.shape:
            return float("inf")
        scale = float(np.abs(r).max()) if r.size else 0.0
        err = float(np.abs(a[path] - r).max()) if r.size else 0.0
        worst = max(worst, err / scale if scale > 0 else err)
    return worst


def measure(case: FastCase) -> FastMeasure:
    """Run one case in exact mode, fast mode and float64 exact mode; compare."""
    build = _BUILDERS[case.facade]
    dtype = jnp.dtype(case.dtype)
    x = _input(case, dtype)
    apply, params, state = build(case, x)
    params = _randomized(params, case.seed)
    cot = jnp.asarray(np.random.default_rng(case.seed + 2).standard_normal(case.shape()).astype(np.float32))
    exact = _outputs(apply, params, state, x, cot)
    with fast():
        fast_out = _outputs(apply, params, state, x, cot)
    with jax.enable_x64(True):
        x64 = x.astype(jnp.float32).astype(jnp.float64)
        apply64, _, state64 = build(case, x64)
        # SpectralNorm: the same power-iteration vectors as the float32 run (drawn at init, and a
        # float64 draw differs); every other state is its deterministic init. The state is converted
        # to float64 too: the frameworks initialize it in param_dtype (float32), and a float32 running
        # statistic updated with a float64 one would round the reference (nnx: a float64 -> float32
        # scatter into the Variable, which jax warns about).
        state64 = _to(state if case.layer == "SpectralNorm" else state64, jnp.float64)
        ref = _outputs(apply64, _to(params, jnp.float64), state64, x64, cot.astype(jnp.float64))
        ref = jax.tree_util.tree_map(np.asarray, ref)
    return FastMeasure(case, tree_diff(exact, fast_out), _err64(exact, ref), _err64(fast_out, ref))


#: The fixed grid behind each ``compat_matrix.md`` cell: every layout x conditioning, two group sizes.
def grid(facade: str, layer: str) -> list[FastCase]:
    layouts = ("rows",) if layer in WRAPPERS else ("rows", "conv")
    cases = []
    for layout in layouts:
        for cond in CONDITIONING:
            sizes = (2, 4) if layer == "GroupNorm" else (4,)
            cases.extend(FastCase(facade, layer, layout, cond, gs) for gs in sizes)
    return cases


@functools.cache
def cell(facade: str, layer: str) -> Cell | None:
    """The ``fast mode`` cell of one facade layer, over :func:`grid`: the largest deviation of fast
    from exact on well-conditioned inputs, and the worst relative error vs float64 of exact (= the
    native library) and of fast over all conditionings (large mean, tiny variance, groups of two).
    ``None`` where the facade has no such layer. A failing contract fails the matrix row."""
    if layer not in FACADE_LAYERS.get(facade, ()):
        return None
    try:
        results = [measure(c) for c in grid(facade, layer)]
    except Exception as err:  # a crash is a measured failure, not a crash of the report
        return Cell(False, f"error: {type(err).__name__}: {err}"[:200])
    well = [r for r in results if r.case.well_conditioned]
    ok = all(r.within() for r in well) and all(r.no_worse() for r in results)
    bitwise = all(r.vs_exact.exact() for r in results)
    dev = "bitwise = exact" if bitwise else f"vs exact {max(r.deviation for r in well):.1e}"
    err_exact = max(r.exact_err64 for r in results)
    err_fast = max(r.fast_err64 for r in results)
    excess = max(r.excess_ulps for r in results)
    return Cell(ok, f"{dev}; vs float64 exact {err_exact:.1e} / fast {err_fast:.1e}, fast − exact at most "
                    f"{excess:+.1f} ulp (≤ {NO_WORSE_ULPS}) ({len(results)} cases)")


def column(facade: str, layer: str) -> str:
    """:func:`cell` as the matrix shows it: ``"pass: ..."``, ``"FAIL: ..."`` or ``"n/a"``."""
    c = cell(facade, layer)
    return "n/a" if c is None else f"{c.status}: {c.text}"
