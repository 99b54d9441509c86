"""The built wheel carries everything the main job needs: fixtures, ``py.typed``.

A user who ``pip install``s normbridge has no repository around it, so the treex rows of
``normbridge check`` must pass from an installed copy, run from an unrelated folder.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE_FIXTURES = ROOT / "normbridge" / "conformance" / "fixtures"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A wheel built from a clean copy of the source tree (no stale ``build/`` of the checkout)."""
    src = tmp_path_factory.mktemp("src") / "normbridge"
    ignore = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis", "v", ".venv")
    shutil.copytree(ROOT, src, ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(src), "-w", str(out)],
        check=True,
        capture_output=True,
    )
    (whl,) = out.glob("normbridge-*.whl")
    return whl


def test_wheel_carries_fixtures_and_py_typed(wheel: pathlib.Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    assert "normbridge/py.typed" in names
    shipped = sorted(p.relative_to(ROOT).as_posix() for p in PACKAGE_FIXTURES.rglob("*") if p.is_file())
    assert len(shipped) > 90  # both fixture sets: norm layers and whole models
    missing = [p for p in shipped if p not in names]
    assert not missing, f"files of the source tree's fixtures missing from the wheel: {missing}"
    for folder in ("treex", "treex-models"):
        assert f"normbridge/conformance/fixtures/{folder}/manifest.json" in names


def test_treex_rows_pass_from_an_installed_wheel(wheel: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """``normbridge check --facade treex`` from the installed package, in a folder with no repository."""
    target, cwd = tmp_path / "site", tmp_path / "elsewhere"
    cwd.mkdir()
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    env.pop("NORMBRIDGE_TREEX_FIXTURES", None)
    where = subprocess.run(
        [sys.executable, "-c", "import normbridge; print(normbridge.__file__)"],
        cwd=cwd, env=env, check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    assert pathlib.Path(where).is_relative_to(target), f"imported {where}, not the installed copy"
    # The treex rows of `normbridge check` (the conformance check's own collect); fast mode's column is
    # measured elsewhere and needs no file, so it is left out here to keep the suite fast.
    script = (
        "from normbridge.conformance import collect\n"
        "rows = collect(['treex'], fast_mode=False)\n"
        "bad = [(r.layer, {k: c.text for k, c in r.cells.items() if not (c.ok or c.deviation)}) for r in rows]\n"
        "print(len(rows), 'rows;', [r.evidence for r in rows][:1]); print('failing:', [b for b in bad if b[1]])\n"
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "failing: []" in run.stdout, run.stdout[-3000:]
    n_rows = int(run.stdout.split()[0])
    assert n_rows >= 8, run.stdout
    assert "FixturesNotFound" not in run.stdout and "real treex" in run.stdout
