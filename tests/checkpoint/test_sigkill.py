"""``kill -9`` of ``normbridge convert`` at spread-out moments: the destination is always either
absent (or, with ``--overwrite``, the old file unchanged) or complete and equal to an undisturbed
conversion; nothing but ``.tmp-*`` names is ever left beside it."""

from __future__ import annotations

import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from normbridge import checkpoint as ck
from normbridge.checkpoint.canonical import canonical_leaves
from normbridge.testing.report import diff_paths

ROOT = pathlib.Path(__file__).resolve().parents[2]
POINTS = 10  # per scenario; two scenarios: 20 kill points in all


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def _convert(args: list[str], cwd: pathlib.Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "normbridge", "convert", *args, "--quiet"], cwd=cwd, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _same(a: str, b: str) -> bool:
    return diff_paths(canonical_leaves(ck.read(a)), canonical_leaves(ck.read(b)), rtol=0, atol=0).ok


@pytest.fixture(scope="module")
def linen_file(tmp_path_factory) -> pathlib.Path:
    from flax import serialization

    from tests.checkpoint.kill_factories import linen_mlp

    path = tmp_path_factory.mktemp("kill") / "linen.msgpack"
    _, variables = linen_mlp()
    path.write_bytes(serialization.msgpack_serialize(serialization.to_state_dict(variables)))
    return path


def _scenario(tmp_path, linen_file, out_name, extra, existing):
    """Run once undisturbed (the reference and its duration), then kill at POINTS moments spread over it."""
    like = ["--source-model", "tests.checkpoint.kill_factories:linen_mlp",
            "--like", "tests.checkpoint.kill_factories:nnx_mlp", "--probe", "2,1536", "--no-verify", *extra]
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    t0 = time.monotonic()
    p = _convert([str(linen_file), "-o", out_name, *like], ref_dir)
    assert p.wait(timeout=300) == 0, p.stderr.read().decode()
    duration = time.monotonic() - t0
    ref = ref_dir / out_name
    rng = random.Random(15)
    outcomes = {"absent/unchanged": 0, "complete": 0}
    for i in range(POINTS):
        work = tmp_path / f"k{i}"
        work.mkdir()
        dst = work / out_name
        if existing is not None:
            shutil.copy(existing, dst) if existing.is_file() else shutil.copytree(existing, dst)
        # spread from start-up to past the reference run's end (a loaded machine runs slower than the reference)
        at = duration * (0.2 + 1.4 * (i + rng.random()) / POINTS)
        p = _convert([str(linen_file), "-o", out_name, *like], work)
        time.sleep(at)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
        leftovers = [n for n in os.listdir(work) if n != out_name]
        assert all(n.startswith((".tmp-", ".old-", ".nbcheck-")) for n in leftovers), leftovers
        if not os.path.lexists(dst):
            assert existing is None or dst.exists(), "a pre-existing destination was removed"
            outcomes["absent/unchanged"] += 1
        elif existing is not None and _same(str(dst), str(existing)):
            outcomes["absent/unchanged"] += 1
        else:
            assert _same(str(dst), str(ref)), f"kill at {at:.2f}s left a destination that differs from a full run"
            outcomes["complete"] += 1
    print(f"\n{out_name}: {POINTS} kills over {duration:.1f}s: {outcomes}")
    return outcomes


def test_sigkill_orbax_destination(tmp_path, linen_file):
    """linen msgpack -> NNX Orbax directory (Orbax's atomic commit, then a rename)."""
    _scenario(tmp_path, linen_file, "nnx.orbax", [], None)


def test_sigkill_replacing_an_existing_file(tmp_path, linen_file):
    """linen msgpack -> NNX msgpack over an existing file with --overwrite: old or new, never a mix."""
    old = tmp_path / "old.msgpack"
    old.write_bytes(linen_file.read_bytes())
    _scenario(tmp_path, linen_file, "nnx.msgpack", ["--overwrite"], old)
