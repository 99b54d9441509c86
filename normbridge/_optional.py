"""Import guard for optional frameworks: a missing one names the extra that installs it."""

from __future__ import annotations

import importlib
from types import ModuleType

_EXTRA_FOR = {"flax": "linen", "equinox": "equinox", "treeo": "treex", "orbax": "nnx", "msgpack": "treex"}


def require(module: str, *, facade: str, extra: str | None = None) -> ModuleType:
    """Import ``module`` or raise ``ImportError`` naming the pip extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:  # pragma: no cover - exercised by a test with a blocked import
        extra = extra or _EXTRA_FOR.get(module.split(".")[0], facade)
        raise ImportError(
            f"normbridge.adapters.{facade} needs {module!r}, which is not installed: "
            f"pip install 'normbridge[{extra}]'"
        ) from err
