"""tiesafe: convert PyTorch pickle checkpoints to safetensors, keeping tied weights.

Example:
    >>> import converter
    >>> report = converter.convert_file("gpt2/pytorch_model.bin")  # doctest: +SKIP
    >>> sd = converter.load_file(report.output)  # doctest: +SKIP
    >>> sd["lm_head.weight"] is sd["transformer.wte.weight"]  # doctest: +SKIP
    True
    >>> converter.load_model(model, report.output).tied  # doctest: +SKIP
    {'lm_head.weight': 'transformer.wte.weight'}
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .batch import ItemResult, convert_tree
    from .convert import ConversionReport, InspectReport, convert_file, inspect, verify_file
    from .dask_executor import DaskExecutor, dask_client
    from .errors import TiesafeError
    from .export import save_file, save_model
    from .folder import FolderReport, convert_folder
    from .hub import UploadReport, prepare_upload, push
    from .loader import load_file
    from .readers.torchfile import read_checkpoint
    from .retie import LoadReport, load_model
    from .run import convert_run, read_run

    __version__: str

# Public name -> the module defining it. The package imports a module only when one
# of its names is first used, so `tiesafe convert` never pays for the batch, Hub,
# Dask or loading machinery (multiprocessing, importlib.metadata, ...): start-up is
# part of every conversion's wall time.
_EXPORTS = {
    "ItemResult": "batch",
    "convert_tree": "batch",
    "ConversionReport": "convert",
    "InspectReport": "convert",
    "convert_file": "convert",
    "inspect": "convert",
    "verify_file": "convert",
    "DaskExecutor": "dask_executor",
    "dask_client": "dask_executor",
    "TiesafeError": "errors",
    "save_file": "export",
    "save_model": "export",
    "FolderReport": "folder",
    "convert_folder": "folder",
    "UploadReport": "hub",
    "prepare_upload": "hub",
    "push": "hub",
    "load_file": "loader",
    "LoadReport": "retie",
    "load_model": "retie",
    "read_checkpoint": "readers.torchfile",
    "convert_run": "run",
    "read_run": "run",
}


def __getattr__(name: str) -> Any:
    if name == "__version__":
        globals()[name] = version = _installed_version()
        return version
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, "__version__"})


def _installed_version() -> str:
    """The installed metadata's version: pyproject.toml is the one place a version is written.

    Read on first use, not at import: importlib.metadata costs start-up time that
    ``tiesafe convert`` would pay for nothing.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tiesafe")
    except PackageNotFoundError:  # a source tree on sys.path, never installed
        return "0+unknown"


__all__ = [
    "ConversionReport",
    "DaskExecutor",
    "FolderReport",
    "InspectReport",
    "ItemResult",
    "LoadReport",
    "TiesafeError",
    "UploadReport",
    "convert_file",
    "convert_folder",
    "convert_run",
    "convert_tree",
    "dask_client",
    "inspect",
    "load_file",
    "load_model",
    "prepare_upload",
    "push",
    "read_checkpoint",
    "read_run",
    "save_file",
    "save_model",
    "verify_file",
]
