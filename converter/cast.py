"""Convert floating-point bytes between dtypes as torch's ``tensor.to(dtype)`` does, without torch.

``--dtype bf16|fp16`` casts a training run's fp32 master weights while they stream to
the output, a block at a time. numpy has no bfloat16 and treats NaNs differently from
torch, so the rules are written out here: round to nearest, ties to even; NaN as torch's
CPU kernels write it (bf16: one NaN; fp16: quieted, payload kept). Checked against torch
in ``tests/test_cast.py`` on random bit patterns (infinities, subnormals, -0.0): from fp32,
the cast ``--dtype`` makes of master weights, bit for bit, NaNs included; from fp16/bf16
torch's own NaN bits depend on an element's position (vector kernel or scalar tail), so
there a NaN is only checked to stay a NaN.
"""

from __future__ import annotations

from typing import Any

from .dtypes import BY_CODE, DType
from .errors import UnsupportedError

FLOATS = ("F32", "F16", "BF16", "F64")
CAST_TARGETS = {"bf16": "BF16", "bfloat16": "BF16", "fp16": "F16", "float16": "F16", "fp32": "F32", "float32": "F32"}


def cast_target(name: str) -> DType:
    """``"bf16"`` -> the BF16 dtype (also ``bfloat16``, ``fp16``, ``float16``, ``fp32``).

    Example:
        >>> cast_target("bf16").code
        'BF16'
    """
    code = CAST_TARGETS.get(name.lower())
    if code is None:
        raise UnsupportedError(f"--dtype {name!r} is not one of bf16, fp16, fp32")
    return BY_CODE[code]


def is_float(dtype: DType) -> bool:
    """Whether ``--dtype`` casts tensors of ``dtype`` (integer buffers keep theirs)."""
    return dtype.code in FLOATS


def _to_float32(data: Any, source: DType) -> Any:
    import numpy as np

    if source.code == "F32":
        return np.frombuffer(data, dtype="<f4")
    if source.code == "BF16":  # exact: bf16 is the top half of an fp32
        return (np.frombuffer(data, dtype="<u2").astype("<u4") << 16).view("<f4")
    if source.code == "F16":
        values = np.frombuffer(data, dtype="<f2").astype("<f4")
        bits = values.view("<u4")
        bits[values != values] |= 0x00400000  # torch quiets a signalling NaN, numpy does not
        return values
    raise UnsupportedError(f"casting from {source.code} is not supported (fp32, fp16 and bf16 are)")


def cast_bytes(data: bytes | bytearray | memoryview, source: DType, target: DType) -> bytes:
    """``data`` (elements of ``source``) as elements of ``target``, rounded as torch rounds.

    Example:
        >>> cast_bytes(bytes.fromhex("0000803f"), BY_CODE["F32"], BY_CODE["BF16"]).hex()
        '803f'
    """
    import numpy as np

    if source == target:
        return bytes(data)
    values = _to_float32(data, source)
    if target.code == "F32":
        return bytes(values.astype("<f4").tobytes())
    bits = values.view("<u4")
    nan = values != values
    if target.code == "BF16":
        rounded = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16
        out = rounded.astype("<u2")
        # torch writes one NaN whatever the payload and sign: its fp32 kernel 0xFFFF, its fp16 one 0x7FC0.
        out[nan] = 0xFFFF if source.code == "F32" else 0x7FC0
        return bytes(out.tobytes())
    if target.code == "F16":
        with np.errstate(over="ignore", invalid="ignore"):
            half = values.astype("<f2").view("<u2").copy()
        # torch (F16C) keeps the sign and the payload's top bits and sets the quiet bit; numpy does not quiet.
        payload = ((bits >> 16) & 0x8000) | 0x7E00 | ((bits >> 13) & 0x3FF)
        half[nan] = payload[nan].astype("<u2")
        return bytes(half.tobytes())
    raise UnsupportedError(f"casting to {target.code} is not supported (bf16, fp16 and fp32 are)")
