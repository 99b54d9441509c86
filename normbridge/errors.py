"""normbridge's exceptions: one hierarchy for everything that reads, writes or converts a checkpoint.

Every message names the file, the path inside it where there is one, what was expected and
what was found; the underlying library's exception is chained (``raise ... from err``), never
let through on its own.

* :class:`CheckpointError` (a ``ValueError``): the base of all checkpoint problems.

  - :class:`CorruptCheckpointError`: the bytes are damaged or not a checkpoint of the
    expected format (truncated, bit-flipped, wrong magic).
  - :class:`UnsafeCheckpointError`: the file asks for something normbridge will not do
    (a pickle GLOBAL outside the allow-list, a zip member outside the archive).
  - :class:`CheckpointMismatchError`: a readable checkpoint that does not fit the model
    (missing or extra paths, shapes, dtypes, a whole missing collection).

* :class:`ConversionError` (a ``ValueError``): a model conversion refused; lists every problem.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "ConversionError",
    "CorruptCheckpointError",
    "UnsafeCheckpointError",
]


class CheckpointError(ValueError):
    """A checkpoint could not be read, written or matched; the message names the file.

    Built either from a finished message (``CheckpointError("ckpt.msgpack: ...")``) or from its
    parts, which are also kept as attributes for scripts: ``file`` (the checkpoint), ``path`` (the
    path inside it, if any), ``expected`` and ``found``. With parts, the message reads
    ``"<file>: <path>: <message>: expected <expected>, found <found>"``.
    """

    def __init__(
        self,
        message: str = "",
        *,
        file: str | None = None,
        path: str | None = None,
        expected: str | None = None,
        found: str | None = None,
    ) -> None:
        self.file = file
        self.path = path
        self.expected = expected
        self.found = found
        parts = [p for p in (file, path, message) if p]
        text = ": ".join(parts)
        detail = ", ".join(f"{k} {v}" for k, v in (("expected", expected), ("found", found)) if v is not None)
        if detail:
            text = f"{text}: {detail}" if text else detail
        super().__init__(text)


class CorruptCheckpointError(CheckpointError):
    """The file is damaged or is not a checkpoint of the expected format."""


class UnsafeCheckpointError(CheckpointError):
    """The file asks for something normbridge refuses to do (run code, escape a folder); nothing was run."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint is readable but does not fit the model it is loaded into."""


class ConversionError(ValueError):
    """A model conversion was refused; the message lists every problem, one per line.

    ``problems``: every problem found, one string each (both sides' paths, what was expected and
    what was found). ``mapping``: a ready-to-paste ``mapping=`` for ``normbridge.convert`` with the
    pairs that could be inferred (``None`` when there is nothing to suggest). ``measured``: the
    verification result (max output difference, worst output paths) when verification refused.
    """

    def __init__(
        self,
        message: str,
        *,
        problems: list[str] | tuple[str, ...] = (),
        mapping: dict[str, str | None] | None = None,
        measured: object = None,
    ) -> None:
        self.problems = list(problems)
        self.mapping = mapping
        self.measured = measured
        text = message
        if self.problems:
            text += f" ({len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}):"
            text += "".join(f"\n  - {p}" for p in self.problems)
        if mapping:
            body = "".join(f"\n    {k!r}: {v!r}," for k, v in mapping.items())
            text += "\nmapping inferred so far (source path: target path), to review and pass as mapping=:"
            text += f"\n  {{{body}\n  }}"
        super().__init__(text)
