"""The treex spoke: a :mod:`normbridge.adapters.treex` module (treex's own classes no longer import).

Paths are attribute paths with list indices (``layers/0``, as ``Module.to_dict`` names them). Layers
are recognised by class name and fields: the norm layers through
:func:`normbridge.adapters.treex.to_canonical` / :func:`~normbridge.adapters.treex.from_canonical`,
``Linear`` (``kernel (in, out)``, ``bias``), ``Conv`` (``kernel`` HWIO, ``bias``), ``Embed``
(``embedding``) in flax's layouts. Leaves of treex's ``Rng`` kind (a ``KeySeq``'s key, so a ``Dropout``'s) and
typed PRNG keys are RNG state: not layers, never converted (the target keeps ``like``'s), listed in the
report; a module holding only such state (``Dropout``) is stateless. Call order: each layer class's
``__call__`` is wrapped during one abstract ``jax.eval_shape`` run of a copy. Targets are
``like.copy()``; ``like`` is never mutated.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax

from normbridge.conversion._util import CallRecorder, check_plain, patched_calls
from normbridge.conversion.base import WRAPPER_KINDS, Call, Layer, WalkedSpoke, is_rng_key, outermost
from normbridge.core import KIND_OF_CLASS

PLAIN_CLASSES = {
    "Linear": ("dense", ("kernel", "bias")),
    "Conv": ("conv", ("kernel", "bias")),
    "ConvTranspose": ("conv_transpose", ("kernel", "bias")),
    "Embed": ("embed", ("embedding",)),
}


def _module_cls() -> type:
    from normbridge.adapters.treex.module import Module

    return Module


def kind_of(module: Any) -> str | None:
    name = type(module).__name__
    if name in KIND_OF_CLASS:
        return KIND_OF_CLASS[name]
    if name in PLAIN_CLASSES and all(hasattr(module, f) for f in PLAIN_CLASSES[name][1]):
        return PLAIN_CLASSES[name][0]
    return None


def _rng_kind(module: Any, field: str) -> bool:
    """Whether ``module``'s ``field`` is of treex's ``Rng`` kind (or a subclass), as ``filter(tx.Rng)`` decides."""
    from normbridge.adapters.treex.module import Rng

    meta = getattr(module, "_field_metadata", {}).get(field)
    kind = getattr(meta, "kind", None)
    return isinstance(kind, type) and issubclass(kind, Rng)


def _children(node: Any) -> list[tuple[str, Any]]:
    if isinstance(node, (list, tuple)):
        return [(str(i), v) for i, v in enumerate(node)]
    if isinstance(node, Mapping):
        return [(str(k), v) for k, v in node.items()]
    return [(k, v) for k, v in vars(node).items() if not k.startswith("_")]


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) or (hasattr(x, "shape") and hasattr(x, "dtype"))


def _get(node: Any, key: str) -> Any:
    return (
        node[int(key)]
        if isinstance(node, (list, tuple))
        else node[key]
        if isinstance(node, Mapping)
        else getattr(node, key)
    )


def _put(node: Any, key: str, value: Any) -> None:
    if isinstance(node, list):
        node[int(key)] = value
    elif isinstance(node, Mapping):
        node[key] = value
    else:
        node.__dict__[key] = value


class TreexSpoke(WalkedSpoke):
    name = "treex"
    family = "flax"

    def _walk(self, model: Any) -> tuple[dict[str, Layer], list[str], list[str]]:
        """``(layers, stateless module paths, RNG-state leaf paths)`` of a treex model."""
        from normbridge.adapters.treex import to_canonical

        module_cls = _module_cls()
        layers: dict[str, Layer] = {}
        stateless: list[str] = []
        rng: list[str] = []

        def make(path: str, module: Any) -> Layer:
            kind = kind_of(module)
            if kind in KIND_OF_CLASS.values():
                layer = Layer(path, kind, type(module).__name__, to_canonical(module), module)
                if kind in WRAPPER_KINDS:
                    layer.inner = make(f"{path}/layer" if path else "layer", module.layer)
                return layer
            if kind is None:
                return Layer(path, "unknown", type(module).__name__, None, module)
            fields = PLAIN_CLASSES[type(module).__name__][1]
            arrays = {f: getattr(module, f) for f in fields if getattr(module, f) is not None}
            return Layer(path, kind, type(module).__name__, arrays, module)

        def walk(node: Any, prefix: str, rng_field: bool = False) -> None:
            for key, value in _children(node):
                path = f"{prefix}/{key}" if prefix else key
                # a leaf under a field of treex's Rng kind (KeySeq.key, a Dropout's key) is RNG state
                is_rng = rng_field or (isinstance(node, module_cls) and _rng_kind(node, key))
                if isinstance(value, module_cls):
                    if kind_of(value) is not None:
                        layers[path] = make(path, value)
                        continue
                    before = len(layers)
                    walk(value, path)
                    if len(layers) == before:
                        stateless.append(path)
                elif isinstance(value, (list, tuple, Mapping)):
                    walk(value, path, is_rng)
                elif _is_array(value) and (is_rng or is_rng_key(value)):
                    rng.append(path)
                elif _is_array(value) and prefix is not None:
                    layers[path] = Layer(
                        path, "param", type(value).__name__, {"value": value}, node, meta={"attr": key}
                    )

        if isinstance(model, module_cls) and kind_of(model) is not None:
            layers[""] = make("", model)  # a bare layer: the model is one layer, path ""
        else:
            walk(model, "")
        return layers, outermost(stateless), rng

    def copy(self, model: Any) -> Any:
        return model.copy()

    def prepare(self, model: Any, train: bool) -> Any:
        return model.train(train)  # a copy in that mode

    def call(self, model: Any, x: Any, train: bool) -> Any:
        return model(x)

    def train_step(self, model: Any, x: Any, call: Callable | None = None) -> tuple[Any, Any]:
        m = self.prepare(model, True)
        y = self.run(m, x, True, call)  # treex layers update their statistics in place in train mode
        return y, m.eval()

    def trace(self, model: Any, probe: Any, call: Callable | None = None) -> list[Call]:
        m = self.prepare(model, False)
        layers = self._walk(m)[0]
        ids = {id(layer.module): path for path, layer in layers.items() if layer.kind != "param"}
        classes = {type(layer.module) for layer in layers.values() if layer.kind != "param"}
        rec = CallRecorder()
        with patched_calls(classes, lambda obj: ids.get(id(obj)), rec):
            jax.eval_shape(lambda x: self.run(m, x, False, call), probe)
        return rec.calls()

    def write(self, like: Any, records: Mapping[str, Any], layers: Mapping[str, Layer], adapt: Any = None) -> Any:
        from normbridge.adapters.treex import from_canonical
        from normbridge.errors import ConversionError

        out = like.copy()
        problems: list[str] = []
        root = [out]  # a bare layer (path ""): its parent is this holder
        for path in sorted(records, key=lambda p: -p.count("/")):
            record = records[path]
            parts = path.split("/") if path else ["0"]
            parent = out if path else root
            for p in parts[:-1]:
                parent = _get(parent, p)
            current = _get(parent, parts[-1])
            kind = "param" if _is_array(current) else kind_of(current)
            if kind in KIND_OF_CLASS.values():
                try:
                    try:
                        new = from_canonical(record, current)
                    except ValueError:
                        if adapt is None:
                            raise
                        from normbridge.adapters.treex import to_canonical

                        new = from_canonical(adapt(path, record, to_canonical(current)), current)
                except ValueError as err:
                    problems.append(f"{path}: {err}")
                    continue
                _put(parent, parts[-1], new)
            elif kind == "param":
                found = check_plain(path, {"value": current}, record)
                problems += found
                if not found:
                    _put(parent, parts[-1], record["value"])
            else:
                fields = PLAIN_CLASSES[type(current).__name__][1]
                have = {f: getattr(current, f) for f in fields if getattr(current, f) is not None}
                found = check_plain(path, have, record)
                problems += found
                if not found:
                    new = current.copy()
                    for f, v in record.items():
                        new.__dict__[f] = v
                    _put(parent, parts[-1], new)
        if problems:
            raise ConversionError("writing the treex target failed", problems=problems)
        return root[0]
