"""Equinox facade: drop-in replacements for ``equinox.nn``'s normalization layers.

Every number comes from :mod:`normbridge.core`; this package only reproduces
equinox's constructor signatures, pytree fields, ``eqx.nn.State`` entries and call
conventions. Beyond native: :class:`InstanceNorm`, :func:`to_canonical` /
:func:`from_canonical` (for facade and native layers) and a named, path-keyed
checkpoint format (:func:`save` / :func:`load`) that also reads plain
``eqx.tree_serialise_leaves`` files.
"""

from normbridge.adapters.equinox.batch_norm import BatchNorm
from normbridge.adapters.equinox.canonical import from_canonical, to_canonical
from normbridge.adapters.equinox.checkpoint import CheckpointMismatchError, LoadReport, load, save
from normbridge.adapters.equinox.normalisation import GroupNorm, InstanceNorm, LayerNorm, RMSNorm
from normbridge.adapters.equinox.wrappers import SpectralNorm, WeightNorm

__all__ = [
    "BatchNorm",
    "CheckpointMismatchError",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "LoadReport",
    "RMSNorm",
    "SpectralNorm",
    "WeightNorm",
    "from_canonical",
    "load",
    "save",
    "to_canonical",
]
