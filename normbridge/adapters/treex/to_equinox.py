"""treex ⇄ canonical :class:`~normbridge.core.NormRecord`, and treex → Equinox through it.

:func:`to_canonical` turns a treex facade norm layer into a ``NormRecord`` and
:func:`from_canonical` writes one back into a treex layer. Record layout of each
treex layer (arrays float32, as treex stores them):

* ``BatchNorm``: ``scale``/``bias`` (Parameter), ``mean``/``var`` (BatchStat), all
  ``(C,)`` with ``C`` the size of ``axis``; ``stats_convention="ema"``; ``momentum``
  is treex's float32 0-d array, recorded as the Python float of that float32;
* ``LayerNorm``/``RMSNorm``/``GroupNorm``/``InstanceNorm``: ``scale`` (and ``bias``;
  RMSNorm has none) ``(C,)``, channels last;
* ``SpectralNorm``: ``spectral={"kernel": SpectralVectors(u (out,), sigma ())}``; the
  layer stores ``u`` as ``(1, out)`` (flax's layout);
* ``WeightNorm``: ``weight_scales={"kernel": g}`` with the shape of the kept
  ``feature_axes`` (``()`` for ``None``).

The wrapped layer's own ``kernel``/``bias`` are not part of the record (as for linen/nnx).
:func:`to_equinox` converts a whole loaded treex model to the equivalent Equinox model and
its ``eqx.nn.State``. It is a thin wrapper over :func:`normbridge.convert` (one engine): it
builds only the Equinox architecture (the layers below, with throw-away weights) and the
mapping of where each treex layer went; ``convert`` writes every array (this module's
``to_canonical`` is the treex spoke) and, given ``probe=``, verifies the outputs:

* ``BatchNorm`` → ``BatchNorm(C, axis_name, eps, momentum, mode="ema",
  inference=True)`` with the treex running ``mean``/``var`` copied into the ema
  state and ``first_time=False``: equinox's ema mode uses the stored statistics
  as they are at inference, exactly like treex/flax (``stats_convention="ema"``);
* ``LayerNorm`` → ``LayerNorm(C, eps, use_weight, use_bias)`` over the last axis;
* ``GroupNorm`` → ``GroupNorm(G, C, eps, channelwise_affine)``;
* ``Linear`` → ``eqx.nn.Linear(in, out)`` with ``weight = kernel.T`` (Equinox's
  ``(out, in)``) and the same bias;
* ``Lambda`` → ``eqx.nn.Lambda``; ``Sequential`` → ``eqx.nn.Sequential``;
* ``Conv`` → ``eqx.nn.Conv`` (HWIO → OIHW, bias ``(out, 1, ..)``), ``Dropout`` → ``eqx.nn.Dropout``
  (inference), ``Embed`` → ``eqx.nn.Embedding`` over every id, ``MLP`` → ``eqx.nn.Sequential``,
  ``Flatten`` and non-elementwise ``Lambda`` in treex's channels-last order.

Equinox layers see **one example, channels first**: call the result as
``jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)``
with ``x`` moved to ``(N, C, ...)`` where the layer is spatial (BatchNorm with
features last on rank > 2, GroupNorm). Equinox's BatchNorm and GroupNorm have
one ``channelwise_affine`` switch for scale and bias together: a missing treex
scale becomes ones and a missing bias zeros (``x·1`` and ``x+0`` are exact).
treex casts every output to its ``dtype``; where that is not float32 the
converter appends an ``eqx.nn.Lambda`` cast. Equinox computes in a different
operation order (two-pass variance, ``(x-μ)/√(σ²+ε)``), so outputs agree to
float32 rounding (≤ 1e-6 relative), not bitwise.

``backend="normbridge"`` builds the norm layers from
:mod:`normbridge.adapters.equinox` (same signatures and state), ``"equinox"``
from ``equinox.nn``; ``"auto"`` prefers the facade when it imports.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp

from normbridge import core
from normbridge._optional import require
from normbridge.adapters.treex.conv import Conv, ConvTranspose
from normbridge.adapters.treex.dropout import Dropout
from normbridge.adapters.treex.extra import InstanceNorm, RMSNorm, SpectralNorm, WeightNorm
from normbridge.adapters.treex.layers import MLP, Embed, Flatten, Lambda, Linear, Sequential
from normbridge.adapters.treex.module import Module
from normbridge.adapters.treex.norm import BatchNorm, GroupNorm, LayerNorm

__all__ = ["from_canonical", "to_canonical", "to_equinox"]

Backend = Literal["auto", "normbridge", "equinox"]


def to_canonical(layer: Module) -> core.NormRecord:
    """The canonical record of a treex normalization layer (arrays shared, not copied; layouts above)."""
    if isinstance(layer, SpectralNorm):
        u = None if layer.u is None else layer.u.reshape(layer.u.shape[-1])
        return core.NormRecord(
            kind="spectral_norm",
            spectral={} if layer.u is None else {"kernel": core.SpectralVectors(u=u, sigma=layer.sigma)},
            epsilon=float(layer.epsilon),
            options=(("n_steps", layer.n_steps),),
        )
    if isinstance(layer, WeightNorm):
        feats = layer.feature_axes
        return core.NormRecord(
            kind="weight_norm",
            weight_scales={} if layer.scale is None else {"kernel": layer.scale},
            epsilon=float(layer.epsilon),
            feature_axes=None if feats is None else tuple(feats) if isinstance(feats, tuple) else (int(feats),),
        )
    if not isinstance(layer, (BatchNorm, LayerNorm, RMSNorm, GroupNorm, InstanceNorm)):
        raise TypeError(f"to_canonical: {type(layer).__name__} is not a treex normalization layer")
    opts = (("dtype", str(jnp.dtype(layer.dtype))), ("use_bias", layer.use_bias), ("use_scale", layer.use_scale))
    if isinstance(layer, BatchNorm):
        return core.NormRecord(
            kind="batch_norm",
            scale=layer.scale,
            bias=layer.bias,
            mean=layer.mean,
            var=layer.var,
            epsilon=float(layer.epsilon),
            momentum=float(layer.momentum),
            stats_convention="ema",
            feature_axes=(int(layer.axis),),
            options=opts,
        )
    if isinstance(layer, (LayerNorm, RMSNorm)):
        return core.NormRecord(
            kind="layer_norm" if isinstance(layer, LayerNorm) else "rms_norm",
            scale=layer.scale,
            bias=getattr(layer, "bias", None),
            epsilon=float(layer.epsilon),
            feature_axes=(-1,),
            reduction_axes=(-1,),
            options=opts,
        )
    if isinstance(layer, InstanceNorm):
        return core.NormRecord(
            kind="instance_norm",
            scale=layer.scale,
            bias=layer.bias,
            epsilon=float(layer.epsilon),
            feature_axes=(-1,),
            options=opts,
        )
    if isinstance(layer, GroupNorm):
        channels = _channels(layer)
        num_groups = None
        if channels is not None:
            num_groups, _ = core.resolve_groups(channels, layer.num_groups, layer.group_size)
        elif layer.num_groups is not None:
            num_groups = layer.num_groups
        return core.NormRecord(
            kind="group_norm",
            scale=layer.scale,
            bias=layer.bias,
            epsilon=float(layer.epsilon),
            feature_axes=(-1,),
            num_groups=num_groups,
            options=(*opts, ("group_size", layer.group_size)),
        )
    raise AssertionError("unreachable")  # pragma: no cover


def _channels(layer: Module) -> int | None:
    for leaf in (layer.scale, layer.bias):
        if leaf is not None:
            return int(leaf.shape[-1])
    return None


_KINDS: dict[type, str] = {
    BatchNorm: "batch_norm",
    LayerNorm: "layer_norm",
    RMSNorm: "rms_norm",
    GroupNorm: "group_norm",
    InstanceNorm: "instance_norm",
    SpectralNorm: "spectral_norm",
    WeightNorm: "weight_norm",
}


def _layer_kind(layer: Any) -> str:
    for cls, kind in _KINDS.items():
        if isinstance(layer, cls):
            return kind
    raise TypeError(f"from_canonical: {type(layer).__name__} is not a treex normalization layer")


def from_canonical(record: core.NormRecord, like: Module) -> Module:
    """A copy of the initialized treex layer ``like`` holding ``record``'s arrays (inverse of :func:`to_canonical`).

    Layout as in the module docstring: ``(C,)`` feature arrays, SpectralNorm ``u`` written
    back as ``(1, out)``, WeightNorm gains with the kept axes' shape. Everything is validated
    before anything is written, and ``like`` itself is never modified: a record of another
    kind, another ``epsilon`` or (BatchNorm) ``momentum`` (compared at float32, treex's
    precision), other groups, a missing or unexpected array, or another shape or dtype raises
    ``ValueError`` naming the layer and every offending path. BatchNorm accepts the
    ``"ema"`` and ``"ema_blend"`` conventions (both used as is at eval) and de-biases
    ``"zero_debiased"`` statistics with :func:`normbridge.core.debias` (as the linen adapter does).
    The wrapped layer of SpectralNorm/WeightNorm (its kernel) is not part of the record.
    """
    kind = _layer_kind(like)
    name = type(like).__name__
    fn = f"from_canonical({name})"
    if record.kind != kind:
        raise ValueError(f"{fn}: record kind {record.kind!r} does not match; expected {kind!r}")
    errors: list[str] = []
    writes: dict[str, Any] = {}

    def same(what: str, ours: Any, theirs: Any) -> None:
        if ours != theirs:
            errors.append(f"{what} is {ours!r} but the record has {theirs!r}")

    def put(path: str, attr: str, current: Any, value: Any, shape: tuple[int, ...] | None = None) -> None:
        if current is None and value is None:
            return
        if current is None:
            errors.append(f"the record has '{path}' but the layer does not use it (or is not initialized)")
            return
        if value is None:
            errors.append(f"the layer expects '{path}' but the record has none")
            return
        value = jnp.asarray(value)
        want = tuple(current.shape) if shape is None else shape
        if tuple(value.shape) != want:
            errors.append(f"'{path}' has shape {tuple(value.shape)}; the layer expects {want}")
        elif value.dtype != current.dtype:
            errors.append(f"'{path}' has dtype {value.dtype}; the layer stores {current.dtype}")
        else:
            writes[attr] = value.reshape(current.shape)

    same("epsilon", float(like.epsilon), record.epsilon)
    if kind == "spectral_norm":
        vectors = dict(record.spectral)
        for path in sorted(set(vectors) - {"kernel"}):
            errors.append(f"the record has 'spectral/{path}' but the layer normalizes only 'kernel'")
        vec = vectors.get("kernel", core.SpectralVectors())
        if vec.v is not None:
            errors.append("the record has 'spectral/kernel/v' (a two-vector power iteration) that treex cannot hold")
        u_shape = None if like.u is None else (like.u.shape[-1],)
        put("spectral/kernel/u", "u", like.u, vec.u, u_shape)
        put("spectral/kernel/sigma", "sigma", like.sigma, vec.sigma)
    elif kind == "weight_norm":
        scales = dict(record.weight_scales)
        for path in sorted(set(scales) - {"kernel"}):
            errors.append(f"the record has 'weight_scales/{path}' but the layer normalizes only 'kernel'")
        put("weight_scales/kernel", "scale", like.scale, scales.get("kernel"))
    else:
        put("scale", "scale", like.scale, record.scale)
        put("bias", "bias", getattr(like, "bias", None), record.bias)
        if kind == "group_norm":
            channels = _channels(like)
            if channels is not None:
                groups, _ = core.resolve_groups(channels, like.num_groups, like.group_size)
                same("num_groups", groups, record.num_groups)
        if kind == "batch_norm":
            same("momentum (float32)", float(jnp.float32(like.momentum)), _f32(record.momentum))
            mean, var = record.mean, record.var
            if record.stats_convention == "zero_debiased":
                if record.count is None or record.momentum is None:
                    errors.append("a 'zero_debiased' record needs count and momentum")
                else:
                    mean, var = core.debias((jnp.asarray(mean), jnp.asarray(var)), record.momentum, record.count)
            put("mean", "mean", like.mean, mean)
            put("var", "var", like.var, var)
        else:
            put("mean", "-", None, record.mean)
            put("var", "-", None, record.var)
    if errors:
        raise ValueError(f"{fn}: " + "; ".join(errors))
    out = like.copy()
    for attr, value in writes.items():
        out.__dict__[attr] = value.reshape(1, -1) if kind == "spectral_norm" and attr == "u" else value
    return out


def _f32(value: float | None) -> float | None:
    return None if value is None else float(jnp.float32(value))


def _norm_layers(backend: Backend) -> Any:
    """The namespace the converted norm layers come from: the equinox facade, or ``equinox.nn`` on request."""
    eqx = require("equinox", facade="treex", extra="equinox")
    if backend == "equinox":
        return eqx.nn
    try:
        import normbridge.adapters.equinox as facade
    except ImportError:
        if backend == "normbridge":
            raise
        return eqx.nn
    return facade


def _cast(dtype: Any) -> Any:
    eqx = require("equinox", facade="treex", extra="equinox")
    return eqx.nn.Lambda(functools.partial(jnp.asarray, dtype=dtype))


#: Elementwise functions: the same on any layout, so a Lambda of one needs no channels-last round trip.
_ELEMENTWISE = frozenset(
    getattr(jax.nn, a) for a in (
        "relu", "relu6", "gelu", "sigmoid", "silu", "swish", "elu", "celu", "selu", "leaky_relu", "softplus",
        "soft_sign", "log_sigmoid", "hard_tanh", "hard_sigmoid", "hard_silu", "hard_swish", "mish",
    ) if hasattr(jax.nn, a)
) | {jnp.tanh}  # fmt: skip


def _channels_last_call(f: Any, x: jax.Array) -> jax.Array:
    """Apply a treex function (written for a channels-last batch) to one channels-first Equinox example.

    ``x (C, *spatial)`` becomes the batch of one ``(1, *spatial, C)``; a result that keeps the rank goes
    back to channels first, a vector (a global pooling) is returned as is; anything else has no
    unambiguous Equinox layout and is refused (at trace time). A vector input is passed as ``(1, F)``.
    """
    if x.ndim == 1:
        return f(x[None])[0]
    y = f(jnp.moveaxis(x, 0, -1)[None])[0]
    if y.ndim == x.ndim:
        return jnp.moveaxis(y, -1, 0)
    if y.ndim == 1:
        return y
    raise ValueError(
        f"to_equinox: a Lambda maps a {x.ndim}-D example to {y.ndim}-D: neither channels-first spatial nor a "
        "vector, so its Equinox layout is ambiguous"
    )


def _flatten_channels_last(x: jax.Array) -> jax.Array:
    """treex ``Flatten`` of one channels-first example: flatten in treex's (channels-last) order."""
    return jnp.ravel(jnp.moveaxis(x, 0, -1)) if x.ndim > 1 else x


def _require_vector(x: jax.Array) -> jax.Array:
    """Guard before ``eqx.nn.Linear`` where the layout is known only at trace time."""
    if x.ndim != 1:
        raise ValueError(
            f"to_equinox: Linear gets a {x.ndim}-D channels-first example (treex applies it to the channels "
            "axis; eqx.nn.Linear takes one vector): add a Flatten or a pooling Lambda before it"
        )
    return x


def _vmapped_lookup(embedding: Any, x: jax.Array) -> jax.Array:
    """``eqx.nn.Embedding`` takes one id; treex's ``Embed`` any array of ids."""
    f = embedding
    for _ in range(jnp.ndim(x)):
        f = jax.vmap(f)
    return f(x)


def _lookup_module(embedding: Any) -> Any:
    eqx = require("equinox", facade="treex", extra="equinox")

    class EmbeddingLookup(eqx.Module):
        """``eqx.nn.Embedding`` over every id of ``x`` (treex ``Embed`` semantics, per example)."""

        embedding: Any

        def __call__(self, x: jax.Array, *, key: Any = None) -> jax.Array:
            return _vmapped_lookup(self.embedding, x)

    return EmbeddingLookup(embedding)


def _conv(module: Conv, key: jax.Array) -> Any:
    """``eqx.nn.Conv`` with the treex Conv's configuration (its weights are written by :func:`normbridge.convert`)."""
    eqx = require("equinox", facade="treex", extra="equinox")
    if module.kernel is None:
        raise ValueError("to_equinox: Conv is not initialized (kernel is None)")
    if module.input_dilation not in (None, 1) and set(_tuple(module.input_dilation, 1)) != {1}:
        raise ValueError("to_equinox: Conv with input_dilation has no eqx.nn.Conv equivalent")
    kernel = module.kernel
    n = kernel.ndim - 2
    window = tuple(kernel.shape[:n])
    in_channels = int(kernel.shape[-2]) * int(module.feature_group_count)
    out_channels = int(kernel.shape[-1])
    dilation = _tuple(module.kernel_dilation, n)
    padding: Any = module.padding
    padding_mode = "ZEROS"
    if padding == "CIRCULAR":
        eff = [(k - 1) * d + 1 for k, d in zip(window, dilation)]
        padding, padding_mode = tuple(((e - 1) // 2, e // 2) for e in eff), "CIRCULAR"
    elif not isinstance(padding, str):
        padding = tuple(tuple(int(v) for v in p) for p in padding)
    return eqx.nn.Conv(
        n, in_channels, out_channels, window, stride=_tuple(module.strides, n), padding=padding,
        dilation=dilation, groups=int(module.feature_group_count), use_bias=module.use_bias,
        padding_mode=padding_mode, dtype=kernel.dtype, key=key,
    )  # fmt: skip


def _tuple(value: Any, n: int) -> tuple[int, ...]:
    if value is None:
        return (1,) * n
    if isinstance(value, int):
        return (value,) * n
    return tuple(int(v) for v in value)


def _linear(module: Linear, key: jax.Array) -> Any:
    eqx = require("equinox", facade="treex", extra="equinox")
    if module.kernel is None:
        raise ValueError("to_equinox: Linear is not initialized (kernel is None)")
    n_in, n_out = module.kernel.shape
    return eqx.nn.Linear(n_in, n_out, use_bias=module.use_bias, dtype=module.kernel.dtype, key=key)


def _join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


#: What the builder returns for one treex module: the Equinox layers, the activation's layout after them
#: (see :func:`_convert`), and ``{treex path: (index into the layers, path inside that layer)}`` for every
#: layer holding arrays (the ``mapping`` handed to :func:`normbridge.convert`).
Built = tuple[list[Any], "bool | None", dict[str, tuple[int, str]]]


def _convert(module: Any, path: str, norms: Any, key: jax.Array, axis_name: str, spatial: bool | None) -> Built:
    """The Equinox architecture for one treex module (a list, to allow a trailing dtype cast), whether the
    activation after it is a channels-first spatial array (Equinox's layout, ``True``), a vector (``False``)
    or decided by its rank at trace time (``None``, after a non-elementwise Lambda), and where each treex
    layer's arrays go. Weights and statistics are placeholders: :func:`normbridge.convert` writes them."""
    eqx = require("equinox", facade="treex", extra="equinox")
    dtype = getattr(module, "dtype", jnp.float32)
    cast = [_cast(dtype)] if jnp.dtype(dtype) != jnp.float32 else []
    if isinstance(module, Sequential):
        out: list[Any] = []
        where: dict[str, tuple[int, str]] = {}
        for i, layer in enumerate(module.layers):
            sub, spatial, sub_where = _convert(
                layer, _join(path, f"layers/{i}"), norms, jax.random.fold_in(key, i), axis_name, spatial
            )
            where |= {t: (0, _join(f"layers/{len(out) + k}", rest)) for t, (k, rest) in sub_where.items()}
            out.extend(sub)
        return [eqx.nn.Sequential(out)], spatial, where
    if isinstance(module, Lambda):
        if not spatial or module.f in _ELEMENTWISE:
            return [eqx.nn.Lambda(module.f)], spatial, {}
        return [eqx.nn.Lambda(functools.partial(_channels_last_call, module.f))], None, {}
    if isinstance(module, Flatten):
        return [eqx.nn.Lambda(jnp.ravel if spatial is False else _flatten_channels_last)], False, {}
    if isinstance(module, Dropout):
        # Inference mode: identity, as treex's eval(). (Equinox's own mask would differ from treex's anyway.)
        return [eqx.nn.Dropout(module.rate, inference=True)], spatial, {}
    if isinstance(module, Embed):
        if module.embedding is None:
            raise ValueError("to_equinox: Embed is not initialized (embedding is None)")
        num, features = module.embedding.shape
        emb = eqx.nn.Embedding(int(num), int(features), weight=jnp.zeros_like(module.embedding))
        return [_lookup_module(emb), *cast], False, {path: (0, "embedding")}
    if isinstance(module, MLP):
        out = []
        where = {}
        for i, (name, layer) in enumerate(zip(module._subtrees, module.layers)):
            where[_join(path, name)] = (0, f"layers/{len(out)}")  # treex's child names: linear, linear2, ...
            out.append(_linear(layer, jax.random.fold_in(key, i)))
            if jnp.dtype(layer.dtype) != jnp.float32:
                out.append(_cast(layer.dtype))
            if i < len(module.layers) - 1:
                out.append(eqx.nn.Lambda(module.activation))
        return [eqx.nn.Sequential(out)], False, where
    if isinstance(module, Conv):
        return [_conv(module, key), *cast], True, {path: (0, "")}
    if isinstance(module, ConvTranspose):
        raise TypeError(
            "to_equinox: ConvTranspose is not converted: eqx.nn.ConvTranspose's padding refers to the forward "
            "convolution, flax 0.4.1's to lax.conv_transpose; no verified mapping"
        )
    if isinstance(module, Linear):
        if spatial:
            raise ValueError(
                "to_equinox: Linear on a spatial activation (treex applies it to the channels axis; "
                "eqx.nn.Linear takes one vector): add a Flatten or a pooling Lambda before it"
            )
        if spatial is False:
            return [_linear(module, key), *cast], False, {path: (0, "")}
        return [eqx.nn.Lambda(_require_vector), _linear(module, key), *cast], False, {path: (1, "")}
    if not isinstance(module, (BatchNorm, LayerNorm, GroupNorm)):
        raise TypeError(f"to_equinox: no Equinox equivalent for {type(module).__name__}")
    record = to_canonical(module)  # the configuration (eps, momentum, groups); convert writes the arrays
    if isinstance(module, BatchNorm):
        if module.mean is None:
            raise ValueError("to_equinox: BatchNorm is not initialized (mean is None)")
        layer = norms.BatchNorm(
            int(module.mean.shape[0]),
            axis_name=axis_name,
            eps=record.epsilon,
            channelwise_affine=True,
            momentum=record.momentum,
            inference=True,
            mode="ema",
        )
    elif isinstance(module, LayerNorm):
        channels = _channels(module)
        if channels is None:
            raise ValueError("to_equinox: a LayerNorm without scale and bias does not know its size")
        layer = norms.LayerNorm(channels, eps=record.epsilon, use_weight=module.use_scale, use_bias=module.use_bias)
    else:
        channels = _channels(module)
        if channels is None or record.num_groups is None:
            raise ValueError("to_equinox: a GroupNorm without scale and bias does not know its channels")
        layer = norms.GroupNorm(record.num_groups, channels, eps=record.epsilon, channelwise_affine=True)
    return [layer, *cast], spatial, {path: (0, "")}


def _first_layer(module: Any) -> Any:
    while isinstance(module, Sequential) and module.layers:
        module = module.layers[0]
    return module


def _probes(probe: Any, spatial: bool) -> tuple[Any, Any]:
    """``(treex probe, Equinox probe)``: a pair as given, else the treex batch and, where the model starts
    with a Conv (channels last in treex, first in Equinox), the same batch with its last axis moved to 1."""
    if isinstance(probe, tuple) and len(probe) == 2:
        return probe
    x = jnp.asarray(probe)
    return x, (jnp.moveaxis(x, -1, 1) if spatial else x)


def to_equinox(
    module: Module,
    *,
    backend: Backend = "auto",
    axis_name: str = "batch",
    key: jax.Array | None = None,
    probe: Any = None,
    return_report: bool = False,
) -> Any:
    """``(equinox_model, eqx.nn.State)`` computing what ``module.eval()`` computes (see the module docstring).

    A thin wrapper over :func:`normbridge.convert`: this function only builds the Equinox architecture
    (layer classes and configuration from the treex model; Lambda and Flatten keep treex's channels-last
    order), then ``convert(module, like, mapping=<where each treex layer went>, probe=..., verify=...)``
    pairs, writes every array (layouts, BatchNorm statistics into the State) and verifies.

    ``probe``: an input batch as the treex model takes it (or a pair ``(treex_probe, equinox_probe)``;
    a single batch is moved to channels first where the model starts with a Conv). With it the
    conversion is **verified**: both models run in eval mode and their outputs must agree within
    ``normbridge.conversion.CROSS_RTOL``, else :class:`~normbridge.errors.ConversionError`. Without it
    the conversion is **unverified** (a treex model does not record the input shape it was initialised
    with, so no probe is derived) and the report says so. ``return_report=True`` returns
    ``(model, state, report)`` (a :class:`~normbridge.conversion.ConversionReport`).

    ``key`` only seeds the throw-away initial weights of the Equinox layers (they are all replaced).
    The result is in inference mode; train it further with ``eqx.nn.inference_mode(model, False)``
    (equinox's ema rules then apply).
    """
    eqx = require("equinox", facade="treex", extra="equinox")
    from normbridge.conversion import convert

    norms = _norm_layers(backend)
    key = jax.random.PRNGKey(0) if key is None else key
    spatial = isinstance(_first_layer(module), (Conv, ConvTranspose))
    layers, _, where = _convert(module, "", norms, key, axis_name, spatial)
    model = layers[0] if len(layers) == 1 else eqx.nn.Sequential(layers)
    mapping = {t: _join("" if len(layers) == 1 else f"layers/{k}", rest) for t, (k, rest) in where.items()}
    like = (model, eqx.nn.State(model))
    probes = None if probe is None else _probes(probe, spatial)
    (model, state), report = convert(module, like, mapping=mapping, probe=probes, verify=probe is not None)
    return (model, state, report) if return_report else (model, state)
