"""Checksums of a shard's datasets over their logical content (values in C order, dtype, shape), not the file's bytes.

The writer hashes each dataset as it appends or writes it, and ``ecgfm shard verify`` hashes what it reads back, so
one flipped byte in any dataset is found and named; HDF5 layout, attributes and padding do not enter the digest.
"""

from __future__ import annotations

import hashlib
import struct

import h5py
import numpy as np

__all__ = ["CHECKSUM_ALGORITHM", "ArrayChecksum", "array_checksum", "dataset_checksum"]

CHECKSUM_ALGORITHM = "sha256"
STRING = "str"  # the dtype name of variable-length UTF-8 datasets (/record_id, /patient_id)
_BLOCK_BYTES = 16 << 20  # rows read per block when a dataset is hashed back from a file


def _canonical(dtype: str | np.dtype) -> str:
    """Little-endian dtype string (``<i2``, ``|b1``), or ``str``: one name per logical type on every machine."""
    if isinstance(dtype, str) and dtype == STRING:
        return STRING
    return np.dtype(dtype).newbyteorder("<").str


class ArrayChecksum:
    """sha256 over an array's rows in the order they are added, then its dtype and shape.

    Numbers are hashed as little-endian C-order bytes; booleans as their stored bytes (so a flipped byte that
    still reads as True is caught); strings as UTF-8, each after its byte length.
    """

    def __init__(self, dtype: str | np.dtype, row_shape: tuple[int, ...] = ()):
        self.dtype = _canonical(dtype)
        self.row_shape = tuple(int(n) for n in row_shape)
        self.rows = 0
        self._hash = hashlib.sha256()

    def update(self, rows: np.ndarray | list) -> None:
        """Add rows ``[n, *row_shape]`` (a list of str or bytes for a string dataset)."""
        if self.dtype == STRING:
            encoded = [s.encode("utf-8") if isinstance(s, str) else bytes(s) for s in rows]
            self._hash.update(struct.pack(f"<{len(encoded)}I", *(len(b) for b in encoded)))
            self._hash.update(b"".join(encoded))
            self.rows += len(encoded)
            return
        values = np.asarray(rows)
        if values.shape[1:] != self.row_shape:
            raise ValueError(f"rows of shape {values.shape[1:]} added to a checksum of rows {self.row_shape}")
        if values.dtype == np.bool_:
            values = np.ascontiguousarray(values).view(np.uint8)  # the stored byte, not its truth value
        elif _canonical(values.dtype) != self.dtype:
            raise ValueError(f"{values.dtype} rows added to a checksum of {self.dtype}")
        self._hash.update(np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<")).data)
        self.rows += values.shape[0]

    def hexdigest(self) -> str:
        """``sha256:<hex>``; the dtype and shape are hashed last, so equal bytes of another shape differ."""
        final = self._hash.copy()
        final.update(f"|{self.dtype}|{(self.rows, *self.row_shape)}".encode())
        return f"{CHECKSUM_ALGORITHM}:{final.hexdigest()}"


def array_checksum(values: np.ndarray | list, dtype: str | np.dtype | None = None) -> str:
    """The checksum of a whole array (``dtype="str"`` for a list of strings), as the writer records it."""
    if dtype == STRING:
        checksum = ArrayChecksum(STRING)
    else:
        values = np.asarray(values) if dtype is None else np.asarray(values, dtype=dtype)
        checksum = ArrayChecksum(values.dtype, values.shape[1:])
    checksum.update(values)
    return checksum.hexdigest()


def dataset_checksum(dset: h5py.Dataset) -> str:
    """The checksum of an HDF5 dataset read back in blocks of rows (about 16 MiB each)."""
    if h5py.check_string_dtype(dset.dtype) is not None:
        checksum = ArrayChecksum(STRING)
        step = 65536
    else:
        checksum = ArrayChecksum(dset.dtype, dset.shape[1:])
        row_bytes = dset.dtype.itemsize * int(np.prod(dset.shape[1:], dtype=np.int64))
        step = max(1, _BLOCK_BYTES // max(row_bytes, 1))
    for start in range(0, dset.shape[0], step):
        checksum.update(dset[start : start + step])
    return checksum.hexdigest()
