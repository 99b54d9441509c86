"""``normbridge check``: measure every facade against the installed frameworks, write the matrix."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from normbridge.conformance import FACADES


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="normbridge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="run the conformance checks and write compat_matrix.md")
    check.add_argument("--output", "-o", default="compat_matrix.md", help="where to write the matrix")
    check.add_argument("--facade", action="append", choices=FACADES, help="only these facades (repeatable)")
    args = parser.parse_args(argv)
    if args.command == "check":
        return _check(args)
    return 2  # pragma: no cover
