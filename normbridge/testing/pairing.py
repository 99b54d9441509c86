"""Which leaf of model ``b`` is which leaf of model ``a``: the pairing interface of ``assert_equivalent``.

A pairing gives, for either model, a *view* ``{path: array}`` of its parameters and statistics (and of
gradients, which have the parameters' structure), and the :class:`LeafPair` list that says which path
of ``b``'s view is which path of ``a``'s. Two implementations:

- :class:`PathPairing`, models of one framework (native or facade layers, whose layouts are the same by
  construction): the user's own leaf paths (linen: ``params/Dense_0/kernel``, ``batch_stats/...``), paired
  by path, ``mapping`` renaming paths or path prefixes of ``a`` to ``b``'s;
- :class:`EnginePairing`, models of two frameworks: the conversion engine's pairing
  (:func:`normbridge.conversion.pair`: mapping, then names, then execution order, shapes checked) and its
  canonical records (flax layout, statistics conventions resolved), so a view's path is
  ``<the user's layer path>/<record field>`` in each model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from normbridge.testing._compare import tree_paths
from normbridge.testing._models import Functional


@dataclasses.dataclass(frozen=True)
class LeafPair:
    path_a: str
    path_b: str
    to_a: Callable[[Any], Any] | None = None  # b's array in a's layout; None: same layout


def _rename(path: str, mapping: Mapping[str, str]) -> str:
    """``path`` with its longest mapped prefix (whole path components) replaced."""
    best = None
    for src in mapping:
        if (path == src or path.startswith(src + "/")) and (best is None or len(src) > len(best)):
            best = src
    return path if best is None else mapping[best] + path[len(best) :]


def named(f: Functional, params: Any, state: Any) -> dict[str, Any]:
    """The user's paths of a model's parameters and state (linen: with their collection)."""
    if f.framework == "linen":
        out = {f"params/{k}" if k else "params": v for k, v in tree_paths(params).items()}
        out.update(tree_paths(state))
        return out

    def user(path: str) -> str:  # an NNX Variable flattens to its value: model.layer.kernel is layer/kernel
        return path[: -len("/value")] if f.framework == "nnx" and path.endswith("/value") else path

    out = {user(k): v for k, v in tree_paths(params).items()}
    for k, v in tree_paths(state).items():
        out[user(k) if user(k) not in out else f"state/{user(k)}"] = v
    return out


class PathPairing:
    """Same framework: the user's leaf paths, paired by path (``mapping`` renames ``a``'s paths)."""

    how = "by path"

    def __init__(self, fa: Functional, fb: Functional, mapping: Mapping[str, str] | None = None) -> None:
        self.mapping = dict(mapping or {})
        view_b = self.values(1, fb, fb.params, fb.state)
        self.pairs = [
            LeafPair(pa, _rename(pa, self.mapping))
            for pa in self.values(0, fa, fa.params, fa.state)
            if _rename(pa, self.mapping) in view_b
        ]
        self.note = f"paired by path ({fa.framework} and {fb.framework})" + (
            f", mapping {self.mapping}" if self.mapping else ""
        )

    def values(self, side: int, f: Functional, params: Any, state: Any) -> dict[str, Any]:
        return named(f, params, state)

    def params_only(self, side: int, f: Functional, params: Any) -> dict[str, Any]:
        return named(f, params, {})

    def state_only(self, side: int, f: Functional, params: Any, state: Any) -> dict[str, Any]:
        return named(f, {}, state)

    @staticmethod
    def layer_of(path: str, framework: str) -> str:
        """The layer a leaf belongs to (linen: without the collection)."""
        parts = path.split("/")
        return "/".join(parts[1:-1] if framework == "linen" else parts[:-1])


class EnginePairing:
    """Two frameworks: layers paired by :func:`normbridge.conversion.pair`, compared as canonical records."""

    how = "conversion engine"

    def __init__(
        self, a: Any, b: Any, fa: Functional, fb: Functional, probe: tuple[Any, Any], mapping: Mapping | None = None
    ) -> None:
        from normbridge.conversion import pair
        from normbridge.conversion.engine import framework_of, spoke_for

        self.probe = probe
        self.spokes = (spoke_for(framework_of(a)), spoke_for(framework_of(b)))
        layer_pairs = pair(a, b, mapping=mapping, probe=probe)
        view_a = self.values(0, fa, fa.params, fa.state)
        view_b = self.values(1, fb, fb.params, fb.state)
        self.pairs = []
        unpaired: list[str] = []
        for lp in layer_pairs:
            mine = {k[len(lp.source) + 1 :] for k in view_a if k.rpartition("/")[0] == lp.source}
            theirs = {k[len(lp.target) + 1 :] for k in view_b if k.rpartition("/")[0] == lp.target}
            for name in sorted(mine & theirs):
                self.pairs.append(LeafPair(f"{lp.source}/{name}", f"{lp.target}/{name}"))
            # a field one framework's record has and the other's has not (Equinox's BatchNorm counter) is a
            # convention, not a value the other model could hold
            unpaired += [f"{lp.source}/{n} (a only)" for n in sorted(mine - theirs)]
            unpaired += [f"{lp.target}/{n} (b only)" for n in sorted(theirs - mine)]
        self.keys = ({p.path_a for p in self.pairs}, {p.path_b for p in self.pairs})
        self.note = (
            f"{fa.framework} and {fb.framework} layers paired by normbridge.conversion.pair "
            f"({len(layer_pairs)} layers), compared as canonical records (<layer path>/<field>)"
            + (f"; fields of one framework only, not compared: {', '.join(unpaired)}" if unpaired else "")
        )

    def _records(self, side: int, model: Any) -> dict[str, Any]:
        from normbridge.conversion.base import record_arrays

        keys = getattr(self, "keys", None)
        out: dict[str, Any] = {}
        for layer in self.spokes[side].layers(model, self.probe[side]).values():
            for item in (layer, layer.inner):
                if item is not None:
                    for name, arr in record_arrays(item.record).items():
                        key = f"{item.path}/{name}"
                        if keys is None or key in keys[side]:
                            out[key] = arr
        return out

    def values(self, side: int, f: Functional, params: Any, state: Any) -> dict[str, Any]:
        return self._records(side, f.rebuild(params, state))

    def params_only(self, side: int, f: Functional, params: Any) -> dict[str, Any]:
        zeros = jax.tree_util.tree_map(lambda x: np.zeros_like(x) if hasattr(x, "dtype") else x, f.state)
        return self._records(side, f.rebuild(params, zeros))

    def state_only(self, side: int, f: Functional, params: Any, state: Any) -> dict[str, Any]:
        return self._records(side, f.rebuild(params, state))

    @staticmethod
    def layer_of(path: str, framework: str) -> str:
        return "/".join(path.split("/")[:-1])


def pairing_for(a: Any, b: Any, fa: Functional, fb: Functional, probe: tuple[Any, Any], mapping: Mapping | None):
    """:class:`PathPairing` for one framework, :class:`EnginePairing` for two."""
    if fa.framework == fb.framework:
        return PathPairing(fa, fb, mapping)
    if fa.rebuild is None or fb.rebuild is None:
        raise TypeError("assert_equivalent: a Functional without rebuild cannot be paired across frameworks")
    return EnginePairing(a, b, fa, fb, probe, mapping)
