"""Hostile and broken input: refused with one clear line, nothing run, nothing written."""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

import converter
from converter.errors import CorruptFileError, TiesafeError, UnsafeCheckpointError


class _Payload:
    """Pickles as a call to ``func(*args)``: what a malicious checkpoint does."""

    def __init__(self, func: object, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(sentinel: Path) -> dict[str, object]:
    touch = f"open({str(sentinel)!r}, 'w').write('ran')"
    return {
        "os.system": _Payload(os.system, f"touch {sentinel}"),
        "eval": _Payload(eval, touch),
        "exec": _Payload(exec, touch),
        "subprocess": _Payload(subprocess.call, ["touch", str(sentinel)]),
    }


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("kind", ["os.system", "eval", "exec", "subprocess"])
def test_reduce_payloads_are_refused_and_never_run(tmp_path: Path, kind: str, legacy: bool) -> None:
    sentinel = tmp_path / "sentinel"
    payload = _payloads(sentinel)[kind]
    state = {"w": torch.ones(2), "evil": payload}
    torch.save(state, tmp_path / "evil.bin", _use_new_zipfile_serialization=not legacy)
    refused = {"os.system": "posix.system", "eval": "builtins.eval", "exec": "builtins.exec"}
    expected = refused.get(kind, "subprocess.call")
    with pytest.raises(
        UnsafeCheckpointError, match=rf"refused: the pickle calls '{expected}' .* this file tries to run code"
    ):
        converter.convert_file(tmp_path / "evil.bin")
    assert not sentinel.exists()
    assert not (tmp_path / "evil.safetensors").exists()


def test_raw_pickle_payload_is_refused(tmp_path: Path) -> None:
    sentinel = tmp_path / "sentinel"
    (tmp_path / "raw.bin").write_bytes(pickle.dumps(_payloads(sentinel)["os.system"], protocol=2))
    with pytest.raises(UnsafeCheckpointError, match=r"posix\.system"):
        converter.convert_file(tmp_path / "raw.bin")
    assert not sentinel.exists()


def _checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "good.bin"
    torch.save({"w": torch.arange(64, dtype=torch.float32)}, path)
    return path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "the file is empty"),
        (b"hello, I am a README\n" * 4, "text file"),
        (b"GGUF\x03\x00\x00\x00" + bytes(64), "GGUF"),
        (b"\x89HDF\r\n\x1a\n" + bytes(64), "HDF5"),
        (struct.pack("<Q", 2) + b"{}", "safetensors file already"),
        (bytes(range(256)) * 4, "not a torch checkpoint"),
    ],
    ids=["empty", "text", "gguf", "hdf5", "safetensors", "binary"],
)
def test_foreign_and_empty_files_are_named(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "x.bin"
    path.write_bytes(content)
    with pytest.raises(CorruptFileError, match=message):
        converter.convert_file(path)


@pytest.mark.parametrize("compression", ["", "gz"])
def test_a_nemo_archive_says_what_to_convert(tmp_path: Path, compression: str) -> None:
    """NeMo's .nemo is a tar (written with tarfile, as NeMo does) holding model_weights.ckpt."""
    import tarfile

    (tmp_path / "model_config.yaml").write_text("target: nemo.collections.asr.models.EncDecCTCModel\n")
    torch.save({"w": torch.ones(2)}, tmp_path / "model_weights.ckpt")
    nemo = tmp_path / "model.nemo"
    with tarfile.open(nemo, f"w:{compression}") as archive:
        for name in ("model_config.yaml", "model_weights.ckpt"):
            archive.add(tmp_path / name, arcname=f"./{name}")
    with pytest.raises(CorruptFileError, match="model_weights.ckpt" if not compression else "gzip-compressed"):
        converter.convert_file(nemo, tmp_path / "out.safetensors")
    assert converter.convert_file(tmp_path / "model_weights.ckpt").tensors == 1


def test_truncated_zip_is_refused(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match=str(path)):
        converter.convert_file(path)
    assert list(tmp_path.iterdir()) == [path]


def test_truncated_legacy_storage_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "legacy.bin"
    torch.save({"w": torch.arange(64, dtype=torch.float32)}, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CorruptFileError, match="cut off"):
        converter.convert_file(path)


def _rewrite_zip(path: Path, edit) -> None:
    with zipfile.ZipFile(path) as src:
        members = [(i.filename, src.read(i)) for i in src.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for name, data in edit(members):
            dst.writestr(name, data)


def test_missing_storage_record_is_refused(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path)
    _rewrite_zip(path, lambda members: [(n, d) for n, d in members if not n.endswith("/data/0")])
    with pytest.raises(CorruptFileError, match="storage '0' has no record"):
        converter.convert_file(path)


def test_short_storage_record_is_refused(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path)
    _rewrite_zip(path, lambda members: [(n, d[:100] if n.endswith("/data/0") else d) for n, d in members])
    with pytest.raises(CorruptFileError, match="should hold 256 bytes but its record has 100"):
        converter.convert_file(path)


def test_offset_past_the_end_of_its_storage_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    base = torch.arange(8, dtype=torch.float32)
    torch.save({"w": base[4:]}, path)
    # Claim the view starts at element 6 of the 8-element storage while keeping 4 elements.
    _rewrite_zip(
        path,
        lambda members: [
            (n, d.replace(b"K\x04K\x04\x85", b"K\x06K\x04\x85") if n.endswith("data.pkl") else d) for n, d in members
        ],
    )
    with pytest.raises(CorruptFileError, match="reaches byte 40 of storage '0', which holds 32"):
        converter.convert_file(path)


def test_torchscript_archive_is_named(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    with pytest.raises(TiesafeError, match=r"TorchScript|refused"):
        converter.convert_file(path)


def test_errors_carry_the_file_name(tmp_path: Path) -> None:
    with pytest.raises(TiesafeError) as caught:
        converter.convert_file(tmp_path / "missing.bin")
    assert str(caught.value) == f"{tmp_path / 'missing.bin'}: no such file"
