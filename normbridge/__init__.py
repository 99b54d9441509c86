"""normbridge: one canonical implementation of JAX normalization layers, four facades.

* ``normbridge.core``: the math, pure functions on arrays (needs only ``jax``);
* ``normbridge.adapters.linen`` / ``.nnx`` / ``.equinox`` / ``.treex``: drop-in
  replacements for each framework's normalization layers, with checkpoint
  conversion through :class:`normbridge.core.NormRecord`;
* :func:`normbridge.convert`: whole-model conversion between the four frameworks
  (:mod:`normbridge.conversion`; imported on first use, so ``import normbridge`` imports no framework);
* ``python -m normbridge check``: the conformance check that writes ``compat_matrix.md``.
"""

from normbridge.errors import (
    CheckpointError,
    CheckpointMismatchError,
    ConversionError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "ConversionError",
    "CorruptCheckpointError",
    "UnsafeCheckpointError",
    "__version__",
    "convert",
]


def __getattr__(name: str):  # PEP 562: normbridge.convert without importing a framework at import time
    if name == "convert":
        from normbridge.conversion import convert

        return convert
    raise AttributeError(f"module 'normbridge' has no attribute {name!r}")
