"""Functional views of a model of any of the four frameworks, for :func:`normbridge.testing.assert_equivalent`.

A :class:`Functional` splits a model into ``params`` (what the optimizer trains and gradients are taken
of) and ``state`` (running statistics and other non-trainable values), and calls it as a pure function
``apply(params, state, x, train) -> (y, new_state)`` that follows the framework's own conventions:

- linen ``(module, variables)``: ``module.apply`` with ``train=`` / ``deterministic=`` /
  ``use_running_average=`` when ``__call__`` takes such a flag, ``mutable=`` the non-param collections
  in training;
- NNX module: ``nnx.split``/``nnx.merge``, ``.train()`` / ``.eval()``;
- Equinox ``(model, state)`` or a stateless model: one example per call, ``jax.vmap`` over the batch
  with the BatchNorms' ``axis_name``, ``eqx.nn.inference_mode`` in eval;
- treex module: ``filter(Parameter)`` / ``merge``, ``.train()`` / ``.eval()``.

Paths are the user's own: ``tree_paths`` of ``params`` and ``state`` as each framework names them.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import jax

Apply = Callable[[Any, Any, Any, bool], tuple[Any, Any]]


@dataclasses.dataclass(frozen=True)
class Functional:
    """A model as ``(params, state, apply)``; ``framework`` names the convention used."""

    framework: str
    params: Any
    state: Any
    apply: Apply
    rebuild: Callable[[Any, Any], Any] | None = None  # (params, state) -> the model in its framework's form


def _is_linen(model: Any) -> bool:
    try:
        import flax.linen as nn
    except ImportError:  # pragma: no cover - flax is a runtime dependency of the facades
        return False
    return isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], nn.Module)


def _is_nnx(model: Any) -> bool:
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, nnx.Module)


def _is_treex(model: Any) -> bool:
    try:
        from normbridge.adapters.treex.module import Module
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, Module)


def _is_equinox(model: Any) -> bool:
    try:
        import equinox as eqx
    except ImportError:  # pragma: no cover
        return False
    if isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], eqx.Module):
        return model[1] is None or isinstance(model[1], eqx.nn.State)
    return isinstance(model, eqx.Module)


def _linen_flags(module: Any, train: bool) -> dict[str, bool]:
    params = inspect.signature(type(module).__call__).parameters
    flags = {"train": train, "training": train, "deterministic": not train, "use_running_average": not train}
    return {k: v for k, v in flags.items() if k in params}


def _linen(model: tuple[Any, Any]) -> Functional:
    module, variables = model
    variables = dict(variables)
    params = variables.get("params", {})
    state = {k: v for k, v in variables.items() if k != "params"}

    def apply(p: Any, s: Any, x: Any, train: bool) -> tuple[Any, Any]:
        flags = _linen_flags(module, train)
        if train and s:
            y, updates = module.apply({"params": p, **s}, x, **flags, mutable=list(s))
            return y, {**s, **dict(updates)}
        return module.apply({"params": p, **s}, x, **flags), s

    return Functional("linen", params, state, apply, lambda p, s: (module, {"params": p, **s}))


def _nnx(model: Any) -> Functional:
    from flax import nnx

    graphdef, params, state = nnx.split(model, nnx.Param, ...)

    def apply(p: Any, s: Any, x: Any, train: bool) -> tuple[Any, Any]:
        m = nnx.merge(graphdef, p, s, copy=True)
        m.train() if train else m.eval()
        y = m(x)
        return y, nnx.split(m, nnx.Param, ...)[2]

    return Functional("nnx", params, state, apply, lambda p, s: nnx.merge(graphdef, p, s))


def _equinox(model: Any) -> Functional:
    import equinox as eqx

    stateful = isinstance(model, tuple)
    net, state = model if stateful else (model, None)
    params, static = eqx.partition(net, eqx.is_inexact_array)
    axis_names = {
        m.axis_name
        for m in jax.tree_util.tree_leaves(net, is_leaf=lambda m: hasattr(m, "axis_name"))
        if hasattr(m, "axis_name")
    }
    axis_names.discard(None)
    if len(axis_names) > 1:
        raise ValueError(f"assert_equivalent: the Equinox model's BatchNorms use several axis names {axis_names}")
    axis_name = next(iter(axis_names), None)

    # a model built with make_with_state may still be called without its (empty) state
    takes_state = stateful and len(inspect.signature(type(net).__call__).parameters) >= 3

    def apply(p: Any, s: Any, x: Any, train: bool) -> tuple[Any, Any]:
        m = eqx.nn.inference_mode(eqx.combine(p, static), value=not train)
        if takes_state:
            return jax.vmap(m, axis_name=axis_name, in_axes=(0, None), out_axes=(0, None))(x, s)
        return jax.vmap(m, axis_name=axis_name)(x), s

    def rebuild(p: Any, s: Any) -> Any:
        return (eqx.combine(p, static), s) if stateful else eqx.combine(p, static)

    return Functional("equinox", params, state if stateful else {}, apply, rebuild)


def _treex(model: Any) -> Functional:
    from normbridge.adapters.treex.module import Parameter

    def not_parameter(field: Any) -> bool:  # a treeo.FieldInfo, as treeo's filter passes it
        return not (isinstance(field.kind, type) and issubclass(field.kind, Parameter))

    params = model.filter(Parameter)
    state = model.filter(not_parameter)

    def apply(p: Any, s: Any, x: Any, train: bool) -> tuple[Any, Any]:
        m = model.merge(p, s)
        m = m.train() if train else m.eval()
        y = m(x)
        return y, m.filter(not_parameter)

    return Functional("treex", params, state, apply, lambda p, s: model.merge(p, s))


def functional(model: Any) -> Functional:
    """The :class:`Functional` view of a linen ``(module, variables)``, NNX module, Equinox ``(model, state)``
    or model, or treex module; a ``Functional`` is returned as it is (for models with their own conventions)."""
    if isinstance(model, Functional):
        return model
    if _is_linen(model):
        return _linen(model)
    if _is_nnx(model):
        return _nnx(model)
    if _is_treex(model):
        return _treex(model)
    if _is_equinox(model):
        return _equinox(model)
    raise TypeError(
        "assert_equivalent: cannot tell the framework of "
        f"{type(model).__name__}; pass a linen (module, variables), an NNX module, an Equinox model or "
        "(model, state), a treex module, or a normbridge.testing.Functional"
    )
