"""``flax.nnx`` facade: drop-in replacements for nnx's seven normalization modules.

Swap ``flax.nnx.BatchNorm`` for ``normbridge.adapters.nnx.BatchNorm`` (and so on): the
constructor, ``nnx.state`` layout (paths, Variable types, shapes, dtypes, init values),
train/eval flags (``.train()``, ``.eval()``, ``nnx.view``), outputs and gradients stay the
same, with every number from :mod:`normbridge.core`. Deliberate deviations from nnx
0.12.8 bugs (GroupNorm axis-1 broadcast, SpectralNorm/WeightNorm kernel overwrite,
WeightNorm gains that are not Params, float masks) follow linen; see ``docs/nnx.md``.

* :func:`to_canonical` / :func:`from_canonical`: one layer's state ⇄
  :class:`~normbridge.core.NormRecord` (facade or native nnx layers).
* :func:`load_native_state`: fill a facade model from a native nnx state/checkpoint.
* :func:`migrate_linen_checkpoint`: fill an NNX model from a linen ``variables`` dict,
  msgpack file or Orbax directory.
"""

from normbridge.adapters.nnx._common import promote_dtype
from normbridge.adapters.nnx.convert import (
    from_canonical,
    load_native_state,
    restore_native_checkpoint,
    to_canonical,
)
from normbridge.adapters.nnx.layers import BatchNorm, GroupNorm, InstanceNorm, LayerNorm, RMSNorm
from normbridge.adapters.nnx.migrate import MigrationError, migrate_linen_checkpoint
from normbridge.adapters.nnx.wrappers import SpectralNorm, WeightNorm

__all__ = [
    "BatchNorm",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "MigrationError",
    "RMSNorm",
    "SpectralNorm",
    "WeightNorm",
    "from_canonical",
    "load_native_state",
    "migrate_linen_checkpoint",
    "promote_dtype",
    "restore_native_checkpoint",
    "to_canonical",
]
