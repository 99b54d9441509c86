"""normbridge: one canonical implementation of JAX normalization layers, four facades.

* ``normbridge.core``: the math, pure functions on arrays (needs only ``jax``);
* ``normbridge.adapters.linen`` / ``.nnx`` / ``.equinox`` / ``.treex``: drop-in
  replacements for each framework's normalization layers, with checkpoint
  conversion through :class:`normbridge.core.NormRecord`;
* ``python -m normbridge check``: the conformance check that writes ``compat_matrix.md``;
* ``normbridge.fast()`` / ``normbridge.config.update("implementation", "fast")`` /
  ``NORMBRIDGE_IMPLEMENTATION=fast``: opt-in fast formulations (docs/fast.md); default ``"exact"``.
"""

from normbridge.errors import (
    CheckpointError,
    CheckpointMismatchError,
    ConversionError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
)

__version__ = "0.1.0"

from typing import Any


def __getattr__(name: str) -> Any:
    # Lazy: ``import normbridge`` stays free of jax until the switch is used.
    if name in ("fast", "config"):
        import importlib

        return getattr(importlib.import_module("normbridge.core.config"), name)
    raise AttributeError(f"module 'normbridge' has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "ConversionError",
    "CorruptCheckpointError",
    "UnsafeCheckpointError",
    "__version__",
    "config",
    "fast",
]
