"""What every conversion report shares: bytes saved, and a JSON-ready dict."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any


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
