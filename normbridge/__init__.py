"""normbridge: one canonical implementation of JAX normalization layers, four facades.

* ``normbridge.core``: the math, pure functions on arrays (needs only ``jax``);
* ``normbridge.adapters.linen`` / ``.nnx`` / ``.equinox`` / ``.treex``: drop-in
  replacements for each framework's normalization layers, with checkpoint
  conversion through :class:`normbridge.core.NormRecord`;
* :func:`normbridge.convert`: whole-model conversion between the four frameworks
  (:mod:`normbridge.conversion`);
* :mod:`normbridge.testing`: cross-framework equivalence reports and assertions;
* :mod:`normbridge.checkpoint` and the ``normbridge`` command line (``check``, ``inspect``,
  ``diff``, ``convert``);
* ``normbridge.fast()`` / ``normbridge.config.update("implementation", "fast")`` /
  ``NORMBRIDGE_IMPLEMENTATION=fast``: opt-in fast formulations (docs/fast.md); default ``"exact"``.

``convert``, ``fast`` and ``config`` are imported on first use, so ``import normbridge``
imports neither jax nor any framework.
"""

from typing import Any

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
    "config",
    "convert",
    "fast",
]


def __getattr__(name: str) -> Any:  # PEP 562: lazy public names
    if name == "convert":
        from normbridge.conversion import convert

        return convert
    if name in ("fast", "config"):
        from normbridge.core import config as _config

        return getattr(_config, name)
    raise AttributeError(f"module 'normbridge' has no attribute {name!r}")
