"""The fast-mode switch: names, scoping, environment variable, and its place in jit's cache key."""

from __future__ import annotations

import os
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normbridge
from normbridge import core
from normbridge.adapters import linen as nbl

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(code: str, **env: str) -> str:
    full_env = {**os.environ, **env}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=full_env, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


def test_default_is_exact_and_fast_scopes():
    assert normbridge.config.implementation == "exact"
    with normbridge.fast():
        assert normbridge.config.implementation == "fast"
        assert core.use_fast()
        with normbridge.fast(False):
            assert normbridge.config.implementation == "exact"
        assert normbridge.config.implementation == "fast"
    assert normbridge.config.implementation == "exact"


def test_config_update_is_global_and_validated():
    try:
        normbridge.config.update("implementation", "fast")
        assert core.use_fast()
    finally:
        normbridge.config.update("implementation", "exact")
    assert not core.use_fast()
    with pytest.raises(ValueError, match="exact"):
        normbridge.config.update("implementation", "fastest")
    with pytest.raises(AttributeError, match="Unrecognized normbridge config option"):
        normbridge.config.update("precision", "fast")


def test_fast_is_a_decorator():
    @normbridge.fast()
    def mode():
        return normbridge.config.implementation

    assert mode() == "fast"
    assert normbridge.config.implementation == "exact"


def test_environment_variable_selects_fast():
    code = "import normbridge; print(normbridge.config.implementation)"
    assert _run(code, NORMBRIDGE_IMPLEMENTATION="fast") == "fast"
    assert _run(code, NORMBRIDGE_IMPLEMENTATION="exact") == "exact"


def test_import_stays_light():
    assert _run("import sys, normbridge; print('jax' in sys.modules)") == "False"


def _group_norm_nhwc():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6, 6, 8)).astype(np.float32)) + 3.0
    m = nbl.GroupNorm(num_groups=4)
    return m, m.init(jax.random.PRNGKey(0), x), x


def _entry_hlo(compiled_text: str) -> str:
    return compiled_text[compiled_text.index("ENTRY"):]


def test_jit_traced_in_both_modes_gives_two_programs():
    m, variables, x = _group_norm_nhwc()
    traces = []

    def f(v, x):
        traces.append(normbridge.config.implementation)
        return m.apply(v, x)

    jf = jax.jit(f)
    y_exact = jf(variables, x)
    with normbridge.fast():
        y_fast = jf(variables, x)
        y_fast_again = jf(variables, x)  # cached: no third trace
    y_exact_again = jf(variables, x)
    assert traces == ["exact", "fast"]
    # Different programs (the channels-last GroupNorm statistics are column reductions in fast mode)...
    hlo_exact = _entry_hlo(jf.lower(variables, x).compile().as_text())
    with normbridge.fast():
        hlo_fast = _entry_hlo(jf.lower(variables, x).compile().as_text())
    assert hlo_exact != hlo_fast
    # ... each reused from the cache, and exact mode still bitwise its first result.
    np.testing.assert_array_equal(np.asarray(y_exact), np.asarray(y_exact_again))
    np.testing.assert_array_equal(np.asarray(y_fast), np.asarray(y_fast_again))
    np.testing.assert_allclose(np.asarray(y_fast), np.asarray(y_exact), rtol=0, atol=1e-5)


def test_filter_jit_is_keyed_too():
    traces = []

    @eqx.filter_jit
    def f(x):
        traces.append(normbridge.config.implementation)
        return core.moments(x, (1, 2, 4))

    x = jnp.ones((2, 3, 3, 2, 2))
    f(x)
    with normbridge.fast():
        f(x)
    f(x)
    assert traces == ["exact", "fast"]


def test_exact_mode_program_is_unchanged():
    """Exact mode traces the same jaxpr whether or not fast mode was ever used in the process."""
    m, variables, x = _group_norm_nhwc()
    before = str(jax.make_jaxpr(m.apply)(variables, x))
    with normbridge.fast():
        fast_jaxpr = str(jax.make_jaxpr(m.apply)(variables, x))
    assert before != fast_jaxpr
    assert str(jax.make_jaxpr(m.apply)(variables, x)) == before
