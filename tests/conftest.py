"""Shared test configuration: fake devices, hypothesis profiles, common fixtures."""

from __future__ import annotations

import os

# Eight fake CPU devices for the multi-device tests; must be set before jax is imported.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()

import pathlib  # noqa: E402

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

_common = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    print_blob=True,
)
# ci: keeps the whole suite inside the CI budget (2 cores, ~15 min); derandomized so a red CI reproduces.
settings.register_profile("ci", max_examples=8, derandomize=True, **_common)
# dev: the default for a local `pytest`.
settings.register_profile("dev", max_examples=12, **_common)
# thorough: HYPOTHESIS_PROFILE=thorough pytest tests/conformance  (many more examples).
settings.register_profile("thorough", max_examples=200, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

@pytest.fixture(scope="session")
def treex_fixtures() -> pathlib.Path:
    """The real-treex norm-layer fixtures shipped in the package (``normbridge/conformance/fixtures/treex``)."""
    from normbridge.conformance import treex_fixtures as tf

    return tf.fixtures_dir()


@pytest.fixture(scope="session")
def treex_model_fixtures() -> pathlib.Path:
    """The real-treex whole-model fixtures (``normbridge/conformance/fixtures/treex-models``)."""
    from normbridge.conformance import treex_fixtures as tf

    return tf.fixtures_dir(name="treex-models")
