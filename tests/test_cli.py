"""``normbridge check`` machinery: matrix rendering, exit codes, atomic output, CLI entry points, CI command."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import types

import pytest

import normbridge.conformance as conformance
from normbridge import cli
from normbridge.conformance import COLUMNS, Cell, Row, collect, measured
from normbridge.conformance.matrix import to_markdown

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _stub_fast_column(monkeypatch: pytest.MonkeyPatch) -> None:
    # The fast-mode column is measured (tests/core/test_fast_accuracy.py); here only its rendering.
    monkeypatch.setattr("normbridge.conformance.fast.cell", lambda facade, layer: Cell(True, f"fast {facade} {layer}"))


def _rows() -> list[Row]:
    good = Row(
        "linen",
        "LayerNorm",
        {**{c: Cell(True, "bitwise (3 cases)") for c in COLUMNS}, "fast mode": Cell(True, "fast linen LayerNorm")},
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


def test_a_failing_fast_mode_cell_fails_its_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast-mode contract is a measured cell like any other: a failure fails the row and the check."""
    good = _rows()[0]
    monkeypatch.setitem(sys.modules, "normbridge.conformance.linen", types.SimpleNamespace(rows=lambda: [good]))
    monkeypatch.setattr("normbridge.conformance.fast.cell", lambda facade, layer: Cell(False, "vs exact 1.0e-03"))
    (row,) = collect(["linen"])
    assert row.cells["fast mode"].status == "FAIL" and not row.ok
    monkeypatch.setattr("normbridge.conformance.fast.cell", lambda facade, layer: None)  # layer without fast mode
    (row,) = collect(["linen"])
    assert row.ok and row.cells["fast mode"].text == "fast linen LayerNorm"


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
    monkeypatch.setattr(conformance, "sections", lambda facades: [])  # measured in tests/conversion
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


# ------------------------------------------------------------------ checkpoints: inspect, diff, convert
TREEX_MLP = "normbridge/conformance/fixtures/treex/sequential_linear_bn_relu_linear_ln.state.msgpack"


def _readme_section(title: str) -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index(f"\n## {title}\n")
    end = readme.index("\n## ", start + 1)
    return readme[start:end]


def _readme_commands() -> list[str]:
    section = _readme_section("Checkpoint files and the command line")
    blocks = re.findall(r"```console\n(.*?)```", section, flags=re.S)
    return [ln[2:].strip() for b in blocks for ln in b.splitlines() if ln.startswith("$ ")]


@pytest.fixture
def workdir(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """A scratch folder where the README's relative paths (normbridge/..., examples.models) resolve."""
    (tmp_path / "normbridge").symlink_to(ROOT / "normbridge")
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    return tmp_path


def _cli(*args: str) -> int:
    return cli.main(list(args))


def test_readme_checkpoint_examples_run(workdir: pathlib.Path, capsys: pytest.CaptureFixture) -> None:
    """Every command of the README's checkpoint section, in order: all exit 0, both round trips are
    bit-exact (``diff`` reports every leaf bitwise equal), ``inspect`` shows each file."""
    commands = _readme_commands()
    assert len(commands) == 11
    diffs = []
    for command in commands:
        argv = shlex.split(command)
        assert argv[:2] in (["python", "-m"], ["python", "-c"]), command
        capsys.readouterr()
        if argv[1] == "-c":
            exec(argv[2], {})
            continue
        assert argv[2] == "normbridge"
        assert cli.main(argv[3:]) == 0, command
        out = capsys.readouterr().out
        if argv[3] == "diff":
            diffs.append(out)
        if argv[3] == "inspect":
            assert "BatchNorm" in out and "params" in out, out
        if argv[3] == "convert":  # every conversion of the README is verified by running both models
            assert "verified" in out and "unverified" not in out, out
    assert len(diffs) == 3
    for out in diffs:
        m = re.search(r"match: (\d+) leaves, \d+ elements \((\d+) bitwise\)", out)
        assert m and m.group(1) == m.group(2) and int(m.group(1)) >= 8, out
    assert (workdir / "nnx.orbax").is_dir() and (workdir / "mlp.nbeqx").is_file()


def test_cli_formats_match_the_package() -> None:
    from normbridge import checkpoint

    assert cli.FORMATS == checkpoint.FORMATS


def test_inspect_json_flags_non_finite(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture) -> None:
    import numpy as np

    from normbridge import checkpoint as ck

    tree = {"params": {"Dense_0": {"kernel": np.array([[1.0, np.nan], [np.inf, 2.0]], np.float32),
                                   "bias": np.zeros(2, np.float32)}}}
    p = tmp_path / "x.msgpack"
    ck.write_tree(p, tree, "msgpack")
    assert _cli("inspect", str(p), "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["format"] == "msgpack" and data["framework"] == "linen" and data["parameters"] == 6
    assert data["nonfinite"] == ["Dense_0/kernel"]
    (kernel,) = [a for a in data["layers"][0]["arrays"] if a["name"] == "kernel"]
    assert kernel["nan"] == 1 and kernel["inf"] == 1 and kernel["min"] == 1.0 and kernel["max"] == 2.0
    assert data["layers"][0]["kind"] == "Dense"


def test_inspect_names_leaves_of_a_file_without_names(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture) -> None:
    import equinox as eqx
    import jax

    p = tmp_path / "m.eqx"
    eqx.tree_serialise_leaves(p, eqx.nn.Linear(3, 2, key=jax.random.key(0)))
    assert _cli("inspect", str(p), "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["format"] == "eqx-leaves" and "by index" in data["notes"][0]
    assert [(ly["path"], ly["arrays"][0]["shape"]) for ly in data["layers"]] == [("<leaf 0>", [2, 3]),
                                                                                 ("<leaf 1>", [2])]


def test_diff_exit_codes_and_report(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture) -> None:
    import numpy as np

    from normbridge import checkpoint as ck

    a = {"params": {"LayerNorm_0": {"scale": np.ones(4, np.float32), "bias": np.zeros(4, np.float32)}}}
    b = {"params": {"LayerNorm_0": {"scale": np.ones(4, np.float32), "bias": np.zeros(4, np.float32)}}}
    b["params"]["LayerNorm_0"]["scale"][2] = np.nextafter(np.float32(1), np.float32(2))
    ck.write_tree(tmp_path / "a.msgpack", a, "msgpack")
    ck.write_tree(tmp_path / "b.orbax", b, "orbax")
    ck.write_tree(tmp_path / "a.safetensors", a, "safetensors")
    assert _cli("diff", str(tmp_path / "a.msgpack"), str(tmp_path / "a.safetensors")) == 0
    capsys.readouterr()
    assert _cli("diff", str(tmp_path / "a.msgpack"), str(tmp_path / "b.orbax"), "--json", "--rtol", "0",
                "--atol", "0") == 1
    report = json.loads(capsys.readouterr().out)
    assert report["failures"] == ["LayerNorm_0/scale"] and not report["ok"]
    assert _cli("diff", str(tmp_path / "a.msgpack"), str(tmp_path / "b.orbax"), "--ulp", "1", "--quiet") == 0
    assert _cli("diff", str(tmp_path / "a.msgpack"), str(tmp_path / "missing.msgpack")) == 2


def test_damaged_input_is_exit_2_naming_the_file(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture) -> None:
    data = (ROOT / TREEX_MLP).read_bytes()
    cut = tmp_path / "cut.msgpack"
    cut.write_bytes(data[: len(data) // 2])
    assert _cli("inspect", str(cut)) == 2
    err = capsys.readouterr().err
    assert f"CorruptCheckpointError: {cut}: truncated: expected a complete flax.serialization msgpack" in err
    assert "No more data to unpack" in err  # the library's own words, after normbridge's


def test_missing_collection_is_one_message(workdir: pathlib.Path, capsys: pytest.CaptureFixture) -> None:
    from flax import serialization

    from examples.models import linen_mlp

    _, variables = linen_mlp()
    p = workdir / "params_only.msgpack"
    p.write_bytes(serialization.msgpack_serialize(serialization.to_state_dict({"params": variables["params"]})))
    assert _cli("convert", str(p), "-o", "x.msgpack", "--like", "examples.models:linen_mlp") == 2
    err = capsys.readouterr().err
    assert "the checkpoint has no batch_stats collection (2 arrays the linen model expects there)" in err
    assert err.count("batch_stats") == 1 and len(err.strip().splitlines()) == 2
    assert not (workdir / "x.msgpack").exists()


def test_convert_refuses_an_existing_destination(workdir: pathlib.Path, capsys: pytest.CaptureFixture) -> None:
    src = str(workdir / TREEX_MLP)
    dst = workdir / "out.npz"
    dst.write_bytes(b"keep me")
    args = ["convert", src, "-o", str(dst), "--like", "examples.models:treex_mlp"]
    assert cli.main(args) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and dst.read_bytes() == b"keep me"
    assert cli.main([*args, "--overwrite", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] and result["format"] == "npz" and result["written_equals_converted"]
    assert result["verification"] == "unverified: no --source-model"
    assert _cli("diff", str(dst), src) == 0


@pytest.mark.parametrize(("spec", "message"), [
    ("examples.models", "expected PKG.MODULE:FACTORY"),
    ("examples.nothing:f", "cannot import"),
    ("examples.models:nope", "has no 'nope'"),
    ("json:dumps", "calling it with no arguments raised TypeError"),
    ("builtins:dict", "not a model of a framework normbridge knows"),
])
def test_bad_factory_is_exit_2(workdir: pathlib.Path, capsys: pytest.CaptureFixture, spec: str, message: str) -> None:
    assert _cli("convert", str(workdir / TREEX_MLP), "-o", "o.msgpack", "--like", spec) == 2
    assert message in capsys.readouterr().err


def test_convert_help_lists_the_options() -> None:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    p = subprocess.run([sys.executable, "-m", "normbridge", "convert", "--help"], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    for option in ("--like", "--source-model", "--map", "--no-verify", "--json", "--overwrite", "--format",
                   "--probe", "--quiet"):
        assert option in p.stdout


def test_convert_map_and_verification_report(workdir: pathlib.Path, capsys: pytest.CaptureFixture) -> None:
    """--map is normbridge.convert's mapping: a wrong one is refused (exit 2) naming the path; a right
    one converts, verified by running both models on --probe."""
    base = ["convert", TREEX_MLP, "--source-model", "examples.models:treex_mlp", "--like",
            "examples.models:equinox_mlp", "--probe", "6,5", "--json"]
    (workdir / "bad.json").write_text(json.dumps({"layers/9": "layers/0"}))
    assert cli.main([*base, "-o", "a.nbeqx", "--map", "bad.json"]) == 2
    captured = capsys.readouterr()
    assert "'layers/9' is not a layer of the source" in captured.err
    assert json.loads(captured.out)["error"] == "ConversionError" and not (workdir / "a.nbeqx").exists()
    (workdir / "good.json").write_text(json.dumps({f"layers/{i}": f"layers/{i}" for i in (0, 1, 3, 4)}))
    assert cli.main([*base, "-o", "a.nbeqx", "--map", "good.json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["verified"] is True and result["how"] == "normbridge.convert"
    assert result["target_framework"] == "equinox" and result["written_equals_converted"]
    (workdir / "list.json").write_text("[1, 2]")
    assert cli.main([*base, "-o", "b.nbeqx", "--map", "list.json"]) == 2
