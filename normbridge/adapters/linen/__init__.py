"""``flax.linen`` facade: drop-in replacements for linen's seven normalization modules.

Swap linen's ``BatchNorm`` for ``normbridge.adapters.linen.BatchNorm`` (and so on):
the fields, variable collections, names, shapes, dtypes, init values, train/eval rules,
errors, outputs and gradients stay the same, and every number comes from
:mod:`normbridge.core`. :func:`to_canonical` / :func:`from_canonical` convert one
layer's variable subtree to the framework-neutral :class:`~normbridge.core.NormRecord`
and back, bit for bit (native linen modules are accepted too: same layout).
"""

from normbridge.adapters.linen.convert import from_canonical, to_canonical
from normbridge.adapters.linen.layers import (
    BatchNorm,
    GroupNorm,
    InstanceNorm,
    LayerNorm,
    RMSNorm,
    SpectralNorm,
    WeightNorm,
)

__all__ = [
    "BatchNorm",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "RMSNorm",
    "SpectralNorm",
    "WeightNorm",
    "from_canonical",
    "to_canonical",
]
