"""What every spoke hands the engine: :class:`Layer` (one parameterised layer with its canonical record),
:class:`Call` (one recorded layer call), the layer-kind tables, and the :class:`Spoke` interface.

Canonical records: a :class:`~normbridge.core.NormRecord` for the seven normalization layers; for every
other kind a flat ``{name: array}`` dict in flax's layout (see :mod:`normbridge.core.layouts`), and for
``"param"`` (a bare array attached to a user module, e.g. a ViT's ``pos_embedding``) ``{"value": array}``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from normbridge.core import KIND_OF_CLASS, NormRecord

#: Norm kinds that wrap another layer (whose arrays are a separate :class:`Layer`, ``Layer.inner``).
WRAPPER_KINDS = ("spectral_norm", "weight_norm")
NORM_KINDS = tuple(KIND_OF_CLASS.values())
PLAIN_KINDS = ("dense", "dense_general", "conv", "conv_transpose", "embed", "attention", "param")
#: The kind of a layer of linen variables given without their module: known once paired (the paired
#: ``like`` layer's kind), then read in that kind's linen layout.
UNTYPED = "untyped"
#: Frameworks whose layers keep flax's array layouts and operation order.
FLAX_FAMILY = ("linen", "nnx", "treex")


@dataclasses.dataclass
class Layer:
    """One layer holding arrays, as a spoke lists it.

    ``path``: the user's path in that framework, ``/``-joined (linen scope path, NNX/Equinox/treex
    attribute path with list indices). ``kind``: a :data:`NORM_KINDS` / :data:`PLAIN_KINDS` entry,
    ``"unknown"`` or :data:`UNTYPED`. ``record``: canonical record (``None`` for unknown kinds). ``shapes``:
    the canonical arrays' shapes (what pairing checks). ``inner``: the wrapped layer of a SpectralNorm/WeightNorm.
    ``module``/``meta``: what the spoke needs to write the layer back.
    """

    path: str
    kind: str
    cls: str
    record: Any = None
    module: Any = None
    inner: Layer | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return record_shapes(self.record)


@dataclasses.dataclass(frozen=True)
class Call:
    """One recorded top-level layer call: which layer, and its first input's / output's shapes."""

    path: str
    in_shape: tuple[int, ...] | None
    out_shape: tuple[int, ...] | None


def record_arrays(record: Any) -> dict[str, Any]:
    """``{name: array}`` of a canonical record (``NormRecord`` or plain dict)."""
    if record is None:
        return {}
    if isinstance(record, NormRecord):
        return record.arrays()
    return dict(record)


def record_shapes(record: Any) -> dict[str, tuple[int, ...]]:
    return {k: tuple(np.shape(v)) for k, v in record_arrays(record).items()}


def record_dtypes(record: Any) -> dict[str, str]:
    return {k: str(np.dtype(v.dtype)) for k, v in record_arrays(record).items() if hasattr(v, "dtype")}


def is_rng_key(x: Any) -> bool:
    """A typed PRNG key array (``jax.random.key``): RNG state in any framework, never a parameter."""
    import jax

    dtype = getattr(x, "dtype", None)
    try:
        return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    except TypeError:
        return False


def outermost(paths: list[str]) -> list[str]:
    """``paths`` without those inside another listed path (a stateless block is listed once, not each part)."""
    return [p for p in paths if not any(p.startswith(q + "/") for q in paths if q != p)]


def first_shape(tree: Any) -> tuple[int, ...] | None:
    """Shape of the first array leaf of ``tree`` (a layer's input or output)."""
    import jax

    for leaf in jax.tree_util.tree_leaves(tree):
        if hasattr(leaf, "shape"):
            return tuple(leaf.shape)
    return None


_INDEXED = re.compile(r"^(.+?)_(\d+)$")


def normalized_name(path: str, framework: str) -> str:
    """A path after the framework's naming rules: linen's ``layers_0`` is ``layers/0`` (as an NNX
    ``nnx.List`` index or an Equinox list index); ``.`` separators count as ``/``."""
    parts = [p for p in re.split(r"[/.]", path) if p]
    if framework == "linen":
        out: list[str] = []
        for p in parts:
            m = _INDEXED.match(p)
            out.extend((m.group(1), m.group(2)) if m else (p,))
        parts = out
    return "/".join(parts)


class Spoke:
    """One framework's side of the hub. Subclasses implement every method.

    * :meth:`layers`: every array-holding layer of a model, keyed by path (no probe needed, except
      linen, whose submodules exist only while the model runs);
    * :meth:`trace`: the order in which layers are *called* on a probe (an abstract ``jax.eval_shape`` run);
    * :meth:`write`: a copy of ``like`` holding the given canonical records (``like`` is not mutated);
    * :meth:`call`: the default way to run a model in eval or train mode.
    """

    name: str = ""
    family: str = ""  # "flax" or "equinox"

    def layers(self, model: Any, probe: Any = None, call: Callable | None = None) -> dict[str, Layer]:
        raise NotImplementedError

    def stateless(self, model: Any, probe: Any = None, call: Callable | None = None) -> list[str]:
        """Paths of called layers that hold no arrays (Dropout, activations): need no pairing."""
        return []

    def rng_state(self, model: Any, probe: Any = None, call: Callable | None = None) -> list[str]:
        """Paths of RNG-state leaves (treex ``Rng`` kind of a ``KeySeq``/``Dropout``, NNX ``RngState``, typed
        keys): stateless for pairing, never converted (the target keeps ``like``'s own), listed in the report."""
        return []

    def trace(self, model: Any, probe: Any, call: Callable | None = None) -> list[Call]:
        raise NotImplementedError

    def write(self, like: Any, records: Mapping[str, Any], layers: Mapping[str, Layer]) -> Any:
        raise NotImplementedError

    def copy(self, model: Any) -> Any:
        return model

    def prepare(self, model: Any, train: bool) -> Any:
        """A copy of ``model`` set to eval or train mode, outside any trace (NNX/treex set modes by mutation)."""
        return self.copy(model)

    def call(self, model: Any, x: Any, train: bool) -> Any:
        """Run a :meth:`prepare`-d model (called inside ``jax.eval_shape`` / ``jax.jit``)."""
        raise NotImplementedError

    def run(self, model: Any, x: Any, train: bool, call: Callable | None) -> Any:
        return (call or self.call)(model, x, train)

    def train_step(self, model: Any, x: Any, call: Callable | None = None) -> tuple[Any, Any]:
        """``(train-mode output, the model with its updated statistics)``: one forward pass in train mode (the
        default call convention, or ``call(model, x, True)``); ``model`` itself is not changed. With a hook on a
        functional framework (linen, Equinox) the updated statistics are the model's only when the hook returns
        them (``(y, updates)`` / ``(y, state)``); else the second item is ``None``."""
        raise NotImplementedError

    def runner(self, model: Any, call: Callable | None) -> Callable[[Any], Any]:
        """``x -> eval output`` of a :meth:`prepare`-d model, run eagerly: the bitwise guarantees between
        frameworks hold op for op; under ``jax.jit`` XLA fuses two different programs differently (~1e-7)."""
        return lambda x: self.run(model, x, False, call)


class WalkedSpoke(Spoke):
    """A spoke that finds layers, stateless modules and RNG state in one attribute walk of the model:
    :meth:`_walk` returns ``(layers, stateless paths, RNG-state paths)``, the three listings read from it."""

    def _walk(self, model: Any) -> tuple[dict[str, Layer], list[str], list[str]]:
        raise NotImplementedError

    def layers(self, model: Any, probe: Any = None, call: Callable | None = None) -> dict[str, Layer]:
        return self._walk(model)[0]

    def stateless(self, model: Any, probe: Any = None, call: Callable | None = None) -> list[str]:
        return self._walk(model)[1]

    def rng_state(self, model: Any, probe: Any = None, call: Callable | None = None) -> list[str]:
        return self._walk(model)[2]
