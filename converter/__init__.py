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

from .batch import ItemResult, convert_tree
from .convert import ConversionReport, InspectReport, convert_file, inspect, verify_file
from .dask_executor import DaskExecutor, dask_client
from .errors import TiesafeError
from .export import save_file, save_model
from .folder import FolderReport, convert_folder
from .hub import UploadReport, prepare_upload, push
from .loader import load_file
from .retie import LoadReport, load_model
from .torchfile import read_checkpoint

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
    "convert_tree",
    "dask_client",
    "inspect",
    "load_file",
    "load_model",
    "prepare_upload",
    "push",
    "read_checkpoint",
    "save_file",
    "save_model",
    "verify_file",
]
__version__ = "0.1.0"
