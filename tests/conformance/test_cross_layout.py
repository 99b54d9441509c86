"""Cross-layout checkpoint conversion: every ordered pair of facades, through the canonical ``NormRecord``.

For each layer kind and each facade ``A`` that has it, ``A`` is built with random, non-trivial state
(parameters, running statistics, spectral vectors, weight-norm gains, set in ``A``'s own layout) and
converted ``A → record → B`` for every other facade ``B`` that has the kind, ``B`` built with the same
hyper-parameters (eps, momentum, groups; equinox is channels first, unbatched, run under ``jax.vmap``).
Then

(a) losslessness: ``A → record → B → record`` gives the first record back, bitwise (arrays, kind,
    epsilon, momentum, groups, statistics convention), and ``B → record → A`` restores ``A``'s state
    bitwise;
(b) behaviour: ``B``'s eval output on the same input equals ``A``'s, bitwise between the flax-family
    facades (linen, nnx, treex: flax's operation order), and with equinox within the difference that
    native ``flax.linen`` and native ``equinox.nn`` show on the same data and state, measured in the
    same example (as ``test_equinox_vs_linen.py`` does).

Conversions that would change the math are refused by ``from_canonical`` with a ``ValueError`` naming
the layer, and tested as such: another epsilon (every facade), flax's SpectralNorm/WeightNorm records into
equinox and equinox's into the flax family (equinox iterates with ``u`` and ``v`` on an ``(out, in)``
weight and has no WeightNorm epsilon), equinox ``mode="batch"`` zero-debiased statistics into nnx and
flax-family statistics into ``mode="batch"``. The zero-debiased → linen/treex conversion is one-way
(de-biased with ``core.debias``) and is tested for behaviour only.

Two representation facts the comparisons spell out rather than hide: treex keeps BatchNorm's momentum as
a float32 0-d array (so momenta are compared at float32, and an equinox layer receiving a treex record is
built with that float32 value, because equinox applies ``1 - momentum`` in Python floats), and equinox
names flax's ``"ema"`` statistics ``"ema_blend"`` with ``count=1`` (used as is at eval in both).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import normbridge.adapters.equinox as E
import normbridge.adapters.linen as L
import normbridge.adapters.nnx as F
import normbridge.adapters.treex as T
from normbridge import core
from normbridge.conformance import equinox_measure as em
from normbridge.conformance.measure import REL_TOL

NORMS = ["BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm"]
WRAPPERS = ["SpectralNorm", "WeightNorm"]
FLAX = ["linen", "nnx", "treex"]
ALL = [*FLAX, "equinox"]


@dataclasses.dataclass(frozen=True)
class Cfg:
    """One drawn example: the layer, its hyper-parameters, the channels-last input and the random state."""

    layer: str
    shape: tuple[int, ...]  # channels last (flax layout); (N, in) for the wrappers
    dtype: str
    eps: float
    momentum: float = 0.9
    groups: int = 1
    out: int = 3
    n_steps: int = 1
    feature_axes: int | None = -1
    seed: int = 0

    @property
    def c(self) -> int:
        return self.shape[-1]


def state_arrays(cfg: Cfg) -> dict[str, jax.Array]:
    """Random float32 state in canonical shapes: scale/bias/mean/var ``(C,)``, kernel ``(in, out)``, u, sigma, g."""
    rng = np.random.default_rng(cfg.seed)
    c, n_in, out = cfg.c, cfg.shape[-1], cfg.out

    def f32(a: Any) -> jax.Array:
        return jnp.asarray(np.asarray(a, np.float32))

    g_shape = (out,) if cfg.feature_axes is not None else ()
    return {
        "scale": f32(1 + 0.3 * rng.standard_normal(c)),
        "bias": f32(0.3 * rng.standard_normal(c)),
        "mean": f32(0.5 + rng.standard_normal(c)),
        "var": f32(0.5 + rng.uniform(size=c) * 2),
        "kernel": f32(rng.standard_normal((n_in, out)) / np.sqrt(n_in)),
        "kbias": f32(0.1 * rng.standard_normal(out)),
        "u": f32(rng.standard_normal(out)),
        "sigma": f32(1 + rng.uniform()),
        "g": f32(0.5 + rng.uniform(size=g_shape)),
    }


def like_state(cfg: Cfg, s: dict) -> dict | None:
    """State of a conversion target before loading: default init for the norms; for the wrappers the same
    wrapped ``kernel``/``bias`` (not part of a record) with other spectral vectors and gains."""
    if cfg.layer not in WRAPPERS:
        return None
    return {**s, "u": -s["u"], "sigma": s["sigma"] + 1, "g": s["g"] + 1}


def make_input(cfg: Cfg) -> jax.Array:
    rng = np.random.default_rng(cfg.seed + 101)
    x = rng.standard_normal(cfg.shape).astype(np.float32) * 2 + 0.5
    return jnp.asarray(x).astype(em.DTYPES[cfg.dtype])


def vmap_n(f: Any, n: int) -> Any:
    for _ in range(n):
        f = jax.vmap(f)
    return f


# --------------------------------------------------------------------------- one adapter per facade
# build(cfg, s) -> object holding A's state (s=None: a freshly initialized B); record(obj); load(rec, obj);
# run(obj, x) -> eval output channels last; native(obj) -> every array of the state in the facade's layout.


class Linen:
    name = "linen"

    @staticmethod
    def module(cfg: Cfg) -> Any:
        kw = {"epsilon": cfg.eps}
        if cfg.layer == "BatchNorm":
            return L.BatchNorm(use_running_average=True, momentum=cfg.momentum, **kw)
        if cfg.layer == "GroupNorm":
            return L.GroupNorm(num_groups=cfg.groups, **kw)
        if cfg.layer == "SpectralNorm":
            return L.SpectralNorm(nn.Dense(cfg.out), n_steps=cfg.n_steps, **kw)
        if cfg.layer == "WeightNorm":
            return L.WeightNorm(nn.Dense(cfg.out), feature_axes=cfg.feature_axes, **kw)
        return getattr(L, cfg.layer)(**kw)

    @classmethod
    def build(cls, cfg: Cfg, s: dict | None) -> tuple[Any, dict]:
        mod = cls.module(cfg)
        x = make_input(cfg)
        if cfg.layer == "SpectralNorm":
            v = mod.init(jax.random.key(7), x, update_stats=True)
        else:
            v = mod.init(jax.random.key(7), x)
        v = {k: dict(val) for k, val in v.items()}  # plain, mutable dicts
        if s is None:
            return mod, v
        if cfg.layer == "SpectralNorm":
            v["params"]["layer_instance"] = {"kernel": s["kernel"], "bias": s["kbias"]}
            v["batch_stats"] = {"layer_instance/kernel/u": s["u"][None], "layer_instance/kernel/sigma": s["sigma"]}
        elif cfg.layer == "WeightNorm":
            v["params"] = {"layer_instance": {"kernel": s["kernel"], "bias": s["kbias"]},
                           "layer_instance/kernel/scale": s["g"]}
        else:
            v["params"] = {k: s[k] for k in v["params"]}
            if cfg.layer == "BatchNorm":
                v["batch_stats"] = {"mean": s["mean"], "var": s["var"]}
        return mod, v

    @staticmethod
    def _sub(cfg: Cfg, v: dict) -> dict:
        if cfg.layer == "SpectralNorm":
            return v["batch_stats"]
        if cfg.layer == "WeightNorm":
            return {k: a for k, a in v["params"].items() if k != "layer_instance"}
        return v

    @classmethod
    def record(cls, cfg: Cfg, obj: tuple[Any, dict]) -> core.NormRecord:
        mod, v = obj
        return L.to_canonical(cls._sub(cfg, v), mod)

    @staticmethod
    def load(cfg: Cfg, rec: core.NormRecord, like: tuple[Any, dict]) -> tuple[Any, dict]:
        mod, v = like
        sub = L.from_canonical(rec, mod)
        if cfg.layer == "SpectralNorm":
            return mod, {**v, "batch_stats": sub}
        if cfg.layer == "WeightNorm":
            return mod, {"params": {"layer_instance": v["params"]["layer_instance"], **sub}}
        return mod, sub

    @staticmethod
    def run(cfg: Cfg, obj: tuple[Any, dict], x: jax.Array) -> jax.Array:
        mod, v = obj
        if cfg.layer == "SpectralNorm":
            return mod.apply(v, x, update_stats=False)
        return mod.apply(v, x)

    @staticmethod
    def native(cfg: Cfg, obj: tuple[Any, dict]) -> dict[str, Any]:
        return flat(obj[1])


class Nnx:
    name = "nnx"

    @staticmethod
    def build(cfg: Cfg, s: dict | None) -> Any:
        r = nnx.Rngs(3)
        kw = {"epsilon": cfg.eps, "rngs": r}
        if cfg.layer == "BatchNorm":
            m = F.BatchNorm(cfg.c, momentum=cfg.momentum, **kw)
        elif cfg.layer == "GroupNorm":
            m = F.GroupNorm(cfg.c, num_groups=cfg.groups, **kw)
        elif cfg.layer == "SpectralNorm":
            m = F.SpectralNorm(nnx.Linear(cfg.shape[-1], cfg.out, rngs=r), n_steps=cfg.n_steps, **kw)
        elif cfg.layer == "WeightNorm":
            m = F.WeightNorm(nnx.Linear(cfg.shape[-1], cfg.out, rngs=r), feature_axes=cfg.feature_axes, **kw)
        else:
            m = getattr(F, cfg.layer)(cfg.c, **kw)
        if s is None:
            return m
        if cfg.layer in WRAPPERS:
            m.layer_instance.kernel.set_value(s["kernel"])
            m.layer_instance.bias.set_value(s["kbias"])
            if cfg.layer == "SpectralNorm":
                m.batch_stats[("kernel", "u")].set_value(s["u"][None])
                m.batch_stats[("kernel", "sigma")].set_value(s["sigma"])
            else:
                m.scales[("kernel",)].set_value(s["g"])
        else:
            for name in ("scale", "bias", "mean", "var"):
                if getattr(m, name, None) is not None:
                    getattr(m, name).set_value(s[name])
        return m

    @staticmethod
    def record(cfg: Cfg, m: Any) -> core.NormRecord:
        return F.to_canonical(m)

    @staticmethod
    def load(cfg: Cfg, rec: core.NormRecord, like: Any) -> Any:
        return F.from_canonical(rec, like)

    @staticmethod
    def run(cfg: Cfg, m: Any, x: jax.Array) -> jax.Array:
        if cfg.layer == "BatchNorm":
            return m(x, use_running_average=True)
        if cfg.layer == "SpectralNorm":
            return m(x, update_stats=False)
        return m(x)

    @staticmethod
    def native(cfg: Cfg, m: Any) -> dict[str, Any]:
        return {"/".join(map(str, p)): (v.get_value() if isinstance(v, nnx.Variable) else v)
                for p, v in nnx.to_flat_state(nnx.state(m))}


class Treex:
    name = "treex"

    @staticmethod
    def build(cfg: Cfg, s: dict | None) -> Any:
        kw = {"epsilon": cfg.eps}
        if cfg.layer == "BatchNorm":
            m = T.BatchNorm(momentum=cfg.momentum, **kw)
        elif cfg.layer == "GroupNorm":
            m = T.GroupNorm(num_groups=cfg.groups, **kw)
        elif cfg.layer == "SpectralNorm":
            m = T.SpectralNorm(T.Linear(cfg.out), n_steps=cfg.n_steps, **kw)
        elif cfg.layer == "WeightNorm":
            m = T.WeightNorm(T.Linear(cfg.out), feature_axes=cfg.feature_axes, **kw)
        else:
            m = getattr(T, cfg.layer)(**kw)
        m = m.init(5, make_input(cfg)).eval()
        if s is None:
            return m
        if cfg.layer in WRAPPERS:
            m.layer.__dict__.update(kernel=s["kernel"], bias=s["kbias"])
            if cfg.layer == "SpectralNorm":
                m.__dict__.update(u=s["u"][None], sigma=s["sigma"])
            else:
                m.__dict__["scale"] = s["g"]
        else:
            m.__dict__.update({k: s[k] for k in ("scale", "bias", "mean", "var") if getattr(m, k, None) is not None})
        return m

    @staticmethod
    def record(cfg: Cfg, m: Any) -> core.NormRecord:
        return T.to_canonical(m)

    @staticmethod
    def load(cfg: Cfg, rec: core.NormRecord, like: Any) -> Any:
        return T.from_canonical(rec, like)

    @staticmethod
    def run(cfg: Cfg, m: Any, x: jax.Array) -> jax.Array:
        return m(x)

    @staticmethod
    def native(cfg: Cfg, m: Any) -> dict[str, Any]:
        return flat(m.to_dict(static_fields=False))


class Equinox:
    """The equinox facade: channels first, one example per call, ``jax.vmap`` over the batch."""

    name = "equinox"

    @staticmethod
    def build(cfg: Cfg, s: dict | None, *, ns: Any = E, mode: str = "ema", momentum: float | None = None) -> Any:
        c, eps = cfg.c, cfg.eps
        state = None
        if cfg.layer == "BatchNorm":
            momentum = cfg.momentum if momentum is None else momentum
            m, state = em.make(ns.BatchNorm, c, "batch", eps, momentum=momentum, mode=mode, inference=True)
        elif cfg.layer == "LayerNorm":
            m = ns.LayerNorm(c, eps)
        elif cfg.layer == "RMSNorm":
            m = ns.RMSNorm(c, eps, use_bias=False)
        elif cfg.layer == "GroupNorm":
            m = ns.GroupNorm(cfg.groups, c, eps)
        elif cfg.layer == "InstanceNorm":
            m = ns.GroupNorm(c, c, eps) if ns is eqx.nn else ns.InstanceNorm(c, eps)
        else:
            raise AssertionError(cfg.layer)
        if s is None:
            return m, state
        m = eqx.tree_at(lambda t: (t.weight, t.bias), m, (s["scale"], None if cfg.layer == "RMSNorm" else s["bias"]),
                        is_leaf=lambda v: v is None)
        if cfg.layer == "BatchNorm":
            if mode == "ema":
                state = state.set(m.ema_state_index, (s["mean"], s["var"]))
                state = state.set(m.ema_first_time_index, jnp.array(False))
            else:  # a hidden EMA after `count` updates
                state = state.set(m.batch_state_index, (s["mean"], s["var"]))
                state = state.set(m.batch_counter, jax.lax.full_like(state.get(m.batch_counter), 3))
        return m, state

    @staticmethod
    def record(cfg: Cfg, obj: tuple[Any, Any]) -> core.NormRecord:
        return E.to_canonical(*obj)

    @staticmethod
    def load(cfg: Cfg, rec: core.NormRecord, like: tuple[Any, Any]) -> tuple[Any, Any]:
        m, state = like
        return E.from_canonical(rec, m, None if state is None else em.clone(state))

    @staticmethod
    def run(cfg: Cfg, obj: tuple[Any, Any], x: jax.Array) -> jax.Array:
        m, state = obj
        x_cf = jnp.moveaxis(x, -1, 1)
        if cfg.layer == "BatchNorm":
            y, _ = jax.vmap(m, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x_cf, state)
        elif cfg.layer in ("LayerNorm", "RMSNorm"):
            return vmap_n(m, x.ndim - 1)(x)  # per position over the channel axis
        else:
            y = jax.vmap(m)(x_cf)
        return jnp.moveaxis(y, 1, -1)

    @staticmethod
    def native(cfg: Cfg, obj: tuple[Any, Any]) -> dict[str, Any]:
        m, state = obj
        out = flat({"layer": em.arrays(m)})
        if state is not None:
            out.update({f"state/{k}": v for k, v in em.state_dict(state).items()})
        return out


FACADES = {"linen": Linen, "nnx": Nnx, "treex": Treex, "equinox": Equinox}


def flat(tree: Any) -> dict[str, Any]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(p): v for p, v in leaves}


# --------------------------------------------------------------------------- comparisons


def bitwise(a: Any, b: Any) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def semantic(rec: core.NormRecord) -> dict[str, Any]:
    """What a record must keep through a conversion: arrays (bitwise) and the fields that change the math."""
    out: dict[str, Any] = {k: v for k, v in rec.arrays().items() if k != "count"}
    out["kind"] = rec.kind
    out["epsilon"] = rec.epsilon
    if rec.momentum is not None:
        out["momentum(float32)"] = float(np.float32(rec.momentum))
    if rec.kind == "group_norm":
        out["num_groups"] = rec.num_groups
    if rec.stats_convention is not None:
        # equinox's ema_blend past its first call is flax's ema: used as is at eval, EMA-updated in training
        fresh = rec.stats_convention == "ema_blend" and rec.count is not None and int(rec.count) == 0
        out["stats"] = "ema" if rec.stats_convention in ("ema", "ema_blend") and not fresh else rec.stats_convention
    return out


def assert_same_record(first: core.NormRecord, second: core.NormRecord, what: str) -> None:
    a, b = semantic(first), semantic(second)
    assert sorted(a) == sorted(b), f"{what}: record fields {sorted(a)} became {sorted(b)}"
    for k in a:
        same = bitwise(a[k], b[k]) if hasattr(a[k], "shape") else a[k] == b[k]
        assert same, f"{what}: record field {k!r} changed: {a[k]!r} -> {b[k]!r}"


def max_abs(a: jax.Array, b: jax.Array) -> float:
    return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


def native_bound(cfg: Cfg, s: dict, x: jax.Array) -> tuple[float, float]:
    """``(max |native linen − native equinox|, max |native linen|)`` in eval mode on ``x`` with state ``s``."""
    kw = {"epsilon": cfg.eps}
    params = {"scale": s["scale"], "bias": s["bias"]}
    if cfg.layer == "BatchNorm":
        lin = nn.BatchNorm(use_running_average=True, momentum=cfg.momentum, **kw)
        variables = {"params": params, "batch_stats": {"mean": s["mean"], "var": s["var"]}}
    elif cfg.layer == "GroupNorm":
        lin, variables = nn.GroupNorm(num_groups=cfg.groups, **kw), {"params": params}
    elif cfg.layer == "RMSNorm":
        lin, variables = nn.RMSNorm(**kw), {"params": {"scale": s["scale"]}}
    else:
        lin, variables = getattr(nn, cfg.layer)(**kw), {"params": params}
    y_lin = lin.apply(variables, x)
    y_eqx = Equinox.run(cfg, Equinox.build(cfg, s, ns=eqx.nn), x)
    return max_abs(y_lin, y_eqx), float(jnp.max(jnp.abs(y_lin.astype(jnp.float32))))


def expect_refusal(fn: Any, layer: str, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        fn()
    assert layer in str(info.value), f"the error does not name {layer}: {info.value}"


# --------------------------------------------------------------------------- strategies


@st.composite
def norm_cfgs(draw: st.DrawFn, layer: str) -> Cfg:
    low = {"BatchNorm": 2, "LayerNorm": 2, "RMSNorm": 2}.get(layer, 3)  # GN/IN: (N, spatial..., C)
    ndim = draw(st.integers(low, 4))
    groups, size = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    c = groups * size if layer == "GroupNorm" else draw(st.sampled_from([1, 4, 6]))
    shape = (draw(st.sampled_from([2, 3])), *[draw(st.sampled_from([2, 3])) for _ in range(ndim - 2)], c)
    return Cfg(
        layer=layer,
        shape=shape,
        dtype=draw(st.sampled_from(["float32", "bfloat16"])),
        eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])),
        momentum=draw(st.sampled_from([0.99, 0.9, 0.5])),
        groups=groups,
        seed=draw(st.integers(0, 2**16)),
    )


@st.composite
def wrapper_cfgs(draw: st.DrawFn, layer: str) -> Cfg:
    return Cfg(
        layer=layer,
        shape=(draw(st.sampled_from([2, 3])), draw(st.sampled_from([2, 4]))),
        dtype=draw(st.sampled_from(["float32", "bfloat16"])),
        eps=draw(st.sampled_from([1e-12, 1e-6])),
        out=draw(st.sampled_from([2, 3, 5])),
        n_steps=draw(st.sampled_from([1, 2])),
        feature_axes=draw(st.sampled_from([-1, None])) if layer == "WeightNorm" else -1,
        seed=draw(st.integers(0, 2**16)),
    )


# --------------------------------------------------------------------------- the pairs

# Every example checks every B for one A; fewer examples than the profile's keep the file inside its budget.
PAIR_SETTINGS = settings(max_examples=max(2, settings().max_examples // 2))


def check_pair(cfg: Cfg, a_name: str, b_name: str, s: dict, a_obj: Any, rec_a: core.NormRecord, y_a: jax.Array,
               x: jax.Array) -> jax.Array:
    """The (a) and (b) checks of one ordered pair; returns B's output."""
    A, B = FACADES[a_name], FACADES[b_name]
    what = f"{cfg.layer} {a_name} -> {b_name}"
    b_kw = {}
    if b_name == "equinox" and a_name == "treex" and cfg.layer == "BatchNorm":
        # treex holds momentum as float32; equinox applies 1 - momentum in Python floats, so it needs that value
        b_kw["momentum"] = rec_a.momentum
    b_like = B.build(cfg, like_state(cfg, s), **b_kw)
    b_obj = B.load(cfg, rec_a, b_like)
    # (a) A -> record -> B -> record is the first record
    assert_same_record(rec_a, B.record(cfg, b_obj), what)
    # (a) B -> record -> A restores A's state bitwise
    rec_b = B.record(cfg, b_obj)
    f32_exact = float(np.float32(cfg.momentum)) == cfg.momentum
    if (a_name, b_name, cfg.layer) == ("equinox", "treex", "BatchNorm") and not f32_exact:
        # treex can hold only float32(momentum); equinox's update uses 1 - momentum in Python floats, which
        # then differs in the last bit, so equinox refuses the way back: a one-way conversion.
        expect_refusal(lambda: A.load(cfg, rec_b, A.build(cfg, None)), "BatchNorm", "momentum")
    else:
        a_like = A.build(cfg, like_state(cfg, s))
        assert A.native(cfg, a_like).keys() == A.native(cfg, a_obj).keys()
        a_back = A.load(cfg, rec_b, a_like)
        want, got = A.native(cfg, a_obj), A.native(cfg, a_back)
        assert sorted(want) == sorted(got), f"{what} -> {a_name}: state paths {sorted(want)} != {sorted(got)}"
        bad = [k for k in want if not bitwise(want[k], got[k])]
        assert not bad, f"{what} -> {a_name}: state not restored bitwise at {bad}"
    # (b) behaviour
    y_b = B.run(cfg, b_obj, x)
    assert y_b.shape == y_a.shape, f"{what}: output shape {y_b.shape} != {y_a.shape}"
    if a_name in FLAX and b_name in FLAX:
        assert bitwise(y_a, y_b), f"{what}: outputs differ by {max_abs(y_a, y_b):.3g} (expected bitwise)"
    # (refusal) another epsilon is refused, naming the layer
    expect_refusal(lambda: B.load(cfg, rec_a.replace(epsilon=rec_a.epsilon * 10), B.build(cfg, None, **b_kw)),
                   cfg.layer, "eps")
    return y_b


@pytest.mark.parametrize("layer", NORMS)
@PAIR_SETTINGS
@given(data=st.data())
def test_norm_layers_convert_between_every_pair(layer: str, data: st.DataObject) -> None:
    cfg = data.draw(norm_cfgs(layer))
    s = state_arrays(cfg)
    x = make_input(cfg)
    bound, scale = native_bound(cfg, s, x)
    for a_name in ALL:
        A = FACADES[a_name]
        a_obj = A.build(cfg, s)
        rec_a = A.record(cfg, a_obj)
        y_a = A.run(cfg, a_obj, x)
        for b_name in ALL:
            if b_name == a_name:
                continue
            y_b = check_pair(cfg, a_name, b_name, s, a_obj, rec_a, y_a, x)
            if "equinox" in (a_name, b_name):
                diff = max_abs(y_a, y_b)
                # slack: the project tolerance of a facade against its own native, as test_equinox_vs_linen.py
                tol = REL_TOL[str((y_a if a_name == "equinox" else y_b).dtype)] * scale
                assert diff <= bound + tol, (
                    f"{layer} {a_name} -> {b_name} {cfg.dtype}: outputs differ by {diff:.3g}; "
                    f"native linen vs native equinox differ by {bound:.3g} (+ {tol:.3g})"
                )


@pytest.mark.parametrize("layer", WRAPPERS)
@PAIR_SETTINGS
@given(data=st.data())
def test_wrappers_convert_between_flax_family_pairs(layer: str, data: st.DataObject) -> None:
    cfg = data.draw(wrapper_cfgs(layer))
    s = state_arrays(cfg)
    x = make_input(cfg)
    for a_name in FLAX:
        A = FACADES[a_name]
        a_obj = A.build(cfg, s)
        rec_a = A.record(cfg, a_obj)
        y_a = A.run(cfg, a_obj, x)
        for b_name in FLAX:
            if b_name != a_name:
                check_pair(cfg, a_name, b_name, s, a_obj, rec_a, y_a, x)


# --------------------------------------------------------------------------- refused or one-way conversions


def equinox_wrapper(layer: str, n_in: int, out: int, s: dict) -> tuple[Any, Any]:
    """An equinox-facade SpectralNorm/WeightNorm around ``Linear(n_in, out)`` (weight ``(out, in)`` = kernel.T)."""
    lin = eqx.nn.Linear(n_in, out, key=jax.random.key(0))
    lin = eqx.tree_at(lambda m: (m.weight, m.bias), lin, (s["kernel"].T, s["kbias"]))
    if layer == "SpectralNorm":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return em.make(E.SpectralNorm, lin, "weight", key=jax.random.key(1))
    return E.WeightNorm(lin), None


@pytest.mark.parametrize("layer", WRAPPERS)
def test_wrappers_refuse_conversion_between_flax_family_and_equinox(layer: str) -> None:
    """equinox iterates on ``u`` and ``v`` of an ``(out, in)`` weight (no iteration at inference) and its
    WeightNorm has no epsilon; flax iterates from ``u`` at every call and adds epsilon: not the same math."""
    cfg = Cfg(layer=layer, shape=(3, 4), dtype="float32", eps=1e-12, out=5, seed=1)
    s = state_arrays(cfg)
    e_obj = equinox_wrapper(layer, 4, 5, s)
    e_rec = E.to_canonical(*e_obj)
    assert e_rec.arrays(), "the equinox record must hold the state being refused"
    m, state = e_obj
    for name in FLAX:
        Fac = FACADES[name]
        flax_obj = Fac.build(cfg, s)
        flax_rec = Fac.record(cfg, flax_obj)
        expect_refusal(lambda Fac=Fac: Fac.load(cfg, e_rec, Fac.build(cfg, None)), layer,
                       "equinox's weight convention|'spectral/weight'|'weight_scales/weight'")
        expect_refusal(lambda r=flax_rec: E.from_canonical(r, m, None if state is None else em.clone(state)), layer,
                       r"(kept_axis\)|axis) is 0 but the record has None")


@settings(max_examples=max(2, settings().max_examples // 4))
@given(cfg=norm_cfgs("BatchNorm"))
def test_zero_debiased_batch_norm_is_one_way(cfg: Cfg) -> None:
    """equinox ``mode="batch"`` keeps a hidden EMA de-biased at eval by ``1 - momentum**count``.

    linen and treex accept it, de-biased with ``core.debias`` (eval output within the native bound, the
    way back is refused: ``"ema"`` is not ``mode="batch"``'s convention); nnx refuses it.
    """
    s = state_arrays(cfg)
    x = make_input(cfg)
    e_obj = Equinox.build(cfg, s, mode="batch")
    rec = Equinox.record(cfg, e_obj)
    assert rec.stats_convention == "zero_debiased" and int(rec.count) == 3
    y_e = Equinox.run(cfg, e_obj, x)
    # the native bound: native equinox in mode="batch" vs native linen given the de-biased statistics
    n_e = Equinox.run(cfg, Equinox.build(cfg, s, ns=eqx.nn, mode="batch"), x)
    mean, var = core.debias((s["mean"], s["var"]), cfg.momentum, jnp.asarray(3))
    variables = {"params": {"scale": s["scale"], "bias": s["bias"]}, "batch_stats": {"mean": mean, "var": var}}
    n_l = nn.BatchNorm(use_running_average=True, momentum=cfg.momentum, epsilon=cfg.eps).apply(variables, x)
    bound, scale = max_abs(n_l, n_e), float(jnp.max(jnp.abs(n_l.astype(jnp.float32))))
    tol = REL_TOL[str(y_e.dtype)] * scale
    for name in ("linen", "treex"):
        Fac = FACADES[name]
        obj = Fac.load(cfg, rec, Fac.build(cfg, None))
        back = Fac.record(cfg, obj)
        assert back.stats_convention == "ema"
        assert bitwise(back.mean, mean) and bitwise(back.var, var), f"{name}: not the core.debias statistics"
        y = Fac.run(cfg, obj, x)
        assert max_abs(y, y_e) <= bound + tol, f"{name}: {max_abs(y, y_e):.3g} > native {bound:.3g} + {tol:.3g}"
        like = Equinox.build(cfg, None, mode="batch", momentum=back.momentum)
        expect_refusal(lambda r=back, like=like: Equinox.load(cfg, r, like), "BatchNorm", "statistics convention")
    expect_refusal(lambda: Nnx.load(cfg, rec, Nnx.build(cfg, None)), "BatchNorm", "zero_debiased")
    # and an equinox mode="ema" layer does not take them either
    expect_refusal(lambda: Equinox.load(cfg, rec, Equinox.build(cfg, None)), "BatchNorm", "statistics convention")
