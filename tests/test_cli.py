"""``normbridge check`` machinery: matrix rendering, exit codes, atomic output, CLI entry points, CI command."""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

import normbridge.conformance as conformance
from normbridge import cli
from normbridge.conformance import COLUMNS, Cell, Row, collect, matrix, measured
from normbridge.conformance.matrix import to_markdown

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _stub_fast_column(monkeypatch: pytest.MonkeyPatch) -> None:
    # The fast-mode column is measured (tests/core/test_fast_accuracy.py); here only its rendering.
    monkeypatch.setattr(matrix, "fast_column", lambda facade, layer: f"pass: fast {facade} {layer}")


def _rows() -> list[Row]:
    good = Row(
        "linen",
        "LayerNorm",
        {c: Cell(True, "bitwise (3 cases)") for c in COLUMNS},
        evidence="flax 0.12.8 | native",
        notes="a note",
    )
    dev = dict(good.cells)
    dev["outputs"] = Cell(False, "follows documented intent", deviation=True)
    deviating = Row("nnx", "GroupNorm", dev)
    bad = dict(good.cells)
    bad["gradients"] = Cell(False, "max rel 3.0e-02 (1/3 failed)")
    del bad["checkpoint round trip"]
    failing = Row("equinox", "BatchNorm", bad)
    return [good, deviating, failing]


def test_cell_status_and_row_ok() -> None:
    good, deviating, failing = _rows()
    assert good.ok and deviating.ok and not failing.ok
    assert deviating.cells["outputs"].status == "deviation"
    assert failing.cells["gradients"].status == "FAIL"
    assert good.cells["outputs"].status == "pass"


def test_to_markdown_renders_every_cell() -> None:
    md = to_markdown(_rows())
    lines = md.splitlines()
    header = "| facade | layer | " + " | ".join(COLUMNS) + " | fast mode | evidence |"
    assert header in lines
    table = [ln for ln in lines if ln.startswith("| ") and ln != header]
    assert len(table) == 3
    for ln in table:  # every row has all columns (a pipe inside a cell is escaped)
        assert len(re.split(r"(?<!\\)\|", ln)) == len(COLUMNS) + 6
    assert "flax 0.12.8 \\| native" in md
    assert "FAIL: max rel 3.0e-02 (1/3 failed)" in md
    assert "deviation: follows documented intent" in md
    assert "| pass: fast linen LayerNorm |" in md
    assert "| n/a |" in md  # the missing column
    assert "3 rows, 2 passing, 1 failing." in md
    assert "- **linen LayerNorm**: a note" in md
    assert "jax " in md and "flax " in md  # versions measured against


def test_measured_turns_a_crash_into_a_failing_cell() -> None:
    def boom() -> Cell:
        raise ValueError("bad shape")

    c = measured(boom)
    assert not c.ok and c.text.startswith("error: ValueError: bad shape")
    assert measured(lambda: Cell(True, "ok")) == Cell(True, "ok")


def test_collect_skips_unbuilt_facades_but_not_broken_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    assert collect(["no_such_facade"]) == []

    def broken(name: str) -> None:
        raise ModuleNotFoundError("No module named 'missing_dep'", name="missing_dep")

    monkeypatch.setattr(conformance.importlib, "import_module", broken)
    with pytest.raises(ModuleNotFoundError, match="missing_dep"):
        collect(["linen"])


def _check(monkeypatch: pytest.MonkeyPatch, rows: list[Row], out: pathlib.Path, *extra: str) -> tuple[int, list]:
    seen: list = []

    def fake_collect(facades: object) -> list[Row]:
        seen.append(list(facades))  # type: ignore[call-overload]
        return rows

    monkeypatch.setattr(conformance, "collect", fake_collect)
    return cli.main(["check", "--output", str(out), *extra]), seen


def test_check_fails_on_a_failing_cell(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "matrix.md"
    rc, seen = _check(monkeypatch, _rows(), out, "--facade", "equinox", "--facade", "nnx")
    assert rc == 1
    assert seen == [["equinox", "nnx"]]
    printed = capsys.readouterr().out
    assert "normbridge conformance" in printed  # the rich table's title
    assert "FAIL" in printed and "equinox/BatchNorm" in printed
    assert out.read_text() == to_markdown(_rows())
    assert not (tmp_path / "matrix.md.tmp").exists()


def test_check_passes_and_rejects_empty(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "matrix.md"
    rc, seen = _check(monkeypatch, _rows()[:2], out)
    assert rc == 0 and seen == [list(conformance.FACADES)]
    assert "2 rows, 2 passing, 0 failing." in out.read_text()
    rc, _ = _check(monkeypatch, [], tmp_path / "empty.md")
    assert rc == 2 and not (tmp_path / "empty.md").exists()


def test_check_writes_atomically(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    """The matrix is written to a temporary file and renamed: an interrupted write leaves the old one."""
    out = tmp_path / "matrix.md"
    out.write_text("old matrix\n")
    replaced: list[tuple[str, str]] = []

    def interrupted(src: str, dst: str) -> None:
        replaced.append((src, dst))
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _check(monkeypatch, _rows(), out)
    assert replaced == [(f"{out}.tmp", str(out))]
    assert out.read_text() == "old matrix\n"
    assert pathlib.Path(f"{out}.tmp").read_text() == to_markdown(_rows())


def test_unknown_facade_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["check", "--facade", "keras"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_module_help() -> None:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    for args in (["--help"], ["check", "--help"]):
        p = subprocess.run([sys.executable, "-m", "normbridge", *args], capture_output=True, text=True, env=env,
                           cwd=ROOT, timeout=60)
        assert p.returncode == 0, p.stderr
        assert "check" in p.stdout
    assert "--facade" in p.stdout and "--output" in p.stdout


def _readme_test_command() -> str:
    """The README's install-and-test command (the one `.ci/run` must run): the shell line in a code
    block that installs the package and runs pytest."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```(?:bash|sh|console|shell)?\n(.*?)```", readme, flags=re.S)
    lines = [ln.strip() for b in blocks for ln in b.splitlines() if not ln.strip().startswith("#")]
    cmds = [ln for ln in lines if "pytest" in ln and "pip install" in ln]
    assert len(cmds) == 1, f"expected exactly one install-and-test command in README.md, found {cmds}"
    return cmds[0]


def _ci_commands() -> list[str]:
    text = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    skip = ("#", "set ", "cd ")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith(skip)]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    assert _ci_commands() == [_readme_test_command()]
    assert shlex.split(_readme_test_command())[-4:] == ["pytest", "-n", "2", "-q"]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert ci.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in ci
    assert os.access(ROOT / ".ci" / "run", os.X_OK)
