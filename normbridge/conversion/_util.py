"""Small helpers the spokes share: plain-record checks, class-method patching for call tracing."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from normbridge.conversion.base import Call, first_shape, record_arrays


def check_plain(where: str, current: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Problems writing canonical arrays ``new`` over a layer's ``current`` ones (keys, shapes, dtypes)."""
    problems = []
    for k in sorted(set(current) - set(new)):
        problems.append(f"{where}: the target has '{k}' {tuple(np.shape(current[k]))} but the source layer has none")
    for k in sorted(set(new) - set(current)):
        problems.append(f"{where}: the source layer has '{k}' {tuple(np.shape(new[k]))} but the target has none")
    for k in sorted(set(new) & set(current)):
        a, b = current[k], new[k]
        if tuple(np.shape(a)) != tuple(np.shape(b)):
            problems.append(f"{where}/{k}: source shape {tuple(np.shape(b))}, target shape {tuple(np.shape(a))}")
        elif np.dtype(a.dtype) != np.dtype(b.dtype):
            problems.append(f"{where}/{k}: source dtype {np.dtype(b.dtype)}, target dtype {np.dtype(a.dtype)}")
    return problems


def plain_record(record: Any) -> dict[str, Any]:
    return record_arrays(record)


class CallRecorder:
    """Records top-level calls of known layers; calls nested inside a known layer are that layer's own."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self.stack: list[dict[str, Any] | None] = []
        self.inner: dict[str, list[str]] = {}

    def enter(self, path: str | None, args: Any) -> dict[str, Any] | None:
        """Push a call; returns the entry to fill with the output (``None`` when the call is nested)."""
        outer = next((e for e in reversed(self.stack) if e is not None), None)
        if path is None:
            self.stack.append(None)
            return None
        if outer is not None:
            self.inner.setdefault(outer["path"], []).append(path)
            self.stack.append({"path": path, "nested": True})
            return None
        entry = {"path": path, "in": first_shape(args), "out": None}
        self.entries.append(entry)
        self.stack.append(entry)
        return entry

    def exit(self, entry: dict[str, Any] | None, out: Any) -> None:
        self.stack.pop()
        if entry is not None:
            entry["out"] = first_shape(out)

    def calls(self) -> list[Call]:
        seen: set[str] = set()
        out = []
        for e in self.entries:
            if e["path"] not in seen:  # a shared layer is paired by its first call
                seen.add(e["path"])
                out.append(Call(e["path"], e["in"], e["out"]))
        return out


@contextlib.contextmanager
def patched_calls(classes: Iterable[type], path_of: Callable[[Any], str | None], rec: CallRecorder) -> Iterator[None]:
    """Wrap ``__call__`` of ``classes`` so that calls on known instances are recorded; always restored."""
    missing = object()
    saved: list[tuple[type, Any]] = []
    try:
        for cls in dict.fromkeys(classes):
            original = cls.__dict__.get("__call__", missing)
            saved.append((cls, original))
            inherited = cls.__call__

            def wrapped(self: Any, *args: Any, __orig: Any = inherited, **kwargs: Any) -> Any:
                entry = rec.enter(path_of(self), args)
                try:
                    out = __orig(self, *args, **kwargs)
                except BaseException:
                    rec.stack.pop()
                    raise
                rec.exit(entry, out)
                return out

            type.__setattr__(cls, "__call__", wrapped)
        yield
    finally:
        for cls, original in reversed(saved):
            if original is missing:
                type.__delattr__(cls, "__call__")
            else:
                type.__setattr__(cls, "__call__", original)
