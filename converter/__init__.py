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

from .convert import ConversionReport, InspectReport, convert_file, inspect, verify_file
from .errors import TiesafeError
from .loader import load_file
from .retie import LoadReport, load_model
from .torchfile import read_checkpoint

__all__ = [
    "ConversionReport",
    "InspectReport",
    "LoadReport",
    "TiesafeError",
    "convert_file",
    "inspect",
    "load_file",
    "load_model",
    "read_checkpoint",
    "verify_file",
]
__version__ = "0.1.0"
