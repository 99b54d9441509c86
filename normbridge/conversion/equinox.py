"""The Equinox spoke: ``(model, state)`` (or a stateless ``model``), native ``equinox.nn`` layers or the
:mod:`normbridge.adapters.equinox` facade.

Paths are field paths with list indices (``blocks/0/conv1``). Array layouts go through
:mod:`normbridge.core.layouts`. Call order is recorded by replacing every known layer with a thin
recording wrapper (an ``eqx.nn.StatefulLayer`` that delegates, so ``eqx.nn.Sequential`` still passes
the state) in a copy of the model, run once under ``jax.eval_shape``. Equinox layers see one example,
channels first: the default call is ``jax.vmap`` over the batch with the BatchNorms' ``axis_name``,
under ``eqx.nn.inference_mode`` in eval.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax

from normbridge._optional import require
from normbridge.conversion._util import CallRecorder, check_plain
from normbridge.conversion.base import WRAPPER_KINDS, Call, Layer, WalkedSpoke, is_rng_key
from normbridge.core import KIND_OF_CLASS, layouts

PLAIN_CLASSES = {
    "Linear": "dense",
    "Conv": "conv",
    "Conv1d": "conv",
    "Conv2d": "conv",
    "Conv3d": "conv",
    "ConvTranspose": "conv_transpose",
    "ConvTranspose1d": "conv_transpose",
    "ConvTranspose2d": "conv_transpose",
    "ConvTranspose3d": "conv_transpose",
    "Embedding": "embed",
    "MultiheadAttention": "attention",
}


def _eqx() -> Any:
    return require("equinox", facade="equinox", extra="equinox")


def kind_of(module: Any) -> str | None:
    name = type(module).__name__
    return KIND_OF_CLASS.get(name) or PLAIN_CLASSES.get(name)


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) or (hasattr(x, "shape") and hasattr(x, "dtype"))


def split(obj: Any) -> tuple[Any, Any]:
    """``(model, state)`` of what the user passed (a bare stateless model has state ``None``)."""
    if isinstance(obj, tuple) and len(obj) == 2:
        return obj
    return obj, None


def _children(node: Any) -> list[tuple[str, Any]]:
    eqx = _eqx()
    if isinstance(node, eqx.Module):
        return [(f.name, getattr(node, f.name)) for f in dataclasses.fields(node) if hasattr(node, f.name)]
    if isinstance(node, (list, tuple)):
        return [(str(i), v) for i, v in enumerate(node)]
    if isinstance(node, Mapping):
        return [(str(k), v) for k, v in node.items()]
    return []


def get_at(node: Any, parts: list[str]) -> Any:
    for p in parts:
        node = (
            node[int(p)]
            if isinstance(node, (list, tuple))
            else node[p]
            if isinstance(node, Mapping)
            else getattr(node, p)
        )
    return node


def _plain_arrays(kind: str, module: Any) -> dict[str, Any]:
    if kind == "attention":
        arrays = {}
        for field in layouts.ATTENTION_PROJECTIONS.values():
            proj = getattr(module, field)
            arrays[f"{field}/weight"] = proj.weight
            arrays[f"{field}/bias"] = proj.bias
        return layouts.equinox_to_canonical(kind, arrays, num_heads=module.num_heads)
    return layouts.equinox_to_canonical(kind, {"weight": module.weight, "bias": getattr(module, "bias", None)})


class EquinoxSpoke(WalkedSpoke):
    name = "equinox"
    family = "equinox"

    def _walk(self, obj: Any) -> tuple[dict[str, Layer], list[str], list[str]]:
        eqx = _eqx()
        from normbridge.adapters.equinox import canonical

        model, state = split(obj)
        layers: dict[str, Layer] = {}
        stateless: list[str] = []
        rng: list[str] = []  # typed PRNG keys a user module stores: RNG state, not parameters

        def make(path: str, module: Any) -> Layer:
            kind = kind_of(module)
            if kind in KIND_OF_CLASS.values():
                try:
                    record = canonical.to_canonical(module, state)
                except ValueError:
                    record = None  # a stateful layer without a state: reported by the engine
                layer = Layer(path, kind, type(module).__name__, record, module)
                if kind in WRAPPER_KINDS:
                    layer.inner = make(f"{path}/layer" if path else "layer", module.layer)
                return layer
            meta = {}
            if kind in ("conv", "conv_transpose"):
                meta["num_spatial_dims"] = module.num_spatial_dims
            return Layer(path, kind, type(module).__name__, _plain_arrays(kind, module), module, meta=meta)

        def walk(node: Any, prefix: str) -> None:
            for key, value in _children(node):
                path = f"{prefix}/{key}" if prefix else key
                if isinstance(value, eqx.Module):
                    if kind_of(value) is not None:
                        layers[path] = make(path, value)
                        continue
                    if isinstance(value, eqx.nn.StateIndex):
                        continue
                    before = len(layers)
                    walk(value, path)
                    if len(layers) == before and not any(
                        _is_array(x) and not is_rng_key(x) for x in jax.tree_util.tree_leaves(value)
                    ):
                        stateless.append(path)
                elif isinstance(value, (list, tuple, Mapping)):
                    walk(value, path)
                elif _is_array(value) and is_rng_key(value):
                    rng.append(path)
                elif _is_array(value):
                    layers[path] = Layer(path, "param", type(value).__name__, {"value": value}, None)

        if isinstance(model, eqx.Module) and kind_of(model) is not None:
            layers[""] = make("", model)  # a bare layer: the model is one layer, path ""
        else:
            walk(model, "")
        return layers, stateless, rng

    def copy(self, obj: Any) -> Any:
        return obj

    def prepare(self, obj: Any, train: bool) -> Any:
        eqx = _eqx()
        model, state = split(obj)
        model = eqx.nn.inference_mode(model, value=not train)
        return (model, state) if isinstance(obj, tuple) else model

    def call(self, obj: Any, x: Any, train: bool) -> Any:
        model, state = split(obj)
        axis = _axis_name(model)
        if state is None or not _stateful(model):
            return jax.vmap(model, axis_name=axis)(x)
        y, _ = jax.vmap(model, axis_name=axis, in_axes=(0, None), out_axes=(0, None))(x, state)
        return y

    def train_step(self, obj: Any, x: Any, call: Callable | None = None) -> tuple[Any, Any]:
        model, state = split(self.prepare(obj, True))
        if call is not None:
            y, new_state = train_output(call((model, state) if isinstance(obj, tuple) else model, x, True))
            return y, None if new_state is None else (split(obj)[0], new_state)
        axis = _axis_name(model)
        if state is None or not _stateful(model):
            return jax.vmap(model, axis_name=axis)(x), obj
        y, new_state = jax.vmap(model, axis_name=axis, in_axes=(0, None), out_axes=(0, None))(x, state)
        return y, (split(obj)[0], new_state)

    def trace(self, obj: Any, probe: Any, call: Callable | None = None) -> list[Call]:
        eqx = _eqx()
        model, state = split(self.prepare(obj, False))
        layers = self._walk((model, state))[0]
        rec = CallRecorder()
        known = [p for p, layer in layers.items() if layer.kind != "param"]
        for path in sorted(known, key=lambda p: -p.count("/")):
            if not path:  # a bare layer
                model = _recording(model, path, rec)
                continue
            parts = path.split("/")
            model = eqx.tree_at(lambda m, q=parts: get_at(m, q), model, _recording(get_at(model, parts), path, rec))
        # model and state as arguments: abstract (jax.eval_shape) arrays are fine
        eqx.filter_eval_shape(
            lambda m, s, x: self.run((m, s) if s is not None else m, x, False, call), model, state, probe
        )
        return rec.calls()

    def write(self, like: Any, records: Mapping[str, Any], layers: Mapping[str, Layer], adapt: Any = None) -> Any:
        eqx = _eqx()
        from normbridge.adapters.equinox import canonical
        from normbridge.errors import ConversionError

        model, state = split(like)
        ours = self._walk(like)[0]
        if state is not None:  # State.set invalidates the State it is called on: work on a clone of like's
            leaves, treedef = jax.tree_util.tree_flatten(state)
            state = jax.tree_util.tree_unflatten(treedef, leaves)
        every = dict(ours)
        for layer in ours.values():
            if layer.inner is not None:
                every[layer.inner.path] = layer.inner
        problems: list[str] = []
        for path in sorted(records, key=lambda p: -p.count("/")):
            record, layer, parts = records[path], every[path], path.split("/") if path else []
            current = get_at(model, parts)
            if layer.kind in KIND_OF_CLASS.values():
                try:
                    try:
                        new, state = canonical.from_canonical(record, current, state)
                    except ValueError:
                        if adapt is None:
                            raise
                        new, state = canonical.from_canonical(adapt(path, record, layer.record), current, state)
                except ValueError as err:
                    problems.append(f"{path}: {err}")
                    continue
            elif layer.kind == "param":
                found = check_plain(path, {"value": current}, record)
                if found:
                    problems += found
                    continue
                new = record["value"]
            else:
                found = check_plain(path, layer.record, record)
                if found:
                    problems += found
                    continue
                new = _with_arrays(layer, current, record)
            if not parts:  # a bare layer
                model = new
                continue
            model = eqx.tree_at(lambda m, q=parts: get_at(m, q), model, new, is_leaf=lambda x: x is None)
        if problems:
            raise ConversionError("writing the equinox target failed", problems=problems)
        return (model, state) if isinstance(like, tuple) else model


def _with_arrays(layer: Layer, module: Any, record: Mapping[str, Any]) -> Any:
    eqx = _eqx()
    arrays = layouts.equinox_from_canonical(layer.kind, record, num_spatial_dims=layer.meta.get("num_spatial_dims"))
    names = sorted(arrays)

    def get(m: Any) -> list[Any]:
        return [get_at(m, n.split("/")) for n in names]

    return eqx.tree_at(get, module, [arrays[n] for n in names], is_leaf=lambda x: x is None)


def train_output(out: Any) -> tuple[Any, Any]:
    """``(y, new state or None)`` of what a train-mode call hook returned: ``(y, eqx.nn.State)`` or ``y`` alone."""
    eqx = _eqx()
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], eqx.nn.State):
        return out
    return out, None


def _axis_name(model: Any) -> Any:
    for leaf in jax.tree_util.tree_leaves(model, is_leaf=lambda x: type(x).__name__ == "BatchNorm"):
        if type(leaf).__name__ == "BatchNorm" and getattr(leaf, "axis_name", None) is not None:
            return leaf.axis_name
    return "batch"


def _stateful(model: Any) -> bool:
    eqx = _eqx()
    return any(
        isinstance(x, eqx.nn.StateIndex)
        for x in jax.tree_util.tree_leaves(model, is_leaf=lambda x: isinstance(x, eqx.nn.StateIndex))
    )


_RECORDING: dict[str, type] = {}


def _recording(layer: Any, path: str, rec: CallRecorder) -> Any:
    eqx = _eqx()
    cls = _RECORDING.get("cls")
    if cls is None:

        class Recording(eqx.nn.StatefulLayer):
            """A known layer during a trace: records its call, then calls it."""

            layer: Any
            path: str = eqx.field(static=True)
            recorder: Any = eqx.field(static=True)

            def is_stateful(self) -> bool:
                inner = self.layer
                return isinstance(inner, eqx.nn.StatefulLayer) and inner.is_stateful()

            def __call__(self, *args: Any, **kwargs: Any) -> Any:
                entry = self.recorder.enter(self.path, args)
                out = self.layer(*args, **kwargs)
                self.recorder.exit(entry, out)
                return out

        cls = _RECORDING["cls"] = Recording
    return cls(layer, path, rec)
