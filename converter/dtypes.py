"""The dtypes tiesafe can carry, under the names each format uses.

safetensors names dtypes with short codes (``"F32"``); torch checkpoints name them
as storage classes (``torch.FloatStorage``) or as ``torch.<dtype>`` globals. This
table is the one place that maps between them, so that reading a pickle needs no
torch import.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DType:
    """One element type: its safetensors code, its torch name and its byte size."""

    code: str  # safetensors header code, e.g. "BF16"
    torch_name: str  # attribute of the torch module, e.g. "bfloat16"
    itemsize: int


_ALL = [
    DType("F64", "float64", 8),
    DType("F32", "float32", 4),
    DType("F16", "float16", 2),
    DType("BF16", "bfloat16", 2),
    DType("I64", "int64", 8),
    DType("I32", "int32", 4),
    DType("I16", "int16", 2),
    DType("I8", "int8", 1),
    DType("U64", "uint64", 8),
    DType("U32", "uint32", 4),
    DType("U16", "uint16", 2),
    DType("U8", "uint8", 1),
    DType("BOOL", "bool", 1),
    DType("F8_E4M3", "float8_e4m3fn", 1),
    DType("F8_E5M2", "float8_e5m2", 1),
    DType("F8_E4M3FNUZ", "float8_e4m3fnuz", 1),
    DType("F8_E5M2FNUZ", "float8_e5m2fnuz", 1),
    DType("C64", "complex64", 8),
]

BY_CODE: dict[str, DType] = {d.code: d for d in _ALL}
BY_TORCH_NAME: dict[str, DType] = {d.torch_name: d for d in _ALL}
# torch spells some dtypes two ways (torch.float is torch.float32, ...).
BY_TORCH_NAME.update(
    {
        "float": BY_TORCH_NAME["float32"],
        "double": BY_TORCH_NAME["float64"],
        "half": BY_TORCH_NAME["float16"],
        "long": BY_TORCH_NAME["int64"],
        "int": BY_TORCH_NAME["int32"],
        "short": BY_TORCH_NAME["int16"],
        "cfloat": BY_TORCH_NAME["complex64"],
    }
)

# Legacy typed storage classes (``torch.FloatStorage``) as pickled by torch.save.
BY_STORAGE_CLASS: dict[str, DType] = {
    "DoubleStorage": BY_TORCH_NAME["float64"],
    "FloatStorage": BY_TORCH_NAME["float32"],
    "HalfStorage": BY_TORCH_NAME["float16"],
    "BFloat16Storage": BY_TORCH_NAME["bfloat16"],
    "LongStorage": BY_TORCH_NAME["int64"],
    "IntStorage": BY_TORCH_NAME["int32"],
    "ShortStorage": BY_TORCH_NAME["int16"],
    "CharStorage": BY_TORCH_NAME["int8"],
    "ByteStorage": BY_TORCH_NAME["uint8"],
    "BoolStorage": BY_TORCH_NAME["bool"],
    "ComplexFloatStorage": BY_TORCH_NAME["complex64"],
}

# Types torch can pickle that safetensors cannot hold: named in the error message.
UNSUPPORTED_STORAGE_CLASSES = {
    "ComplexDoubleStorage": "complex128",
    "QInt8Storage": "qint8 (quantized)",
    "QInt32Storage": "qint32 (quantized)",
    "QUInt8Storage": "quint8 (quantized)",
    "QUInt4x2Storage": "quint4x2 (quantized)",
    "QUInt2x4Storage": "quint2x4 (quantized)",
}
UNSUPPORTED_TORCH_DTYPES = {
    "complex128",
    "cdouble",
    "complex32",
    "chalf",
    "qint8",
    "qint32",
    "quint8",
    "quint4x2",
    "quint2x4",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
    "bits8",
    "bits16",
    "bits1x8",
    "bits2x4",
    "bits4x2",
}

# An untyped storage (torch >= 2 for the newer dtypes) counts bytes.
BYTE = BY_TORCH_NAME["uint8"]
