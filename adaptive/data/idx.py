"""Readers for the IDX file format (LeCun et al.), plain or gzip-compressed.

IDX header: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions ``d``,
then ``d`` big-endian uint32 sizes, then the data in C order.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

_UBYTE = 0x08


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (``.gz`` or uncompressed) into a uint8 array of the shape in its header."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise ValueError(f"{path} is not an IDX file: only {len(data)} bytes")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != _UBYTE or ndim == 0:
        raise ValueError(
            f"{path} is not an unsigned-byte IDX file "
            f"(header {data[:4].hex()}, expected 0000 08 followed by the number of dimensions)"
        )
    header_end = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header_end])
    expected = int(np.prod(shape))
    if len(data) - header_end != expected:
        raise ValueError(
            f"{path} is truncated or padded: header promises {expected} bytes of data for shape "
            f"{shape}, file holds {len(data) - header_end}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_end).reshape(shape).copy()
