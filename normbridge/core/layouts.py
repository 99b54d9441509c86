"""Array layouts of the non-normalization layers, and the pure functions between them.

The canonical layout of every layer kind is flax's (shared by ``flax.linen``, ``flax.nnx`` and
treex); Equinox stores the same numbers transposed or reshaped. Every conversion here is a
transpose or a reshape (no arithmetic), so ``canonical → equinox → canonical`` is bit-exact.

================  ===========================================  ==========================================
kind              canonical (flax family)                      equinox
================  ===========================================  ==========================================
``dense``         ``kernel (in, out)``, ``bias (out,)``        ``Linear.weight (out, in)``, ``bias (out,)``
``dense_general`` ``kernel (*in, *out)``, ``bias (*out,)``     (no equivalent)
``conv``          ``kernel (*window, in/groups, out)`` (HWIO),  ``Conv.weight (out, in/groups, *window)``
                  ``bias (out,)``                              (OIHW), ``bias (out, 1, ..., 1)``
``conv_transpose`` ``kernel (*window, in, out)``, ``bias``      ``ConvTranspose.weight (out, in, *window)``,
                                                               ``bias (out, 1, ..., 1)`` (neither flips the
                                                               window: flax ``transpose_kernel=False``)
``embed``         ``embedding (num, features)``                ``Embedding.weight (num, features)``
``attention``     ``query|key|value/kernel (D, H, Dh)``,       ``query_proj|key_proj|value_proj.weight
                  ``query|key|value/bias (H, Dh)``,            (H·Dh, D)``, ``bias (H·Dh,)``;
                  ``out/kernel (H, Dh, Do)``, ``out/bias (Do,)``  ``output_proj.weight (Do, H·Dh)``, ``bias (Do,)``
================  ===========================================  ==========================================

Head ``h``, dimension ``d`` of a projection is row ``h·Dh + d`` of Equinox's weight (Equinox splits
heads with ``reshape(seq, H, -1)``, C order), so the head split is a plain C-order reshape.

A canonical record is a flat ``{"/"-joined name: array}`` dict, e.g. ``{"kernel": ..., "bias": ...}``
or ``{"query/kernel": ..., "out/bias": ...}``; absent biases are absent keys. Pure ``jax.numpy``;
no framework is imported here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "ATTENTION_PROJECTIONS",
    "LAYOUT_KINDS",
    "conv_bias_from_vector",
    "conv_bias_to_vector",
    "equinox_from_canonical",
    "equinox_to_canonical",
    "heads_bias_from_canonical",
    "heads_bias_to_canonical",
    "heads_kernel_from_weight",
    "heads_weight_from_kernel",
    "hwio_from_oihw",
    "kernel_from_linear_weight",
    "linear_weight_from_kernel",
    "oihw_from_hwio",
    "out_kernel_from_weight",
    "out_weight_from_kernel",
]

#: Layer kinds whose layouts this module converts.
LAYOUT_KINDS: tuple[str, ...] = ("dense", "dense_general", "conv", "conv_transpose", "embed", "attention")
#: Canonical attention projection names (flax) → Equinox ``MultiheadAttention`` field names.
ATTENTION_PROJECTIONS: dict[str, str] = {
    "query": "query_proj",
    "key": "key_proj",
    "value": "value_proj",
    "out": "output_proj",
}


# --------------------------------------------------------------------------- dense


def kernel_from_linear_weight(weight: jax.Array) -> jax.Array:
    """Equinox ``Linear.weight (out, in)`` → flax ``kernel (in, out)``: ``weight.T``."""
    return jnp.asarray(weight).T


def linear_weight_from_kernel(kernel: jax.Array) -> jax.Array:
    """flax ``kernel (in, out)`` → Equinox ``Linear.weight (out, in)``: ``kernel.T``."""
    kernel = jnp.asarray(kernel)
    if kernel.ndim != 2:
        raise ValueError(f"linear_weight_from_kernel: kernel has shape {kernel.shape}; expected (in, out)")
    return kernel.T


# --------------------------------------------------------------------------- convolution


def hwio_from_oihw(weight: jax.Array) -> jax.Array:
    """Equinox ``(out, in, *window)`` → flax ``(*window, in, out)``."""
    weight = jnp.asarray(weight)
    n = weight.ndim - 2
    if n < 1:
        raise ValueError(f"hwio_from_oihw: weight has shape {weight.shape}; expected (out, in, *window)")
    return jnp.transpose(weight, (*range(2, 2 + n), 1, 0))


def oihw_from_hwio(kernel: jax.Array) -> jax.Array:
    """flax ``(*window, in, out)`` → Equinox ``(out, in, *window)`` (inverse of :func:`hwio_from_oihw`)."""
    kernel = jnp.asarray(kernel)
    n = kernel.ndim - 2
    if n < 1:
        raise ValueError(f"oihw_from_hwio: kernel has shape {kernel.shape}; expected (*window, in, out)")
    return jnp.transpose(kernel, (n + 1, n, *range(n)))


def conv_bias_to_vector(bias: jax.Array) -> jax.Array:
    """Equinox conv bias ``(out, 1, ..., 1)`` → ``(out,)``."""
    bias = jnp.asarray(bias)
    if any(d != 1 for d in bias.shape[1:]):
        raise ValueError(f"conv_bias_to_vector: bias has shape {bias.shape}; expected (out, 1, ..., 1)")
    return bias.reshape(bias.shape[:1])


def conv_bias_from_vector(bias: jax.Array, num_spatial_dims: int) -> jax.Array:
    """``(out,)`` → Equinox conv bias ``(out, 1, ..., 1)`` with ``num_spatial_dims`` ones."""
    bias = jnp.asarray(bias)
    if bias.ndim != 1:
        raise ValueError(f"conv_bias_from_vector: bias has shape {bias.shape}; expected (out,)")
    return bias.reshape((bias.shape[0],) + (1,) * num_spatial_dims)


# --------------------------------------------------------------------------- attention


def heads_kernel_from_weight(weight: jax.Array, num_heads: int) -> jax.Array:
    """Equinox projection ``(H·Dh, D)`` → flax ``(D, H, Dh)``."""
    weight = jnp.asarray(weight)
    if weight.ndim != 2 or weight.shape[0] % num_heads:
        raise ValueError(f"heads_kernel_from_weight: weight {weight.shape} does not split into {num_heads} heads")
    return weight.T.reshape(weight.shape[1], num_heads, weight.shape[0] // num_heads)


def heads_weight_from_kernel(kernel: jax.Array) -> jax.Array:
    """flax ``(D, H, Dh)`` → Equinox projection ``(H·Dh, D)``."""
    kernel = jnp.asarray(kernel)
    if kernel.ndim != 3:
        raise ValueError(f"heads_weight_from_kernel: kernel has shape {kernel.shape}; expected (D, H, Dh)")
    return kernel.reshape(kernel.shape[0], -1).T


def heads_bias_to_canonical(bias: jax.Array, num_heads: int) -> jax.Array:
    """Equinox projection bias ``(H·Dh,)`` → flax ``(H, Dh)``."""
    bias = jnp.asarray(bias)
    return bias.reshape(num_heads, bias.shape[0] // num_heads)


def heads_bias_from_canonical(bias: jax.Array) -> jax.Array:
    """flax ``(H, Dh)`` → Equinox ``(H·Dh,)``."""
    return jnp.asarray(bias).reshape(-1)


def out_kernel_from_weight(weight: jax.Array, num_heads: int) -> jax.Array:
    """Equinox ``output_proj.weight (Do, H·Dh)`` → flax ``out/kernel (H, Dh, Do)``."""
    weight = jnp.asarray(weight)
    if weight.ndim != 2 or weight.shape[1] % num_heads:
        raise ValueError(f"out_kernel_from_weight: weight {weight.shape} does not split into {num_heads} heads")
    return weight.T.reshape(num_heads, weight.shape[1] // num_heads, weight.shape[0])


def out_weight_from_kernel(kernel: jax.Array) -> jax.Array:
    """flax ``out/kernel (H, Dh, Do)`` → Equinox ``output_proj.weight (Do, H·Dh)``."""
    kernel = jnp.asarray(kernel)
    if kernel.ndim != 3:
        raise ValueError(f"out_weight_from_kernel: kernel has shape {kernel.shape}; expected (H, Dh, Do)")
    return kernel.reshape(-1, kernel.shape[-1]).T


# --------------------------------------------------------------------------- whole records


def equinox_to_canonical(kind: str, arrays: Mapping[str, Any], *, num_heads: int | None = None) -> dict[str, Any]:
    """Canonical record of an Equinox layer's arrays.

    ``arrays``: ``{"weight", "bias"}`` for ``dense``/``conv``/``conv_transpose``/``embed``
    (``bias`` absent or ``None`` when unused); for ``attention``
    ``{"query_proj/weight", "query_proj/bias", ..., "output_proj/bias"}`` and ``num_heads``.
    """
    arrays = {k: v for k, v in arrays.items() if v is not None}
    if kind == "dense":
        out = {"kernel": kernel_from_linear_weight(arrays["weight"])}
        if "bias" in arrays:
            out["bias"] = jnp.asarray(arrays["bias"])
        return out
    if kind in ("conv", "conv_transpose"):
        out = {"kernel": hwio_from_oihw(arrays["weight"])}
        if "bias" in arrays:
            out["bias"] = conv_bias_to_vector(arrays["bias"])
        return out
    if kind == "embed":
        return {"embedding": jnp.asarray(arrays["weight"])}
    if kind == "attention":
        if num_heads is None:
            raise ValueError("equinox_to_canonical(attention): num_heads is required")
        out = {}
        for name, field in ATTENTION_PROJECTIONS.items():
            weight = arrays[f"{field}/weight"]
            if name == "out":
                out["out/kernel"] = out_kernel_from_weight(weight, num_heads)
                if f"{field}/bias" in arrays:
                    out["out/bias"] = jnp.asarray(arrays[f"{field}/bias"])
            else:
                out[f"{name}/kernel"] = heads_kernel_from_weight(weight, num_heads)
                if f"{field}/bias" in arrays:
                    out[f"{name}/bias"] = heads_bias_to_canonical(arrays[f"{field}/bias"], num_heads)
        return out
    raise ValueError(f"equinox_to_canonical: Equinox has no layer of kind {kind!r}")


def equinox_from_canonical(
    kind: str, record: Mapping[str, Any], *, num_spatial_dims: int | None = None
) -> dict[str, Any]:
    """Equinox arrays (keys as :func:`equinox_to_canonical` takes them) of a canonical record."""
    if kind == "dense":
        out = {"weight": linear_weight_from_kernel(record["kernel"])}
        if "bias" in record:
            out["bias"] = jnp.asarray(record["bias"])
        return out
    if kind in ("conv", "conv_transpose"):
        kernel = jnp.asarray(record["kernel"])
        out = {"weight": oihw_from_hwio(kernel)}
        if "bias" in record:
            n = kernel.ndim - 2 if num_spatial_dims is None else num_spatial_dims
            out["bias"] = conv_bias_from_vector(record["bias"], n)
        return out
    if kind == "embed":
        return {"weight": jnp.asarray(record["embedding"])}
    if kind == "attention":
        out = {}
        for name, field in ATTENTION_PROJECTIONS.items():
            kernel = record[f"{name}/kernel"]
            if name == "out":
                out[f"{field}/weight"] = out_weight_from_kernel(kernel)
                if "out/bias" in record:
                    out[f"{field}/bias"] = jnp.asarray(record["out/bias"])
            else:
                out[f"{field}/weight"] = heads_weight_from_kernel(kernel)
                if f"{name}/bias" in record:
                    out[f"{field}/bias"] = heads_bias_from_canonical(record[f"{name}/bias"])
        return out
    raise ValueError(f"equinox_from_canonical: Equinox has no layer of kind {kind!r}")
