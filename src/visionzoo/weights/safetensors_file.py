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
from typing import cast

import torch

ALIGN = 64  # PyTorch's CPU allocation alignment
MAX_HEADER = 100_000_000  # the reference implementation's limit on the header's size
_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
          "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
          "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "U16": "uint16", "U32": "uint32", "U64": "uint64"}
DTYPES = {code: getattr(torch, name) for code, name in _NAMES.items() if hasattr(torch, name)}
CODES = {dtype: code for code, dtype in DTYPES.items()}


class SafetensorsError(ValueError):
    """A file that is not valid safetensors."""


def read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """`(tensors, metadata)` of a safetensors file; aligned tensors are views of the mapped file.

    The header is checked as strictly as the reference implementation checks it, before any
    tensor is allocated: a JSON object (at most `MAX_HEADER` bytes, no duplicate keys, no
    floats) of entries with a known dtype, a shape of non-negative integers and two offsets
    that match it; the tensors' byte ranges must tile the data exactly (no gap, no overlap,
    nothing after the last), and `__metadata__` must map strings to strings.
    """
    if sys.byteorder != "little":  # pragma: no cover - the format is little-endian
        from safetensors.torch import load_file

        return load_file(str(path)), {}
    path = Path(path)
    size = path.stat().st_size
    tensors: dict[str, torch.Tensor] = {}
    storage = None
    with open(path, "rb") as f:
        entries, metadata, start = read_header(f, size)
        for name, (dtype, shape, begin, end) in entries.items():
            numel = math.prod(shape)
            offset = start + begin
            itemsize = torch.empty((), dtype=dtype).element_size()
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
    return tensors, metadata


Entry = tuple[torch.dtype, list[int], int, int]  # dtype, shape, begin and end offsets in the data


def read_header(f, size: int) -> tuple[dict[str, Entry], dict[str, str], int]:
    """The checked header of the open safetensors file `f` of `size` bytes: its entries, its
    metadata and where its data start. Raises `SafetensorsError` naming what is wrong."""
    head = f.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    if n < 2 or n > MAX_HEADER or 8 + n > size:
        raise SafetensorsError(f"header length {n} does not fit a {size}-byte file (nor the format's limit of "
                               f"{MAX_HEADER:,} bytes)")
    raw = f.read(n)
    if not raw.startswith(b"{"):
        raise SafetensorsError("header does not start with '{'")
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicates, parse_float=_no_float, parse_constant=_no_float)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise SafetensorsError(f"header is not valid JSON ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(header, dict):
        raise SafetensorsError("header is not a JSON object")
    if not _unicode(header):
        raise SafetensorsError("header holds an escaped lone surrogate, which is not text (JSON text is Unicode)")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError("__metadata__ must be an object whose values are strings")
    entries = {name: _entry(name, info) for name, info in header.items()}
    data = size - 8 - n
    position = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: item[1][2:]):
        if begin != position:
            what = "overlaps the previous tensor" if begin < position else "leaves a gap after the previous tensor"
            raise SafetensorsError(f"tensor {name!r}: data offsets {begin}..{end} {what}; the tensors' byte "
                                   f"ranges must follow each other")
        position = end
    if position != data:
        raise SafetensorsError(f"the tensors cover {position} bytes of data but the file holds {data}")
    return entries, metadata, 8 + n


def _unicode(value: object) -> bool:
    """Whether every string (and key) in a parsed JSON value is Unicode text: `\\udc00` escapes
    parse in Python but not in the reference reader."""
    if isinstance(value, str):
        return not any("\ud800" <= c <= "\udfff" for c in value)
    if isinstance(value, dict):
        return all(_unicode(k) and _unicode(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_unicode(v) for v in value)
    return True


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
    return dict(pairs)


def _no_float(text: str) -> None:
    raise ValueError(f"number {text[:30]} is not an integer; safetensors headers hold integers only")


def _entry(name: str, info: object) -> Entry:
    if not isinstance(info, dict):
        raise SafetensorsError(f"tensor {name!r}: its entry is not an object")
    code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(code, str) or code not in DTYPES:
        raise SafetensorsError(f"tensor {name!r}: unsupported dtype {code!r}")
    if not isinstance(shape, list) or not all(_natural(d) for d in shape):
        raise SafetensorsError(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_natural(o) for o in offsets):
        raise SafetensorsError(f"tensor {name!r}: data_offsets {offsets!r} is not two non-negative integers")
    dtype = DTYPES[code]
    begin, end = offsets
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if end - begin != nbytes:
        raise SafetensorsError(f"tensor {name!r}: data offsets {begin}..{end} hold {end - begin} bytes, but its "
                               f"shape {shape} of {code} needs {nbytes}")
    return dtype, shape, begin, end


def _natural(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


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
