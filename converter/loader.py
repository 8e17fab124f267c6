"""Load safetensors written by tiesafe (or anyone) and give back every name, tied.

A path names one ``.safetensors`` file, a sharded set's
``model.safetensors.index.json``, or a folder holding either. Every shard's tie
record is decoded against that shard's own stored tensors by
:mod:`converter.ties`; the union of the shards' records is the record of the set.

Stored tensors come from ``safetensors.safe_open`` (memory-mapped, zero-copy),
which parses and checks each header once; the header is not parsed a second
time here, so that a tied file loads as fast as with safetensors' own
``load_file``. When safetensors refuses a file, :mod:`converter.stfile` names
the problem. Ties are rebuilt from the validated record: aliases are the same
tensor object, views are ``as_strided`` windows on their base's storage, copies
are clones.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from . import conventions
from .dtypes import BY_TORCH_NAME
from .errors import CorruptFileError, TiesafeError
from .geometry import extent
from .stfile import MAX_HEADER_BYTES, read_safetensors
from .ties import StoredInfo, TieRecord, decode

if TYPE_CHECKING:
    import torch

SINGLE_NAME = conventions.safetensors_name("model")  # model.safetensors: what transformers loads first
INDEX_NAME = conventions.index_name("model")
_MAX_INDEX_BYTES = 64 * 1024 * 1024


@dataclass
class TiedTensors:
    """The stored tensors of a file or a sharded set, and its validated tie record.

    ``stored`` holds what the files store (hidden spans included, memory-mapped);
    :meth:`tensor` rebuilds any name the set gives.
    """

    where: Path  # the file, or the index of a sharded set: what messages name
    stored: dict[str, torch.Tensor]
    record: TieRecord

    def names(self) -> list[str]:
        """Every name of the source: stored (in file order), then aliases, views and copies."""
        hidden = set(self.record.hidden)
        return [n for n in self.stored if n not in hidden] + self.record.names()

    def source(self, name: str) -> str:
        """The stored name whose bytes hold ``name``'s values."""
        if name in self.record.views:
            return self.record.views[name].base
        if name in self.record.aliases:
            return self.record.aliases[name]
        return self.record.copies.get(name, name)

    def storage_of(self, name: str) -> str:
        """The stored name whose memory ``name`` lives in (a copy owns its memory: itself)."""
        return name if name in self.record.copies else self.source(name)

    def value(self, name: str, base: torch.Tensor | None = None) -> torch.Tensor:
        """``name``'s values on its stored tensor (or on ``base``, a converted copy of it), never copied."""
        stored = self.stored[self.source(name)] if base is None else base
        view = self.record.views.get(name)
        if view is not None:
            return stored.as_strided(view.shape, view.stride, stored.storage_offset() + view.offset)
        return stored

    def tensor(self, name: str) -> torch.Tensor:
        """``name`` as the source had it: an alias is its stored tensor, a view a window
        on its base's memory, a copy an independent clone."""
        value = self.value(name)
        return value.clone() if name in self.record.copies else value


def _locate(path: str | Path) -> tuple[Path, list[Path], dict[str, str] | None]:
    """What to load for ``path``: (what messages name, safetensors files, weight_map or None).

    A folder is looked into the way ``transformers`` does: ``model.safetensors``
    first, then ``model.safetensors.index.json``, then a lone ``*.safetensors``
    index or file.
    """
    path = Path(path)
    if path.is_dir():
        path = _pick_in_folder(path)
    if path.name.endswith(".index.json"):
        weight_map = _read_index(path)
        shards = list(dict.fromkeys(path.parent / file for file in weight_map.values()))
        return path, shards, weight_map
    return path, [path], None


def _pick_in_folder(folder: Path) -> Path:
    for name in (SINGLE_NAME, INDEX_NAME):
        if (folder / name).is_file():
            return folder / name
    for pattern in ("*.safetensors.index.json", "*.safetensors"):
        found = sorted(folder.glob(pattern))
        if len(found) == 1:
            return found[0]
        if found:
            names = ", ".join(p.name for p in found[:3])
            raise TiesafeError(f"holds several {pattern} ({names}, ...); name the one to load", path=folder)
    raise TiesafeError(f"holds neither {SINGLE_NAME} nor {INDEX_NAME}", path=folder)


def _read_index(index: Path) -> dict[str, str]:
    """The weight map of a sharded set's (untrusted) index: stored name -> shard file name."""
    try:
        if index.stat().st_size > _MAX_INDEX_BYTES:
            raise CorruptFileError(f"index is larger than {_MAX_INDEX_BYTES} bytes", path=index)
        document = json.loads(index.read_bytes())
    except FileNotFoundError:
        raise TiesafeError("no such file", path=index) from None
    except OSError as exc:
        raise TiesafeError(f"cannot read the index ({exc.strerror})", path=index) from None
    except (ValueError, RecursionError) as exc:
        raise CorruptFileError(f"index is not valid JSON ({str(exc)[:80]})", path=index) from None
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CorruptFileError("'weight_map' must map tensor names to file names", path=index)
    for name, file in weight_map.items():
        # Shards sit next to their index: a path elsewhere is refused, not followed.
        if file in ("", ".", "..") or "/" in file or "\\" in file:
            raise CorruptFileError(f"'weight_map' puts {name!r} in {file!r}, which is not a file name", path=index)
    if not weight_map:
        raise CorruptFileError("'weight_map' names no tensor", path=index)
    return dict(weight_map)


def read_tied(path: str | Path, *, device: str = "cpu") -> TiedTensors:
    """Open a file, index or folder: stored tensors (mmap) and the validated tie record.

    Everything is checked before any tensor is built: headers, each shard's tie
    record against its own tensors, and, for a sharded set, that the index and
    the shards agree and that no name is stored or tied twice.

    Example:
        >>> tied = read_tied("gpt2/model.safetensors")  # doctest: +SKIP
        >>> tied.record.aliases
        {'lm_head.weight': 'transformer.wte.weight'}
    """
    where, files, weight_map = _locate(path)
    opened = [_open(f, device) for f in files]
    home: dict[str, Path] = {}  # stored name -> its shard
    for file, _, tensors in opened:
        for name in tensors:
            if name in home:
                both = f"{home[name].name} and {file.name}"
                raise CorruptFileError(f"{name!r} is stored in both {both}", path=where)
            home[name] = file
    for name, shard in (weight_map or {}).items():
        if name not in home or home[name].name != shard:
            raise CorruptFileError(f"'weight_map' puts {name!r} in {shard}, which does not store it", path=where)
    record = _merge_records(opened, home, where)
    stored = opened[0][2] if len(opened) == 1 else {n: t for _, _, tensors in opened for n, t in tensors.items()}
    return TiedTensors(where, stored, record)


_Opened = tuple[Path, dict[str, str], dict[str, "torch.Tensor"]]


def _open(file: Path, device: str) -> _Opened:
    """One file's metadata and stored tensors, memory-mapped by safetensors."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt", device=device) as f:
            opened = file, f.metadata() or {}, f.get_tensors()
        if _entry_count(file) != len(opened[2]) and len(read_safetensors(file).entries) != len(opened[2]):
            # A name given twice (the header parser names it), or a name holding '\"data_offsets'
            # that the quick count took for a key (the parser then finds every entry loaded).
            raise CorruptFileError("the header lists a tensor more than once", path=file)
        return opened
    except (SafetensorError, OSError, TypeError, ValueError, OverflowError) as exc:
        # A damaged or missing file, or sizes torch cannot hold: the header parser names the problem.
        read_safetensors(file)
        raise TiesafeError(f"cannot load: {exc}", path=file) from None
    except RuntimeError as exc:  # e.g. a device this machine does not have
        raise TiesafeError(f"cannot load to device {device!r}: {str(exc)[:120]}", path=file) from None


def _entry_count(file: Path) -> int:
    """How many tensor entries the raw header holds, duplicates included.

    safetensors keeps one of two entries with the same name without a word. The
    byte string ``"data_offsets"`` stands in a header as a key, or inside a name
    ending in an escaped quote; counting it costs microseconds where parsing the
    header again would cost more than the load, so the parser is asked only when
    the count disagrees.
    """
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return f.read(min(length, MAX_HEADER_BYTES)).count(b'"data_offsets"')


class _StoredInfos(Mapping[str, StoredInfo]):
    """What :func:`~converter.ties.decode` knows of a file's tensors, built only for the names it asks about.

    Most stored tensors are no tie's target; describing each of them would cost
    more than the rest of a load's own work.
    """

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self._tensors = tensors
        self._infos: dict[str, StoredInfo] = {}

    def __getitem__(self, name: str) -> StoredInfo:
        info = self._infos.get(name)
        if info is None:
            tensor = self._tensors[name]
            dtype_name = str(tensor.dtype).removeprefix("torch.")
            dtype = BY_TORCH_NAME.get(dtype_name)  # a dtype tiesafe never writes keeps torch's name
            info = self._infos[name] = StoredInfo(dtype.code if dtype else dtype_name, tuple(tensor.shape))
        return info

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def _merge_records(opened: list[_Opened], home: dict[str, Path], where: Path) -> TieRecord:
    """The union of every file's tie record, each decoded against that file's own tensors."""
    record = TieRecord()
    tied_in: dict[str, Path] = {}  # tie name -> the file whose record holds it
    for file, metadata, tensors in opened:
        try:
            part = decode(metadata, _StoredInfos(tensors))
        except TiesafeError as exc:
            raise type(exc)(exc.problem, path=file) from None
        for name in part.names():
            if name in home or name in tied_in:
                verb, other = ("stores", home[name]) if name in home else ("ties", tied_in[name])
                raise CorruptFileError(
                    f"tie metadata of {file.name} ties {name!r}, which {other.name} {verb} too", path=where
                )
            tied_in[name] = file
        record.aliases.update(part.aliases)
        record.views.update(part.views)
        record.copies.update(part.copies)
        record.hidden.extend(part.hidden)
    return record


def load_file(
    path: str | Path, *, device: str = "cpu", ties: Literal["share", "clone"] = "share"
) -> dict[str, torch.Tensor]:
    """Load ``path`` (a file, a sharded set's index, or a folder) with every tied name rebuilt.

    Returns every name of the original checkpoint. With ``ties="share"`` an
    alias *is* its stored tensor and a view shares its base's memory at the
    offset, shape and stride it had in the source (tied bytes are held once,
    memory-mapped from the file); with ``ties="clone"`` each name owns its
    memory. Files written by the Hub's convert service (plain
    ``removed -> kept`` metadata) are re-tied too; a file without ties loads as
    it is.

    Example:
        >>> sd = load_file("gpt2/model.safetensors")  # doctest: +SKIP
        >>> sd["lm_head.weight"] is sd["transformer.wte.weight"]
        True
        >>> sd = load_file("llama/", ties="clone")  # doctest: +SKIP
    """
    if ties not in ("share", "clone"):
        raise TiesafeError(f"ties must be 'share' or 'clone', not {ties!r}")
    tied = read_tied(path, device=device)
    result = dict(tied.stored)  # stored names as they are: the bulk of a file, no per-name work
    for name in tied.record.hidden:
        del result[name]
    result.update((name, tied.tensor(name)) for name in tied.record.names())
    if ties == "clone":
        seen: set[str] = set()  # storages already owned by a name: every later one copies
        for name in result:
            storage = tied.storage_of(name)
            if storage in seen:
                result[name] = _clone_window(result[name])
            seen.add(storage)
    return result


def _clone_window(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of the memory a (strided) tensor reaches, with its strides kept.

    ``clone()`` would make an expanded view (stride 0) dense, so a few bytes of
    file could ask for any amount of memory; this copy is never larger than the
    stored tensor it comes from.
    """
    reach = extent(0, tensor.shape, tensor.stride())
    own = tensor.as_strided((reach,), (1,), tensor.storage_offset()).clone()
    return own.as_strided(tensor.shape, tensor.stride(), 0)
