from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from models import BUILDERS, save_model_folder


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep tiesafe's cache (declared ties) out of the user's home during tests."""
    os.environ["TIESAFE_CACHE_DIR"] = str(tmp_path_factory.mktemp("tiesafe-cache"))


@pytest.fixture(scope="session")
def model_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One folder per tiny model: config.json + pytorch_model.bin (torch.save of the state dict)."""
    root = tmp_path_factory.mktemp("models")
    folders = {}
    for name in BUILDERS:
        save_model_folder(name, root / name)
        folders[name] = root / name
    return folders
