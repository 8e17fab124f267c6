"""The tie record: which names of a safetensors file repeat or view a stored tensor.

This module is the only place that knows the schema; everything that writes or
reads tie metadata goes through :func:`encode` and :func:`decode`.

The safetensors header's ``__metadata__`` must stay ``str -> str``, so the record
is one JSON document under the key ``"tiesafe"``::

    {"version": 1,
     "aliases": {"lm_head.weight": "transformer.wte.weight"},
     "views":   {"attn.q": {"base": "attn.qkv", "dtype": "F32",
                            "offset": 0, "shape": [4, 8], "stride": [8, 1]}},
     "copies":  {},
     "hidden":  []}

- ``aliases``: the name is the very same tensor as a stored one.
- ``views``: the name is a window on a stored tensor; ``offset`` (elements),
  ``shape`` and ``stride`` are relative to the stored tensor's first element.
- ``copies``: the name held the same bytes as a stored one but was *not* shared;
  it is loaded as an independent tensor.
- ``hidden``: stored names that are no tensor of the source (spans under
  ``__tiesafe_span__.N`` covering overlapping views); loaders drop them.

Aliases are also written the way the Hub's convert service writes them, one plain
entry ``alias name -> stored name`` each, and :func:`decode` reads that
convention from files written by others.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from .dtypes import BY_CODE
from .errors import TieMetadataError, quoted
from .geometry import MAX_DIMS, MAX_EXPANDED_BYTES, MAX_INT64, extent, numel

METADATA_KEY = "tiesafe"
VERSION = 1
RESERVED_PREFIX = "__tiesafe_span__."
MAX_RECORD_BYTES = 64 * 1024 * 1024
_RESERVED_METADATA = {"format", METADATA_KEY}


@dataclass(frozen=True)
class View:
    """A window on a stored tensor: offset in elements, shape and stride, same dtype."""

    base: str
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str  # safetensors code; must equal the base's


@dataclass
class TieRecord:
    """Ties of one file (or of a sharded set, where targets may lie in other shards)."""

    aliases: dict[str, str] = field(default_factory=dict)
    views: dict[str, View] = field(default_factory=dict)
    copies: dict[str, str] = field(default_factory=dict)
    hidden: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.aliases or self.views or self.copies or self.hidden)

    def names(self) -> list[str]:
        """Every name that is not stored under its own name."""
        return [*self.aliases, *self.views, *self.copies]


@dataclass(frozen=True)
class StoredInfo:
    """What decode needs to know of a stored tensor to validate ties against it."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return numel(self.shape)


def encode(record: TieRecord) -> dict[str, str]:
    """The ``__metadata__`` entries that carry ``record`` (without ``"format"``).

    Example:
        >>> encode(TieRecord(aliases={"lm_head.weight": "wte.weight"}))["lm_head.weight"]
        'wte.weight'
    """
    if not record:
        return {}
    document = {
        "version": VERSION,
        "aliases": dict(record.aliases),
        "views": {
            name: {
                "base": v.base,
                "dtype": v.dtype,
                "offset": v.offset,
                "shape": list(v.shape),
                "stride": list(v.stride),
            }
            for name, v in record.views.items()
        },
        "copies": dict(record.copies),
        "hidden": list(record.hidden),
    }
    entries = {METADATA_KEY: json.dumps(document, separators=(",", ":"), ensure_ascii=False)}
    entries.update(record.aliases)  # the Hub convert service's convention, for other tools
    return entries


def _fail(problem: str) -> TieMetadataError:
    return TieMetadataError(f"tie metadata ({METADATA_KEY!r}): {problem}")


def _name_map(document: dict[str, object], key: str) -> dict[str, str]:
    value = document.get(key, {})
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise _fail(f"{key!r} must map names to names")
    return dict(value)


def _int_list(value: object, what: str, name: str) -> tuple[int, ...]:
    if (
        not isinstance(value, list)
        or len(value) > MAX_DIMS
        or not all(type(v) is int and 0 <= v <= MAX_INT64 for v in value)  # what torch's as_strided takes
    ):
        raise _fail(f"view {quoted(name)}: {what} must be a list of at most {MAX_DIMS} non-negative 64-bit integers")
    return tuple(value)


def _parse_document(text: str) -> TieRecord:
    if len(text) > MAX_RECORD_BYTES:
        raise _fail(f"{len(text)} bytes, more than the {MAX_RECORD_BYTES} allowed")
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise _fail(f"not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise _fail("not a JSON object")
    version = document.get("version")
    if type(version) is not int:
        raise _fail("no schema version")
    if version > VERSION:
        raise _fail(f"schema version {version} is newer than this tiesafe reads ({VERSION}); upgrade tiesafe")
    record = TieRecord(aliases=_name_map(document, "aliases"), copies=_name_map(document, "copies"))
    views = document.get("views", {})
    if not isinstance(views, dict):
        raise _fail("'views' must be an object")
    for name, spec in views.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("base"), str):
            raise _fail(f"view {quoted(name)} has no base name")
        offset = spec.get("offset")
        if type(offset) is not int or not 0 <= offset <= MAX_INT64:
            raise _fail(f"view {quoted(name)}: offset must be a non-negative 64-bit integer")
        shape = _int_list(spec.get("shape"), "shape", name)
        stride = _int_list(spec.get("stride"), "stride", name)
        if len(shape) != len(stride):
            raise _fail(f"view {quoted(name)}: shape and stride differ in length")
        if not isinstance(spec.get("dtype"), str):
            raise _fail(f"view {quoted(name)}: dtype must be a string")
        record.views[name] = View(spec["base"], offset, shape, stride, spec["dtype"])
    hidden = document.get("hidden", [])
    if not isinstance(hidden, list) or not all(isinstance(h, str) for h in hidden):
        raise _fail("'hidden' must be a list of names")
    record.hidden = list(hidden)
    return record


def decode(metadata: dict[str, str] | None, stored: Mapping[str, StoredInfo]) -> TieRecord:
    """Read and validate the ties of a file whose stored tensors are ``stored``.

    Reads tiesafe's record and the Hub convert service's plain
    ``removed name -> kept name`` entries. The metadata is untrusted: every
    target, bound and dtype is checked, and any problem raises
    :class:`~converter.errors.TieMetadataError` before anything is built.

    Example:
        >>> info = {"wte": StoredInfo("F32", (4, 4))}
        >>> decode({"format": "pt", "lm_head": "wte"}, info).aliases
        {'lm_head': 'wte'}
    """
    metadata = metadata or {}
    record = _parse_document(metadata[METADATA_KEY]) if METADATA_KEY in metadata else TieRecord()
    for key, value in metadata.items():
        # The Hub convention: an entry whose key is no tensor and whose value is one.
        plain_alias = key not in _RESERVED_METADATA and key not in stored and value in stored
        if plain_alias and key not in record.views and key not in record.copies:
            record.aliases.setdefault(key, value)
    validate(record, stored)
    return record


def validate(record: TieRecord, stored: Mapping[str, StoredInfo]) -> None:
    """Check that every tie points at a stored tensor and stays inside it."""
    seen: set[str] = set()
    for kind, mapping in (("alias", record.aliases), ("copy", record.copies)):
        for name, target in mapping.items():
            _check_target(kind, name, target, stored, record, seen)
    for name, view in record.views.items():
        _check_target("view", name, view.base, stored, record, seen)
        base = stored[view.base]
        if view.dtype != base.dtype:
            raise _fail(f"view {quoted(name)} is {quoted(view.dtype)} but its base {quoted(view.base)} is {base.dtype}")
        end = extent(view.offset, view.shape, view.stride)
        if end > base.numel:
            raise _fail(f"view {quoted(name)} reaches element {end} of {quoted(view.base)}, which has {base.numel}")
        itemsize = BY_CODE[base.dtype].itemsize if base.dtype in BY_CODE else 1
        touched, size = (end - view.offset) * itemsize, numel(view.shape) * itemsize
        if size > max(touched, MAX_EXPANDED_BYTES):  # a stride-0 view of a few bytes, terabytes once cloned
            raise _fail(f"view {quoted(name)} repeats {touched} bytes of {quoted(view.base)} as {size}")
    for name in record.hidden:
        if name not in stored:
            raise _fail(f"hidden name {quoted(name)} is not a tensor of the file")


def _check_target(
    kind: str, name: str, target: str, stored: Mapping[str, StoredInfo], record: TieRecord, seen: set[str]
) -> None:
    if name in seen:
        raise _fail(f"{quoted(name)} is tied more than once")
    seen.add(name)
    if name in stored:
        raise _fail(f"{kind} {quoted(name)} is also a stored tensor")
    if target in record.aliases or target in record.views or target in record.copies:
        raise _fail(
            f"{kind} {quoted(name)} points to {quoted(target)}, which is itself a tie (chains and cycles are refused)"
        )
    if target not in stored:
        raise _fail(f"{kind} {quoted(name)} points to {quoted(target)}, which is not in the file")


def restrict(record: TieRecord, stored: set[str]) -> TieRecord:
    """The part of ``record`` whose targets are in ``stored`` (the ties one shard carries)."""
    return TieRecord(
        aliases={n: t for n, t in record.aliases.items() if t in stored},
        views={n: v for n, v in record.views.items() if v.base in stored},
        copies={n: t for n, t in record.copies.items() if t in stored},
        hidden=[h for h in record.hidden if h in stored],
    )


def merge(records: list[TieRecord]) -> TieRecord:
    """The record of a sharded set from its shards' records; a name tied twice is refused."""
    merged = TieRecord()
    for record in records:
        for name in record.names():
            if name in merged.aliases or name in merged.views or name in merged.copies:
                raise _fail(f"{quoted(name)} is tied in more than one shard")
        merged.aliases.update(record.aliases)
        merged.views.update(record.views)
        merged.copies.update(record.copies)
        merged.hidden.extend(record.hidden)
    return merged
