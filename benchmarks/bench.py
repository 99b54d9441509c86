#!/usr/bin/env python
"""Benchmark: each normbridge facade against the native layer it replaces.

For every (facade, layer, shape) case the native layer and the facade layer are built with the
same constructor arguments, the same parameters and the same input, and four functions are
compiled with the framework's own jit (``jax.jit`` for linen/treex, ``nnx.jit`` for nnx,
``eqx.filter_jit`` for equinox):

* ``fwd``: the layer's output (train-mode BatchNorm also returns its updated statistics);
* ``fwd+bwd``: the gradient of ``sum(y.astype(float32) ** 2)`` w.r.t. the input and the
  parameters (train-mode BatchNorm also returns its updated statistics).

The first call of each (trace + compile + one run) is timed separately. After two warm-up calls
the four functions are timed *interleaved*: several rounds, each running every function for its
share of the repetitions in a rotating order, so slow phases of a shared machine hit native and
facade alike. Reported: the median per function, the ratio facade / native of the medians (target
<= 1.05), the ratio of first-call times, the largest difference between the native and facade
results (output and all gradients, first calls) and whether the optimized HLO of facade and
native is the same program up to names (a ratio above 1 with the same HLO is noise).

Run ``python benchmarks/bench.py --help``. The script re-executes itself with
``GLIBC_TUNABLES`` set so that glibc recycles freed buffers instead of unmapping them; otherwise
page faults on every fresh XLA buffer dominate the timings (see docs/benchmark.md).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib
import math
import os
import platform
import re
import statistics
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

# Measure the checkout this script belongs to, not whichever normbridge is installed.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

#: Allocator settings for the timed process: never mmap/unmap per buffer, never trim, one arena.
GLIBC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736:glibc.malloc.arena_max=1"

FACADES: tuple[str, ...] = ("linen", "nnx", "equinox", "treex")

#: Input shapes: name -> (full shape, quick-mode shape, dtype name).
SHAPES: dict[str, tuple[tuple[int, ...], tuple[int, ...], str]] = {
    "tfm_f32": ((8192, 1024), (64, 128), "float32"),
    "tfm_bf16": ((8192, 1024), (64, 128), "bfloat16"),
    "conv_f32": ((64, 56, 56, 64), (4, 6, 6, 64), "float32"),
    # SpectralNorm / WeightNorm wrap a Dense(1024 -> 1024) (kernel 1024x1024); x is (256, 1024).
    "dense_f32": ((256, 1024), (16, 64), "float32"),
}

#: Layer key -> display name.
LAYERS: dict[str, str] = {
    "bn_train": "BatchNorm train",
    "bn_eval": "BatchNorm eval",
    "layernorm": "LayerNorm",
    "rmsnorm": "RMSNorm",
    "groupnorm": "GroupNorm(32)",
    "instancenorm": "InstanceNorm",
    "spectralnorm": "SpectralNorm(Dense)",
    "weightnorm": "WeightNorm(Dense)",
    # nnx only: native WeightNorm never trains its gains (plain arrays, a deviation the facade fixes);
    # here they are made nnx.Param on the native side too, so both sides do the same work.
    "weightnorm_trained": "WeightNorm(Dense), gains trained on both sides",
}

#: Which layers run on which shape (normalization layers on activations, wrappers on a Dense).
SHAPE_LAYERS: dict[str, tuple[str, ...]] = {
    "tfm_f32": ("bn_train", "bn_eval", "layernorm", "rmsnorm", "groupnorm", "instancenorm"),
    "tfm_bf16": ("bn_train", "bn_eval", "layernorm", "rmsnorm", "groupnorm", "instancenorm"),
    "conv_f32": ("bn_train", "bn_eval", "groupnorm", "instancenorm"),
    "dense_f32": ("spectralnorm", "weightnorm", "weightnorm_trained"),
}

MOMENTUM = 0.99
BN_EPS = 1e-5
GROUPS = 32


class Unsupported(Exception):
    """The facade's framework has no such layer (e.g. equinox InstanceNorm): the case is skipped."""


@dataclasses.dataclass
class Impl:
    """One side (native or facade) of a case: two compiled functions and their arguments."""

    fwd: Callable[..., Any]
    fwd_args: tuple[Any, ...]
    bwd: Callable[..., Any]
    bwd_args: tuple[Any, ...]
    #: fwd result -> output array; bwd result -> pytree of gradients ``(d_params, d_x)``.
    out_of: Callable[[Any], Any]
    grads_of: Callable[[Any], Any]
    #: paths of the leaves that were randomized (so the other side can randomize the same ones)
    randomized: set[str] | None = None

    def call_fwd(self) -> Any:
        return self.fwd(*self.fwd_args)

    def call_bwd(self) -> Any:
        return self.bwd(*self.bwd_args)


@dataclasses.dataclass
class Result:
    facade: str
    layer: str
    shape: str
    dtype: str
    fwd_native_ms: float
    fwd_facade_ms: float
    bwd_native_ms: float
    bwd_facade_ms: float
    compile_native_s: float
    compile_facade_s: float
    max_abs_diff: float
    #: max |Δ| relative to max |native| over output and gradients
    max_rel_diff: float
    hlo: str
    reps: int
    notes: list[str] = dataclasses.field(default_factory=list)
    #: (fwd ratio, fwd+bwd ratio) of the in-run repeat of a case that first measured above target
    recheck: tuple[float, float] | None = None
    #: re-times the same compiled functions; dropped once used (it holds the case's arrays)
    retime: Callable[[], tuple[float, float]] | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def fwd_ratio(self) -> float:
        return self.fwd_facade_ms / self.fwd_native_ms

    @property
    def bwd_ratio(self) -> float:
        return self.bwd_facade_ms / self.bwd_native_ms

    @property
    def compile_ratio(self) -> float:
        return self.compile_facade_s / self.compile_native_s


# ---------------------------------------------------------------------------------------------
# inputs and parameters


def _backend() -> str:
    import jax

    name = jax.default_backend()
    return name if name == "cpu" else f"{name} ({jax.devices()[0].device_kind})"


def _jnp() -> Any:
    import jax.numpy as jnp

    return jnp


def make_input(shape: tuple[int, ...], dtype: str, seed: int = 0) -> Any:
    """Deterministic input with a non-zero mean per feature (so centring matters)."""
    import jax

    jnp = _jnp()
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(k1, shape, jnp.float32) * 2.0 + jax.random.normal(k2, shape[-1:], jnp.float32)
    return x.astype(dtype)


def _path_name(path: Any) -> str:
    """keystr of a leaf path, without nnx's trailing ``.value`` (a Variable and a plain array
    stored at the same place get the same name)."""
    import jax

    return jax.tree_util.keystr(path).removesuffix(".value")


def randomize(tree: Any, seed: int = 1, only: set[str] | None = None) -> Any:
    """Add N(0, 0.1²) noise to every floating leaf, keyed by the leaf's path.

    Native and facade trees with the same layout therefore get identical values, and parameters
    stay near their inits (scale ≈ 1, var ≈ 1 > 0), so every case computes something non-trivial.
    ``only``: randomize just these paths (``jax.tree_util.keystr``), e.g. those the native side has.
    """
    import jax

    jnp = _jnp()

    def leaf(path: Any, v: Any) -> Any:
        name = _path_name(path)
        if not (hasattr(v, "dtype") and jnp.issubdtype(v.dtype, jnp.floating)):
            return v
        if only is not None and name not in only:
            return v
        key = jax.random.PRNGKey(zlib.crc32(f"{seed}:{name}".encode()) & 0x7FFFFFFF)
        return (v + 0.1 * jax.random.normal(key, v.shape, jnp.float32)).astype(v.dtype)

    return jax.tree_util.tree_map_with_path(leaf, tree)


def _loss_of(y: Any) -> Any:
    jnp = _jnp()
    return jnp.sum(jnp.square(y.astype(jnp.float32)))


# ---------------------------------------------------------------------------------------------
# per-framework drivers: build an Impl from a namespace of layer classes (native or facade)


def _linen_module(ns: Any, layer: str, features: int, dtype: Any, *, treex_defaults: bool = False) -> tuple[Any, bool]:
    """A linen module (native ``flax.linen`` or the linen facade) and whether it updates batch stats."""
    import flax.linen as nn

    eps = {"epsilon": 1e-5} if treex_defaults else {}
    if layer in ("bn_train", "bn_eval"):
        m = ns.BatchNorm(use_running_average=layer == "bn_eval", momentum=MOMENTUM, epsilon=BN_EPS, dtype=dtype)
        return m, layer == "bn_train"
    if layer == "layernorm":
        return ns.LayerNorm(dtype=dtype, **eps), False
    if layer == "rmsnorm":
        return ns.RMSNorm(dtype=dtype, **eps), False
    if layer == "groupnorm":
        return ns.GroupNorm(num_groups=GROUPS, dtype=dtype, **eps), False
    if layer == "instancenorm":
        return ns.InstanceNorm(dtype=dtype, **eps), False
    if layer == "spectralnorm":
        return ns.SpectralNorm(nn.Dense(features)), True
    if layer == "weightnorm":
        return ns.WeightNorm(nn.Dense(features)), False
    raise Unsupported(layer)


def linen_impl(ns: Any, layer: str, x: Any, dtype: Any, *, treex_defaults: bool = False) -> Impl:
    """``jax.jit(module.apply)``; train BatchNorm / SpectralNorm with ``mutable=['batch_stats']``.

    ``treex_defaults``: linen configured and called the way treex used it (treex modules wrapped
    linen's ``apply`` and are returned whole from a jitted step): epsilon 1e-5 for LayerNorm /
    GroupNorm, and every function also returns all variables, as a returned treex module does.
    """
    import jax

    m, mutates = _linen_module(ns, layer, x.shape[-1], dtype, treex_defaults=treex_defaults)
    call_kw = {"update_stats": True} if layer == "spectralnorm" else {}
    variables = randomize(dict(m.init(jax.random.PRNGKey(0), x, **call_kw)))
    params = variables.pop("params", {})
    rest = variables

    def apply(params: Any, rest: Any, x: Any) -> tuple[Any, Any]:
        if mutates:
            y, upd = m.apply({"params": params, **rest}, x, mutable=["batch_stats"], **call_kw)
        else:
            y, upd = m.apply({"params": params, **rest}, x, **call_kw), {}
        if treex_defaults:
            return y, {"params": params, **rest, **upd}
        return y, upd

    def loss(params: Any, x: Any, rest: Any) -> tuple[Any, Any]:
        y, upd = apply(params, rest, x)
        return _loss_of(y), upd

    fwd = jax.jit(apply)
    bwd = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
    return Impl(fwd, (params, rest, x), bwd, (params, x, rest), lambda r: r[0], lambda r: r[0])


def nnx_impl(ns: Any, layer: str, x: Any, dtype: Any, only: set[str] | None = None) -> Impl:
    """``nnx.jit`` over the module (state updated in place) and ``nnx.grad`` w.r.t. (Params, x)."""
    from flax import nnx

    c = x.shape[-1]
    rngs = nnx.Rngs(0)
    kw = {"dtype": dtype, "rngs": rngs}
    if layer in ("bn_train", "bn_eval"):
        m = ns.BatchNorm(c, use_running_average=layer == "bn_eval", momentum=MOMENTUM, epsilon=BN_EPS, **kw)
    elif layer == "layernorm":
        m = ns.LayerNorm(c, **kw)
    elif layer == "rmsnorm":
        m = ns.RMSNorm(c, **kw)
    elif layer == "groupnorm":
        m = ns.GroupNorm(c, num_groups=GROUPS, **kw)
    elif layer == "instancenorm":
        m = ns.InstanceNorm(c, **kw)
    elif layer == "spectralnorm":
        m = ns.SpectralNorm(nnx.Linear(c, c, rngs=nnx.Rngs(1)), rngs=rngs)
    elif layer in ("weightnorm", "weightnorm_trained"):
        m = ns.WeightNorm(nnx.Linear(c, c, rngs=nnx.Rngs(1)), rngs=rngs)
        if layer == "weightnorm_trained" and ns is nnx:
            m.scales = nnx.data({path: nnx.Param(v) for path, v in m.scales.items()})
    else:
        raise Unsupported(layer)
    import jax

    graphdef, state = nnx.split(m)
    state = randomize(state, only=only)
    # separate copies for fwd and fwd+bwd: native SpectralNorm/WeightNorm overwrite the kernel in
    # place on every call, so a shared module would hand the two sides different first inputs
    m = nnx.merge(graphdef, state)
    m_bwd = nnx.merge(graphdef, jax.tree_util.tree_map(lambda v: v.copy() if hasattr(v, "copy") else v, state))
    paths = {_path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]}

    @nnx.jit
    def fwd(m: Any, x: Any) -> Any:
        return m(x)

    @nnx.jit
    def bwd(m: Any, x: Any) -> Any:
        return nnx.grad(lambda m, x: _loss_of(m(x)), argnums=(0, 1))(m, x)

    return Impl(fwd, (m, x), bwd, (m_bwd, x), lambda r: r, lambda r: (nnx.to_pure_dict(r[0]), r[1]), paths)


def equinox_impl(ns: Any, layer: str, x: Any, dtype: Any) -> Impl:
    """``eqx.filter_jit``; the layer is ``jax.vmap``-ed over the batch and sees channels first.

    BatchNorm: ``make_with_state``, ``axis_name='batch'``, ``mode='batch'`` (eval: one training
    step first, so the de-biased running statistics are finite). bf16: LayerNorm/RMSNorm/GroupNorm
    upcast internally and return bf16; BatchNorm gets ``dtype=bfloat16`` (its only bf16 output).
    """
    import equinox as eqx
    import jax

    jnp = _jnp()
    # channels first, same bytes: (N, C) stays, (N, H, W, C) -> (N, C, H, W)
    xc = x if x.ndim == 2 else jnp.moveaxis(x, -1, 1)
    c = xc.shape[1]
    key = jax.random.PRNGKey(1)
    state = None
    if layer in ("bn_train", "bn_eval"):
        bn_dtype = jnp.bfloat16 if x.dtype == jnp.bfloat16 else None
        model, state = eqx.nn.make_with_state(ns.BatchNorm)(
            c, axis_name="batch", momentum=MOMENTUM, eps=BN_EPS, mode="batch", dtype=bn_dtype
        )
    elif layer == "layernorm":
        model = ns.LayerNorm(xc.shape[1:])
    elif layer == "rmsnorm":
        model = ns.RMSNorm(xc.shape[1:], use_bias=False)
    elif layer == "groupnorm":
        model = ns.GroupNorm(GROUPS, c)
    elif layer == "spectralnorm":
        model, state = eqx.nn.make_with_state(ns.SpectralNorm)(eqx.nn.Linear(c, c, key=key), "weight", key=key)
    elif layer == "weightnorm":
        model = ns.WeightNorm(eqx.nn.Linear(c, c, key=key))
    else:
        raise Unsupported(f"equinox has no {LAYERS[layer]}")
    params, static = eqx.partition(model, eqx.is_inexact_array)
    model = eqx.combine(randomize(params), static)
    inference = layer == "bn_eval"

    if state is None:

        def run(model: Any, state: Any, x: Any) -> tuple[Any, Any]:
            return jax.vmap(model)(x), None

    else:

        def run(model: Any, state: Any, x: Any) -> tuple[Any, Any]:
            call = (lambda x, s: model(x, s, inference=True)) if inference else model
            return jax.vmap(call, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)

    if inference:  # populate the running statistics with one training step
        _, state = eqx.filter_jit(lambda m, s, x: jax.vmap(m, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
            x, s))(model, state, xc)

    fwd = eqx.filter_jit(run)

    @eqx.filter_jit
    def bwd(model: Any, state: Any, x: Any) -> Any:
        def loss(mx: Any, state: Any) -> tuple[Any, Any]:
            y, new_state = run(mx[0], state, mx[1])
            return _loss_of(y), new_state

        return eqx.filter_grad(loss, has_aux=True)((model, x), state)

    return Impl(
        fwd, (model, state, xc), bwd, (model, state, xc), lambda r: r[0], lambda r: eqx.filter(r[0], eqx.is_array)
    )


def _last_key_values(tree: Any) -> dict[str, Any]:
    """``{last path component: leaf}``, e.g. linen ``params/scale`` and treex ``0/scale`` -> ``scale``."""
    from normbridge.conformance.measure import tree_paths

    return {path.split("/")[-1]: leaf for path, leaf in tree_paths(tree).items()}


def treex_impl(ns: Any, layer: str, x: Any, dtype: Any, values: dict[str, Any]) -> Impl:
    """The treex facade, used the treex way: ``Module.init(key, x)``, ``.train()``/``.eval()``,
    ``jax.jit`` over the module, gradients w.r.t. ``module.parameters()`` merged back in.

    fwd returns ``(y, module)`` (treex modules update their batch statistics by mutation inside
    the jitted function, so they must be returned). ``values`` are the native reference's
    randomized parameters and statistics by name, copied in so both sides compute the same thing.
    """
    import jax

    kw = {"dtype": dtype}
    if layer in ("bn_train", "bn_eval"):
        m = ns.BatchNorm(momentum=MOMENTUM, epsilon=BN_EPS, **kw)
    elif layer == "layernorm" and hasattr(ns, "LayerNorm"):
        m = ns.LayerNorm(**kw)
    elif layer == "rmsnorm" and hasattr(ns, "RMSNorm"):
        m = ns.RMSNorm(**kw)
    elif layer == "groupnorm" and hasattr(ns, "GroupNorm"):
        m = ns.GroupNorm(num_groups=GROUPS, **kw)
    elif layer == "instancenorm" and hasattr(ns, "InstanceNorm"):
        m = ns.InstanceNorm(**kw)
    else:
        raise Unsupported(f"the treex facade has no {LAYERS[layer]}")
    m = m.init(jax.random.PRNGKey(0), x)
    m = m.eval() if layer == "bn_eval" else m.train()

    def take(path: Any, leaf: Any) -> Any:
        v = values.get(jax.tree_util.keystr(path, simple=True, separator="/").split("/")[-1])
        ok = v is not None and getattr(v, "shape", None) == getattr(leaf, "shape", ()) and v.dtype == leaf.dtype
        return v if ok else leaf

    m = jax.tree_util.tree_map_with_path(take, m)

    def fwd(m: Any, x: Any) -> tuple[Any, Any]:
        y = m(x)
        return y, m

    def loss(params: Any, m: Any, x: Any) -> tuple[Any, Any]:
        m = m.merge(params)
        return _loss_of(m(x)), m

    bwd = jax.jit(jax.grad(loss, argnums=(0, 2), has_aux=True))
    return Impl(
        jax.jit(fwd),
        (m, x),
        bwd,
        (m.parameters(), m, x),
        lambda r: r[0],
        lambda r: (_last_key_values(r[0][0]), r[0][1]),
    )


def _linen_as_treex(ns: Any, layer: str, x: Any, dtype: Any) -> Impl:
    """Native reference for the treex facade: flax.linen configured the way treex configured it
    (treex wrapped linen; compute dtype float32 by default, LayerNorm/GroupNorm epsilon 1e-5)."""
    return linen_impl(ns, layer, x, dtype, treex_defaults=True)


def build_pair(facade: str, layer: str, x: Any, *, native_as_facade: bool = False) -> tuple[Impl, Impl]:
    """(native, facade) implementations of one case; raises ImportError / Unsupported to skip it."""
    jnp = _jnp()
    dtype = jnp.bfloat16 if x.dtype == jnp.bfloat16 else None
    if layer == "weightnorm_trained" and facade != "nnx":
        raise Unsupported("an nnx-only case: only nnx's native WeightNorm leaves its gains untrained")
    if facade == "linen":
        native = importlib.import_module("flax.linen")
        fac = native if native_as_facade else importlib.import_module("normbridge.adapters.linen")
        return linen_impl(native, layer, x, dtype), linen_impl(fac, layer, x, dtype)
    if facade == "nnx":
        native = importlib.import_module("flax.nnx")
        fac = native if native_as_facade else importlib.import_module("normbridge.adapters.nnx")
        ref = nnx_impl(native, layer, x, dtype)
        # only the parameters native has are randomized: a facade Param native keeps as a plain
        # array (WeightNorm scales) stays at its init on both sides
        return ref, nnx_impl(fac, layer, x, dtype, only=ref.randomized)
    if facade == "equinox":
        native = importlib.import_module("equinox.nn")
        fac = native if native_as_facade else importlib.import_module("normbridge.adapters.equinox")
        return equinox_impl(native, layer, x, dtype), equinox_impl(fac, layer, x, dtype)
    if facade == "treex":
        if layer in ("spectralnorm", "weightnorm"):
            raise Unsupported(f"treex has no {LAYERS[layer]}")
        native = importlib.import_module("flax.linen")
        tdtype = dtype or jnp.float32  # treex's default compute dtype
        if native_as_facade:
            return _linen_as_treex(native, layer, x, tdtype), _linen_as_treex(native, layer, x, tdtype)
        fac = importlib.import_module("normbridge.adapters.treex")
        ref = _linen_as_treex(native, layer, x, tdtype)
        params, rest, _ = ref.fwd_args
        values = _last_key_values({"params": params, **rest})
        return ref, treex_impl(fac, layer, x, tdtype, values)
    raise ValueError(f"unknown facade {facade!r}; expected one of {FACADES}")


# ---------------------------------------------------------------------------------------------
# comparison of results and of compiled programs


def max_diff(native: Any, facade: Any, notes: list[str] | None = None) -> tuple[float, float]:
    """(max |Δ|, max |Δ| / max |native|) over the floating leaves of two pytrees, matched by path.

    The relative figure divides by the largest native value of the whole tree, not leaf by leaf:
    some gradients are pure cancellation noise (train BatchNorm's d/dx of sum(y²) is 0 in exact
    arithmetic) and would look wildly "wrong" relative to themselves. Leaves present on one side
    only are compared on the common paths and reported in ``notes`` (e.g. a facade that makes a
    native plain array trainable has one more gradient); no common leaf at all is an infinite
    difference.
    """
    import numpy as np

    from normbridge.conformance.measure import tree_paths

    jnp = _jnp()
    a, b = tree_paths(native), tree_paths(facade)
    common = sorted(set(a) & set(b))
    if not common:
        return math.inf, math.inf
    if notes is not None and set(a) != set(b):
        notes.append(f"native-only {sorted(set(a) - set(b))}, facade-only {sorted(set(b) - set(a))}")
    worst_abs, scale = 0.0, 0.0
    for k in common:
        if not (hasattr(a[k], "dtype") and jnp.issubdtype(a[k].dtype, jnp.floating)):
            continue  # integer counters, keys: not results
        va = np.asarray(a[k]).astype(np.float64)
        vb = np.asarray(b[k]).astype(np.float64)
        if va.shape != vb.shape:
            return math.inf, math.inf
        if va.size == 0:
            continue
        worst_abs = max(worst_abs, float(np.max(np.abs(va - vb))))
        scale = max(scale, float(np.max(np.abs(va))))
    return worst_abs, (worst_abs / scale if scale > 0 else worst_abs)


_REF = re.compile(r"%([\w.\-]+)")
_PARAM = re.compile(r"([\w.\-]+): ")
_META = re.compile(r",?\s*(metadata|frontend_attributes|backend_config|sharding)=\{[^{}]*(\{[^{}]*\}[^{}]*)*\}")


def canonical_hlo(text: str) -> str:
    """Optimized HLO with instruction/computation names numbered by first appearance and
    metadata (source locations, op names) dropped, so two programs that differ only in
    naming compare equal."""
    names: dict[str, str] = {}

    def rename(mt: re.Match[str]) -> str:
        return "%" + names.setdefault(mt.group(1), f"v{len(names)}")

    def rename_param(mt: re.Match[str]) -> str:
        return names.setdefault(mt.group(1), f"v{len(names)}") + ": "

    lines = []
    started = False
    for line in text.splitlines():
        started = started or line.startswith(("%", "ENTRY"))
        if not started or not line.strip():  # module header and the source-location tables
            continue
        line = _META.sub("", line)
        if line.rstrip().endswith("{") and "->" in line:  # computation header: named parameters
            line = _PARAM.sub(rename_param, line)
        lines.append(_REF.sub(rename, line).strip())
    return "\n".join(lines)


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?(%[\w.\-]+)\s*=\s*(\(.*?\)|\S+)\s+([\w\-]+)\((.*)$")
_TRIVIAL = {"parameter", "tuple", "get-tuple-element", "constant", "bitcast"}


def _elements(type_text: str) -> int:
    dims = re.findall(r"\[([\d,]*)\]", type_text)
    return max((math.prod(int(d) for d in ds.split(",") if d) for ds in dims), default=0)


def _entry_instructions(text: str):
    """``(name, type, op, operands)`` of each instruction of an HLO module's ENTRY computation."""
    entry = text.split("\nENTRY", 1)[-1]
    for line in entry.splitlines()[1:]:
        if line.strip() == "}":
            return
        mt = _INSTR.match(line)
        if mt:
            yield mt.groups()


def kernel_profile(text: str) -> tuple[int, int]:
    """(kernels, big kernels) of the ENTRY computation: kernels = fusions and unfused ops (not
    parameters/tuples/constants/bitcasts), big = those reading or writing an array at least 1/8
    the size of the largest parameter (passes over x; the rest work on parameter-sized vectors)."""
    size: dict[str, int] = {}
    ops: list[tuple[str, int]] = []
    for name, typ, op, args in _entry_instructions(text):
        size[name] = _elements(typ)
        touched = max([size[name]] + [size.get(a, 0) for a in re.findall(r"%[\w.\-]+", args)])
        ops.append((op, touched))
    largest = max((n for op, n in ops if op == "parameter"), default=0)
    kernels = [n for op, n in ops if op not in _TRIVIAL]
    return len(kernels), sum(n * 8 >= largest for n in kernels)


def entry_kernels(text: str) -> int:
    """Kernels the ENTRY computation launches (fusions and unfused ops, not parameters/tuples)."""
    return kernel_profile(text)[0]


def _type_sizes(type_text: str) -> list[int]:
    """Element counts of each array in an HLO type (several for a tuple)."""
    return [math.prod(int(d) for d in ds.split(",") if d) for ds in re.findall(r"\[([\d,]*)\]", type_text)]


def kernel_structure(text: str) -> tuple[tuple[str, int, int], ...]:
    """The x-sized traffic of each big kernel of the ENTRY computation, in program order:
    ``(op, x-sized arrays read, x-sized arrays written)``; x-sized = at least 1/8 of the largest
    parameter, as in :func:`kernel_profile`. Two programs with the same structure stream x the same
    number of times in the same kernels; what differs is inside the kernels (loop order, vectorization)."""
    size: dict[str, int] = {}
    ops: list[tuple[str, list[int], list[int]]] = []
    for name, typ, op, args in _entry_instructions(text):
        outs = _type_sizes(typ)
        size[name] = max(outs, default=0)
        operands = list(dict.fromkeys(a for a in re.findall(r"%[\w.\-]+", args) if a in size))
        ops.append((op, [size[a] for a in operands], outs))
    largest = max((max(o, default=0) for op, _, o in ops if op == "parameter"), default=0)
    out = []
    for op, reads, writes in ops:
        if op in _TRIVIAL:
            continue
        r = sum(n * 8 >= largest for n in reads)
        w = sum(n * 8 >= largest for n in writes)
        if r or w:
            out.append((op, r, w))
    return tuple(out)


def fmt_structure(structure: Sequence[tuple[str, int, int]]) -> str:
    """``"fusion 1R/1W, fusion 2R/0W"`` (x-sized reads / writes per big kernel) plus the total x traffic."""
    total = sum(r + w for _, r, w in structure)
    return f"{', '.join(f'{op} {r}R/{w}W' for op, r, w in structure)} ({total} x-passes)"


def compiled_text(fn: Callable[..., Any], args: tuple[Any, ...]) -> str | None:
    """Optimized HLO of a jitted function (jax.jit, nnx.jit and eqx.filter_jit all have .lower)."""
    try:
        compiled = fn.lower(*args).compile()
        compiled = getattr(compiled, "compiled", compiled)  # equinox wraps jax's Compiled
        return compiled.as_text()
    except Exception:  # a framework without .lower: no HLO column, the timing still stands
        return None


def hlo_summary(native: Impl, facade: Impl) -> str:
    """``same`` when the optimized programs are identical up to names, else the kernel counts
    (all, and big = x-sized) native→facade, for fwd and fwd+bwd."""
    parts = []
    for which in ("fwd", "bwd"):
        tn = compiled_text(getattr(native, which), getattr(native, f"{which}_args"))
        tf = compiled_text(getattr(facade, which), getattr(facade, f"{which}_args"))
        if tn is None or tf is None:
            parts.append("?")
        elif canonical_hlo(tn) == canonical_hlo(tf):
            parts.append("same")
        else:
            (kn, bn), (kf, bf) = kernel_profile(tn), kernel_profile(tf)
            parts.append(f"{kn}→{kf}k (big {bn}→{bf})")
    return " / ".join(parts)


# ---------------------------------------------------------------------------------------------
# timing


@dataclasses.dataclass(frozen=True)
class Timing:
    """Repetition policy: per function ``clamp(target_s / t_call, min_reps, max_reps)`` reps."""

    target_fwd_s: float = 0.5
    target_bwd_s: float = 0.8
    min_reps: int = 16
    max_reps: int = 80
    #: 0 = one call per function per round (finest interleaving)
    rounds: int = 0
    warmup: int = 2


#: Quick mode (a smoke run): tiny inputs, one activation shape plus the Dense wrappers, few reps.
QUICK_SHAPES: tuple[str, ...] = ("tfm_f32", "dense_f32")
QUICK_TIMING = Timing(target_fwd_s=0.01, target_bwd_s=0.01, min_reps=3, max_reps=6, rounds=3, warmup=1)


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    import jax

    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - t0, out


def interleaved(fns: Sequence[Callable[[], Any]], reps: Sequence[int], rounds: int) -> list[list[float]]:
    """Samples (seconds) per function, interleaved: function i's ``reps[i]`` calls are spread evenly
    over ``rounds`` rounds (0 = as many rounds as the largest rep count, i.e. one call per function
    per round), each round in a rotating order, reversed every other round. Python GC is off."""
    import jax

    rounds = rounds or max(reps)
    samples: list[list[float]] = [[] for _ in fns]
    idx = list(range(len(fns)))
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            order = idx[r % len(idx) :] + idx[: r % len(idx)]
            if r % 2:
                order.reverse()
            for i in order:
                for _ in range(reps[i] * (r + 1) // rounds - reps[i] * r // rounds):
                    t0 = time.perf_counter()
                    jax.block_until_ready(fns[i]())
                    samples[i].append(time.perf_counter() - t0)
    finally:
        if gc_was:
            gc.enable()
    return samples


def median_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """``(median, lo, hi)``: the sample median and the distribution-free order-statistic confidence
    interval for the population median, ``[v_(k), v_(n+1-k)]`` with the largest ``k`` for which
    ``P(Binomial(n, 1/2) < k) <= (1 - level) / 2`` (coverage at least ``level``; with fewer than 6
    values no such ``k`` exists and the interval is the whole range)."""
    v = sorted(values)
    n = len(v)
    if n == 0:
        return math.nan, math.nan, math.nan
    tail = (1.0 - level) / 2
    k, cdf = 0, 0.0  # cdf = P(B < k + 1) as k grows
    while k < n // 2:
        cdf += math.comb(n, k) / 2**n
        if cdf > tail:
            break
        k += 1
    k = max(k, 1)
    return statistics.median(v), v[k - 1], v[n - k]


def paired_ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """Per-repetition ratios ``num_i / den_i`` of two functions timed in the same interleaved rounds
    (sample ``i`` of each comes from round ``i``, so both saw the same state of the machine)."""
    if len(num) != len(den):
        raise ValueError(f"paired_ratios: {len(num)} vs {len(den)} samples (not timed in the same rounds)")
    return [a / b for a, b in zip(num, den)]


def sized_reps(fns: Sequence[Callable[[], Any]], targets: Sequence[float], timing: Timing) -> list[int]:
    """Warm every function up ``timing.warmup`` times, then give each ``clamp(target_s / t_call, min_reps,
    max_reps)`` reps, ``t_call`` being its last warm-up call (at least 1 µs)."""
    est = warm_up(fns, timing.warmup)
    return [min(timing.max_reps, max(timing.min_reps, round(tg / t))) for tg, t in zip(targets, est)]


def warm_up(fns: Sequence[Callable[[], Any]], warmup: int) -> list[float]:
    """Call each function ``warmup`` times; return its last call's time (at least 1 µs)."""
    est = []
    for f in fns:
        t = 0.0
        for _ in range(warmup):
            t, _ = _timed(f)
        est.append(max(t, 1e-6))
    return est


def run_case(facade: str, layer: str, shape_name: str, *, quick: bool = False, timing: Timing | None = None,
             native_as_facade: bool = False, hlo: bool = True) -> Result:
    """Build, check and time one case (raises ImportError / Unsupported when it cannot run)."""
    full, small, dtype_name = SHAPES[shape_name]
    timing = timing or (QUICK_TIMING if quick else Timing())
    x = make_input(small if quick else full, dtype_name)
    native, fac = build_pair(facade, layer, x, native_as_facade=native_as_facade)

    # first calls (trace + compile + run), in the same order for both sides so that stateful
    # layers (nnx in-place updates) see the same history; their results are what gets compared
    c_nf, out_n = _timed(native.call_fwd)
    c_ff, out_f = _timed(fac.call_fwd)
    c_nb, grad_n = _timed(native.call_bwd)
    c_fb, grad_f = _timed(fac.call_bwd)
    notes: list[str] = []
    d_abs_y, d_rel_y = max_diff(native.out_of(out_n), fac.out_of(out_f), notes)
    d_abs_g, d_rel_g = max_diff(native.grads_of(grad_n), fac.grads_of(grad_f), notes)
    del out_n, out_f, grad_n, grad_f

    fns = [native.call_fwd, fac.call_fwd, native.call_bwd, fac.call_bwd]
    targets = [timing.target_fwd_s] * 2 + [timing.target_bwd_s] * 2
    reps = sized_reps(fns, targets, timing)
    samples = interleaved(fns, reps, timing.rounds)
    med = [statistics.median(s) * 1e3 for s in samples]

    def retime() -> tuple[float, float]:
        again = [statistics.median(s) for s in interleaved(fns, reps, timing.rounds)]
        return again[1] / again[0], again[3] / again[2]

    return Result(
        facade=facade,
        layer=LAYERS[layer],
        shape=shape_name,
        dtype=dtype_name,
        fwd_native_ms=med[0],
        fwd_facade_ms=med[1],
        bwd_native_ms=med[2],
        bwd_facade_ms=med[3],
        compile_native_s=c_nf + c_nb,
        compile_facade_s=c_ff + c_fb,
        max_abs_diff=max(d_abs_y, d_abs_g),
        max_rel_diff=max(d_rel_y, d_rel_g),
        hlo=hlo_summary(native, fac) if hlo else "-",
        reps=min(len(s) for s in samples),
        notes=notes,
        retime=retime,
    )


# ---------------------------------------------------------------------------------------------
# report

COLUMNS = (
    "facade", "layer", "shape", "dtype", "fwd native ms", "fwd facade ms", "fwd ratio", "fwd+bwd native ms",
    "fwd+bwd facade ms", "fwd+bwd ratio", "compile ratio", "max|Δ|", "HLO fwd / bwd", "recheck fwd / bwd",
)
TARGET = 1.05


def _rel_tol(dtype: str) -> float:
    from normbridge.conformance.measure import REL_TOL

    return REL_TOL.get(dtype, 1e-6)


def fmt_ratio(v: float) -> str:
    """Two decimals; three where two would print an above-target ratio as ``1.05``."""
    return f"{v:.3f}" if TARGET < v < TARGET + 0.005 else f"{v:.2f}"


def row_cells(r: Result) -> list[str]:
    def ratio(v: float) -> str:
        return f"**{fmt_ratio(v)}**" if v > TARGET else fmt_ratio(v)

    # a sanity flag, not the conformance verdict (tests/conformance is): reassociation in float32
    # gives ~1e-6 relative, half precision about one ulp; flag ten times / two ulps more
    tol = 1e-5 if r.dtype == "float32" else 2 * _rel_tol(r.dtype)
    delta = f"{r.max_abs_diff:.1e}" + (" ⚠" if r.max_rel_diff > tol else "")
    return [
        r.facade, r.layer, r.shape, r.dtype, f"{r.fwd_native_ms:.2f}", f"{r.fwd_facade_ms:.2f}", ratio(r.fwd_ratio),
        f"{r.bwd_native_ms:.2f}", f"{r.bwd_facade_ms:.2f}", ratio(r.bwd_ratio), f"{r.compile_ratio:.2f}", delta,
        r.hlo, "" if r.recheck is None else f"{ratio(r.recheck[0])} / {ratio(r.recheck[1])}",
    ]


def header(argv: Sequence[str], wall_s: float, quick: bool) -> list[str]:
    from normbridge.conformance.matrix import versions

    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    v = versions()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [
        "# normbridge benchmark: facade vs native",
        "",
        f"Generated by `python benchmarks/bench.py {' '.join(argv)}`" + (" (quick mode: tiny shapes, not a measurement)"
                                                                          if quick else "") + ".",
        "",
        f"- Date: {now}; wall time {wall_s:.0f} s.",
        f"- Machine: {cpu}, {os.cpu_count()} cores, {platform.platform()}, {_backend()} backend.",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        f"- Allocator: GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '') or '(unset)'}.",
        "- ms = median of all interleaved repetitions; ratio = facade / native (target <= 1.05, above in **bold**);",
        "  compile ratio = first-call time (trace + compile + run) of fwd and fwd+bwd, facade / native;",
        "  max|Δ| = largest |native - facade| over the output and all gradients (⚠ above float tolerance);",
        "  HLO = whether the optimized XLA programs are identical up to names (`same`), else the kernels",
        "  of the ENTRY computation native→facade (big = kernels reading or writing x-sized arrays);",
        "  recheck = ratios of an in-run repeat (same executables, timed again after all cases) of",
        "  every case that first measured above 1.05.",
        "",
    ]


_KERNELS = re.compile(r"(\d+)→(\d+)k \(big (\d+)→(\d+)\)")


def explain(r: Result) -> list[str]:
    """Why a ratio is above the target, from the measurements themselves: an identical optimized
    program means the difference is the machine (noise); otherwise the kernel counts say whether
    the facade makes more passes over x-sized arrays (a real cost) or only more small ops."""
    hlo_parts = r.hlo.split(" / ") if " / " in r.hlo else ["-", "-"]
    out = []
    for i, (phase, ratio) in enumerate((("fwd", r.fwd_ratio), ("fwd+bwd", r.bwd_ratio))):
        if ratio <= TARGET:
            continue
        part = hlo_parts[i]
        mt = _KERNELS.fullmatch(part)
        if part == "same":
            cause = ("identical optimized program (HLO same), so the difference is outside XLA: per-call host "
                     "work (flattening the arguments) or machine noise")
        elif mt:
            kn, kf, bn, bf = (int(g) for g in mt.groups())
            if bf > bn:
                cause = (f"the facade's program makes {bf - bn} more big kernel(s) ({bn}→{bf}, passes over the "
                         "largest arrays): extra memory traffic")
            else:
                cause = (f"same big passes ({bn}→{bf} big kernels); the programs differ only in "
                         f"parameter-sized ops ({kn}→{kf} kernels)")
        else:
            cause = "no HLO comparison in this run"
        if r.recheck is not None:
            again = r.recheck[i]
            cause += f"; in-run repeat {fmt_ratio(again)}" + (" (did not repeat)" if again <= TARGET else " (repeated)")
        out.append(f"{phase} {fmt_ratio(ratio)}: {cause}")
    return out


def md_header() -> str:
    """The markdown table's header row (``|`` inside a column name escaped)."""
    return "| " + " | ".join(c.replace("|", "\\|") for c in COLUMNS) + " |"


def to_markdown(results: Sequence[Result], argv: Sequence[str], wall_s: float, quick: bool,
                skipped: Sequence[str]) -> str:
    lines = header(argv, wall_s, quick)
    lines.append(md_header())
    lines.append("|---|---|---|---|" + "---:|" * 8 + "---|---|")
    for r in results:
        lines.append("| " + " | ".join(row_cells(r)) + " |")
    over = [r for r in results if max(r.fwd_ratio, r.bwd_ratio) > TARGET]
    lines += ["", f"{len(results)} cases; {len(over)} with a ratio above {TARGET}."]
    rechecked = [r for r in over if r.recheck is not None]
    if rechecked:
        still = [r for r in rechecked if max(r.recheck) > TARGET]  # type: ignore[arg-type]
        lines[-1] += f" Of these, {len(still)} stayed above {TARGET} in the in-run repeat."
    if over:
        lines += ["", f"### Ratios above {TARGET}", ""]
        lines += [f"- {r.facade} {r.layer} {r.shape}: " + "; ".join(explain(r)) + "." for r in over]
    noted = [f"- {r.facade} {r.layer} {r.shape}: {n}" for r in results for n in r.notes]
    if noted:
        lines += ["", "Result trees (max|Δ| is over the common leaves):", "", *noted]
    if skipped:
        lines += ["", "Skipped:", "", *[f"- {s}" for s in skipped]]
    return "\n".join(lines) + "\n"


README_START = "<!-- benchmark-table:start (written by benchmarks/bench.py --readme) -->"
README_END = "<!-- benchmark-table:end -->"


SUMMARY_HEADER = ("| facade | cases | fwd ratio median (max) | fwd+bwd ratio median (max) | above 1.05 "
                  "(repeated in recheck) | HLO same fwd / bwd |")


def _ratio(cell: str) -> float:
    return float(cell.strip().strip("*"))


def summary_table(markdown: str) -> list[str]:
    """Per facade, from a results file's table: case count, median and max ratios, how many cases were
    above the target (and stayed there in the in-run repeat), how many compiled to native's program."""
    head = [c.strip() for c in md_header().strip("|").split(" | ")]
    rows: dict[str, list[list[str]]] = {}
    for ln in markdown.splitlines():
        if not ln.startswith("| ") or ln.startswith(md_header()):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", ln)[1:-1]]
        if len(cells) != len(head):
            continue
        rows.setdefault(cells[0], []).append(cells)
    i_fwd, i_bwd, i_hlo, i_re = (head.index(c) for c in ("fwd ratio", "fwd+bwd ratio", "HLO fwd / bwd",
                                                         "recheck fwd / bwd"))
    out = [SUMMARY_HEADER, "|---|---:|---:|---:|---:|---:|"]
    for facade, cases in rows.items():
        fwd = [_ratio(c[i_fwd]) for c in cases]
        bwd = [_ratio(c[i_bwd]) for c in cases]
        over = [c for c, f, b in zip(cases, fwd, bwd) if max(f, b) > TARGET]
        repeated = [c for c in over if c[i_re] and max(_ratio(v) for v in c[i_re].split(" / ")) > TARGET]
        same = [c[i_hlo].split(" / ") for c in cases]
        out.append(f"| {facade} | {len(cases)} | {statistics.median(fwd):.2f} ({max(fwd):.2f}) | "
                   f"{statistics.median(bwd):.2f} ({max(bwd):.2f}) | {len(over)} ({len(repeated)}) | "
                   f"{sum(p[0] == 'same' for p in same)} / {sum(len(p) > 1 and p[1] == 'same' for p in same)} |")
    return out


def readme_block(markdown: str) -> str:
    """What the README shows of a results file: its date / machine lines and the per-facade summary."""
    lines = markdown.splitlines()
    meta = [ln for ln in lines if ln.startswith(("- Date:", "- Machine:", "- Versions:"))]
    count = next((ln for ln in lines if re.match(r"\d+ cases; ", ln)), "")
    return "\n".join([*meta, "", *summary_table(markdown), "", count]).strip() + "\n"


def splice_readme(readme: str, markdown: str) -> str:
    """``readme`` with the text between the benchmark markers replaced by ``readme_block(markdown)``."""
    return _splice_between(readme, README_START, README_END, "benchmark", readme_block, markdown)


def _splice_between(
    readme: str, start: str, end: str, what: str, block_of: Callable[[str], str], markdown: str
) -> str:
    """``readme`` with the text between its ``start`` and ``end`` markers replaced by ``block_of(markdown)``
    (built only once both markers are found)."""
    if start not in readme or end not in readme:
        raise ValueError(f"README has no {what} markers {start!r} ... {end!r}")
    head, rest = readme.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{block_of(markdown)}{end}{tail}"


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def print_results(results: Sequence[Result]) -> None:
    widths = [max(len(c), *(len(row_cells(r)[i]) for r in results)) for i, c in enumerate(COLUMNS)]
    print("  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)))
    for r in results:
        print("  ".join(c.ljust(w) for c, w in zip(row_cells(r), widths)))


def cases(facades: Sequence[str], layers: Sequence[str] | None, shapes: Sequence[str]) -> list[tuple[str, str, str]]:
    out = []
    for facade in facades:
        for shape in shapes:
            for layer in SHAPE_LAYERS[shape]:
                if layers is None or layer in layers:
                    out.append((facade, layer, shape))
    return out


def run(facades: Sequence[str], layers: Sequence[str] | None, shapes: Sequence[str], *, quick: bool = False,
        native_as_facade: bool = False, hlo: bool = True, recheck: bool = True, log: Callable[[str], None] = print
        ) -> tuple[list[Result], list[str]]:
    """Run every case; a facade that does not import or lacks a layer is skipped with a message."""
    results: list[Result] = []
    skipped: list[str] = []
    dead: dict[str, str] = {}
    for facade, layer, shape in cases(facades, layers, shapes):
        name = f"{facade} {LAYERS[layer]} {shape}"
        if facade in dead:
            continue
        try:
            t0 = time.perf_counter()
            r = run_case(facade, layer, shape, quick=quick, native_as_facade=native_as_facade, hlo=hlo)
        except ImportError as err:
            dead[facade] = f"{facade}: facade not importable ({err}); all its cases skipped"
            skipped.append(dead[facade])
            log(f"SKIP {dead[facade]}")
            continue
        except Unsupported as err:
            skipped.append(f"{name}: {err}")
            log(f"SKIP {name}: {err}")
            continue
        except Exception as err:  # one broken facade layer must not hide the other measurements
            skipped.append(f"{name}: FAILED {type(err).__name__}: {str(err)[:200]}")
            log(f"FAIL {name}: {type(err).__name__}: {err}")
            continue
        if max(r.fwd_ratio, r.bwd_ratio) <= TARGET or not recheck:
            r.retime = None  # release the case's arrays and executables
        results.append(r)
        log(f"{name}: fwd {r.fwd_ratio:.2f} ({r.fwd_native_ms:.2f}/{r.fwd_facade_ms:.2f} ms), fwd+bwd "
            f"{r.bwd_ratio:.2f} ({r.bwd_native_ms:.2f}/{r.bwd_facade_ms:.2f} ms), compile {r.compile_ratio:.2f}, "
            f"max|Δ| {r.max_abs_diff:.1e}, HLO {r.hlo} [{time.perf_counter() - t0:.1f} s]")
    # in-run repeat of every case above target, minutes later, same executables: separates a
    # systematic slowdown (repeats) from a slow phase of the shared machine (does not)
    for r in results:
        if r.retime is not None:
            r.recheck = r.retime()
            r.retime = None
            log(f"recheck {r.facade} {r.layer} {r.shape}: fwd {r.recheck[0]:.2f}, fwd+bwd {r.recheck[1]:.2f}")
    return results, skipped


# ---------------------------------------------------------------------------------------------
# --versus: fast mode against the fastest native framework

#: Native frameworks timed in --versus mode (treex has no native left; its facade runs flax's program).
NATIVES: tuple[str, ...] = ("linen", "nnx", "equinox")
#: Facades timed in exact and in fast mode in --versus mode.
VERSUS_FACADES: tuple[str, ...] = ("linen", "nnx", "equinox")
#: The normalization layers of --versus mode, per activation shape (no Dense wrappers: fast mode
#: does not change SpectralNorm / WeightNorm).
VERSUS_LAYERS: dict[str, tuple[str, ...]] = {
    shape: tuple(layer for layer in layers if layer in ("bn_train", "bn_eval", "layernorm", "rmsnorm", "groupnorm",
                                                        "instancenorm"))
    for shape, layers in SHAPE_LAYERS.items() if shape != "dense_f32"
}


@dataclasses.dataclass
class VersusResult:
    """One (layer, shape) case of --versus mode: samples and medians (ms) per implementation and phase."""

    layer: str
    shape: str
    dtype: str
    anchor_ms: float
    #: name -> (fwd ms, fwd+bwd ms); names ``native linen`` ..., ``linen exact``, ``linen fast`` ...
    ms: dict[str, tuple[float, float]]
    #: name -> (big kernels fwd, big kernels fwd+bwd) of the compiled program (``None`` without --hlo)
    big: dict[str, tuple[int, int]]
    #: facade -> max |fast - exact| / max |exact| over output and gradients
    fast_vs_exact: dict[str, float]
    reps: int
    notes: list[str] = dataclasses.field(default_factory=list)
    #: name -> canonical optimized HLO (fwd, fwd+bwd), for "same program" verdicts (empty without --hlo)
    programs: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict, repr=False)
    #: name -> (fwd samples, fwd+bwd samples) in ms; sample i of every name of a phase is from round i
    samples: dict[str, tuple[list[float], list[float]]] = dataclasses.field(default_factory=dict, repr=False)
    #: phase -> (native, samples): the A/A control, a second entry of that native's compiled function
    aa: dict[int, tuple[str, list[float]]] = dataclasses.field(default_factory=dict, repr=False)
    #: name -> (fwd, fwd+bwd) :func:`kernel_structure` of the compiled programs (empty without --hlo)
    structure: dict[str, tuple[tuple[tuple[str, int, int], ...], ...]] = dataclasses.field(
        default_factory=dict, repr=False)

    def fastest_native(self, phase: int) -> tuple[str, float]:
        natives = {k.removeprefix("native "): v[phase] for k, v in self.ms.items() if k.startswith("native ")}
        name = min(natives, key=natives.__getitem__)
        return name, natives[name]

    def paired(self, facade: str, phase: int) -> tuple[float, float, float]:
        """(median, lo, hi) of the paired per-repetition ratios ``facade fast`` / the fastest native."""
        nat = self.fastest_native(phase)[0]
        if not self.samples:  # built by hand (tests): the ratio of medians, no interval
            r = self.ms[f"{facade} fast"][phase] / self.ms[f"native {nat}"][phase]
            return r, r, r
        return median_interval(paired_ratios(self.samples[f"{facade} fast"][phase],
                                             self.samples[f"native {nat}"][phase]))

    def aa_interval(self, phase: int) -> tuple[str, tuple[float, float, float]] | None:
        """The A/A control of ``phase``: (native, paired ratios copy / original: median, lo, hi)."""
        if phase not in self.aa:
            return None
        nat, copy = self.aa[phase]
        return nat, median_interval(paired_ratios(copy, self.samples[f"native {nat}"][phase]))

    def best_fast(self, phase: int) -> tuple[str, float]:
        """The fast-mode facade with the lowest paired median ratio to the fastest native, and its median ms."""
        fasts = [k.removesuffix(" fast") for k in self.ms if k.endswith(" fast")]
        name = min(fasts, key=lambda f: self.paired(f, phase)[0])
        return name, self.ms[f"{name} fast"][phase]

    def ratio_to_fastest(self, facade: str, phase: int) -> float:
        return self.paired(facade, phase)[0]

    def verdict(self, phase: int) -> tuple[str, str]:
        """(short, long) verdict on fast mode vs the fastest native in ``phase``: ``≤ 1.00``; above 1.00
        but the same optimized program; interval includes 1.00 and the same kernel structure; or slower,
        with the kernel structures that differ."""
        nat = self.fastest_native(phase)[0]
        fac = self.best_fast(phase)[0]
        med, lo, hi = self.paired(fac, phase)
        if med <= 1.0:
            return "≤ 1.00", ""
        aa = self.aa_interval(phase)
        aa_text = f"; A/A control (native {aa[0]} twice) {fmt_interval(aa[1])}" if aa else ""
        native_prog = self.programs.get(f"native {nat}", (None, None))[phase]
        same = [f for f in (k.removesuffix(" fast") for k in self.ms if k.endswith(" fast"))
                if native_prog is not None and self.programs.get(f"{f} fast", (None, None))[phase] == native_prog]
        if same:
            ratios = ", ".join(f"{f} fast {fmt_interval(self.paired(f, phase))}" for f in same)
            return "same program", (f"above 1.00 but the same optimized program (HLO identical up to names): "
                                    f"{' and '.join(f'{f} fast' for f in same)} compile(s) to native {nat}'s program "
                                    f"({ratios}){aa_text}")
        sn = self.structure.get(f"native {nat}", (None, None))[phase]
        sf = self.structure.get(f"{fac} fast", (None, None))[phase]
        if sn is None or sf is None:
            return "**unexplained**", f"{fac} fast {fmt_interval((med, lo, hi))}; no HLO comparison (--no-hlo){aa_text}"
        if lo <= 1.0 and sorted(sn) == sorted(sf):
            return "CI ∋ 1.00, same kernels", (f"interval includes 1.00 and same kernel structure: {fac} fast "
                                               f"{fmt_interval((med, lo, hi))}; x-sized reads/writes per kernel "
                                               f"{fmt_structure(sf)}{aa_text}")
        return "**slower**", (f"slower: {fac} fast {fmt_interval((med, lo, hi))}; native {nat}: {fmt_structure(sn)}; "
                              f"{fac} fast: {fmt_structure(sf)}{aa_text}")


def fmt_interval(v: tuple[float, float, float]) -> str:
    """``median [lo, hi]`` of a ratio."""
    med, lo, hi = v
    return f"{med:.2f} [{lo:.2f}, {hi:.2f}]"


def _in_mode(fn: Callable[[], Any], mode: str) -> Callable[[], Any]:
    """``fn`` called with normbridge's implementation switch set to ``mode`` (part of jit's cache key)."""
    import normbridge

    def call() -> Any:
        with normbridge.fast(mode == "fast"):
            return fn()

    return call


def versus_impls(layer: str, x: Any, facades: Sequence[str]) -> dict[str, tuple[Impl, str]]:
    """``name -> (Impl, mode)``: every native framework that has ``layer``, and each facade in both modes."""
    jnp = _jnp()
    dtype = jnp.bfloat16 if x.dtype == jnp.bfloat16 else None
    builders = {
        "linen": lambda ns: linen_impl(ns, layer, x, dtype),
        "nnx": lambda ns: nnx_impl(ns, layer, x, dtype),
        "equinox": lambda ns: equinox_impl(ns, layer, x, dtype),
    }
    native_ns = {"linen": "flax.linen", "nnx": "flax.nnx", "equinox": "equinox.nn"}
    out: dict[str, tuple[Impl, str]] = {}
    for fw in NATIVES:
        with contextlib.suppress(Unsupported):  # e.g. equinox has no InstanceNorm
            out[f"native {fw}"] = (builders[fw](importlib.import_module(native_ns[fw])), "exact")
    for facade in facades:
        try:
            ns = importlib.import_module(f"normbridge.adapters.{facade}")
            impl = builders[facade](ns)
        except Unsupported:
            continue
        # separate Impls per mode: nnx updates its module in place, so each mode gets its own history
        out[f"{facade} exact"] = (impl, "exact")
        out[f"{facade} fast"] = (builders[facade](ns), "fast")
    return out


def run_versus_case(layer: str, shape_name: str, *, facades: Sequence[str] = VERSUS_FACADES, quick: bool = False,
                    timing: Timing | None = None, hlo: bool = True) -> VersusResult:
    """Time every native framework, each facade in exact and fast mode, and the ``x * 2.0`` anchor,
    interleaved in one run; check fast against exact on the first calls."""
    import jax

    full, small, dtype_name = SHAPES[shape_name]
    timing = timing or (QUICK_TIMING if quick else Timing())
    x = make_input(small if quick else full, dtype_name)
    impls = versus_impls(layer, x, facades)
    if not any(name.endswith(" fast") for name in impls):
        raise Unsupported(f"no facade among {list(facades)} has {LAYERS[layer]}")
    names = list(impls)
    fns: list[Callable[[], Any]] = []
    first: dict[str, tuple[Any, Any]] = {}
    big: dict[str, tuple[int, int]] = {}
    programs: dict[str, tuple[str, str]] = {}
    structure: dict[str, tuple[Any, Any]] = {}
    for name in names:
        impl, mode = impls[name]
        fwd, bwd = _in_mode(impl.call_fwd, mode), _in_mode(impl.call_bwd, mode)
        fns += [fwd, bwd]
        out = jax.block_until_ready(fwd())
        grads = jax.block_until_ready(bwd())
        first[name] = (impl.out_of(out), impl.grads_of(grads))
        if hlo:
            with importlib.import_module("normbridge").fast(mode == "fast"):
                texts = [compiled_text(impl.fwd, impl.fwd_args), compiled_text(impl.bwd, impl.bwd_args)]
            if all(t is not None for t in texts):
                big[name] = (kernel_profile(texts[0])[1], kernel_profile(texts[1])[1])  # type: ignore[arg-type]
                programs[name] = (canonical_hlo(texts[0]), canonical_hlo(texts[1]))  # type: ignore[arg-type]
                structure[name] = (kernel_structure(texts[0]), kernel_structure(texts[1]))  # type: ignore[arg-type]
    notes: list[str] = []
    fast_vs_exact = {}
    for facade in facades:
        if f"{facade} fast" in first:
            (ye, ge), (yf, gf) = first[f"{facade} exact"], first[f"{facade} fast"]
            fast_vs_exact[facade] = max(max_diff(ye, yf, notes)[1], max_diff(ge, gf, notes)[1])
    del first
    anchor = jax.jit(lambda v: v * 2.0)
    fns.append(lambda: anchor(x))
    est = warm_up(fns, timing.warmup)
    # The A/A control: per phase, a second entry of the native that is fastest in a short interleaved
    # pre-run (3 calls each), the same compiled function called through the same callable; copy / original
    # shows the machine's noise on this case.
    natives = [n for n in names if n.startswith("native ")]
    pre_fns = [fns[2 * names.index(n) + p] for p in (0, 1) for n in natives]
    pre = [statistics.median(v) for v in interleaved(pre_fns, [3] * len(pre_fns), 0)]
    aa_of = {p: natives[min(range(len(natives)), key=lambda i: pre[p * len(natives) + i])] for p in (0, 1)}
    fns += [fns[2 * names.index(aa_of[0])], fns[2 * names.index(aa_of[1]) + 1]]
    # One rep count per phase, so that every function of a phase is called once in the same rounds and
    # sample i of each is from round i: the per-repetition ratios are paired.
    sized = [min(timing.max_reps, max(timing.min_reps, round(tg / t)))
             for tg, t in zip([timing.target_fwd_s, timing.target_bwd_s] * len(names) + [timing.target_fwd_s], est)]
    reps_f, reps_b = max(sized[0::2]), max(sized[1::2])
    reps = [reps_f, reps_b] * len(names) + [reps_f, reps_f, reps_b]
    samples = [[t * 1e3 for t in v] for v in interleaved(fns, reps, timing.rounds)]
    med = [statistics.median(v) for v in samples]
    n = len(names)
    ms = {name: (med[2 * i], med[2 * i + 1]) for i, name in enumerate(names)}
    per_name = {name: (samples[2 * i], samples[2 * i + 1]) for i, name in enumerate(names)}
    aa = {0: (aa_of[0].removeprefix("native "), samples[2 * n + 1]),
          1: (aa_of[1].removeprefix("native "), samples[2 * n + 2])}
    return VersusResult(LAYERS[layer], shape_name, dtype_name, med[2 * n], ms, big, fast_vs_exact,
                        min(len(v) for v in samples), notes, programs, per_name, aa, structure)


VERSUS_COLUMNS = (
    "layer", "shape",
    "fwd: fastest native", "ms", "xA", "fast ms (facade)", "xA", "fast / fastest [95% CI]", "A/A [95% CI]",
    "verdict", "fast / exact", "fast / linen",
    "fwd+bwd: fastest native", "ms", "xA", "fast ms (facade)", "xA", "fast / fastest [95% CI]", "A/A [95% CI]",
    "verdict", "fast / exact", "fast / linen",
    "big kernels fastest→fast fwd / bwd", "max rel Δ fast vs exact",
)
#: Per phase, the cells of :data:`VERSUS_COLUMNS` after ``layer, shape``.
_PHASE_CELLS = 10


def versus_cells(r: VersusResult) -> list[str]:
    """One summary row: the fastest native and the fastest fast-mode facade, per phase, with the paired
    ratio's median and 95 % interval, the A/A control's, and the verdict."""
    cells = [r.layer, r.shape]
    for phase in (0, 1):
        nat, nat_ms = r.fastest_native(phase)
        fac, fast_ms = r.best_fast(phase)
        paired = r.paired(fac, phase)
        exact = r.ms[f"{fac} exact"][phase]
        linen = r.ms.get("native linen", (math.nan, math.nan))[phase]
        aa = r.aa_interval(phase)
        ratio = fmt_interval(paired)
        cells += [nat, f"{nat_ms:.2f}", f"{nat_ms / r.anchor_ms:.2f}", f"{fast_ms:.2f} ({fac})",
                  f"{fast_ms / r.anchor_ms:.2f}", f"**{ratio}**" if paired[0] > 1.0 else ratio,
                  "-" if aa is None else f"{fmt_interval(aa[1])} ({aa[0]})", r.verdict(phase)[0],
                  f"{fast_ms / exact:.2f}", f"{fast_ms / linen:.2f}"]
    nat0, nat1 = r.fastest_native(0)[0], r.fastest_native(1)[0]
    fac0, fac1 = r.best_fast(0)[0], r.best_fast(1)[0]
    if r.big:
        b = r.big
        cells.append(f"{b[f'native {nat0}'][0]}→{b[f'{fac0} fast'][0]} / "
                     f"{b[f'native {nat1}'][1]}→{b[f'{fac1} fast'][1]}")
    else:
        cells.append("-")
    cells.append(f"{max(r.fast_vs_exact.values()):.1e}" if r.fast_vs_exact else "-")
    return cells


def versus_detail(r: VersusResult) -> list[str]:
    """Every implementation of one case: ms, xA and the ratio to the fastest native (paired medians)."""
    lines = [f"#### {r.layer}, {r.shape} (anchor `x * 2.0`: {r.anchor_ms:.2f} ms, {r.reps}+ reps)", "",
             "| implementation | fwd ms | fwd xA | fwd+bwd ms | fwd+bwd xA | big kernels fwd / bwd | "
             "fwd / fastest native | fwd+bwd / fastest native |", "|---|---:|---:|---:|---:|---|---:|---:|"]

    def ratio(name: str, phase: int) -> str:
        nat = f"native {r.fastest_native(phase)[0]}"
        if not r.samples:
            return f"{r.ms[name][phase] / r.ms[nat][phase]:.2f}"
        return f"{median_interval(paired_ratios(r.samples[name][phase], r.samples[nat][phase]))[0]:.2f}"

    for name, (f, b) in r.ms.items():
        big = r.big.get(name)
        lines.append(f"| {name} | {f:.2f} | {f / r.anchor_ms:.2f} | {b:.2f} | {b / r.anchor_ms:.2f} | "
                     f"{'-' if big is None else f'{big[0]} / {big[1]}'} | {ratio(name, 0)} | {ratio(name, 1)} |")
    return [*lines, ""]


def versus_count_line(results: Sequence[VersusResult]) -> str:
    """How many phases are ≤ 1.00, and why the others are above."""
    verdicts = [r.verdict(p)[0].strip("*") for r in results for p in (0, 1)]
    above = [v for v in verdicts if v != "≤ 1.00"]
    kinds = {k: above.count(k) for k in dict.fromkeys(above)}
    why = "; ".join(f"{k}: {n}" for k, n in kinds.items())
    return (f"{len(results)} cases, {len(verdicts)} phases; {len(verdicts) - len(above)} at a paired median ≤ 1.00, "
            f"{len(above)} above" + (f" ({why})." if above else "."))


def versus_markdown(results: Sequence[VersusResult], argv: Sequence[str], wall_s: float, quick: bool,
                    skipped: Sequence[str]) -> str:
    lines = header(argv, wall_s, quick)
    lines[0] = "# normbridge benchmark: fast mode vs the fastest native framework"
    lines = [
        *lines[:8],
        "- Per case every native framework (flax.linen `jax.jit(apply)`, flax.nnx `nnx.jit`, equinox",
        "  `eqx.filter_jit` + `vmap`, channels-first), each facade in exact mode and in fast mode",
        "  (`normbridge.fast()`), a jitted `x * 2.0` anchor and an A/A control are timed interleaved call by",
        "  call in one run, every function of a phase once per round; ms = median. xA = time / anchor time",
        "  (1.0 = one read + one write of x).",
        "- fast / fastest = paired per-repetition ratios (round i's fast-mode call / round i's call of the",
        "  fastest native): their median and its distribution-free 95 % interval (order statistics); the",
        "  facade shown is the one with the lowest median (target <= 1.00, above in **bold**). A/A = the same",
        "  for a second entry of the fastest native's compiled function (fastest in a 3-call pre-run):",
        "  the machine's noise on this case. fast / exact = that facade's fast / its exact mode (= its native",
        "  program); fast / linen = fast / native flax.linen (ratios of medians). big kernels = compiled",
        "  kernels streaming an x-sized array.",
        "- verdict: ≤ 1.00; *same program* (a fast-mode facade compiles to the fastest native's optimized",
        "  HLO, identical up to names: the difference is the machine); *CI ∋ 1.00, same kernels* (the",
        "  interval includes 1.00 and both programs read/write x-sized arrays the same number of times in",
        "  the same kernels); **slower** (explained below from the programs' kernels).",
        "- max rel Δ = largest |fast - exact| / max |exact| over output and gradients (first calls).",
        "",
        "| " + " | ".join(VERSUS_COLUMNS) + " |",
        "|---|---|" + "---|---:|---:|---:|---:|---:|---:|---|---:|---:|" * 2 + "---|---:|",
    ]
    for r in results:
        lines.append("| " + " | ".join(versus_cells(r)) + " |")
    lines += ["", versus_count_line(results)]
    over = [(r, p) for r in results for p in (0, 1) if r.verdict(p)[0] != "≤ 1.00"]
    if over:
        lines += ["", "### Fast mode above the fastest native", ""]
        for r, p in over:
            lines.append(f"- {r.layer} {r.shape} {('fwd', 'fwd+bwd')[p]} (fastest native {r.fastest_native(p)[0]}): "
                         f"{r.verdict(p)[1]}.")
    lines += ["", "### Every implementation", ""]
    for r in results:
        lines += versus_detail(r)
    if skipped:
        lines += ["Skipped:", "", *[f"- {s}" for s in skipped]]
    return "\n".join(lines) + "\n"


VERSUS_README_START = "<!-- fast-table:start (written by benchmarks/bench.py --versus --readme) -->"
VERSUS_README_END = "<!-- fast-table:end -->"


#: The README's compact fast-mode table (the full one stays in benchmarks/results_fast.md).
VERSUS_SUMMARY_COLUMNS = (
    "layer", "shape", "fwd: fast / fastest native [95% CI]", "fwd verdict",
    "fwd+bwd: fast / fastest native [95% CI]", "fwd+bwd verdict", "fast / flax.linen (fwd, fwd+bwd)",
)


def versus_summary_row(row: str) -> str:
    """One compact README row from one row of the full ``VERSUS_COLUMNS`` table."""
    c = [cell.strip() for cell in row.strip().strip("|").split("|")]
    f, b = 2, 2 + _PHASE_CELLS
    return (f"| {c[0]} | {c[1]} | {c[f + 5]} ({c[f]}) | {c[f + 7]} | {c[b + 5]} ({c[b]}) | {c[b + 7]} | "
            f"{c[f + 9]}, {c[b + 9]} |")


def versus_readme_block(markdown: str) -> str:
    """The README's fast-mode summary: per case, fast / fastest native per phase, and its count line."""
    lines = markdown.splitlines()
    head = "| " + " | ".join(VERSUS_COLUMNS) + " |"
    start = lines.index(head)
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    count = lines[end + 1] if end + 1 < len(lines) else ""
    date = next((ln for ln in lines if ln.startswith("- Date:")), "")
    table = ["| " + " | ".join(VERSUS_SUMMARY_COLUMNS) + " |", "|---|---|---:|---|---:|---|---:|"]
    table += [versus_summary_row(ln) for ln in lines[start + 2 : end]]
    return "\n".join([date, "", *table, "", count]).strip() + "\n"


def splice_versus_readme(readme: str, markdown: str) -> str:
    return _splice_between(readme, VERSUS_README_START, VERSUS_README_END, "fast-mode", versus_readme_block, markdown)


def run_versus(layers: Sequence[str] | None, shapes: Sequence[str], facades: Sequence[str], *, quick: bool = False,
               hlo: bool = True, log: Callable[[str], None] = print) -> tuple[list[VersusResult], list[str]]:
    results: list[VersusResult] = []
    skipped: list[str] = []
    for shape in shapes:
        for layer in VERSUS_LAYERS.get(shape, ()):
            if layers is not None and layer not in layers:
                continue
            name = f"{LAYERS[layer]} {shape}"
            t0 = time.perf_counter()
            try:
                r = run_versus_case(layer, shape, facades=facades, quick=quick, hlo=hlo)
            except Unsupported as err:
                skipped.append(f"{name}: {err}")
                log(f"SKIP {name}: {err}")
                continue
            except Exception as err:  # one broken case must not hide the others
                skipped.append(f"{name}: FAILED {type(err).__name__}: {str(err)[:200]}")
                log(f"FAIL {name}: {type(err).__name__}: {err}")
                continue
            results.append(r)
            parts = []
            for p in (0, 1):
                nat, fac = r.fastest_native(p), r.best_fast(p)
                aa = r.aa_interval(p)
                parts.append(f"{('fwd', 'fwd+bwd')[p]} fast {fac[1]:.2f} ms ({fac[0]}) / fastest native {nat[1]:.2f} "
                             f"ms ({nat[0]}) = {fmt_interval(r.paired(fac[0], p))}, A/A "
                             f"{'-' if aa is None else fmt_interval(aa[1])}: {r.verdict(p)[1] or r.verdict(p)[0]}")
            log(f"{name}: " + "; ".join(parts) + f"; anchor {r.anchor_ms:.2f} ms [{time.perf_counter() - t0:.1f} s]")
    return results, skipped


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--facade", action="append", choices=FACADES, help="only these facades (repeatable)")
    p.add_argument("--layer", action="append", choices=tuple(LAYERS), help="only these layers (repeatable)")
    p.add_argument("--shape", action="append", choices=tuple(SHAPES), help="only these shapes (repeatable)")
    p.add_argument("--quick", action="store_true",
                   help=f"tiny shapes, few repetitions, shapes {QUICK_SHAPES} unless --shape, no HLO comparison or "
                   "re-timing (a smoke run, < 60 s)")
    p.add_argument("--markdown", metavar="PATH", help="also write the table as markdown to PATH")
    p.add_argument("--readme", metavar="PATH",
                   help="also replace the benchmark section of PATH (between its benchmark-table markers)")
    p.add_argument("--no-hlo", action="store_true", help="skip the HLO comparison (saves one compile per function)")
    p.add_argument("--no-recheck", action="store_true", help="do not re-time cases above the 1.05 target")
    p.add_argument("--no-reexec", action="store_true", help="do not re-execute with the GLIBC_TUNABLES allocator")
    p.add_argument("--versus", action="store_true",
                   help="fast mode vs the fastest native framework: every native framework, each facade in exact "
                   "and fast mode and the x*2 anchor, interleaved (--facade picks the facades; default linen, nnx, "
                   "equinox)")
    p.add_argument("--native-as-facade", action="store_true", help=argparse.SUPPRESS)  # harness self-test
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if not args.no_reexec and os.environ.get("GLIBC_TUNABLES") != GLIBC_TUNABLES:
        # the allocator reads GLIBC_TUNABLES at process start, so the setting needs a fresh process
        env = dict(os.environ, GLIBC_TUNABLES=GLIBC_TUNABLES)
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *argv], env)
    if args.versus:
        return _main_versus(args, argv)
    t0 = time.perf_counter()
    results, skipped = run(
        args.facade or FACADES,
        args.layer,
        args.shape or (QUICK_SHAPES if args.quick else tuple(SHAPES)),
        quick=args.quick,
        native_as_facade=args.native_as_facade,
        # quick mode is a smoke run, not a measurement: no HLO comparison (a second compile per
        # function) and no re-timing
        hlo=not (args.no_hlo or args.quick),
        recheck=not (args.no_recheck or args.quick),
    )
    wall = time.perf_counter() - t0
    if results:
        print()
        print_results(results)
    for s in skipped:
        print(f"skipped: {s}")
    markdown = to_markdown(results, argv, wall, args.quick, skipped)
    return _publish(args, markdown, splice_readme, "the benchmark section", len(results), wall)


def _main_versus(args: argparse.Namespace, argv: Sequence[str]) -> int:
    t0 = time.perf_counter()
    facades = [f for f in (args.facade or VERSUS_FACADES) if f in VERSUS_FACADES]
    results, skipped = run_versus(args.layer, args.shape or (("tfm_f32",) if args.quick else tuple(VERSUS_LAYERS)),
                                  facades, quick=args.quick, hlo=not (args.no_hlo or args.quick))
    wall = time.perf_counter() - t0
    markdown = versus_markdown(results, argv, wall, args.quick, skipped)
    for s in skipped:
        print(f"skipped: {s}")
    return _publish(args, markdown, splice_versus_readme, "the fast-mode table", len(results), wall)


def _publish(
    args: argparse.Namespace, markdown: str, splice: Callable[[str, str], str], section: str, cases: int, wall: float
) -> int:
    """Write ``markdown`` to ``--markdown`` and splice it into ``section`` of ``--readme`` (each when given),
    print the summary line, and return the exit status (1 when no case ran)."""
    if args.markdown:
        write_atomic(args.markdown, markdown)
        print(f"wrote {args.markdown}")
    if args.readme:
        with open(args.readme, encoding="utf-8") as fh:
            write_atomic(args.readme, splice(fh.read(), markdown))
        print(f"updated {section} of {args.readme}")
    print(f"{cases} cases in {wall:.0f} s")
    return 0 if cases else 1


if __name__ == "__main__":
    sys.exit(main())
