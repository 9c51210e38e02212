"""Minimal streaming safetensors reader and writer over numpy memory maps.

`safetensors`' numpy backend cannot hold bfloat16, and its framework
backends place whole tensors on a device. Here a tensor is a zero-copy view
of a memory-mapped file (bfloat16 through `ml_dtypes`), so a loader can
convert, place and drop one tensor at a time, and a shard's pages are
released as soon as the file is closed.

Format: 8-byte little-endian header length, a JSON header mapping names to
{dtype, shape, data_offsets}, then the raw little-endian bytes.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from typing import Iterable

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsError(ValueError):
  pass


class SafetensorsFile:
  """A read-only safetensors file; use as a context manager."""

  def __init__(self, path: str):
    self.path = path
    try:
      self._file = open(path, "rb")
    except OSError as e:
      raise SafetensorsError(f"{path}: cannot open: {e}") from e
    try:
      (n,) = struct.unpack("<Q", self._file.read(8))
      self.header = json.loads(self._file.read(n))
    except (struct.error, ValueError) as e:
      self._file.close()
      raise SafetensorsError(f"{path}: not a safetensors file: {e}") from e
    self.header.pop("__metadata__", None)
    self._base = 8 + n
    size = os.fstat(self._file.fileno()).st_size
    self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
    for name, info in self.header.items():
      if info["dtype"] not in DTYPES:
        raise SafetensorsError(
            f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}"
        )
      if self._base + info["data_offsets"][1] > size:
        raise SafetensorsError(f"{path}: tensor {name!r} is truncated")

  def keys(self) -> list[str]:
    return list(self.header)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.header[name]["shape"])

  def get(self, name: str) -> np.ndarray:
    """A read-only view of tensor `name` (valid until `close`)."""
    info = self.header[name]
    start, end = info["data_offsets"]
    dtype = DTYPES[info["dtype"]]
    arr = np.frombuffer(
        self._mmap,
        dtype=dtype,
        count=(end - start) // dtype.itemsize,
        offset=self._base + start,
    )
    return arr.reshape(info["shape"])

  def close(self):
    self._mmap.close()
    self._file.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def save_file(
    tensors: Iterable[tuple[str, np.ndarray]],
    path: str,
    metadata: dict[str, str] | None = None,
) -> None:
  """Writes (name, array) pairs to `path` (atomically, via a temp file)."""
  tensors = list(tensors)
  header, offset = {}, 0
  for name, arr in tensors:
    nbytes = arr.size * arr.dtype.itemsize
    header[name] = {
        "dtype": NAMES[np.dtype(arr.dtype)],
        "shape": list(arr.shape),
        "data_offsets": [offset, offset + nbytes],
    }
    offset += nbytes
  if metadata:
    header["__metadata__"] = metadata
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for _, arr in tensors:
      f.write(np.ascontiguousarray(arr).tobytes())
  os.replace(tmp, path)
