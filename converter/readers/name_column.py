"""Tensor names held as one UTF-8 buffer: a mixture-of-experts file's 100,000 names in 5 MB, not 10.

A Python string costs about 50 bytes besides its characters, and a list of them 8 more
each; held as the bytes the pickle gave them (``BINUNICODE``: UTF-8, surrogates passed),
each followed by a NUL, with where each ends, a name costs its length and 9 bytes, and is
made a string again when read: a few thousand at a time, decoded as one string and split
at the NULs in C (:meth:`NameColumn.in_order`), where one at a time would cost a Python
call each. (A name that holds a NUL itself turns the split off: then each is cut by its ends.)
"""

from __future__ import annotations

import re
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from itertools import accumulate, chain, islice, repeat
from operator import add, eq, methodcaller
from typing import overload

_SURROGATE = re.compile(rb"\xed[\xa0-\xbf]")  # U+D800..U+DFFF as "surrogatepass" encodes them
_CHUNK = 4096  # names decoded (and encoded) at a time
_ENCODE = methodcaller("encode", "utf-8", "surrogatepass")


class NameColumn(Sequence[str]):
    """Names in order, as one buffer; a :class:`~collections.abc.Sequence` of ``str``.

    Example:
        >>> names = NameColumn(["model.embed.weight", "lm_head.weight"])
        >>> names[1], len(names), "lm_head.weight" in names, "lm_head" in names
        ('lm_head.weight', 2, True, False)
    """

    __slots__ = ("_blob", "_ends", "_split")

    def __init__(self, names: Iterable[str] = ()) -> None:
        self._blob = bytearray()  # each name, then a NUL
        self._ends = array("q")  # where each name ends (its NUL); the next starts one byte on
        self._split = True  # no name holds a NUL: a run of names is split at the NULs
        self.extend(names)

    def extend(self, names: Iterable[str]) -> None:
        """Add ``names``, encoded and added a chunk at a time (in C)."""
        rest = iter(names)
        while chunk := list(islice(rest, _CHUNK)):
            self.extend_encoded(list(map(_ENCODE, chunk)))

    def append(self, name: str) -> None:
        self.extend_encoded([_ENCODE(name)])

    def extend_encoded(self, names: list[bytes]) -> None:
        """Add names as ``BINUNICODE`` holds them (UTF-8, surrogates passed; checked by the
        caller), in C: a run of rows read from the pickle, or a chunk of a header."""
        if not names:
            return
        if self._split and any(map(bytes.__contains__, names, repeat(b"\x00"))):
            self._split = False
        lengths = list(map(len, names))
        starts = accumulate(map((1).__add__, lengths), initial=len(self._blob))  # each name, then its NUL
        self._ends.extend(map(add, starts, lengths))
        self._blob += b"\x00".join(names)
        self._blob.append(0)

    def __len__(self) -> int:
        return len(self._ends)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return list(self.in_order(range(*index.indices(len(self)))))
        ends = self._ends
        if index < 0:
            index += len(ends)
        if not 0 <= index < len(ends):
            raise IndexError("name index out of range")
        return self._blob[ends[index - 1] + 1 if index else 0 : ends[index]].decode("utf-8", "surrogatepass")

    def __iter__(self) -> Iterator[str]:
        return self.in_order(range(len(self)))

    def in_order(self, order: Sequence[int]) -> Iterator[str]:
        """The names of rows ``order``: runs of consecutive rows (a ``range``) decoded a chunk at a time.

        Example:
            >>> list(NameColumn(["a", "b", "c"]).in_order(range(1, 3)))
            ['b', 'c']
        """
        if not isinstance(order, range) or order.step != 1:
            return map(self.__getitem__, order)
        return chain.from_iterable(
            self._decoded(start, min(start + _CHUNK, order.stop)) for start in range(order.start, order.stop, _CHUNK)
        )

    def _decoded(self, start: int, stop: int) -> Iterator[str]:
        """Rows ``start .. stop-1``, decoded as one string and split at the NULs (in C)."""
        if not self._split:
            return map(self.__getitem__, range(start, stop))
        ends = self._ends
        text = self._blob[ends[start - 1] + 1 if start else 0 : ends[stop - 1]].decode("utf-8", "surrogatepass")
        return iter(text.split("\x00"))

    def encoded(self) -> Iterator[bytes]:
        """Each name's bytes, in order (compared and hashed as the names are: UTF-8 is one-to-one)."""
        blob, start = self._blob, 0
        for end in self._ends:
            yield bytes(blob[start:end])
            start = end + 1

    def index(self, name: str, start: int = 0, stop: int | None = None) -> int:
        """The first row from ``start`` holding ``name``: a search of the buffer, then a check of
        the boundaries; ValueError if there is none."""
        target = name.encode("utf-8", "surrogatepass")
        ends = self._ends
        stop = len(ends) if stop is None else min(stop, len(ends))
        if not target:  # an empty name: one that ends a byte after the one before it
            for i in range(start, stop):
                if ends[i] == (ends[i - 1] + 1 if i else 0):
                    return i
            raise ValueError("'' is not a name here")
        at = self._blob.find(target, ends[start - 1] + 1 if start else 0)
        while at >= 0:
            i = bisect_left(ends, at + len(target))  # the name that ends there, if one does
            if i >= stop:
                break
            if ends[i] == at + len(target) and (ends[i - 1] + 1 if i else 0) == at:
                return i
            at = self._blob.find(target, at + 1)
        raise ValueError(f"{name!r} is not a name here")

    def __contains__(self, name: object) -> bool:
        """Whether ``name`` is one of the names (:meth:`index`)."""
        if not isinstance(name, str):
            return False
        try:
            self.index(name)
        except ValueError:
            return False
        return True

    def has_lone_surrogates(self) -> bool:
        """Whether a name holds a lone surrogate, which UTF-8 proper cannot encode (the general path names it)."""
        return _SURROGATE.search(self._blob) is not None


def distinct_hashes(names: NameColumn, hashes: array[int]) -> bool:
    """Whether no name repeats, given each name's hash in order: the hashes sorted, then the
    names of any two alike compared exactly. (A set of 100,000 names would take 14 MB; the
    sort takes 4.)

    Example:
        >>> names = NameColumn(["a", "b", "a"])
        >>> distinct_hashes(names, array("q", map(hash, names.encoded())))
        False
    """
    ordered = sorted(hashes)
    if not any(map(eq, ordered, islice(ordered, 1, None))):
        return True
    twice = {h for h, after in zip(ordered, islice(ordered, 1, None), strict=False) if h == after}
    del ordered
    seen: set[bytes] = set()
    for name, h in zip(names.encoded(), hashes, strict=True):
        if h in twice:
            if name in seen:
                return False
            seen.add(name)
    return True


def names_in_order(names: Sequence[str], order: Sequence[int]) -> Iterator[str]:
    """``names[i] for i in order``, a chunk at a time when ``names`` is a :class:`NameColumn`.

    Example:
        >>> list(names_in_order(["a", "b"], [1, 0]))
        ['b', 'a']
    """
    if isinstance(names, NameColumn):
        return names.in_order(order)
    return map(names.__getitem__, order)
