"""A treex-compatible module system on ``treeo``: ``Module``, the kinds, lazy ``init``.

treex 0.6 modules are ``treeo.Tree`` objects: every annotated field is either a
*node* (a pytree child: arrays, sub-modules) or *static* (part of the treedef),
and every node field has a *kind* (``Parameter``, ``BatchStat``, ...) that
``filter`` selects on. Three static flags drive the behaviour:

* ``_training`` (default ``True``): ``train()`` / ``eval()``;
* ``_frozen`` (default ``False``): ``freeze()`` / ``unfreeze()``;
* ``_initialized`` (default ``False``): set by ``init(key, inputs)``, which runs
  the module once with a key so that each layer creates its leaves from the
  input's shape.

Modules mutate themselves when called (a BatchNorm stores its new running
statistics on ``self``); under ``jax.jit`` that happens on the traced copy, which
is returned as usual (``y, module = jit(lambda m, x: (m(x), m))(module, x)``).

treeo 0.2.2's own ``copy``/``filter``/``apply`` call ``jax.tree_map``, which the
installed jax no longer has, so those operations are implemented here on the
object graph directly; the pytree registration and field metadata are treeo's.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import jax
import jax.numpy as jnp

from normbridge._optional import require

to = require("treeo", facade="treex")

M = TypeVar("M", bound="Module")

__all__ = [
    "BatchStat",
    "Cache",
    "ModelState",
    "Module",
    "OptState",
    "Parameter",
    "Rng",
    "State",
    "TreePart",
    "initializing",
    "next_key",
    "param_key",
]


# --------------------------------------------------------------------------- kinds
class TreePart(to.KindMixin):
    """Base of every treex kind (``treex.types.TreePart``)."""


class Parameter(TreePart):
    """Trainable leaves (``treex.types.Parameter``)."""


class State(TreePart):
    """Non-trainable leaves (``treex.types.State``)."""


class Rng(State):
    """Random keys (``treex.types.Rng``)."""


class ModelState(State):
    """Model state that is not a parameter (``treex.types.ModelState``)."""


class BatchStat(ModelState):
    """Running batch statistics (``treex.types.BatchStat``)."""


class Cache(ModelState):
    """Cached values (``treex.types.Cache``)."""


class OptState(TreePart):
    """Optimizer state (``treex.types.OptState``)."""


# ------------------------------------------------------------------ init context
class _InitContext(threading.local):
    key: jax.Array | None = None
    initializing: bool = False


_INIT = _InitContext()


@contextlib.contextmanager
def _init_context(key: jax.Array) -> Iterator[None]:
    prev = (_INIT.key, _INIT.initializing)
    _INIT.key, _INIT.initializing = key, True
    try:
        yield
    finally:
        _INIT.key, _INIT.initializing = prev


def initializing() -> bool:
    """``True`` inside ``Module.init`` (layers create their leaves then)."""
    return _INIT.initializing


def next_key() -> jax.Array:
    """A fresh key from the ``init`` key, as treex's ``next_key``: ``key, carry = split(carry)``.

    Every treex layer asks for one key at init and hands it to its flax 0.4.1 module as the
    ``params`` rng; :func:`param_key` derives each parameter's key from it as flax did.
    """
    if _INIT.key is None:
        raise RuntimeError("treex: RNG key not set; leaves are only created inside `Module.init(key, inputs)`")
    key, _INIT.key = jax.random.split(_INIT.key)
    return key


def _fold_in_static(key: jax.Array, data: int) -> jax.Array:
    """flax's ``LazyRng`` fold-in of one int (``sha1`` of its big-endian bytes, first 4 bytes as uint32)."""
    digest = hashlib.sha1(data.to_bytes((data.bit_length() + 7) // 8, byteorder="big")).digest()
    return jax.random.fold_in(key, jnp.uint32(int.from_bytes(digest[:4], byteorder="big")))


def param_key(layer_key: jax.Array, index: int) -> jax.Array:
    """The key flax 0.4.1 gave the ``index``-th parameter (1-based) of a root module initialized with ``layer_key``."""
    return _fold_in_static(layer_key, index)


def _as_key(key: int | jax.Array) -> jax.Array:
    if isinstance(key, int):
        return jax.random.PRNGKey(key)
    return jnp.asarray(key) if not jax.dtypes.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key) else key


def _snake(name: str) -> str:
    """``BatchNorm`` → ``batch_norm`` (treex's default module names)."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


# ------------------------------------------------------------------- graph walk
def _map_modules(obj: Any, fn: Callable[[Module], None]) -> None:
    """Call ``fn`` on every Module reachable through node fields, lists, tuples and dicts (children first)."""
    if isinstance(obj, Module):
        for field, value in vars(obj).items():
            if obj._is_node(field):
                _map_modules(value, fn)
        fn(obj)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _map_modules(v, fn)
    elif isinstance(obj, dict):
        for v in obj.values():
            _map_modules(v, fn)


def _walk_tree_order(obj: Any, fn: Callable[[Module], None]) -> None:
    """Call ``fn`` on every Module in pytree leaf order (node fields sorted by name, as jax flattens dicts)."""
    if isinstance(obj, Module):
        fn(obj)
        for field in sorted(vars(obj)):
            if field != "_field_metadata" and obj._is_node(field):
                _walk_tree_order(vars(obj)[field], fn)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _walk_tree_order(v, fn)
    elif isinstance(obj, dict):
        for k in sorted(obj):
            _walk_tree_order(obj[k], fn)


def _copy(obj: Any) -> Any:
    """Deep copy of the module graph; arrays are immutable and shared."""
    if isinstance(obj, Module):
        new = object.__new__(type(obj))
        d = {k: _copy(v) for k, v in vars(obj).items() if k != "_field_metadata"}
        d["_field_metadata"] = dict(obj._field_metadata)
        new.__dict__.update(d)
        return new
    if isinstance(obj, list):
        return [_copy(v) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_copy(v) for v in obj)
    if isinstance(obj, dict):
        return {k: _copy(v) for k, v in obj.items()}
    return obj


def _filter_value(value: Any, kind: type, keep: Callable[[type], bool]) -> Any:
    """Replace every leaf of ``value`` (a field of kind ``kind``) by ``treeo.NOTHING`` unless kept."""
    if isinstance(value, Module):
        return value._filtered(keep)
    if isinstance(value, list):
        return [_filter_value(v, kind, keep) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_filter_value(v, kind, keep) for v in value)
    if isinstance(value, dict):
        return {k: _filter_value(v, kind, keep) for k, v in value.items()}
    if value is None:
        return None  # an empty pytree: nothing to filter
    return value if keep(kind) else to.NOTHING


# ----------------------------------------------------------------------- Module
class Module(to.Tree):
    """Base of every treex facade module (``treex.Module``).

    Fields: ``name`` (static, ``snake_case`` of the class name), the flags
    ``_training``, ``_frozen``, ``_initialized`` (static) and whatever the layer
    declares. Leaves are created by :meth:`init`.
    """

    _training: bool = to.static(True)
    _initialized: bool = to.static(False)
    _frozen: bool = to.static(False)

    def tree_flatten(self) -> tuple[tuple[dict[str, Any]], dict[str, Any]]:
        """treeo's flattening, without its per-call copy and metadata pass when they change nothing.

        ``jax.jit`` flattens the module on every call; treeo copies the module and re-annotates
        its fields each time, which costs about 10 µs per module (visible on GPU, where a norm
        layer runs in 0.1 ms). The result is the same: node fields as children, the rest (flags,
        configuration, field metadata) as static aux data.
        """
        ctx = to.tree._CONTEXT
        fields = vars(self)
        meta = self._field_metadata
        if ctx.add_field_info or ctx.flatten_mode is not None or not meta.keys() >= fields.keys():
            return super().tree_flatten()  # treeo's special modes, or fields treeo must annotate first
        node: dict[str, Any] = {}
        static: dict[str, Any] = {}
        for field, value in fields.items():
            (node if meta[field].node else static)[field] = value
        return (node,), static

    def _is_node(self, field: str) -> bool:
        meta = self._field_metadata.get(field)
        if meta is None:
            return isinstance(getattr(self, field, None), to.Tree)
        return bool(meta.node)

    def _set_name(self) -> None:
        self.name = _snake(type(self).__name__)

    # ---------------------------------------------------------------- flags
    @property
    def training(self) -> bool:
        return self._training

    @property
    def frozen(self) -> bool:
        return self._frozen

    @property
    def initialized(self) -> bool:
        return self._initialized

    def _with_flag(self: M, flag: str, value: bool, inplace: bool) -> M:
        module = self if inplace else self.copy()

        def setflag(m: Module) -> None:
            m.__dict__[flag] = value

        _map_modules(module, setflag)
        return module

    def train(self: M, mode: bool = True, inplace: bool = False) -> M:
        """This module (and every sub-module) with ``training=mode``; a copy unless ``inplace``."""
        return self._with_flag("_training", bool(mode), inplace)

    def eval(self: M, inplace: bool = False) -> M:
        """``train(False)``."""
        return self.train(False, inplace=inplace)

    def freeze(self: M, mode: bool = True, inplace: bool = False) -> M:
        """This module (and every sub-module) with ``frozen=mode``; a copy unless ``inplace``."""
        return self._with_flag("_frozen", bool(mode), inplace)

    def unfreeze(self: M, inplace: bool = False) -> M:
        """``freeze(False)``."""
        return self.freeze(False, inplace=inplace)

    # ----------------------------------------------------------------- init
    def init(
        self: M,
        key: int | jax.Array,
        inputs: Any = to.MISSING,
        call_method: str = "__call__",
        *,
        inplace: bool = False,
    ) -> M:
        """Run the module once on ``inputs`` so that each layer creates its leaves; set ``initialized``.

        ``key`` is an int seed or a PRNG key; ``inputs`` is one positional
        argument, or a ``(args_tuple, kwargs_dict)`` pair when it is a 2-tuple whose
        second item is a dict. Returns a copy unless ``inplace``.
        """
        module = self if inplace else self.copy()
        # treex ran on jax 0.4's non-partitionable threefry; the same key gives the same numbers only there.
        with jax.threefry_partitionable(False), _init_context(_as_key(key)):
            # treex first gives every key-only leaf (a KeySeq's ``Initializer``) a key, in leaf order,
            # then runs the forward pass, in which each layer takes one key for its parameters.
            _walk_tree_order(module, lambda m: m.rng_init())
            if inputs is not to.MISSING:
                if isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[1], dict):
                    args, kwargs = inputs
                else:
                    args, kwargs = (inputs,), {}
                getattr(module, call_method)(*args, **kwargs)
        return module._with_flag("_initialized", True, inplace=True)

    def rng_init(self) -> None:
        """Hook for leaves that need only a key (none of the normalization layers)."""

    def _check_ready(self) -> None:
        if not (self._initialized or initializing()):
            raise RuntimeError(
                f"{type(self).__name__}: module is not initialized; call `.init(key, inputs)` first "
                "(or load it from a checkpoint)"
            )

    # ----------------------------------------------------------- tree utils
    def copy(self: M) -> M:
        """Deep copy (leaves shared, they are immutable)."""
        return _copy(self)

    def _filtered(self: M, keep: Callable[[type], bool]) -> M:
        new = object.__new__(type(self))
        for field, value in vars(self).items():
            if field != "_field_metadata" and self._is_node(field):
                kind = self._field_metadata[field].kind if field in self._field_metadata else type(None)
                new.__dict__[field] = _filter_value(value, kind, keep)
            else:
                new.__dict__[field] = _copy(value)
        new.__dict__["_field_metadata"] = dict(self._field_metadata)
        return new

    def filter(self: M, *filters: type | Callable[[type], bool]) -> M:
        """A copy whose leaves not matching every filter are ``treeo.NOTHING``.

        A filter is a kind (kept when the field's kind is a subclass of it) or a
        predicate on the kind.
        """
        preds = [
            (lambda k, t=f: isinstance(k, type) and issubclass(k, t)) if isinstance(f, type) else f for f in filters
        ]
        return self._filtered(lambda kind: all(p(kind) for p in preds))

    def parameters(self: M, *filters: type | Callable[[type], bool]) -> M:
        """``filter(Parameter, *filters)``."""
        return self.filter(Parameter, *filters)

    def batch_stats(self: M, *filters: type | Callable[[type], bool]) -> M:
        """``filter(BatchStat, *filters)``."""
        return self.filter(BatchStat, *filters)

    def merge(self: M, *others: M) -> M:
        """Leaves of ``others`` (later wins) where they are not ``NOTHING``, else this module's."""
        flat, treedef = jax.tree_util.tree_flatten(self, is_leaf=lambda x: isinstance(x, to.Nothing))
        for other in others:
            oflat = jax.tree_util.tree_flatten(other, is_leaf=lambda x: isinstance(x, to.Nothing))[0]
            if len(oflat) != len(flat):
                raise ValueError(f"{type(self).__name__}.merge: structures differ ({len(flat)} vs {len(oflat)} leaves)")
            flat = [a if isinstance(b, to.Nothing) else b for a, b in zip(flat, oflat)]
        return jax.tree_util.tree_unflatten(treedef, flat)

    def to_dict(self, *, private_fields: bool = False, static_fields: bool = True, type_info: bool = False) -> Any:
        """treeo ``to_dict``: fields as nested dicts/lists (``static_fields=False``: node fields only)."""
        return to.to_dict(self, private_fields=private_fields, static_fields=static_fields, type_info=type_info)

    def __repr__(self) -> str:
        fields = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        inner = ", ".join(
            f"{k}={getattr(v, 'shape', v)!r}" if hasattr(v, "shape") else f"{k}={v!r}" for k, v in fields.items()
        )
        return f"{type(self).__name__}({inner}, training={self._training}, frozen={self._frozen})"
