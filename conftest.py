"""Repository root: load normbridge's pytest plugin from this checkout when no installed copy registered it.

An installed normbridge registers ``normbridge.testing.pytest_plugin`` through its ``pytest11`` entry
point; a checkout run without installing it gets the same plugin here, registered once either way.
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    from normbridge.testing import pytest_plugin

    if not config.pluginmanager.is_registered(pytest_plugin) and not config.pluginmanager.is_blocked("normbridge"):
        config.pluginmanager.register(pytest_plugin, "normbridge")
