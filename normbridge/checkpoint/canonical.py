"""A checkpoint's arrays under framework-neutral names, and its layers as ``inspect`` shows them.

The names follow the canonical record (:class:`normbridge.core.NormRecord`) and flax's layouts,
one rule per framework, without a model (a checkpoint holds no architecture):

* linen: the collection is dropped (``params/BatchNorm_0/scale`` and ``batch_stats/BatchNorm_0/mean``
  are ``BatchNorm_0/scale`` and ``BatchNorm_0/mean``);
* NNX: the trailing ``/value`` of a variable is dropped;
* normbridge's Equinox format: ``model/`` is dropped, a 1-D ``weight`` is ``scale``, and a
  BatchNorm's ``state/<layer>/[ema_]state_index/0`` and ``/1`` are ``<layer>/mean`` and ``<layer>/var``;
* treex and the rest: as stored.

Layers are never paired by a guess: two checkpoints compare path by path after these rules, and
a path on one side only is reported as such.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from normbridge.checkpoint._common import Checkpoint

_EQX_STATE = re.compile(r"^state/(.+)/(?:ema_)?state_index/([01])$")


def canonical_leaves(ckpt: Checkpoint) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for path, arr in ckpt.leaves.items():
        out[canonical_path(ckpt, path, arr)] = arr
    if len(out) != len(ckpt.leaves):  # two stored paths fell on one name: keep them as stored
        return dict(ckpt.leaves)
    return out


def canonical_path(ckpt: Checkpoint, path: str, arr: Any) -> str:
    if ckpt.framework == "linen" or path.split("/", 1)[0] in ("params", "batch_stats"):
        head, _, rest = path.partition("/")
        if head in ("params", "batch_stats") and rest:
            return rest
    if path.endswith("/value"):
        return path[: -len("/value")]
    if ckpt.format == "equinox":
        m = _EQX_STATE.match(path)
        if m:
            return f"{m.group(1)}/{'mean' if m.group(2) == '0' else 'var'}"
        if path.startswith("model/"):
            path = path[len("model/"):]
            if path.endswith("/weight") and np.ndim(arr) == 1:
                return path[: -len("weight")] + "scale"
    return path


@dataclasses.dataclass
class Layer:
    """One layer of a checkpoint: its path, a kind guessed from its arrays' names, its arrays."""

    path: str
    kind: str
    arrays: dict[str, np.ndarray]

    @property
    def count(self) -> int:
        return sum(int(np.size(a)) for a in self.arrays.values())

    @property
    def nbytes(self) -> int:
        return sum(int(np.asarray(a).nbytes) for a in self.arrays.values())


def guess_kind(fields: dict[str, np.ndarray]) -> str:
    names = set(fields)
    if {"mean", "var"} <= names:
        return "BatchNorm"
    if {"u", "sigma"} & names:
        return "SpectralNorm"
    if "kernel" in names:
        return "Dense" if np.ndim(fields["kernel"]) == 2 else "Conv/DenseGeneral"
    if "embedding" in names:
        return "Embed"
    if "weight" in names:
        return "Linear" if np.ndim(fields["weight"]) == 2 else "Conv" if np.ndim(fields["weight"]) > 2 else "?"
    if names == {"scale", "bias"} or names == {"scale"} or names == {"bias"}:
        return "LayerNorm/GroupNorm/InstanceNorm" if "bias" in names else "RMSNorm (or a norm without bias)"
    return "?"


def layers(ckpt: Checkpoint) -> list[Layer]:
    """The checkpoint's arrays grouped by layer (the path up to the last component), in file order."""
    if ckpt.format == "eqx-leaves":  # no names: one entry per leaf
        return [Layer(f"<leaf {k}>", "?", {"": v}) for k, v in ckpt.leaves.items()]
    groups: dict[str, dict[str, np.ndarray]] = {}
    for path, arr in canonical_leaves(ckpt).items():
        layer, _, field = path.rpartition("/")
        groups.setdefault(layer, {})[field] = arr
    return [Layer(p or "<root>", guess_kind(f), f) for p, f in groups.items()]


def stats(arr: np.ndarray) -> dict[str, Any]:
    """min/max/mean over the finite values, NaN and Inf counts (numeric arrays only)."""
    a = np.asarray(arr)
    if a.dtype.kind == "V" or (a.dtype.kind not in "biufc" and "float" not in a.dtype.name):
        return {}
    f = a.astype(np.float64) if a.dtype.kind != "c" else np.abs(a)
    finite = np.isfinite(f)
    out: dict[str, Any] = {"nan": int(np.isnan(f).sum()), "inf": int(np.isinf(f).sum())}
    if finite.any():
        v = f[finite]
        out.update(min=float(v.min()), max=float(v.max()), mean=float(v.mean()))
    return out
