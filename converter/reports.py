"""What every report shares: bytes saved, a JSON-ready dict, sizes for people."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any


def shown(text: object) -> str:
    r"""Text from a file (tensor names, paths) made safe to print through rich markup.

    Control characters are escaped (no terminal escape sequences from a checkpoint
    or a file name) and ``[`` is escaped so that it is never read as markup.

    Example:
        >>> shown("a\x1b[2Jb")
        'a\\x1b\\[2Jb'
    """
    printable = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text))
    return printable.replace("[", "\\[")


def human_bytes(n: int) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


class SavedBytesReport:
    """Mixin for report dataclasses with ``bytes_all_names`` and ``bytes_written``."""

    bytes_all_names: int  # what writing every name separately would take
    bytes_written: int  # tensor data in the output

    @property
    def bytes_saved(self) -> int:
        return self.bytes_all_names - self.bytes_written

    def to_dict(self) -> dict[str, Any]:
        """The report as plain data (what ``--json`` prints), with ``bytes_saved``."""
        data: dict[str, Any] = asdict(self)  # type: ignore[call-overload]
        data["bytes_saved"] = self.bytes_saved
        return data
