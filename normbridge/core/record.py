"""The canonical state record that every facade's checkpoint layout converts to and from.

Conversion between facades is hub-and-spoke: ``facade A → NormRecord → facade B``.
A record holds arrays in one agreed layout and the hyper-parameters that change
the math, so that a converter can refuse a conversion that would change results.

Canonical layout
----------------
* ``scale``/``bias``: shape = sizes of the feature axes in flax's order, e.g.
  ``(C,)`` or ``(4, 6)``; for equinox LayerNorm/RMSNorm the full normalized shape.
* ``mean``/``var``: running statistics, feature-shaped, stored exactly as the
  owning framework stores them; ``stats_convention`` says how to read them:

  - ``"ema"``: flax/treex, EMA from ``(0, 1)``, used as is at eval;
  - ``"ema_blend"``: equinox ``mode="ema"``, used as is, ``count == 0`` means the
    first training call takes the batch statistics;
  - ``"zero_debiased"``: equinox ``mode="batch"``, the hidden EMA from ``(0, 1)``,
    divided by ``1 - momentum**count`` at eval.

* ``count``: number of statistic updates where the framework keeps one.
* ``spectral``: per normalized weight path (``"kernel"``, ``"inner/kernel"``),
  :class:`SpectralVectors` with ``u`` in the output space, shape ``(out,)``,
  ``v`` in the input space (flattened), ``sigma`` a scalar; absent ones are ``None``.
* ``weight_scales``: per normalized weight path, the weight-norm gain with the
  shape of the kept (feature) axes, e.g. ``(out,)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import jax

LayerKind = Literal[
    "batch_norm", "layer_norm", "rms_norm", "group_norm", "instance_norm", "spectral_norm", "weight_norm"
]
StatsConvention = Literal["ema", "ema_blend", "zero_debiased"]
LAYER_KINDS: tuple[str, ...] = (
    "batch_norm",
    "layer_norm",
    "rms_norm",
    "group_norm",
    "instance_norm",
    "spectral_norm",
    "weight_norm",
)
#: Layer class name (the same in flax.linen, flax.nnx, equinox.nn, treex and the facades) → record kind.
KIND_OF_CLASS: dict[str, str] = {
    "BatchNorm": "batch_norm",
    "LayerNorm": "layer_norm",
    "RMSNorm": "rms_norm",
    "GroupNorm": "group_norm",
    "InstanceNorm": "instance_norm",
    "SpectralNorm": "spectral_norm",
    "WeightNorm": "weight_norm",
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SpectralVectors:
    """Power-iteration state of one weight: ``u`` ``(out,)``, ``v`` ``(in,)``, ``sigma`` ``()``."""

    u: jax.Array | None = None
    v: jax.Array | None = None
    sigma: jax.Array | None = None


def _static(default: Any = None) -> Any:
    return dataclasses.field(default=default, metadata={"static": True})


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NormRecord:
    """Framework-neutral state of one normalization layer (a pytree; config is static)."""

    kind: str = _static()
    scale: jax.Array | None = None
    bias: jax.Array | None = None
    mean: jax.Array | None = None
    var: jax.Array | None = None
    count: jax.Array | None = None
    spectral: Mapping[str, SpectralVectors] = dataclasses.field(default_factory=dict)
    weight_scales: Mapping[str, jax.Array] = dataclasses.field(default_factory=dict)
    epsilon: float | None = _static()
    momentum: float | None = _static()
    stats_convention: str | None = _static()
    feature_axes: tuple[int, ...] | None = _static()
    reduction_axes: tuple[int, ...] | None = _static()
    num_groups: int | None = _static()
    #: Other settings that change the math, as sorted ``(name, value)`` pairs.
    options: tuple[tuple[str, Any], ...] = _static(())

    def __post_init__(self) -> None:
        if self.kind not in LAYER_KINDS:
            raise ValueError(f"NormRecord: kind must be one of {LAYER_KINDS}, got {self.kind!r}")
        if self.stats_convention not in (None, "ema", "ema_blend", "zero_debiased"):
            raise ValueError(f"NormRecord: unknown stats_convention {self.stats_convention!r}")
        object.__setattr__(self, "options", tuple(sorted(dict(self.options).items())))

    def option(self, name: str, default: Any = None) -> Any:
        """Value of one entry of :attr:`options`."""
        return dict(self.options).get(name, default)

    def replace(self, **changes: Any) -> NormRecord:
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def arrays(self) -> dict[str, jax.Array]:
        """Every array in the record keyed by a ``/``-joined name (for diffs and error messages)."""
        flat, _ = jax.tree_util.tree_flatten_with_path(self)
        return {jax.tree_util.keystr(p, simple=True, separator="/"): leaf for p, leaf in flat}
