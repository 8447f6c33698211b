"""safetensors files checked header-first and written one tensor at a time.

Reading goes through the safetensors library (``safe_open``, memory-mapped). Two things it does
not do are written here by hand: (1) it writes a file only from a dict of tensors that are all in
memory at once, and copying a 2 GB embedding from a source shard into an output shard must stream
its bytes; (2) its header's key order follows a hash map and changes between processes, so two
identical runs would not write identical files. The format is small and fixed: an 8-byte
little-endian header length, a JSON header (name -> dtype, shape, data_offsets, padded with
spaces to a multiple of 8), then the tensors' raw bytes, contiguous, in header order.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.errors import LowbitError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
CODES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100_000_000
_CHUNK = 1 << 24  # bytes copied per read when streaming a tensor between files


@dataclass(frozen=True)
class Entry:
    """Where one tensor lies in a safetensors file (absolute byte offsets)."""

    path: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> tuple[dict[str, Entry], dict[str, str]]:
    """(name -> Entry, metadata) of a safetensors file, checked against the file's size: a
    truncated or damaged file is an error naming it."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > _MAX_HEADER:
                raise ValueError(f"header length {n} is implausible")
            if 8 + n > size:
                raise LowbitError(f"{path} is truncated: its header needs {8 + n:,} bytes, "
                                  f"the file has {size:,}")  # fmt: skip
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as exc:
        raise LowbitError(f"{path} is not a readable safetensors file: {exc}") from None
    if not isinstance(header, dict):
        raise LowbitError(f"{path}: the safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    entries, last = {}, 0
    for name, info in header.items():
        try:
            dtype, shape = info["dtype"], tuple(int(d) for d in info["shape"])
            start, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise LowbitError(f"{path}: malformed header entry for tensor {name!r}") from None
        if dtype not in DTYPES:
            raise LowbitError(f"{path}: tensor {name!r} has unknown dtype {dtype}")
        want = math.prod(shape) * DTYPES[dtype].itemsize
        if end - start != want or start < 0:
            raise LowbitError(f"{path}: tensor {name!r} spans {end - start} bytes, its shape "
                              f"{list(shape)} needs {want}")  # fmt: skip
        entries[name] = Entry(path, name, dtype, shape, 8 + n + start, 8 + n + end)
        last = max(last, 8 + n + end)
    if last > size:
        raise LowbitError(f"{path} is truncated: its header needs {last:,} bytes, the file has "
                          f"{size:,}")  # fmt: skip
    return entries, meta


Item = torch.Tensor | Entry


def write_file(path: Path, items: Mapping[str, Item], metadata: Mapping[str, str]) -> int:
    """Write ``items`` (tensors, or entries of other files copied byte for byte) as one
    safetensors file; returns its size. Tensors go in order of element size (largest first,
    which keeps every tensor aligned), then name: the same inputs give the same bytes."""
    order = sorted(items, key=lambda k: (-_itemsize(items[k]), k))
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for name in order:
        dtype, shape, nbytes = _describe(items[name])
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}  # fmt: skip
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    try:
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name in order:
                _write_item(f, items[name])
            total = f.tell()
    except OSError as exc:
        raise LowbitError(f"cannot write {path}: {exc.strerror or exc}") from None
    return total


def _itemsize(item: Item) -> int:
    return item.torch_dtype.itemsize if isinstance(item, Entry) else item.element_size()


def _describe(item: Item) -> tuple[str, tuple[int, ...], int]:
    if isinstance(item, Entry):
        return item.dtype, item.shape, item.nbytes
    if item.dtype not in CODES:
        raise LowbitError(f"safetensors cannot store dtype {item.dtype}")
    return CODES[item.dtype], tuple(item.shape), item.numel() * item.element_size()


def _write_item(f, item: Item) -> None:
    if isinstance(item, Entry):
        with open(item.path, "rb") as src:
            src.seek(item.start)
            left = item.nbytes
            while left:
                chunk = src.read(min(_CHUNK, left))
                if not chunk:
                    raise LowbitError(f"{item.path} ended inside tensor {item.name!r}")
                f.write(chunk)
                left -= len(chunk)
        return
    flat = item.detach().contiguous().reshape(-1)
    if flat.numel():
        f.write(memoryview(flat.view(torch.uint8).numpy()))
