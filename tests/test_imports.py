"""The conversion path never imports torch (nor rich, which only draws tables), nor reads the
installed metadata (``converter.__version__`` is read when asked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

import converter


def _imported_modules(*args: str) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "converter", *args], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}


def test_convert_and_inspect_of_a_checkpoint_do_not_import_torch(tmp_path: Path) -> None:
    weight = torch.randn(8, 4)
    source = tmp_path / "pytorch_model.bin"
    torch.save({"wte.weight": weight, "lm_head.weight": weight, "qkv": torch.randn(12, 4)}, source)

    converted = _imported_modules("convert", str(source), str(tmp_path / "model.safetensors"))
    assert "converter.convert" in converted  # the probe sees our own imports
    assert "torch" not in converted and "rich" not in converted
    assert "importlib.metadata" not in converted
    assert "torch" not in _imported_modules("inspect", str(source))
    assert "torch" not in _imported_modules("verify", str(source), str(tmp_path / "model.safetensors"))
    assert "torch" not in _imported_modules("--help")
    assert "torch" not in _imported_modules("--version")


def test_strided_tensors_of_a_legacy_file_convert_without_torch(tmp_path: Path) -> None:
    """Transposes and slices in the legacy format (facenet-pytorch's pnet.pt shape) are gathered without torch."""
    base = torch.randn(6, 4)
    source = tmp_path / "pnet.pt"
    state = {"w": base.t(), "every_other": base[::2], "channels_last": torch.randn(2, 3, 4, 5).permute(0, 2, 3, 1)}
    torch.save(state, source, _use_new_zipfile_serialization=False)
    output = tmp_path / "pnet.safetensors"
    for args in (("convert", str(source), str(output)), ("inspect", str(source)), ("verify", str(source), str(output))):
        assert "torch" not in _imported_modules(*args), args
    loaded = converter.load_file(output)  # views of one storage come back through tiesafe's loader
    assert all(torch.equal(loaded[name], tensor) for name, tensor in state.items())


def test_convert_of_a_multi_component_folder_imports_no_ml_library(tmp_path: Path) -> None:
    """A diffusers pipeline and a PEFT adapter convert without torch, diffusers, peft or sentence-transformers
    (the extras serve prepare-upload's load check only)."""
    pipeline = tmp_path / "pipe"
    (pipeline / "unet").mkdir(parents=True)
    (pipeline / "scheduler").mkdir()
    index = {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "X"]}
    (pipeline / "model_index.json").write_text(json.dumps(index))
    (pipeline / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    (pipeline / "scheduler" / "scheduler_config.json").write_text("{}")
    torch.save({"conv.weight": torch.randn(2, 2)}, pipeline / "unet" / "diffusion_pytorch_model.bin")
    imported = _imported_modules("convert", str(pipeline), str(tmp_path / "out"))
    assert "converter.folder" in imported
    assert not imported & {"torch", "diffusers", "peft", "sentence_transformers", "transformers", "rich"}
    assert (tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_export_of_a_local_model_does_not_import_the_distributed_machinery(tmp_path: Path) -> None:
    """torch itself imports torch.distributed; DTensor support (converter.collective) loads only for a DTensor."""
    code = (
        "import sys, torch, converter\n"
        f"converter.save_model(torch.nn.Linear(2, 2), {str(tmp_path / 'x.safetensors')!r})\n"
        "print(sorted(m for m in sys.modules if m in ('converter.collective', 'torch.distributed.tensor')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_training_run_conversion_imports_neither_deepspeed_nor_torch_distributed(tmp_path: Path) -> None:
    import subprocess as sp

    code = (
        "import sys, converter.run, converter.readers.deepspeed, converter.readers.dcp, converter.cast; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('deepspeed', 'torch')))"
    )
    result = sp.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
