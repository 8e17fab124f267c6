"""The one exception family of tiesafe.

Every error a user can cause (a bad file, a refused pickle, wrong arguments) is a
:class:`TiesafeError` whose ``str()`` is the single line the CLI prints: the file,
the problem and, where there is one, what to do instead. Anything else that
escapes is a bug (exit code 1).
"""

from __future__ import annotations

from pathlib import Path


class TiesafeError(Exception):
    """A problem with the user's input; its message is what the user reads.

    Example:
        >>> str(TiesafeError("broken", path="model.bin"))
        'model.bin: broken'
    """

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        self.problem = message
        super().__init__(f"{self.path}: {message}" if self.path else message)

    def at(self, path: str | Path) -> TiesafeError:
        """This error naming ``path``, unless it already names a file."""
        return self if self.path is not None else type(self)(self.problem, path=path)


class UnsafeCheckpointError(TiesafeError):
    """The pickle asks for something outside what a weights file needs."""


class CorruptFileError(TiesafeError):
    """The file is truncated, inconsistent or not the format it claims to be."""


class UnsupportedError(TiesafeError):
    """Valid input that safetensors cannot represent (complex128, sparse, ...)."""


class TieMetadataError(TiesafeError):
    """Tie metadata in a safetensors header is malformed or inconsistent."""


class ModelMismatchError(TiesafeError):
    """A file does not fit the module it is loaded into (names, shapes, conflicting ties)."""


class VerificationError(TiesafeError):
    """The written output does not reproduce the source bit for bit."""


class WriteError(TiesafeError):
    """The output could not be written: disk full, read-only, permission denied, ..."""


def quoted(value: object, limit: int = 80) -> str:
    """``repr`` of an untrusted value for a one-line message: escaped, short, never huge to build.

    A name from a file may hold newlines or terminal escapes, be megabytes long or
    nested a million deep; the message must stay one short, inert line.

    Example:
        >>> quoted("os.system\\n\\x1b[2J")
        "'os.system\\\\n\\\\x1b[2J'"
    """
    if isinstance(value, (str, bytes)):
        text = repr(value[: limit + 1])
    elif type(value) is int and value.bit_length() > 64:
        text = f"<an integer of {value.bit_length()} bits>"
    elif isinstance(value, (int, float, bool, type(None))):
        text = repr(value)
    elif isinstance(value, (tuple, list)):  # one level, a few items: shapes, strides, ids
        items = [quoted(v, 24) if not isinstance(v, (tuple, list)) else f"<{type(v).__name__}>" for v in value[:6]]
        more = ", ..." if len(value) > 6 else ("," if type(value) is tuple and len(value) == 1 else "")
        text = ("({})" if type(value) is tuple else "[{}]").format(", ".join(items) + more)
    else:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_error(exc: OSError, path: str | Path, what: str) -> TiesafeError:
    """The one line for a file that cannot be read (``what``: "checkpoint file", ...)."""
    if isinstance(exc, FileNotFoundError):
        return TiesafeError("no such file", path=path)
    if isinstance(exc, IsADirectoryError):
        return TiesafeError(f"is a folder, not a {what}", path=path)
    if isinstance(exc, PermissionError):
        return TiesafeError("permission denied", path=path)
    return TiesafeError(f"cannot read the file ({exc.strerror or exc})", path=path)
