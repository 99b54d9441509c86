"""The implementation switch: ``"exact"`` (bitwise the native libraries, the default) or ``"fast"``.

A trace-time setting in the JAX style, like ``jax.default_matmul_precision``: it applies to what is
*traced* while it is set, and it is part of jit's cache key, so one jitted function called in both
modes compiles (and caches) both programs.

* ``with normbridge.fast(): ...`` (also a decorator);
* ``normbridge.config.update("implementation", "fast")`` (global, like ``jax.config.update``);
* the environment variable ``NORMBRIDGE_IMPLEMENTATION=fast``, read at import.

The state is a JAX config state (``jax._src.config.enum_state`` with ``include_in_jit_key`` and
``include_in_trace_context``), the mechanism JAX uses for its own trace-time options: the value is
thread-local inside the context manager and enters the C++ jit dispatch key and every tracing cache
(``jax.jit``, ``eqx.filter_jit`` and ``nnx.jit`` all build on them). It also answers to
``jax.config.update("normbridge_implementation", ...)``.
"""

from __future__ import annotations

from typing import Any

from jax._src import config as _jax_config

IMPLEMENTATIONS: tuple[str, ...] = ("exact", "fast")

#: The JAX config state; ``implementation_state.value`` is the mode in effect for the current trace.
implementation_state = _jax_config.enum_state(
    name="normbridge_implementation",
    enum_values=list(IMPLEMENTATIONS),
    default="exact",
    help=(
        "normbridge: 'exact' traces every layer to its native library's program (bitwise); 'fast' "
        "uses the fastest formulation of the same math known for the shape (see docs/fast.md)."
    ),
    include_in_jit_key=True,
    include_in_trace_context=True,
)


def implementation() -> str:
    """The implementation in effect now (for the function being traced): ``"exact"`` or ``"fast"``."""
    return implementation_state.value


def use_fast() -> bool:
    """Whether core functions trace their fast formulation: the one place the choice is read."""
    return implementation_state.value == "fast"


def fast(enabled: bool = True) -> Any:
    """Context manager (or decorator): trace normbridge layers with the fast formulations.

    ``fast(False)`` forces exact mode inside a region where fast mode is on globally.
    """
    return implementation_state("fast" if enabled else "exact")


class Config:
    """``normbridge.config``: ``update("implementation", value)`` and the attribute ``implementation``."""

    _OPTIONS = ("implementation",)

    def update(self, name: str, value: Any) -> None:
        """Set an option globally (``"implementation"``: ``"exact"`` or ``"fast"``)."""
        if name not in self._OPTIONS:
            raise AttributeError(f"Unrecognized normbridge config option: {name} (known: {', '.join(self._OPTIONS)})")
        if value not in IMPLEMENTATIONS:
            raise ValueError(f"normbridge implementation must be one of {IMPLEMENTATIONS}, got {value!r}")
        _jax_config.update("normbridge_implementation", value)

    @property
    def implementation(self) -> str:
        """The implementation in effect now."""
        return implementation()

    def __repr__(self) -> str:
        return f"normbridge.config(implementation={self.implementation!r})"


config = Config()
