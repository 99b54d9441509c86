"""treex facade: a treex 0.6.12-compatible module system on ``treeo``, and safe loading of treex checkpoints.

treex is unmaintained and no longer imports; this package reproduces what its
users had (``Module`` with lazy ``init``, ``train``/``eval``/``freeze``, kinds and
``filter``; ``BatchNorm``/``LayerNorm``/``GroupNorm`` exactly as treex configured
flax 0.4.1; ``Linear``/``Sequential``/``Lambda``, ``Conv``/``ConvTranspose``, ``Embed``,
``Dropout``/``KeySeq``, ``Flatten``, ``MLP``) with every number computed by
:mod:`normbridge.core`, plus ``RMSNorm``/``InstanceNorm``/``SpectralNorm``/
``WeightNorm`` in treex style (additions treex never had). :func:`load` reads
real treex checkpoints (pickle, cloudpickle, msgpack, npz) without executing
anything from the file; :func:`save` writes them; :func:`to_canonical` / :func:`from_canonical`
convert one layer to and from :class:`~normbridge.core.NormRecord`; :func:`to_equinox` converts a
loaded model to Equinox.
"""

from normbridge.adapters.treex.conv import Conv, ConvTranspose
from normbridge.adapters.treex.dropout import Dropout, KeySeq
from normbridge.adapters.treex.extra import InstanceNorm, RMSNorm, SpectralNorm, WeightNorm
from normbridge.adapters.treex.layers import MLP, Embed, Flatten, Lambda, Linear, Sequential
from normbridge.adapters.treex.module import (
    BatchStat,
    Cache,
    ModelState,
    Module,
    OptState,
    Parameter,
    Rng,
    State,
    TreePart,
)
from normbridge.adapters.treex.norm import BatchNorm, GroupNorm, LayerNorm
from normbridge.adapters.treex.serialization import CheckpointError, UnsafePickleError, dumps, load, save, state_dict
from normbridge.adapters.treex.to_equinox import from_canonical, to_canonical, to_equinox

__all__ = [
    "MLP",
    "BatchNorm",
    "BatchStat",
    "Cache",
    "CheckpointError",
    "Conv",
    "ConvTranspose",
    "Dropout",
    "Embed",
    "Flatten",
    "GroupNorm",
    "InstanceNorm",
    "KeySeq",
    "Lambda",
    "LayerNorm",
    "Linear",
    "ModelState",
    "Module",
    "OptState",
    "Parameter",
    "RMSNorm",
    "Rng",
    "Sequential",
    "SpectralNorm",
    "State",
    "TreePart",
    "UnsafePickleError",
    "WeightNorm",
    "dumps",
    "from_canonical",
    "load",
    "save",
    "state_dict",
    "to_canonical",
    "to_equinox",
]
