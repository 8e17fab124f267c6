"""tiesafe: convert PyTorch pickle checkpoints to safetensors, keeping tied weights.

Example:
    >>> import converter
    >>> report = converter.convert_file("gpt2/pytorch_model.bin")  # doctest: +SKIP
    >>> sd = converter.load_file(report.output)  # doctest: +SKIP
    >>> sd["lm_head.weight"] is sd["transformer.wte.weight"]  # doctest: +SKIP
    True
"""

from __future__ import annotations

from .batch import ItemResult, convert_tree
from .convert import ConversionReport, InspectReport, convert_file, inspect, verify_file
from .dask_executor import DaskExecutor, dask_client
from .errors import TiesafeError
from .folder import FolderReport, convert_folder
from .loader import load_file
from .torchfile import read_checkpoint

__all__ = [
    "ConversionReport",
    "DaskExecutor",
    "FolderReport",
    "InspectReport",
    "ItemResult",
    "TiesafeError",
    "convert_file",
    "convert_folder",
    "convert_tree",
    "dask_client",
    "inspect",
    "load_file",
    "read_checkpoint",
    "verify_file",
]
__version__ = "0.1.0"
