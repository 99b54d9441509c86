#!/usr/bin/env python
"""Scale benchmark of ``normbridge convert``: a large float32 checkpoint (a stack of Dense(W×W) +
LayerNorm(W) layers in linen's layout, written by this script in a temporary folder) converted
between two formats, timed against ``cp`` of the same bytes, with the converting process's peak RSS.

Each conversion is a fresh ``python -m normbridge convert`` process (so its time includes Python,
jax and flax start-up; "its start-up" is the same command converting a 1-layer, 64-wide checkpoint
of the same formats, i.e. everything but the part proportional to the bytes), given an abstract ``--like``
(``jax.eval_shape``: no second copy of the weights is allocated). Peak RSS is that process's
``ru_maxrss`` (``os.wait4``). With ``--repeat N`` every timing is the median of N runs, ``cp``
and ``cp`` + fsync timed in the same loop as the conversion (ratios within one run); the load
average before and after is printed. Prints a markdown table.

    python benchmarks/checkpoint_scale.py --gib 1 --repeat 3   # the README figures (~3 GB in --dir)
    python benchmarks/checkpoint_scale.py --gib 0.1            # quick
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH = int(os.environ.get("NB_SCALE_WIDTH", "2048"))
LAYERS = int(os.environ.get("NB_SCALE_LAYERS", "4"))


def like():
    """The ``--like`` factory: the linen model, abstract (shapes and dtypes only)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            for _ in range(LAYERS):
                x = nn.LayerNorm()(nn.Dense(WIDTH)(x))
            return x

    module = Stack()
    return module, jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, WIDTH)))


def _write_source(path: str, fmt: str) -> None:
    """Runs in a child process: random float32 arrays in linen's layout, written by normbridge's writer."""
    import numpy as np

    from normbridge import checkpoint as ck

    rng = np.random.default_rng(0)
    params = {}
    for i in range(LAYERS):
        params[f"Dense_{i}"] = {"kernel": rng.standard_normal((WIDTH, WIDTH), dtype=np.float32),
                                "bias": np.zeros(WIDTH, np.float32)}
        params[f"LayerNorm_{i}"] = {"scale": np.ones(WIDTH, np.float32), "bias": np.zeros(WIDTH, np.float32)}
    ck.write_tree(path, {"params": params}, fmt)


def _du(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def _run(cmd: list[str], env: dict[str, str]) -> tuple[float, int, int]:
    """(wall seconds, peak RSS bytes, exit code) of one child process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        sys.stderr.write(p.stderr.read().decode()[-3000:])
    return wall, usage.ru_maxrss * 1024, p.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0, help="checkpoint size in GiB (float32 weights)")
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temporary folder in /tmp)")
    ap.add_argument("--pairs", default="msgpack:safetensors,safetensors:msgpack,msgpack:orbax,orbax:msgpack",
                    help="comma-separated SRC:DST formats")
    ap.add_argument("--repeat", type=int, default=1, help="runs per row; timings are medians, RSS the maximum")
    args = ap.parse_args()
    per_layer = (WIDTH * WIDTH + 3 * WIDTH) * 4
    layers = max(1, round(args.gib * 2**30 / per_layer))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(NB_SCALE_WIDTH=str(WIDTH), NB_SCALE_LAYERS=str(layers), JAX_PLATFORMS="cpu",
               PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}")
    ext = {"msgpack": ".msgpack", "orbax": ".orbax", "safetensors": ".safetensors", "equinox": ".nbeqx"}
    scratch = tempfile.mkdtemp(prefix="nb-scale-", dir=args.dir)
    rows = []
    try:
        imports = ("import normbridge.cli, normbridge.checkpoint, jax, flax.linen, orbax.checkpoint; "
                   "import benchmarks.checkpoint_scale as b; b.like()")
        load_before = os.getloadavg()
        startups = [_run([sys.executable, "-c", imports], env) for _ in range(args.repeat)]
        startup, start_rss = statistics.median(w for w, _, _ in startups), max(r for _, r, _ in startups)
        for pair in args.pairs.split(","):
            src_fmt, dst_fmt = pair.split(":")
            src = os.path.join(scratch, "src" + ext[src_fmt])
            dst = os.path.join(scratch, "dst" + ext[dst_fmt])
            subprocess.run([sys.executable, "-c", f"import benchmarks.checkpoint_scale as b; "
                            f"b._write_source({src!r}, {src_fmt!r})"], env=env, cwd=ROOT, check=True)
            size = _du(src)
            # this conversion's own start-up: the same command on a 1-layer, 64-wide checkpoint of the same
            # formats (imports, the abstract model, writer set-up, exit), nothing proportional to the bytes
            tiny_env = dict(env, NB_SCALE_WIDTH="64", NB_SCALE_LAYERS="1")
            tiny, tiny_dst = os.path.join(scratch, "tiny" + ext[src_fmt]), os.path.join(scratch, "tiny" + ext[dst_fmt])
            subprocess.run([sys.executable, "-c", f"import benchmarks.checkpoint_scale as b; "
                            f"b._write_source({tiny!r}, {src_fmt!r})"], env=tiny_env, cwd=ROOT, check=True)
            fixed = []
            for _ in range(args.repeat):
                fixed.append(_run([sys.executable, "-m", "normbridge", "convert", tiny, "-o", tiny_dst, "--like",
                                   "benchmarks.checkpoint_scale:like", "--quiet", "--no-verify"], tiny_env)[0])
                _remove(tiny_dst)
            _remove(tiny)
            copy = os.path.join(scratch, "copy")
            cps, syncs, walls, rss, rc = [], [], [], 0, 0
            for _ in range(args.repeat):
                cps.append(_run(["cp", "-r", src, copy], env)[0])
                _remove(copy)
                # normbridge fsyncs what it writes (the atomic rename needs it); so does this copy
                syncs.append(_run(["sh", "-c", 'cp -r "$0" "$1" && find "$1" -type f -exec sync {} +', src, copy],
                                  env)[0])
                _remove(copy)
                wall, peak, code = _run([sys.executable, "-m", "normbridge", "convert", src, "-o", dst, "--like",
                                         "benchmarks.checkpoint_scale:like", "--quiet", "--no-verify"], env)
                walls.append(wall)
                rss, rc = max(rss, peak), rc or code
                _remove(dst)
            rows.append((src_fmt, dst_fmt, size, statistics.median(cps), statistics.median(syncs),
                         statistics.median(walls), statistics.median(fixed), rss, rc))
            _remove(src)
        load_after = os.getloadavg()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    gib = lambda n: n / 2**30  # noqa: E731
    print(f"{layers} × (Dense {WIDTH}×{WIDTH} + LayerNorm {WIDTH}), float32; start-up of a process that "
          f"imports normbridge, jax, flax, orbax and builds the abstract model: {startup:.2f} s, "
          f"{gib(start_rss):.2f} GiB peak RSS; medians of {args.repeat} run(s); load average (1, 5, 15 min) "
          f"{'/'.join(f'{x:.1f}' for x in load_before)} before, {'/'.join(f'{x:.1f}' for x in load_after)} after, "
          f"on {os.cpu_count()} CPUs\n")
    print("| SRC → DST | size | `cp` | `cp` + fsync | convert | its start-up | convert − start-up "
          "| ÷ `cp` + fsync (− start-up) | peak RSS | ÷ size | exit |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for src_fmt, dst_fmt, size, cp_wall, sync_wall, wall, fixed, rss, rc in rows:
        print(f"| {src_fmt} → {dst_fmt} | {gib(size):.2f} GiB | {cp_wall:.2f} s | {sync_wall:.2f} s | {wall:.2f} s | "
              f"{fixed:.2f} s | {wall - fixed:.2f} s | {wall / sync_wall:.1f}× ({(wall - fixed) / sync_wall:.1f}×) | "
              f"{gib(rss):.2f} GiB | {rss / size:.2f} | {rc} |")
    print("\nits start-up: the same `normbridge convert` of a 1-layer, 64-wide checkpoint of the same formats.")


if __name__ == "__main__":
    main()
