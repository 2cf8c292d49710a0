"""Reading and writing safetensors files, memory-mapped where that is exact.

The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header
length, a JSON header `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{...}}` (may be padded with spaces), then the tensors' bytes back to back.

Why not `safetensors.torch.load_file`: it maps the file and returns views at whatever
offset each tensor has. PyTorch allocates tensors 64-byte aligned, and CPU kernels take
other code paths (other summation orders) for unaligned data, so a model running on such
views can differ from the same weights loaded normally in the last bits. Here a tensor is
a view of the mapped file only when it is 64-byte aligned in it; any other is read (not
through the mapping, so the file's pages do not add to the process's memory) into a fresh,
aligned tensor. `write` lays files out so that every tensor whose size is a multiple of 64
bytes (nearly all weights) starts aligned, so files written by visionzoo load zero-copy.
Files are interchangeable with the safetensors library both ways.
"""
from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch

ALIGN = 64  # PyTorch's CPU allocation alignment
_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
          "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
          "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "U16": "uint16", "U32": "uint32", "U64": "uint64"}
DTYPES = {code: getattr(torch, name) for code, name in _NAMES.items() if hasattr(torch, name)}
CODES = {dtype: code for code, dtype in DTYPES.items()}


class SafetensorsError(ValueError):
    """A file that is not valid safetensors."""


def read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """`(tensors, metadata)` of a safetensors file; aligned tensors are views of the mapped file."""
    if sys.byteorder != "little":  # pragma: no cover - the format is little-endian
        from safetensors.torch import load_file

        return load_file(str(path)), {}
    path = Path(path)
    size = path.stat().st_size
    tensors: dict[str, torch.Tensor] = {}
    storage = None
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n <= 0 or 8 + n > size:
            raise SafetensorsError(f"header length {n} does not fit a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"header is not JSON ({e})") from None
        if not isinstance(header, dict):
            raise SafetensorsError("header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        start = 8 + n
        for name, info in header.items():
            dtype, shape, (begin, end) = _entry(name, info)
            numel = math.prod(shape)
            itemsize = torch.empty((), dtype=dtype).element_size()
            if begin < 0 or end - begin != numel * itemsize or start + end > size:
                raise SafetensorsError(f"tensor {name!r}: offsets {begin}..{end} do not match its shape "
                                       f"{shape} {dtype} or the file size")
            offset = start + begin
            if numel and offset % ALIGN == 0:
                if storage is None:
                    # torch's stubs type from_file as returning any storage; on UntypedStorage it makes one
                    storage = cast(torch.UntypedStorage,
                                   torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size))
                tensors[name] = torch.empty(0, dtype=dtype).set_(storage, offset // itemsize, shape,
                                                                 _contiguous_strides(shape))
                continue
            t = torch.empty(shape, dtype=dtype)
            if numel:
                f.seek(offset)
                view = t.reshape(-1).view(torch.uint8).numpy().data
                if f.readinto(view) != end - begin:
                    raise SafetensorsError(f"tensor {name!r}: file ends early")
            tensors[name] = t
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _entry(name: str, info: Any) -> tuple[torch.dtype, list[int], tuple[int, int]]:
    # `info` is a value of the parsed JSON header, whatever the file holds: the lookups below check it
    try:
        code, shape, offsets = info["dtype"], [int(s) for s in info["shape"]], info["data_offsets"]
        begin, end = int(offsets[0]), int(offsets[1])
    except (TypeError, KeyError, ValueError, IndexError):
        raise SafetensorsError(f"tensor {name!r}: malformed header entry") from None
    if code not in DTYPES:
        raise SafetensorsError(f"tensor {name!r}: unsupported dtype {code!r}")
    return DTYPES[code], shape, (begin, end)


def _contiguous_strides(shape: list[int]) -> list[int]:
    strides, step = [], 1
    for dim in reversed(shape):
        strides.append(step)
        step *= max(dim, 1)
    return strides[::-1]


def write(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
          metadata: Mapping[str, str] | None = None) -> None:
    """Write contiguous CPU tensors as safetensors, 64-byte aligned where sizes allow."""
    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    # tensors whose size is a multiple of ALIGN first: each of them then starts aligned
    names = sorted(tensors, key=lambda k: nbytes(tensors[k]) % ALIGN != 0)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in CODES:
            raise SafetensorsError(f"tensor {name!r}: dtype {t.dtype} cannot be stored in safetensors")
        header[name] = {"dtype": CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes(t)]}
        offset += nbytes(t)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % ALIGN)  # the data then starts aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in names:
            t = tensors[name]
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
