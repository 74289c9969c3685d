"""The safetensors file layout, read and written without `safe_open` or `safetensors.torch.save`.

Why not those two:
- `safe_open(...).get_tensor` (safetensors 0.8, torch) maps the WHOLE file as a private writable mapping: every
  open charges the file's size to the address space (RLIMIT_DATA / overcommit) and, while a handle stays open over
  many tensors, every page read stays resident. `SafetensorsFile.get` reads one tensor's byte range with positional
  reads into a fresh buffer: it costs exactly that tensor.
- `save()` needs every tensor of a shard in memory plus a second copy as one `bytes` object: a 2 GB shard costs 4 GB.
  The writers in `deltapack.io.writer` build the header with `safetensors_header` and stream tensor bytes after it.

`safetensors_header` lays a shard out exactly as `safetensors.torch.save` does (dtype width, then name; the same
compact JSON padded with spaces to 8 bytes), so files written this way are byte-identical to `save()`'s.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

from deltapack.errors import InputError

# bytes per read/write when copying tensor data between files. Kept at 1 MiB: big enough for full disk speed, and
# below glibc's largest mmap threshold, so freeing it never raises the threshold and pushes later large tensor
# allocations onto the never-shrinking brk heap (a 16 MiB buffer made compress's data segment grow ~2x).
COPY_CHUNK = 1 << 20

# safetensors dtype names <-> torch; the rank is safetensors' Dtype enum order, which its serializer sorts by
# (descending, so wide types come first and every tensor stays aligned after the 8-byte-padded header)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "BOOL": (torch.bool, 0),
    "U8": (torch.uint8, 1),
    "I8": (torch.int8, 2),
    "F8_E5M2": (getattr(torch, "float8_e5m2", None), 3),
    "F8_E4M3": (getattr(torch, "float8_e4m3fn", None), 4),
    "I16": (torch.int16, 5),
    "U16": (getattr(torch, "uint16", None), 6),
    "F16": (torch.float16, 7),
    "BF16": (torch.bfloat16, 8),
    "I32": (torch.int32, 9),
    "U32": (getattr(torch, "uint32", None), 10),
    "F32": (torch.float32, 11),
    "F64": (torch.float64, 12),
    "I64": (torch.int64, 13),
    "U64": (getattr(torch, "uint64", None), 14),
}
TORCH_TO_ST = {dt: name for name, (dt, _) in DTYPES.items() if dt is not None}


class SafetensorsFile:
    """Header of one safetensors file; `get(name)` reads that tensor's bytes with one positional read."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ValueError("file shorter than its 8-byte header length")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8 or n > 100 << 20:
                    raise ValueError(f"header length {n} does not fit a {size}-byte file")
                header = json.loads(f.read(n))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
        except (OSError, ValueError, RecursionError) as e:
            raise InputError(f"cannot read safetensors file {self.path}: {str(e)[:200]}") from e
        self.data_start = 8 + n
        meta = header.pop("__metadata__", None) or {}
        self.metadata: dict = meta if isinstance(meta, dict) else {}
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                a, b = info["data_offsets"]
                shape = tuple(info["shape"])
                dtype_name = info["dtype"]
                if not (type(a) is int and type(b) is int and all(type(x) is int and x >= 0 for x in shape)):
                    raise ValueError("offsets and shape must be non-negative integers")
                self.entries[name] = (dtype_name, shape, a, b)
            except (KeyError, TypeError, ValueError) as e:
                raise InputError(f"cannot read safetensors file {self.path}: bad entry for {str(name)[:200]}") from e
            if not 0 <= a <= b or self.data_start + b > size:
                raise InputError(f"cannot read tensor {name} from {self.path}: file truncated")
            dt = DTYPES.get(dtype_name, (None,))[0] if isinstance(dtype_name, str) else None
            # a header whose byte range disagrees with its shape would read other tensors' bytes or fail in reshape
            if dt is not None and math.prod(shape) * torch.empty((), dtype=dt).element_size() != b - a:
                raise InputError(f"cannot read tensor {name} from {self.path}: shape {list(shape)} does not fit "
                                 f"its {b - a} bytes")

    def keys(self) -> list[str]:
        return list(self.entries)

    def get(self, name: str) -> torch.Tensor:
        dtype_name, shape, a, b = self.entries[name]
        dtype = DTYPES.get(dtype_name, (None,))[0]
        if dtype is None:
            raise InputError(f"unsupported safetensors dtype {dtype_name} for {name} in {self.path}")
        nbytes = b - a
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            view = memoryview(buf.numpy())
            got = 0
            try:
                with open(self.path, "rb", buffering=0) as f:
                    f.seek(self.data_start + a)
                    while got < nbytes:
                        k = f.readinto(view[got:])
                        if not k:
                            break
                        got += k
            except OSError as e:
                raise InputError(f"cannot read tensor {name} from {self.path}: {e}") from e
            if got != nbytes:
                raise InputError(f"cannot read tensor {name} from {self.path}: file truncated")
        itemsize = torch.empty((), dtype=dtype).element_size()
        if nbytes % itemsize:
            raise InputError(f"tensor {name} in {self.path} has {nbytes} bytes, not a multiple of {itemsize}")
        return buf.view(dtype).reshape(shape)


def tensor_bytes_view(t: torch.Tensor) -> memoryview:
    flat = t.detach().contiguous().cpu().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def safetensors_header(entries: list[tuple[str, str, list[int], int]], metadata: dict | None) -> tuple[bytes, list[int]]:
    """Header bytes (length prefix included) and the order in which tensor data follows, for (name, dtype name,
    shape, nbytes) entries: the layout `safetensors.torch.save` produces."""
    order = sorted(range(len(entries)), key=lambda i: (-DTYPES[entries[i][1]][1], entries[i][0]))
    head: dict = {}
    if metadata:
        head["__metadata__"] = {k: str(v) for k, v in sorted(metadata.items())}
    off = 0
    for i in order:
        name, dt, shape, nbytes = entries[i]
        head[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    text = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text, order
