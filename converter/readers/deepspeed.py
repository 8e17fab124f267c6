"""Placeholder until the DeepSpeed reader lands (needs the inert pickle objects of issue 14)."""

from __future__ import annotations

from pathlib import Path

from ..descriptors import Checkpoint


def looks_like_deepspeed(folder: Path) -> bool:
    return (folder / "latest").is_file() or any(folder.glob("*_model_states.pt"))


def find_deepspeed(folder: Path) -> tuple[Path, Path] | None:
    return None


def read_deepspeed(folder: Path) -> Checkpoint:
    raise NotImplementedError
