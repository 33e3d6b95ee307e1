import gzip
import struct

import numpy as np
import pytest

from adaptive.data import read_idx


def _write_idx(path, array: np.ndarray, compress: bool) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("shape", [(7,), (5, 3, 4)])
def test_round_trip(tmp_path, compress, shape):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=shape, dtype=np.uint8)
    path = tmp_path / ("a.idx.gz" if compress else "a.idx")
    _write_idx(path, array, compress)
    out = read_idx(path)
    assert out.dtype == np.uint8 and out.shape == shape
    np.testing.assert_array_equal(out, array)
    out[...] = 0  # a writable copy, not a view of the file buffer


def test_truncated_file_names_sizes(tmp_path):
    path = tmp_path / "t.idx"
    _write_idx(path, np.zeros((4, 2), np.uint8), compress=False)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match=r"promises 8 bytes .* holds 5"):
        read_idx(path)


def test_wrong_magic(tmp_path):
    path = tmp_path / "bad.idx"
    path.write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)  # 0x0D = float, not supported
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        read_idx(path)
