"""The ``flax.linen`` spoke: ``(module, variables)``, native layers or the :mod:`normbridge.adapters.linen` facade.

Paths are linen scope paths (``ResNetBlock_0/Conv_1``). A linen model's submodules (and their
hyper-parameters) exist only while it runs, so its layers are found by running it once abstractly
(``jax.eval_shape``) on the probe under ``nn.intercept_methods``: every ``__call__`` of a known layer
is recorded with its bound module, in call order, which is also the execution order used for
pairing. Calls made inside a known layer (the Dense a SpectralNorm wraps, attention's projections)
belong to it. Every variable must belong to a called layer, else it is reported. Targets are new
variables dicts; ``like``'s are not mutated.

A source may also be linen variables alone (``{'params': ..., 'batch_stats': ...}``, a checkpoint
without its architecture): nothing can run, so its layers are untyped scopes (every scope path, and
every array directly in a scope, which may be a bare ``self.param``) until pairing (mapping and
names only) gives each the kind of its ``like`` layer; :meth:`LinenSpoke.typed` then reads it in
that kind's layout (:func:`normbridge.adapters.linen.to_canonical` with ``module=None``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax

from normbridge._optional import require
from normbridge.conversion._util import check_plain
from normbridge.conversion.base import NORM_KINDS, UNTYPED, WRAPPER_KINDS, Call, Layer, Spoke
from normbridge.core import KIND_OF_CLASS

PLAIN_CLASSES = {
    "Dense": "dense",
    "DenseGeneral": "dense_general",
    "Conv": "conv",
    "ConvTranspose": "conv_transpose",
    "Embed": "embed",
    "MultiHeadDotProductAttention": "attention",
    "MultiHeadAttention": "attention",
    "SelfAttention": "attention",
}
#: Keyword flags a linen ``__call__`` commonly takes, and their value in eval mode.
EVAL_FLAGS = {"train": False, "training": False, "deterministic": True, "use_running_average": True}


def _nn() -> Any:
    return require("flax.linen", facade="linen", extra="linen")


def kind_of(module: Any) -> str | None:
    name = type(module).__name__
    return KIND_OF_CLASS.get(name) or PLAIN_CLASSES.get(name)


def is_bare(obj: Any) -> bool:
    """Linen variables without their module (a checkpoint with no architecture)."""
    return isinstance(obj, Mapping)


def bare_layers(variables: Mapping[str, Any]) -> dict[str, Layer]:
    """The untyped candidates of variables without their module: every scope path, and every array
    directly in a scope (SpectralNorm/WeightNorm entries such as ``'Dense_0/kernel/u'`` are their scope's)."""
    out: dict[str, Layer] = {}
    for tree in _plain(variables).values():
        for key in _flatten(tree):
            for i in range(1, len(key)):
                path = "/".join(key[:i])
                out.setdefault(path, Layer(path, UNTYPED, "variables", meta={"scope": key[:i]}))
            if "/" not in key[-1]:
                path = "/".join(key)
                out.setdefault(path, Layer(path, UNTYPED, "variables", meta={"array": key}))
    return out


def split(obj: Any) -> tuple[Any, dict[str, Any]]:
    module, variables = obj
    return module, _plain(variables)


def _plain(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {str(k): _plain(v) for k, v in tree.items()}
    return tree


def _at(tree: Mapping[str, Any], parts: tuple[str, ...]) -> Any:
    node: Any = tree
    for p in parts:
        if not isinstance(node, Mapping) or p not in node:
            return None
        node = node[p]
    return node


def _flatten(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """``{key tuple: leaf}``; keys are tuples because linen's SpectralNorm/WeightNorm keys contain ``/``."""
    if isinstance(tree, Mapping):
        out: dict[tuple[str, ...], Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, (*prefix, k)))
        return out
    return {prefix: tree}


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in flat.items():
        *heads, last = k
        node = out
        for h in heads:
            node = node.setdefault(h, {})
        node[last] = v
    return out


def flags(module: Any, train: bool) -> dict[str, Any]:
    """The eval/train keyword flags ``module.__call__`` takes (``train``, ``deterministic``, ...)."""
    try:
        params = inspect.signature(type(module).__call__).parameters
    except (TypeError, ValueError):
        return {}
    return {k: (v if not train else not v) for k, v in EVAL_FLAGS.items() if k in params}


def train_output(out: Any, variables: Mapping[str, Any]) -> tuple[Any, Any]:
    """``(y, updated collections or None)`` of what a train-mode call hook returned: ``module.apply(...,
    mutable=...)``'s ``(y, updates)`` (a mapping of the model's non-``params`` collections), or ``y`` alone."""
    stats = set(variables) - {"params"}
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping) and out[1] and set(out[1]) <= stats:
        return out[0], out[1]
    return out, None


class _Trace:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.stack: list[dict[str, Any]] = []
        self.stateless: list[str] = []


class LinenSpoke(Spoke):
    name = "linen"
    family = "flax"

    def __init__(self) -> None:
        self._cache: dict[tuple[int, int], tuple[dict[str, Layer], list[Call], list[str]]] = {}

    def _run(self, obj: Any, probe: Any, call: Callable | None) -> tuple[dict[str, Layer], list[Call], list[str]]:
        key = (id(obj), id(probe))
        if key in self._cache:
            return self._cache[key]
        if probe is None:
            raise LookupError("a linen model's layers exist only while it runs: pass probe= (an input batch)")
        nn = _nn()
        _, variables = split(obj)
        tr = _Trace()

        def intercept(next_fun: Any, args: Any, kwargs: Any, ctx: Any) -> Any:
            if ctx.method_name != "__call__":
                return next_fun(*args, **kwargs)
            mod = ctx.module
            path = "/".join(mod.path)
            kind = kind_of(mod)
            owner = next((e for e in reversed(tr.stack) if e["kind"] is not None), None)
            entry = {"path": path, "kind": kind, "module": mod, "in": None, "out": None, "inner": []}
            if owner is not None:
                owner["inner"].append(entry)
            else:
                from normbridge.conversion.base import first_shape

                entry["in"] = first_shape(args)
                tr.calls.append(entry)
            tr.stack.append(entry)
            try:
                out = next_fun(*args, **kwargs)
            finally:
                tr.stack.pop()
            if owner is None:
                from normbridge.conversion.base import first_shape

                entry["out"] = first_shape(out)
            return out

        with nn.intercept_methods(intercept):
            # variables as an argument: abstract (jax.eval_shape) variables are fine
            jax.eval_shape(lambda v, x: self.run((obj[0], v), x, False, call), variables, probe)
        layers: dict[str, Layer] = {}
        calls: list[Call] = []
        stateless: list[str] = []
        containers: list[dict[str, Any]] = []
        for e in tr.calls:
            if e["path"] in layers or any(c.path == e["path"] for c in calls):
                continue
            if e["kind"] is None:
                containers.append(e)
                continue
            layers[e["path"]] = self._layer(e, variables)
            calls.append(Call(e["path"], e["in"], e["out"]))
        owned: set[tuple[str, ...]] = set()
        for layer in layers.values():
            for sub in (layer, layer.inner):
                if sub is not None:
                    owned.add(tuple(sub.path.split("/")) if sub.path else ())
        flat = {c: _flatten(tree) for c, tree in variables.items()}
        for e in containers:
            path = e["path"]
            parts = tuple(path.split("/")) if path else ()
            for col, tree in variables.items():
                node = _at(tree, parts)
                if not isinstance(node, Mapping):
                    continue
                for k, v in node.items():
                    if not isinstance(v, Mapping):
                        p = f"{path}/{k}" if path else k
                        kind = "param" if col == "params" else "unknown"
                        layers[p] = Layer(p, kind, "param", {"value": v}, None, meta={"collection": col})
                        owned.add((*parts, k))
            if path and not any(_at(t, parts) is not None for t in variables.values()):
                stateless.append(path)
        # every variable must belong to a called layer
        for col, leaves in flat.items():
            for p in leaves:
                if not any(p[: len(o)] == o for o in owned):
                    name = "/".join(p)
                    layers[name] = Layer(name, "unknown", f"{col} variable of no called layer", None, None)
        self._cache[key] = (layers, calls, stateless)
        return self._cache[key]

    def _layer(self, e: dict[str, Any], variables: Mapping[str, Any]) -> Layer:
        from normbridge.adapters.linen import convert

        mod, kind, path = e["module"], e["kind"], e["path"]
        cls = "variables" if mod is None else type(mod).__name__
        parts = tuple(path.split("/")) if path else ()
        if kind in KIND_OF_CLASS.values():
            if kind == "spectral_norm":
                collection = "batch_stats" if mod is None else mod.collection_name
                sub = _at(variables.get(collection, {}), parts) or {}
            elif kind == "weight_norm":
                sub = {k: v for k, v in (_at(variables.get("params", {}), parts) or {}).items()}
            else:
                sub = {c: _at(t, parts) for c, t in variables.items() if isinstance(_at(t, parts), Mapping)}
            layer = Layer(path, kind, cls, convert.to_canonical(sub, mod, kind=kind), mod)
            if kind in WRAPPER_KINDS:
                inner = next((i for i in e["inner"] if i["kind"] is not None), None)
                name = layer.record.option("layer_name")
                if inner is None and mod is None and name and e.get("inner_kind"):
                    # variables alone: the wrapped layer is the sibling scope its entries name
                    inner = {"path": "/".join((*parts[:-1], name)), "kind": e["inner_kind"], "module": None}
                if inner is not None:
                    layer.inner = self._layer(inner, variables)
            return layer
        params = _at(variables.get("params", {}), parts) or {}
        others = [c for c, t in variables.items() if c != "params" and _at(t, parts) is not None]
        record = {"/".join(k): v for k, v in _flatten(params).items()}
        return Layer(path, kind, cls, record, mod, meta={"other_collections": others})

    def typed(self, variables: Mapping[str, Any], layer: Layer, like: Layer) -> Layer:
        """An untyped ``layer`` of variables without their module (:func:`bare_layers`) read in the linen
        layout of ``like``'s kind; ``ValueError`` when its arrays do not fit that layout."""
        variables = _plain(variables)
        if like.kind == "param":
            if "array" not in layer.meta:
                raise ValueError("a scope of arrays, but like's layer is one bare parameter")
            key = layer.meta["array"]
            col = next(c for c, t in variables.items() if _at(t, key) is not None)
            return Layer(layer.path, "param", "param", {"value": _at(variables[col], key)}, meta={"collection": col})
        if "scope" not in layer.meta:
            raise ValueError(f"one array, but like's layer is a {like.kind} layer")
        if like.kind not in (*NORM_KINDS, *PLAIN_CLASSES.values()):
            raise ValueError(f"like's layer is of a kind unknown to normbridge ({like.cls})")
        inner_kind = like.inner.kind if like.inner is not None else None
        entry = {"path": layer.path, "kind": like.kind, "module": None, "inner": [], "inner_kind": inner_kind}
        return self._layer(entry, variables)

    def collections(self, variables: Mapping[str, Any]) -> list[tuple[str, dict[tuple[str, ...], Any]]]:
        """``(collection, {key tuple: array})`` of variables without their module."""
        return [(col, _flatten(tree)) for col, tree in _plain(variables).items()]

    def covers(self, layer: Layer) -> dict[str, tuple[str, ...]]:
        """``{collection or "*": scope}``: the arrays a typed layer of variables without their module was
        read from (a norm layer: all under its scope; other kinds: their ``params``; a parameter: itself)."""
        parts = tuple(layer.path.split("/")) if layer.path else ()
        if layer.kind in NORM_KINDS:
            return {"*": parts}
        return {layer.meta.get("collection", "params"): parts}

    def layers(self, model: Any, probe: Any = None, call: Callable | None = None) -> dict[str, Layer]:
        if is_bare(model):
            return bare_layers(model)
        return self._run(model, probe, call)[0]

    def stateless(self, model: Any, probe: Any = None, call: Callable | None = None) -> list[str]:
        return [] if is_bare(model) else self._run(model, probe, call)[2]

    def trace(self, model: Any, probe: Any, call: Callable | None = None) -> list[Call] | None:
        """The call order; ``None`` for variables without their module (nothing to run)."""
        return None if is_bare(model) else self._run(model, probe, call)[1]

    def copy(self, obj: Any) -> Any:
        return obj

    def call(self, obj: Any, x: Any, train: bool) -> Any:
        module, variables = obj
        kw = flags(module, train)
        if train:
            mutable = [c for c in variables if c != "params"]
            y, _ = module.apply(variables, x, mutable=mutable, rngs={"dropout": jax.random.key(0)}, **kw)
            return y
        return module.apply(variables, x, **kw)

    def train_step(self, obj: Any, x: Any, call: Callable | None = None) -> tuple[Any, Any]:
        module, variables = obj
        mutable = [c for c in variables if c != "params"]
        if call is not None:
            y, updates = train_output(call(obj, x, True), variables)
            return y, None if updates is None else (module, {**_plain(variables), **_plain(updates)})
        y, updates = module.apply(
            variables, x, mutable=mutable, rngs={"dropout": jax.random.key(0)}, **flags(module, True)
        )
        return y, (module, {**_plain(variables), **_plain(updates)})

    def write(self, like: Any, records: Mapping[str, Any], layers: Mapping[str, Layer], adapt: Any = None) -> Any:
        from normbridge.adapters.linen import convert
        from normbridge.errors import ConversionError

        module, variables = split(like)
        flat = {c: _flatten(t) for c, t in variables.items()}
        every = dict(layers)
        for layer in layers.values():
            if layer.inner is not None:
                every[layer.inner.path] = layer.inner
        problems: list[str] = []
        for path, record in records.items():
            layer = every[path]
            parts = tuple(path.split("/")) if path else ()
            n = len(parts)
            if layer.kind in KIND_OF_CLASS.values():
                name = layer.inner.path.rsplit("/", 1)[-1] if layer.inner is not None else None
                try:
                    try:
                        sub = convert.from_canonical(record, layer.module, layer_name=name)
                    except ValueError:
                        if adapt is None:
                            raise
                        sub = convert.from_canonical(adapt(path, record, layer.record), layer.module, layer_name=name)
                except ValueError as err:
                    problems.append(f"{path}: {err}")
                    continue
                if layer.kind == "spectral_norm":
                    sub = {layer.module.collection_name: sub}
                elif layer.kind == "weight_norm":
                    sub = {"params": sub}
                for col, tree in sub.items():
                    new = {"/".join(k): v for k, v in _flatten(tree).items()}
                    have = {
                        "/".join(k[n:]): v for k, v in flat.get(col, {}).items() if k[:n] == parts and len(k) == n + 1
                    }
                    found = check_plain(f"{col}/{path}", have, new)
                    problems += found
                    if not found:
                        flat.setdefault(col, {}).update({(*parts, *k): v for k, v in _flatten(tree).items()})
                continue
            if layer.kind in ("param", "unknown"):
                col = layer.meta.get("collection", "params")
                current = flat.get(col, {}).get(parts)
                found = check_plain(f"{col}/{path}", {} if current is None else {"value": current}, record)
                problems += found
                if not found:
                    flat[col][parts] = record["value"]
                continue
            have = {"/".join(k[n:]): v for k, v in flat.get("params", {}).items() if k[:n] == parts}
            found = check_plain(f"params/{path}", have, record)
            problems += found
            if not found:
                flat["params"].update({(*parts, *k.split("/")): v for k, v in record.items()})
        if problems:
            raise ConversionError("writing the linen target failed", problems=problems)
        return module, {c: _unflatten(f) for c, f in flat.items()}
