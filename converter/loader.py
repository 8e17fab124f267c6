"""Load a safetensors file and give back every name of the original checkpoint.

Stored tensors come from ``safetensors.safe_open`` (memory-mapped, zero-copy);
ties are rebuilt from the validated record: aliases are the same tensor object,
views are ``as_strided`` windows on their base's storage, copies are clones.
With ``ties="clone"`` every name owns its memory instead (for TorchScript, or
for code that writes to tensors in place).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from .errors import CorruptFileError, TiesafeError
from .stfile import Entry, read_safetensors
from .ties import StoredInfo, decode

if TYPE_CHECKING:
    import torch


def load_file(
    path: str | Path, *, device: str = "cpu", ties: Literal["share", "clone"] = "share"
) -> dict[str, torch.Tensor]:
    """Load ``path`` with every tied name rebuilt.

    With ``ties="share"`` an alias *is* its stored tensor and a view shares its
    base's memory at the offset, shape and stride it had in the source; with
    ``ties="clone"`` each name owns a copy. Files written by the Hub's convert
    service (plain ``removed -> kept`` metadata) are re-tied too.

    Example:
        >>> sd = load_file("gpt2/model.safetensors")  # doctest: +SKIP
        >>> sd["lm_head.weight"] is sd["transformer.wte.weight"]
        True
    """
    if ties not in ("share", "clone"):
        raise TiesafeError(f"ties must be 'share' or 'clone', not {ties!r}")
    path = Path(path)
    header = read_safetensors(path)
    info = {e.name: StoredInfo(e.dtype.code, e.shape) for e in header.entries.values()}
    try:
        record = decode(header.metadata, info)
    except TiesafeError as exc:
        raise type(exc)(exc.problem, path=path) from None

    stored = _read_stored(path, header.entries, device)

    result = {name: t for name, t in stored.items() if name not in record.hidden}
    for name, target in record.aliases.items():
        result[name] = stored[target] if ties == "share" else stored[target].clone()
    for name, view in record.views.items():
        base = stored[view.base]
        window = base.as_strided(view.shape, view.stride, base.storage_offset() + view.offset)
        result[name] = window if ties == "share" else window.clone()
    for name, target in record.copies.items():
        result[name] = stored[target].clone()
    return result


def _read_stored(path: Path, entries: dict[str, Entry], device: str) -> dict[str, torch.Tensor]:
    """The stored tensors, as the header we validated describes them.

    The file is opened a second time here: if it was replaced in between, a tensor
    could differ from the geometry the ties were checked against, and a view would
    reach outside its base. Each tensor is checked against the validated entry.
    """
    import torch
    from safetensors import SafetensorError, safe_open

    stored: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            for name, entry in entries.items():
                tensor = f.get_tensor(name)
                if tuple(tensor.shape) != entry.shape or tensor.dtype != getattr(torch, entry.dtype.torch_name):
                    raise CorruptFileError("the file changed while it was being loaded", path=path)
                stored[name] = tensor
    except SafetensorError as exc:
        raise CorruptFileError(f"the safetensors library refuses the file ({str(exc)[:160]})", path=path) from None
    return stored
