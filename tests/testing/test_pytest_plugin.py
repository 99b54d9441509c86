"""The pytest plugin: registered through ``pytest11``; a failing ``assert report`` shows the table.

The installed case is reproduced without installing: a ``dist-info`` folder carrying the entry point that
pyproject.toml declares, on ``PYTHONPATH`` of a fresh pytest process, is how pip's install exposes it.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import tomllib

from normbridge.testing import pytest_plugin, tree_diff

ROOT = pathlib.Path(__file__).resolve().parents[2]

DEMO = textwrap.dedent(
    """
    import numpy as np
    from normbridge.testing import tree_diff

    def helper(a, b):
        report = tree_diff(a, b)
        assert report

    def test_bare_report():
        a = {"params": {"w": np.ones(3, np.float32)}, "stats": {"mean": np.zeros(2, np.float32)}}
        b = {"params": {"w": np.array([1, 2, 3], np.float32)}, "stats": {"mean": np.zeros(2, np.float32)}}
        report = tree_diff(a, b)
        assert report

    def test_in_helper():
        helper({"x": np.ones(2)}, {"x": np.zeros(2)})

    def test_compare():
        assert tree_diff({"z": np.ones(1)}, {"z": np.zeros(1)}) == tree_diff({"z": np.ones(1)}, {"z": np.ones(1)})

    def test_unrelated_assert():
        report = tree_diff({"q": np.ones(1)}, {"q": np.zeros(1)})
        assert 1 == 2
    """
)


def _entry_points() -> dict[str, str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["entry-points"]["pytest11"]


def _fake_install(site: pathlib.Path) -> None:
    dist = site / "normbridge_plugin_probe-0.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: normbridge-plugin-probe\nVersion: 0.0\n")
    eps = "".join(f"{k} = {v}\n" for k, v in _entry_points().items())
    (dist / "entry_points.txt").write_text(f"[pytest11]\n{eps}")


def _run(tmp_path: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_demo.py").write_text(DEMO)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), str(ROOT)]))
    env.pop("PYTEST_ADDOPTS", None)
    env.pop("PYTEST_PLUGINS", None)
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-q", "test_demo.py", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def _sections(out: str) -> dict[str, str]:
    parts, name = {}, None
    for line in out.splitlines():
        if line.startswith("_____") and " test_" in line:
            name = line.strip("_ ")
            parts[name] = ""
        elif line.startswith("====="):  # the summary ends the last section (with CI set it repeats messages)
            name = None
        elif name:
            parts[name] += line + "\n"
    return parts


def test_entry_point_names_the_plugin_module():
    assert _entry_points() == {"normbridge": "normbridge.testing.pytest_plugin"}


def test_installed_plugin_shows_the_table(tmp_path):
    _fake_install(tmp_path / "site")
    result = _run(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    s = _sections(result.stdout)
    assert set(s) == {"test_bare_report", "test_in_helper", "test_compare", "test_unrelated_assert"}
    bare = s["test_bare_report"]
    assert "assert DiffReport(1 mismatch: params/w)" in bare and "normbridge DiffReport:" in bare
    assert "1 of 2 leaves differs between a and b" in bare
    assert [line for line in bare.splitlines() if line.startswith("E       params/w")], bare  # the table row
    assert "stats/mean  " not in bare  # a matching leaf is not a row
    assert "normbridge DiffReport:" in s["test_in_helper"] and "E       x " in s["test_in_helper"]
    cmp = s["test_compare"]
    assert cmp.count("1 of 1 leaf differs") == 1 and "E         z " in cmp  # assertrepr_compare, once
    assert "normbridge DiffReport:" not in s["test_unrelated_assert"]  # a report not asserted is not shown


def test_no_plugin_no_table(tmp_path):
    _fake_install(tmp_path / "site")
    result = _run(tmp_path, "-p", "no:normbridge")
    assert result.returncode == 1
    assert "assert DiffReport(1 mismatch: params/w)" in result.stdout
    assert "normbridge DiffReport:" not in result.stdout


def test_checkout_conftest_and_installed_entry_point_register_once(tmp_path):
    """This repository's root conftest.py registers the plugin unless an installed copy already did."""
    (tmp_path / "conftest.py").write_text((ROOT / "conftest.py").read_text())
    _fake_install(tmp_path / "site")  # without it, this very suite is the case (test_this_suite_has_the_plugin)
    result = _run(tmp_path)
    assert result.returncode == 1 and "already registered" not in result.stdout + result.stderr
    bare = _sections(result.stdout)["test_bare_report"]
    assert bare.count("normbridge DiffReport:") == 1, bare


def test_this_suite_has_the_plugin(request):
    assert request.config.pluginmanager.get_plugin("normbridge") is pytest_plugin
    assert request.config.pluginmanager.is_registered(pytest_plugin)


def test_assertrepr_compare_direct():
    bad = tree_diff({"x": np.ones(2)}, {"x": np.zeros(2)})
    lines = pytest_plugin.pytest_assertrepr_compare(None, "==", bad, True)
    assert lines[0] == "DiffReport(1 mismatch: x) == True" and any(line.startswith("x ") for line in lines)
    assert pytest_plugin.pytest_assertrepr_compare(None, "==", 1, 2) is None
