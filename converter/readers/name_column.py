"""Tensor names held as one UTF-8 buffer: a mixture-of-experts file's 100,000 names in 5 MB, not 10.

A Python string costs about 50 bytes besides its characters, and a list of them 8 more
each; held as the bytes the pickle gave them (``BINUNICODE``: UTF-8, surrogates passed)
back to back, with where each ends, a name costs its length and 8 bytes, and is made a
string again when read.
"""

from __future__ import annotations

import re
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain
from typing import overload

_SURROGATE = re.compile(rb"\xed[\xa0-\xbf]")  # U+D800..U+DFFF as "surrogatepass" encodes them


class NameColumn(Sequence[str]):
    """Names in order, as one buffer; a :class:`~collections.abc.Sequence` of ``str``.

    Example:
        >>> names = NameColumn(["model.embed.weight", "lm_head.weight"])
        >>> names[1], len(names), "lm_head.weight" in names, "lm_head" in names
        ('lm_head.weight', 2, True, False)
    """

    __slots__ = ("_blob", "_ends")

    def __init__(self, names: Iterable[str] = ()) -> None:
        self._blob = bytearray()
        self._ends = array("q")
        for name in names:
            self.append(name)

    def append(self, name: str) -> None:
        self.append_encoded(name.encode("utf-8", "surrogatepass"))

    def append_encoded(self, encoded: bytes) -> None:
        """Add a name as ``BINUNICODE`` holds it (UTF-8, surrogates passed), checked by the caller."""
        self._blob += encoded
        self._ends.append(len(self._blob))

    def __len__(self) -> int:
        return len(self._ends)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.encoded_at(index).decode("utf-8", "surrogatepass")

    def encoded_at(self, index: int) -> bytes:
        ends = self._ends
        if index < 0:
            index += len(ends)
        if not 0 <= index < len(ends):
            raise IndexError("name index out of range")
        return bytes(self._blob[ends[index - 1] if index else 0 : ends[index]])

    def __iter__(self) -> Iterator[str]:
        for encoded in self.encoded():
            yield encoded.decode("utf-8", "surrogatepass")

    def encoded(self) -> Iterator[bytes]:
        """Each name's bytes, in order (compared and hashed as the names are: UTF-8 is one-to-one)."""
        blob, start = self._blob, 0
        for end in self._ends:
            yield bytes(blob[start:end])
            start = end

    def __contains__(self, name: object) -> bool:
        """Whether ``name`` is one of the names: a search of the buffer, then a check of the boundaries."""
        if not isinstance(name, str):
            return False
        target = name.encode("utf-8", "surrogatepass")
        blob, ends = self._blob, self._ends
        if not target:  # an empty name: one that ends where the one before it does
            return any(map(int.__eq__, ends, chain((0,), ends)))
        at = blob.find(target)
        while at >= 0:
            i = bisect_left(ends, at + len(target))  # the name that ends there, if one does
            if i < len(ends) and ends[i] == at + len(target) and (ends[i - 1] if i else 0) == at:
                return True
            at = blob.find(target, at + 1)
        return False

    def has_lone_surrogates(self) -> bool:
        """Whether a name holds a lone surrogate, which UTF-8 proper cannot encode (the general path names it)."""
        return _SURROGATE.search(self._blob) is not None
