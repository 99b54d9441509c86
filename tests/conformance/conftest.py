"""Fixtures of the conformance tests: one comparison run under ``jax_numpy_dtype_promotion="strict"``.

Equinox's own test suite runs with strict promotion, and careful users enable it; a drop-in facade must
then do what the native layer does: compute the same result, or raise the same error. Each facade's
property tests add a strict-promotion run of their measuring function through :func:`strict_promotion`,
with a quarter of the profile's examples (2 in ``ci``; the strategies are the standard run's), inside
the ``jax.numpy_dtype_promotion("strict")`` context manager so that no other test is affected.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import pytest


def _raised(fn: Callable[[], Any]) -> BaseException | None:
    try:
        fn()
    except Exception as err:  # measured: both sides must fail the same way
        return err
    return None


def run_strict(measure: Callable[[], Any], native: Callable[[], Any], facade: Callable[[], Any]) -> tuple[str, Any]:
    """``measure()`` under strict promotion: ``("compared", its result)`` or ``("raised", native error)``.

    ``measure`` runs native and facade and compares them (it raises if either side raises);
    ``native``/``facade`` run one side alone. When ``measure`` raises, both sides must raise: the
    same exception type, the native message verbatim in the facade's.
    """
    with jax.numpy_dtype_promotion("strict"):
        try:
            return "compared", measure()
        except Exception:
            nat, fac = _raised(native), _raised(facade)
            if nat is None and fac is None:
                raise  # neither side fails alone: the measurement itself is broken
            assert nat is not None, f"under strict promotion the facade raises where native runs: {fac!r}"
            assert fac is not None, f"under strict promotion native raises {nat!r}; the facade runs"
            assert isinstance(fac, type(nat)), f"native {type(nat).__name__} vs facade {type(fac).__name__}: {fac}"
            assert _message(nat) in _message(fac), f"native message not in the facade's:\n{nat}\n{fac}"
            return "raised", nat


def _message(err: BaseException) -> str:
    """The error text; for jax's ``TypePromotionError`` with the two dtypes in sorted order.

    jax names the operands' dtypes in operand order, so ``x - mean`` and ``mean - x`` give the same
    error with the pair swapped; the treex facade fails at its statistics upcast, linen configured as
    treex at ``x - mean`` (bfloat16 and float32 either way).
    """
    text = str(err)
    if isinstance(err, jax.dtypes.TypePromotionError):
        match = re.match(r"Input dtypes \(([^)]*)\)", text)
        if match:
            pair = ", ".join(sorted(p.strip() for p in match.group(1).split(",")))
            text = f"Input dtypes ({pair})" + text[match.end():]
    return text


@pytest.fixture(scope="session")
def strict_promotion() -> Callable[..., tuple[str, Any]]:
    """:func:`run_strict` (session-scoped, so hypothesis tests may use it)."""
    return run_strict
