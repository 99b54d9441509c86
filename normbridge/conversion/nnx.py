"""The ``flax.nnx`` spoke: an NNX module (native layers or the :mod:`normbridge.adapters.nnx` facade).

Paths are attribute paths with ``nnx.List``/list indices (``blocks/0/conv1``). Layers are found by
walking the module's attributes; their call order by wrapping each layer class's ``__call__`` during
one abstract ``jax.eval_shape`` run of a clone (restored afterwards). ``nnx.RngState`` (a Dropout's
``rngs``, an ``nnx.Rngs``) is RNG state: not paired, never converted, listed in the report. Written
targets are clones of ``like`` (``nnx.clone``); ``like`` is never mutated.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax

from normbridge._optional import require
from normbridge.conversion._util import CallRecorder, check_plain, patched_calls
from normbridge.conversion.base import WRAPPER_KINDS, Call, Layer, Spoke
from normbridge.core import KIND_OF_CLASS

PLAIN_CLASSES = {
    "Linear": "dense",
    "LinearGeneral": "dense_general",
    "Conv": "conv",
    "ConvTranspose": "conv_transpose",
    "Embed": "embed",
    "MultiHeadAttention": "attention",
}
_PLAIN_FIELDS = {
    "dense": ("kernel", "bias"),
    "dense_general": ("kernel", "bias"),
    "conv": ("kernel", "bias"),
    "conv_transpose": ("kernel", "bias"),
    "embed": ("embedding",),
}
_HEADS = ("query", "key", "value", "out")


def _nnx() -> Any:
    return require("flax.nnx", facade="nnx", extra="nnx")


def _value(v: Any) -> Any:
    return v.get_value() if hasattr(v, "get_value") else v


def _children(node: Any) -> list[tuple[str, Any]]:
    nnx = _nnx()
    if isinstance(node, (nnx.List, list, tuple)):
        return [(str(i), v) for i, v in enumerate(node)]
    if isinstance(node, Mapping):
        return [(str(k), node[k]) for k in node]
    return [(k, v) for k, v in vars(node).items() if not k.startswith("_")]


def kind_of(module: Any) -> str | None:
    name = type(module).__name__
    return KIND_OF_CLASS.get(name) or PLAIN_CLASSES.get(name)


def _plain_arrays(kind: str, module: Any) -> dict[str, Any]:
    if kind == "attention":
        out = {}
        for head in _HEADS:
            sub = getattr(module, head)
            for f in ("kernel", "bias"):
                v = getattr(sub, f, None)
                if v is not None:
                    out[f"{head}/{f}"] = _value(v)
        return out
    return {f: _value(getattr(module, f)) for f in _PLAIN_FIELDS[kind] if getattr(module, f, None) is not None}


class NnxSpoke(Spoke):
    name = "nnx"
    family = "flax"

    def _walk(self, model: Any) -> tuple[dict[str, Layer], list[str]]:
        nnx = _nnx()
        from normbridge.adapters.nnx import convert

        layers: dict[str, Layer] = {}
        stateless: list[str] = []

        def make(path: str, module: Any) -> Layer:
            kind = kind_of(module)
            if kind in KIND_OF_CLASS.values():
                layer = Layer(path, kind, type(module).__name__, convert.to_canonical(module), module)
                if kind in WRAPPER_KINDS:
                    inner = module.layer_instance
                    layer.inner = make(f"{path}/layer_instance", inner)
                return layer
            if kind is None:
                return Layer(path, "unknown", type(module).__name__, None, module)
            return Layer(path, kind, type(module).__name__, _plain_arrays(kind, module), module)

        def walk(node: Any, prefix: str) -> None:
            direct = []
            for key, value in _children(node):
                path = f"{prefix}/{key}" if prefix else key
                if isinstance(value, nnx.Module):
                    if kind_of(value) is not None:
                        layers[path] = make(path, value)
                        continue
                    if isinstance(value, nnx.Rngs):
                        continue
                    before = len(layers)
                    walk(value, path)
                    if len(layers) == before and not _has_variables(value):
                        stateless.append(path)
                elif isinstance(value, nnx.Variable):
                    direct.append((path, value))
                elif isinstance(value, (list, tuple, Mapping)):
                    walk(value, path)
            for path, var in direct:
                if isinstance(var, nnx.RngState):
                    continue
                kind = "param" if isinstance(var, nnx.Param) else "unknown"
                layers[path] = Layer(
                    path, kind, type(var).__name__, {"value": _value(var)}, node, meta={"attr": path.rsplit("/", 1)[-1]}
                )

        walk(model, "")
        return layers, stateless

    def layers(self, model: Any, probe: Any = None, call: Callable | None = None) -> dict[str, Layer]:
        return self._walk(model)[0]

    def stateless(self, model: Any, probe: Any = None, call: Callable | None = None) -> list[str]:
        return self._walk(model)[1]

    def rng_state(self, model: Any, probe: Any = None, call: Callable | None = None) -> list[str]:
        """Every ``nnx.RngState`` (a Dropout's ``rngs`` key and count, an ``nnx.Rngs`` attribute)."""
        nnx = _nnx()
        return ["/".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.RngState))]

    def copy(self, model: Any) -> Any:
        return _nnx().clone(model)

    def prepare(self, model: Any, train: bool) -> Any:
        m = self.copy(model)
        if train:
            m.train()
        else:
            m.eval()
        return m

    def call(self, model: Any, x: Any, train: bool) -> Any:
        return model(x)

    def train_step(self, model: Any, x: Any, call: Callable | None = None) -> tuple[Any, Any]:
        m = self.prepare(model, True)
        y = self.run(m, x, True, call)  # NNX layers update their statistics in place
        m.eval()
        return y, m

    def trace(self, model: Any, probe: Any, call: Callable | None = None) -> list[Call]:
        nnx = _nnx()
        m = self.prepare(model, False)
        known = lambda layers: {  # noqa: E731
            path: layer for path, layer in layers.items() if layer.kind not in ("param", "unknown")
        }
        classes = {type(layer.module) for layer in known(self._walk(m)[0]).values()}
        graph, state = nnx.split(m)
        ids: dict[int, str] = {}
        rec = CallRecorder()

        def run(st: Any, x: Any) -> Any:
            inner = nnx.merge(graph, st)  # a model at this trace level: its layers may write Variables
            ids.update({id(layer.module): path for path, layer in known(self._walk(inner)[0]).items()})
            return self.run(inner, x, False, call)

        with patched_calls(classes, lambda obj: ids.get(id(obj)), rec):
            jax.eval_shape(run, state, probe)
        return rec.calls()

    def write(self, like: Any, records: Mapping[str, Any], layers: Mapping[str, Layer], adapt: Any = None) -> Any:
        from normbridge.adapters.nnx import convert
        from normbridge.errors import ConversionError

        out = self.copy(like)
        ours = self._walk(out)[0]
        every = dict(ours)
        for layer in ours.values():
            if layer.inner is not None:
                every[layer.inner.path] = layer.inner
        problems: list[str] = []
        plans: list[Callable[[], None]] = []
        for path, record in records.items():
            layer = every[path]
            if layer.kind in KIND_OF_CLASS.values():
                try:
                    writes = convert._writes(record, layer.module)
                except ValueError as err:
                    if adapt is None:
                        problems.append(f"{path}: {err}")
                        continue
                    try:
                        writes = convert._writes(adapt(path, record, layer.record), layer.module)
                    except ValueError as err2:
                        problems.append(f"{path}: {err2}")
                        continue
                plans.append(lambda w=writes: [convert._write(c, k, v) for _, c, k, v in w])
                continue
            current = dict(layer.record)
            found = check_plain(path, current, record)
            if found:
                problems += found
                continue
            plans.append(lambda m=layer, r=dict(record): _set_plain(m, r))
        if problems:
            raise ConversionError("writing the nnx target failed", problems=problems)
        for plan in plans:
            plan()
        return out


def _has_variables(module: Any) -> bool:
    nnx = _nnx()
    return any(not isinstance(v, nnx.RngState) for _, v in nnx.to_flat_state(nnx.state(module)))


def _set_plain(layer: Layer, record: Mapping[str, Any]) -> None:
    if layer.kind in ("param", "unknown"):
        getattr(layer.module, layer.meta["attr"]).set_value(record["value"])
        return
    for name, value in record.items():
        owner = layer.module
        *heads, field = name.split("/")
        for h in heads:
            owner = getattr(owner, h)
        getattr(owner, field).set_value(value)
