"""A JSON object read a member at a time, from text that comes in pieces.

A safetensors header of 100,000 tensors is 11 MB of JSON, and ``json.loads`` holds all of
it as objects at once (about 0.6 KiB a tensor). Read here, one member is parsed at a time
by json's own C scanner, the text a block at a time: what tiesafe's check after writing
(:mod:`.flat_convert`) and ``inspect``'s columns (:mod:`.stcolumns`) hold is one member.
Hand-written because the standard library parses only whole documents; the tests hold it
to ``json.loads`` member for member, the text cut at every place.
"""

from __future__ import annotations

import codecs
import json
import json.scanner
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO


def scanner(decoder: json.JSONDecoder) -> Callable[[str, int], tuple[Any, int]]:
    """json's C scanner for ``decoder`` (its hooks): one JSON value from a position -> (value, end)."""
    # (typeshed types its argument as a scanner, where json.decoder passes the decoder itself.)
    return json.scanner.make_scanner(decoder)  # type: ignore[arg-type]


_SCAN = scanner(json.JSONDecoder())
_SPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace (json.decoder.WHITESPACE)
_SPACE_CHARS = frozenset(" \t\n\r")


def _skip(text: str, pos: int) -> int:
    """``pos`` moved past any JSON whitespace (none, in what tiesafe writes: no regex then)."""
    if text[pos : pos + 1] not in _SPACE_CHARS:
        return pos
    match = _SPACE.match(text, pos)
    return match.end() if match else pos


def header_text(f: BinaryIO, length: int) -> Iterator[str]:
    """The ``length`` bytes of header from ``f``'s position, decoded a block at a time.

    Raises ValueError (UnicodeDecodeError) for bytes that are not UTF-8 and for a file that ends early.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    while length > 0:
        block = f.read(min(length, _HEADER_BLOCK))
        if not block:
            raise ValueError("the header is cut off")
        length -= len(block)
        yield decoder.decode(block, final=length == 0)


_HEADER_BLOCK = 1 << 20


def members(pieces: Iterable[str], scan: Callable[[str, int], tuple[Any, int]] = _SCAN) -> Iterator[tuple[str, object]]:
    """The members of the JSON object whose text comes in ``pieces``, in order, each value parsed on its own.

    The grammar of the top level (braces, strings, colons, commas, whitespace) is walked
    here; keys and values are read by json's own C scanner, so that a text this accepts
    is one json.loads accepts, member for member. Raises ValueError or StopIteration on
    anything else, including text after the object.

    A member is taken only once the text holds the comma or brace after it (a prefix of
    the text that holds that much parses as the whole text does); short of it, the next
    piece is added and the member read again. Text before the member is dropped as it
    goes: a header of 100,000 members is never held whole. ``scan`` reads each key and
    value (:func:`scanner`: json's, with the hooks of a decoder).
    """
    rest = iter(pieces)
    text, pos, ended = "", 0, False

    def more() -> bool:
        nonlocal text, pos, ended
        piece = next(rest, None)
        if piece is None:
            ended = True
            return False
        text = text[pos:] + piece  # pos: the start of what is still to read
        pos = 0
        return True

    while True:  # the opening brace, after any whitespace
        at = _skip(text, pos)
        if at < len(text) or not more():
            break
    if text[at : at + 1] != "{":
        raise ValueError("not an object")
    pos, first = at + 1, True
    space = _SPACE_CHARS  # (whitespace skipped only where there is some: none in tiesafe's)
    while True:  # members, each with the comma or brace after it
        try:
            at = _skip(text, pos) if text[pos : pos + 1] in space else pos
            if first and text[at : at + 1] == "}":
                member, closing = None, at  # an empty object
            else:
                if text[at : at + 1] != '"':
                    raise ValueError("a key is not a string")
                key, at = scan(text, at)  # a string: its opening quote is there
                if text[at : at + 1] != ":":
                    at = _skip(text, at)
                    if text[at : at + 1] != ":":
                        raise ValueError("no colon after a key")
                at += 1
                value, closing = scan(text, _skip(text, at) if text[at : at + 1] in space else at)
                if text[closing : closing + 1] in space:
                    closing = _skip(text, closing)
                member = (key, value)
        except (ValueError, StopIteration, IndexError, RecursionError):
            if ended or not more():
                raise ValueError("not a JSON object") from None
            continue  # perhaps only cut off: read again with the next piece
        if closing >= len(text):  # the separator is not in the text yet
            if ended or not more():
                raise ValueError("no comma or closing brace after a value")
            continue
        first = False
        if member is not None:
            yield member
        separator, pos = text[closing], closing + 1
        if separator == "}":
            break
        if separator != ",":
            raise ValueError("no comma or closing brace after a value")
    while True:  # nothing but whitespace after the object
        if _skip(text, pos) != len(text):
            raise ValueError("text after the object")
        if not more():
            return
