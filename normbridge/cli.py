"""The ``normbridge`` command line.

* ``normbridge check``: measure every facade against the installed frameworks, write the matrix.
* ``normbridge inspect CKPT``: format, framework, layers, shapes, dtypes, sizes, statistics.
* ``normbridge diff A B``: two checkpoints of any frameworks compared as canonical records
  (``normbridge.testing`` report).
* ``normbridge convert SRC -o DST --like PKG.MODULE:FACTORY``: a checkpoint into another framework/format.

Exit codes: 0 ok / equal; 1 the checkpoints differ (or some arrays cannot be mapped to canonical
records without --a-model/--b-model, or the engine cannot pair the two models' layers) or a
verification failed; 2 bad input
(unreadable, unsafe or mismatched checkpoint, existing destination, bad factory).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from normbridge.conformance import FACADES

EXIT_OK, EXIT_DIFFER, EXIT_BAD_INPUT = 0, 1, 2


def _check(args: argparse.Namespace) -> int:
    # Several fake CPU devices for the cross-device checks; must precede the first jax import.
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()
    from normbridge import conformance
    from normbridge.conformance.matrix import print_table, to_markdown

    rows = conformance.collect(args.facade or FACADES)
    if not rows:
        print("normbridge check: no facade produced any row", file=sys.stderr)
        return 2
    extra = conformance.sections(args.facade or FACADES)
    md = to_markdown(rows, [text for text, _ in extra])
    tmp = f"{args.output}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(md)
    os.replace(tmp, args.output)  # never leave a half-written matrix
    print_table(rows)
    failed = [f"{r.facade}/{r.layer}" for r in rows if not r.ok] + [f for _, fails in extra for f in fails]
    print(f"wrote {args.output}: {len(rows)} rows, {len(failed)} failing" + (f": {failed}" if failed else ""))
    return 1 if failed else 0


# ----------------------------------------------------------------------------------- shared helpers
class BadInput(Exception):
    """Exit code 2 with this message (a bad factory, an existing destination, a bad mapping file)."""


def _console(args: argparse.Namespace, stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(file=sys.stderr if stderr else sys.stdout, quiet=getattr(args, "quiet", False) and not stderr,
                   highlight=False, soft_wrap=True)


@contextlib.contextmanager
def _progress(args: argparse.Namespace, total: int) -> Iterator[Callable[[str], None]]:
    """A rich progress bar on stderr (hidden with --quiet / --json, or when stderr is not a terminal):
    ``step(description)`` advances it by one."""
    if args.quiet or getattr(args, "json", False) or not sys.stderr.isatty():
        yield lambda _: None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=_console(args, stderr=True), transient=True) as bar:
        task = bar.add_task("starting", total=total)
        first = [True]

        def step(description: str) -> None:
            if not first[0]:
                bar.advance(task)
            first[0] = False
            bar.update(task, description=description)

        yield step
        bar.advance(task)


def _read(path: str, fmt: str | None) -> Any:
    from normbridge import checkpoint as ck

    return ck.read(path, format=fmt)


def load_factory(spec: str) -> Any:
    """Call ``PKG.MODULE:FACTORY`` with no arguments (the current directory is importable, as with
    ``python -m``)."""
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise BadInput(f"{spec!r}: expected PKG.MODULE:FACTORY (e.g. mypkg.models:make_model)")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(mod_name)
    except ImportError as err:
        raise BadInput(f"{spec!r}: cannot import {mod_name!r} ({err})") from err
    try:
        factory = module
        for part in attr.split("."):
            factory = getattr(factory, part)
    except AttributeError as err:
        raise BadInput(f"{spec!r}: {mod_name} has no {attr!r}") from err
    if not callable(factory):
        raise BadInput(f"{spec!r}: {attr} is not callable")
    try:
        return factory()
    except Exception as err:
        raise BadInput(f"{spec!r}: calling it with no arguments raised {type(err).__name__}: {err}") from err


def _run(args: argparse.Namespace, command: Callable[[argparse.Namespace], int]) -> int:
    """Run a checkpoint command: normbridge's errors and bad input become exit code 2 with one message."""
    from normbridge.errors import CheckpointError, ConversionError

    try:
        return command(args)
    except (CheckpointError, BadInput, FileExistsError) as err:
        _error(args, err)
        return EXIT_BAD_INPUT
    except ConversionError as err:
        if "probe=" in str(err):
            err.args = (f"{err}\n(on the command line: --probe SHAPE or --probe PKG.MODULE:FACTORY)",)
        _error(args, err)
        # measured: both models ran and their outputs differ (a failed verification), else a refusal
        return EXIT_DIFFER if getattr(err, "measured", None) is not None else EXIT_BAD_INPUT


def _error(args: argparse.Namespace, err: BaseException) -> None:
    kind = type(err).__name__
    if getattr(args, "json", False):
        print(json.dumps({"ok": False, "error": kind, "message": str(err)}))
    print(f"normbridge {args.command}: {kind}: {err}", file=sys.stderr)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


# ------------------------------------------------------------------------------------------ inspect
def inspect_data(path: str, fmt: str | None = None) -> dict[str, Any]:
    """What ``normbridge inspect --json`` prints."""
    import numpy as np

    from normbridge.checkpoint.canonical import layers, stats

    ckpt = _read(path, fmt)
    out_layers = []
    for layer in layers(ckpt):
        arrays = []
        for name, arr in layer.arrays.items():
            a = np.asarray(arr)
            arrays.append({"name": name, "shape": list(a.shape), "dtype": a.dtype.name, "size": int(a.size),
                           "bytes": int(a.nbytes), **stats(a)})
        out_layers.append({"path": layer.path, "kind": layer.kind, "parameters": layer.count,
                           "bytes": layer.nbytes, "arrays": arrays})
    flagged = [f"{ly['path']}/{a['name']}".rstrip("/") for ly in out_layers for a in ly["arrays"]
               if a.get("nan") or a.get("inf")]
    return {
        "file": ckpt.file,
        "format": ckpt.format,
        "framework": ckpt.framework,
        "notes": list(ckpt.notes),
        "arrays": len(ckpt.leaves),
        "parameters": sum(ly["parameters"] for ly in out_layers),
        "bytes": sum(ly["bytes"] for ly in out_layers),
        "nonfinite": flagged,
        "layers": out_layers,
    }


def _inspect(args: argparse.Namespace) -> int:
    with _progress(args, 1) as step:
        step(f"reading {args.checkpoint}")
        data = inspect_data(args.checkpoint, args.format)
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    from rich.markup import escape
    from rich.tree import Tree

    con = _console(args)
    head = (f"[bold]{escape(data['file'])}[/]: {data['format']}, framework {data['framework'] or 'unknown'}, "
            f"{data['arrays']} arrays, {data['parameters']:,} parameters, {_fmt_bytes(data['bytes'])}")
    tree = Tree(head)
    for note in data["notes"]:
        tree.add(f"[dim]{escape(note)}[/]")
    for ly in data["layers"]:
        node = tree.add(f"[bold]{escape(ly['path'])}[/] {escape(ly['kind'])}  "
                        f"{ly['parameters']:,} params, {_fmt_bytes(ly['bytes'])}")
        for a in ly["arrays"]:
            s = ""
            if "min" in a:
                s = f"  min {a['min']:.4g} max {a['max']:.4g} mean {a['mean']:.4g}"
            if a.get("nan") or a.get("inf"):
                s += f"  [red bold]NaN {a['nan']} Inf {a['inf']}[/]"
            node.add(f"{escape(a['name'] or '(array)')}: {a['dtype']}{a['shape']}{s}")
    con.print(tree)
    if data["nonfinite"]:
        con.print(f"[red bold]non-finite values in {len(data['nonfinite'])} arrays:[/] "
                  + ", ".join(map(escape, data["nonfinite"])))
    return EXIT_OK


# --------------------------------------------------------------------------------------------- diff
def diff_checkpoints(a: str, b: str, *, rtol: float | None = None, atol: float | None = None,
                     max_ulp: int | None = None, fmt_a: str | None = None, fmt_b: str | None = None,
                     model_a: Any = None, model_b: Any = None, probe: Any = None,
                     mapping: dict[str, Any] | None = None) -> Any:
    """The :class:`normbridge.checkpoint.canonical.CheckpointDiff` of two checkpoints of any formats and
    frameworks, both as canonical records; ``b`` is the reference.

    Each side is mapped from the file alone (:func:`~normbridge.checkpoint.canonical.canonical_view`) or,
    given its model (``model_a`` / ``model_b``, what ``--a-model`` / ``--b-model`` factories return), by
    loading the file into the model and reading the conversion spoke's records
    (:func:`~normbridge.checkpoint.canonical.model_view`; linen needs ``probe``, or a pair
    ``(probe for a, probe for b)``). Layers pair by name (``mapping`` first,
    :func:`~normbridge.checkpoint.canonical.diff_views`); given both models, exactly as
    :func:`normbridge.convert` pairs them (:func:`~normbridge.checkpoint.canonical.diff_models`:
    the engine's ``normbridge.conversion.pair``, execution order on ``probe`` included)."""
    from normbridge.checkpoint.canonical import canonical_view, diff_models, diff_views, model_view

    if model_a is not None and model_b is not None:
        ckpts = (_read(a, fmt_a), _read(b, fmt_b))
        try:
            return diff_models(ckpts[0], model_a, ckpts[1], model_b, probe=probe, mapping=mapping, names=(a, b),
                               rtol=rtol, atol=atol, max_ulp=max_ulp)
        except ValueError as err:  # a mapping that names no layer
            raise BadInput(f"--map: {err}") from None
    probes = probe if isinstance(probe, tuple) and len(probe) == 2 else (probe, probe)
    views = []
    for path, fmt, model, flag, p in ((a, fmt_a, model_a, "--a-model", probes[0]),
                                      (b, fmt_b, model_b, "--b-model", probes[1])):
        ckpt = _read(path, fmt)
        views.append(canonical_view(ckpt, flag=flag) if model is None else model_view(ckpt, model, p))
    try:
        return diff_views(*views, mapping=mapping, names=(a, b), rtol=rtol, atol=atol, max_ulp=max_ulp)
    except ValueError as err:  # a mapping key that names no layer
        raise BadInput(f"--map: {err}") from None


def _diff(args: argparse.Namespace) -> int:
    with _progress(args, 2) as step:
        step("building the models")
        models = {}
        for flag, spec in (("--a-model", args.a_model), ("--b-model", args.b_model)):
            models[flag] = _model_factory(flag, spec) if spec else None
        probe = _probe(args.probe) if args.probe else None
        mapping = _load_mapping(args.map) if args.map else None
        step(f"reading and comparing {args.a} and {args.b}")
        diff = diff_checkpoints(args.a, args.b, rtol=args.rtol, atol=args.atol, max_ulp=args.ulp,
                                fmt_a=args.format, fmt_b=args.format_b or args.format,
                                model_a=models["--a-model"], model_b=models["--b-model"], probe=probe,
                                mapping=mapping)
    if args.json:
        print(diff.to_json())
    elif not args.quiet:
        print(str(diff))
    return EXIT_OK if diff.ok else EXIT_DIFFER


def _model_factory(flag: str, spec: str) -> Any:
    """``load_factory(spec)``, checked to be a model of a framework normbridge knows (exit 2 if not)."""
    from normbridge.checkpoint import models

    model = load_factory(spec)
    try:
        models.framework_of(model)
    except TypeError as err:
        raise BadInput(f"{flag} {spec}: {err}") from None
    return model


def _load_mapping(path: str) -> dict[str, Any]:
    """``--map mapping.json``: a JSON object ``{layer path: layer path or null}`` (exit 2 if not)."""
    try:
        with open(path, encoding="utf-8") as fh:
            mapping = json.load(fh)
    except (OSError, ValueError) as err:
        raise BadInput(f"--map {path}: not a readable JSON object ({err})") from err
    if not isinstance(mapping, dict):
        raise BadInput(f"--map {path}: expected a JSON object {{source layer path: target layer path}}")
    return mapping


# ------------------------------------------------------------------------------------------ convert
def _convert(args: argparse.Namespace) -> int:
    from normbridge import checkpoint as ck
    from normbridge.checkpoint import models
    dst = args.output
    out_fmt = args.format or ck.format_for_path(dst)
    if os.path.lexists(dst) and not args.overwrite:
        raise FileExistsError(f"{dst}: exists; pass --overwrite to replace it")
    mapping = _load_mapping(args.map) if args.map else None

    with _progress(args, 5) as step:
        step(f"reading {args.src}")
        src = _read(args.src, args.src_format)
        source_format = src.format
        step("building the models")
        like = load_factory(args.like)
        source_model = load_factory(args.source_model) if args.source_model else None
        probe = _probe(args.probe) if args.probe else None
        for flag, spec, model in (("--like", args.like, like), ("--source-model", args.source_model, source_model)):
            if model is not None:
                try:
                    models.framework_of(model)
                except TypeError as err:
                    raise BadInput(f"{flag} {spec}: {err}") from None
        step("loading the checkpoint into the source model")
        if source_model is not None:
            source = models.load_into(src, source_model)
        elif src.obj is not None:  # a treex pickle holds its model
            source = src.obj
        else:
            source = None
        step("converting")
        target, how, verified = _convert_models(src, source, like, mapping, verify=not args.no_verify, probe=probe)
        why = ("--no-verify" if args.no_verify else "no --source-model" if source is None
               else "no --probe" if probe is None else "")
        step(f"writing {dst}")
        expected = models.write_model(dst, target, out_fmt, overwrite=args.overwrite)
        target_framework = models.framework_of(target)
        # the source's arrays are freed before the read-back; views of a memory-mapped file need no
        # collection (their pages are dropped by release, referenced or not)
        mapped = all([ck.release(a) for a in src.leaves.values()])
        del src, source, target
        if not mapped:
            gc.collect()  # flax modules and tracebacks make reference cycles that would keep the arrays alive

    # What was written must read back as exactly what was converted: paths, shapes, dtypes, bytes.
    for arr in expected.values():  # a memory-mapped source's pages, touched by the write
        ck.release(arr)
    written = ck.read(dst)
    readback = _readback(expected, written.leaves)
    ok = not readback and verified is not False
    result = {
        "ok": ok,
        "source": args.src,
        "source_format": source_format,
        "destination": dst,
        "format": out_fmt,
        "target_framework": target_framework,
        "how": how,
        "verified": verified,
        "verification": "verified" if verified else ("failed" if verified is False else f"unverified: {why}"),
        "written_equals_converted": not readback,
        "arrays": len(written.leaves),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        con = _console(args)
        status = {True: "[green]verified[/]", False: "[red]verification FAILED[/]",
                  None: f"[yellow]unverified[/] ({why})"}[verified]
        con.print(f"wrote {dst} ({out_fmt}, {result['target_framework']}, {result['arrays']} arrays) "
                  f"from {args.src} ({source_format}) by {how}; {status}")
        if readback:
            con.print("[red]the file read back differs from what was converted:[/]\n  " + "\n  ".join(readback))
    return EXIT_OK if ok else EXIT_DIFFER


def _readback(expected: dict[str, Any], got: dict[str, Any]) -> list[str]:
    """Every difference of paths, shapes, dtypes or bytes (not a tolerance comparison: that is
    ``normbridge diff``) between what was written and what reads back, one line each. Compared
    array by array, each one's pages dropped once compared where it is a view of a memory-mapped
    file (:func:`normbridge.checkpoint.release`), so the check holds about one array more than
    the conversion did."""
    import numpy as np

    from normbridge import checkpoint as ck

    def what(a: Any) -> tuple[tuple[int, ...], str]:
        return tuple(a.shape), a.dtype.name

    problems = []
    for k, want in expected.items():
        want = np.asarray(want)
        have = got.get(k)
        if have is None:
            problems.append(f"{k}: written {what(want)}, read back nothing")
            continue
        have = np.asarray(have)
        if what(have) != what(want):
            problems.append(f"{k}: written {what(want)}, read back {what(have)}")
        elif not _same_bytes(want, have):
            problems.append(f"{k}: written {what(want)}, read back with other bytes")
        ck.release(want)
        ck.release(have)
    return problems + [f"{k}: read back, never written" for k in got if k not in expected]


def _same_bytes(a: Any, b: Any, chunk: int = 1 << 20) -> bool:
    """Bitwise equality (NaNs included) of two arrays of one shape and dtype, compared as unsigned
    words ``chunk`` at a time (a small temporary, not one of the arrays' size)."""
    import numpy as np

    a, b = np.ascontiguousarray(a).reshape(-1), np.ascontiguousarray(b).reshape(-1)
    word = next(w for w in (8, 4, 2, 1) if a.nbytes % w == 0)
    a, b = a.view(np.uint8).view(f"u{word}"), b.view(np.uint8).view(f"u{word}")
    return all(np.array_equal(a[i:i + chunk], b[i:i + chunk]) for i in range(0, a.size, chunk))


def _probe(spec: str) -> Any:
    """``--probe``: ``2,5`` (a standard-normal float32 batch of that shape, key 0) or ``PKG.MODULE:FACTORY``
    (an array, or a pair ``(input for the source, input for like)``)."""
    if ":" in spec:
        return load_factory(spec)
    try:
        shape = tuple(int(d) for d in spec.split(","))
    except ValueError as err:
        raise BadInput(f"--probe {spec!r}: expected a shape such as 2,5 or PKG.MODULE:FACTORY") from err
    import jax

    return jax.random.normal(jax.random.key(0), shape)


def _convert_models(src: Any, source: Any, like: Any, mapping: Any, *, verify: bool,
                    probe: Any = None) -> tuple[Any, str, Any]:
    """``(target, how, verified)``. With a source model: ``normbridge.convert`` (pairing, layouts and
    verification live there, once). Without: the file must already be in like's layout, and its
    arrays are loaded into like by path (a change of format only, unverified)."""
    from normbridge.checkpoint import models

    if source is None:
        return models.load_into(src, like), "loading the file's arrays by path into --like", None
    target, report = _engine()(source, like, mapping=mapping, probe=probe, verify=verify)
    verified = report.verified if report.verification is not None else None
    return target, "normbridge.convert", verified


def _engine() -> Any:
    from normbridge import convert

    return convert



# --------------------------------------------------------------------------------------------- main
#: normbridge.checkpoint.FORMATS, spelled out so that ``check`` imports no jax before it sets XLA_FLAGS
#: (tests/test_cli.py checks the two agree).
FORMATS = ("orbax", "msgpack", "eqx-leaves", "equinox", "safetensors", "pickle", "npz")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="normbridge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="run the conformance checks and write compat_matrix.md")
    check.add_argument("--output", "-o", default="compat_matrix.md", help="where to write the matrix")
    check.add_argument("--facade", action="append", choices=FACADES, help="only these facades (repeatable)")

    fmt_help = "the format, instead of detecting it from the content: " + ", ".join(FORMATS)
    ins = sub.add_parser("inspect", help="format, framework, layers, shapes, dtypes, sizes and statistics")
    ins.add_argument("checkpoint")
    ins.add_argument("--format", choices=FORMATS, help=fmt_help)
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    ins.add_argument("--quiet", "-q", action="store_true", help="print nothing (exit code only)")

    dif = sub.add_parser("diff", help="compare two checkpoints of any frameworks as canonical records "
                                      "(exit 1 when they differ or cannot all be mapped)")
    dif.add_argument("a")
    dif.add_argument("b", help="the reference")
    dif.add_argument("--rtol", type=float)
    dif.add_argument("--atol", type=float)
    dif.add_argument("--ulp", type=int, help="match within this many ulps")
    dif.add_argument("--format", choices=FORMATS, help=fmt_help + " (both files)")
    dif.add_argument("--format-b", choices=FORMATS, help="the format of B when it differs from --format")
    dif.add_argument("--a-model", metavar="PKG.MODULE:FACTORY",
                     help="a function returning a model of A's architecture (for what A's file alone does not decide)")
    dif.add_argument("--b-model", metavar="PKG.MODULE:FACTORY", help="the same for B")
    dif.add_argument("--probe", metavar="SHAPE|PKG.MODULE:FACTORY",
                     help="an input for a linen --a-model/--b-model (its layers exist only while it runs); "
                          "with both models, what they run on to pair layers by execution order, as convert")
    dif.add_argument("--map", metavar="mapping.json",
                     help="{A's layer path: B's layer path} (null skips one; 're:<regex>' keys), before names "
                          "(with both models: convert's --map, before names and execution order)")
    dif.add_argument("--json", action="store_true")
    dif.add_argument("--quiet", "-q", action="store_true")

    con = sub.add_parser("convert", help="convert a checkpoint to another framework and/or format")
    con.add_argument("src")
    con.add_argument("-o", "--output", required=True, help="destination; its extension picks the format")
    con.add_argument("--like", required=True, metavar="PKG.MODULE:FACTORY",
                     help="a function returning a model of the target architecture")
    con.add_argument("--source-model", metavar="PKG.MODULE:FACTORY",
                     help="a function returning a model of the source architecture (to verify the conversion)")
    con.add_argument("--map", metavar="mapping.json",
                     help="normbridge.convert's mapping: {source layer path: target layer path} (null skips one)")
    con.add_argument("--probe", metavar="SHAPE|PKG.MODULE:FACTORY",
                     help="the input both models run on to pair layers by execution and verify: a shape "
                          "(2,5: a normal float32 batch) or a factory returning an array or (source input, like input)")
    con.add_argument("--no-verify", action="store_true", help="do not run both models to compare them")
    con.add_argument("--format", choices=FORMATS, help="the output format, instead of DST's extension")
    con.add_argument("--src-format", choices=FORMATS, help="the input format, instead of detecting it")
    con.add_argument("--overwrite", action="store_true", help="replace an existing destination (atomically)")
    con.add_argument("--json", action="store_true")
    con.add_argument("--quiet", "-q", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "check":
        return _check(args)
    import logging

    # Orbax leaves TensorStore's error on a damaged checkpoint in an unawaited asyncio task too: it is
    # already reported (as normbridge's error naming the file); its several-KB repeat is not.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    commands = {"inspect": _inspect, "diff": _diff, "convert": _convert}
    return _run(args, commands[args.command])
