"""SpectralNorm / WeightNorm records between the flax family and Equinox, which keep different state.

The per-layer records refuse these pairs (the state means different things); with the wrapped layer's
weight at hand the engine can map one to the other for **eval** behaviour:

* SpectralNorm, flax → Equinox: flax runs ``n_steps`` power-iteration steps from its stored ``u`` on
  every call (also in eval) and divides by ``σ = v W uᵀ``; Equinox at inference divides by
  ``σ = uᵀ W v`` with its stored ``(u, v)`` and no iteration. Storing flax's iterated ``(u, v)``
  (:func:`normbridge.core.power_iteration_flax`) in Equinox gives the same σ.
* SpectralNorm, Equinox → flax: flax's ``u`` is Equinox's ``u`` and ``σ`` its ``uᵀ W v``; flax then
  iterates from ``u``, which gives the same σ only where Equinox's iteration has converged. The
  verification decides (it refuses a state that is not converged).
* WeightNorm: the gain per output unit is the same number (flax ``kernel (in, out)`` with
  ``feature_axes=-1``, Equinox ``weight (out, in)`` with ``axis=0``); flax adds ``epsilon`` (1e-12)
  under the square root, Equinox does not: a relative difference of ``eps/‖w‖²``.

Only a dense wrapped layer is mapped (a convolution's flattened input order differs between the two).
Training continues with each framework's own iteration, so train behaviour is not the same.
"""

from __future__ import annotations

import jax.numpy as jnp

from normbridge import core
from normbridge.conversion.base import Layer
from normbridge.core import NormRecord, SpectralVectors


def _dense_kernel(layer: Layer) -> jnp.ndarray:
    inner = layer.inner
    if inner is None or inner.kind != "dense":
        raise ValueError(f"{layer.path}: only a wrapped Dense/Linear maps between flax and Equinox")
    return jnp.asarray(inner.record["kernel"])  # canonical (in, out) on both sides


def wrapper_record(a: Layer, b: Layer, source_family: str) -> NormRecord:
    """The record for ``b`` (the other family's wrapper) that gives ``a``'s eval behaviour."""
    kernel = _dense_kernel(a)
    if a.kind == "spectral_norm":
        if source_family == "flax":
            vectors = dict(a.record.spectral)
            if set(vectors) != {"kernel"} or vectors["kernel"].u is None:
                raise ValueError(f"{a.path}: expected one spectral vector for 'kernel', found {sorted(vectors)}")
            n_steps = a.record.option("n_steps") or 1
            u, v = core.power_iteration_flax(
                kernel, jnp.asarray(vectors["kernel"].u)[None, :], n_steps, a.record.epsilon
            )
            spectral = {b.module.weight_name: SpectralVectors(u=u[0], v=v[0])}
            return NormRecord(kind=a.kind, spectral=spectral, epsilon=b.record.epsilon, options=b.record.options)
        ((_, vec),) = dict(a.record.spectral).items()
        sigma = core.sigma_eqx(kernel.T, jnp.asarray(vec.u), jnp.asarray(vec.v))
        return NormRecord(
            kind=a.kind,
            spectral={"kernel": SpectralVectors(u=vec.u, sigma=sigma.astype(jnp.asarray(vec.u).dtype))},
            epsilon=b.record.epsilon,
            options=b.record.options,
        )
    # weight_norm
    if source_family == "flax":
        if a.record.feature_axes not in ((-1,), (1,)) or b.record.option("kept_axis") != 0:
            raise ValueError(f"{a.path}: WeightNorm maps only per output unit (flax feature_axes=-1, Equinox axis=0)")
        (g,) = dict(a.record.weight_scales).values()
        return NormRecord(
            kind=a.kind,
            weight_scales={b.module.weight_name: g},
            feature_axes=b.record.feature_axes,
            options=b.record.options,
        )
    if a.record.option("kept_axis") != 0 or b.record.feature_axes not in ((-1,), (1,)):
        raise ValueError(f"{a.path}: WeightNorm maps only per output unit (flax feature_axes=-1, Equinox axis=0)")
    (g,) = dict(a.record.weight_scales).values()
    return NormRecord(
        kind=a.kind,
        weight_scales={"kernel": jnp.asarray(g).reshape(-1)},
        epsilon=b.record.epsilon,
        feature_axes=b.record.feature_axes,
        options=b.record.options,
    )
