"""Bounded-memory tensor IO: read safetensors tensors with positional reads, write shards without buffering them.

Why not `safe_open` and `safetensors.torch.save`:
- `safe_open(...).get_tensor` (safetensors 0.8, torch) maps the WHOLE file as a private writable mapping: every
  open charges the file's size to the address space (RLIMIT_DATA / overcommit) and, while a handle stays open over
  many tensors (`iter_tensors`), every page read stays resident. Reading a tensor's byte range with `readinto` into
  a fresh buffer costs exactly that tensor.
- `save()` needs every tensor of a shard in memory plus a second copy as one `bytes` object: a 2 GB shard costs
  4 GB. `StreamingShardWriter` spills each tensor to a sidecar file as it arrives and, at the shard boundary,
  writes header + data (sorted like safetensors does) while hashing: peak memory is one tensor plus a copy buffer.

The files `StreamingShardWriter` writes are byte-identical to `safetensors.torch.save` of the same tensors and
metadata (same dtype-then-name order, same compact JSON header padded with spaces to 8 bytes), so swapping it in
changes no checksum.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from pathlib import Path
from typing import Iterator

import torch

from deltapack.errors import InputError
from deltapack.io.sources import ModelSource

log = logging.getLogger(__name__)

# bytes per read/write when moving spilled tensor data into the shard. Kept at 1 MiB: big enough for full disk
# speed, and below glibc's largest mmap threshold, so freeing it never raises the threshold and pushes later large
# tensor allocations onto the never-shrinking brk heap (a 16 MiB buffer made compress's data segment grow ~2x).
COPY_CHUNK = 1 << 20

# safetensors dtype names <-> torch; the rank is safetensors' Dtype enum order, which its serializer sorts by
# (descending, so wide types come first and every tensor stays aligned after the 8-byte-padded header)
_DTYPES: dict[str, tuple[torch.dtype, int]] = {
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
_TORCH_TO_ST = {dt: name for name, (dt, _) in _DTYPES.items() if dt is not None}


# ---- reading -------------------------------------------------------------------------------------------------------
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
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read safetensors file {self.path}: {e}") from e
        self.data_start = 8 + n
        self.metadata: dict = header.pop("__metadata__", None) or {}
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                a, b = info["data_offsets"]
                self.entries[name] = (info["dtype"], tuple(info["shape"]), int(a), int(b))
            except (KeyError, TypeError, ValueError) as e:
                raise InputError(f"cannot read safetensors file {self.path}: bad entry for {name}") from e
            if not 0 <= a <= b or self.data_start + b > size:
                raise InputError(f"cannot read tensor {name} from {self.path}: file truncated")

    def keys(self) -> list[str]:
        return list(self.entries)

    def supported(self, name: str) -> bool:
        return _DTYPES.get(self.entries[name][0], (None,))[0] is not None

    def get(self, name: str) -> torch.Tensor:
        dtype_name, shape, a, b = self.entries[name]
        dtype = _DTYPES.get(dtype_name, (None,))[0]
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


class PreadSource(ModelSource):
    """A `ModelSource` whose safetensors tensors are read by byte range (see the module docstring); `.bin`
    checkpoints and dtypes this reader does not know go through the parent class."""

    _files: dict

    @classmethod
    def wrap(cls, src: ModelSource) -> "PreadSource":
        if isinstance(src, PreadSource):
            return src
        new = cls.__new__(cls)
        new.__dict__.update(src.__dict__)
        new._bin_cache = {}
        new._files = {}
        return new

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_bin_cache"], state["_files"] = {}, {}  # headers are re-read where the object lands
        return state

    def _file(self, f: Path) -> SafetensorsFile:
        h = self._files.get(f)
        if h is None:
            h = self._files[f] = SafetensorsFile(f)
        return h

    def get(self, name: str) -> torch.Tensor:
        f = self._index.get(name)
        if f is None:
            raise KeyError(name)
        if f.suffix == ".safetensors":
            h = self._file(f)
            if name in h.entries and h.supported(name):
                return h.get(name)
        return super().get(name)

    def iter_tensors(self, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        names = self.keys() if names is None else names
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self._index[n], []).append(n)
        for ns in by_file.values():  # file order, as the parent: one file's pages are read together
            for n in ns:
                yield n, self.get(n)


# ---- writing -------------------------------------------------------------------------------------------------------
def _tensor_bytes_view(t: torch.Tensor) -> memoryview:
    flat = t.detach().contiguous().cpu().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def safetensors_header(entries: list[tuple[str, str, list[int], int]], metadata: dict | None) -> tuple[bytes, list[int]]:
    """Header bytes (length prefix included) and the order in which tensor data follows, for (name, dtype name,
    shape, nbytes) entries: the layout `safetensors.torch.save` produces."""
    order = sorted(range(len(entries)), key=lambda i: (-_DTYPES[entries[i][1]][1], entries[i][0]))
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


class StreamingShardWriter:
    """Drop-in for `deltapack.io.writer.ShardedSafetensorsWriter` (same constructor, `add`, `add_group`, `close`,
    `location`) whose memory does not grow with the shard: tensors are spilled to a sidecar file on arrival."""

    def __init__(self, directory: Path, prefix: str, max_shard_bytes: int = 2 << 30, metadata: dict | None = None):
        self.dir = Path(directory)
        self.prefix = prefix
        self.max = max_shard_bytes
        self.metadata = {k: str(v) for k, v in (metadata or {}).items()}
        self._spill: Path | None = None
        self._spill_f = None
        self._entries: list[tuple[str, str, list[int], int]] = []  # name, dtype, shape, nbytes
        self._offsets: list[int] = []  # where each entry's bytes start in the spill file
        self._bytes = 0
        self._names: set[str] = set()
        self._written: list[tuple[Path, list[str], int, str]] = []  # temp path, names, bytes, sha256
        self.location: dict[str, str] = {}

    def add(self, name: str, t: torch.Tensor) -> None:
        self.add_group({name: t})

    def add_group(self, tensors: dict[str, torch.Tensor]) -> None:
        """Add tensors that must land in the same shard (the parts of one compressed tensor)."""
        if not tensors:
            return
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if self._entries and self._bytes + nbytes > self.max:
            self._flush()
        if self._spill_f is None:
            self._spill = self.dir / f".{self.prefix}-{len(self._written):05d}.spill"
            self._spill_f = open(self._spill, "wb")
        for name, t in tensors.items():
            if name in self._names:
                raise ValueError(f"duplicate tensor name {name}")
            if t.dtype not in _TORCH_TO_ST:
                raise ValueError(f"{name}: dtype {t.dtype} cannot be stored in safetensors")
            view = _tensor_bytes_view(t)
            self._offsets.append(self._spill_f.tell())
            self._spill_f.write(view)
            self._entries.append((name, _TORCH_TO_ST[t.dtype], list(t.shape), view.nbytes))
            self._names.add(name)
            self.location[name] = ""
        self._bytes += nbytes

    def _flush(self) -> None:
        if self._spill_f is None:
            return
        self._spill_f.close()
        self._spill_f = None
        header, order = safetensors_header(self._entries, self.metadata)
        part = self.dir / f".{self.prefix}-{len(self._written):05d}.partial"
        h = hashlib.sha256(header)
        size = len(header)
        buf = bytearray(COPY_CHUNK)
        with open(self._spill, "rb", buffering=0) as src, open(part, "wb") as dst:
            dst.write(header)
            for i in order:
                left, pos = self._entries[i][3], self._offsets[i]
                src.seek(pos)
                while left:
                    k = src.readinto(memoryview(buf)[: min(left, COPY_CHUNK)])
                    if not k:
                        raise OSError(f"spill file {self._spill} shrank while writing a shard")
                    chunk = memoryview(buf)[:k]
                    dst.write(chunk)
                    h.update(chunk)
                    left -= k
                    size += k
            dst.flush()
            os.fsync(dst.fileno())
        os.unlink(self._spill)
        self._written.append((part, [e[0] for e in self._entries], size, h.hexdigest()))
        self._entries, self._offsets, self._bytes = [], [], 0

    def close(self) -> dict[str, dict]:
        """Flush, give shards their final names; returns {file name: {bytes, sha256}}."""
        self._flush()
        n = len(self._written)
        files = {}
        for i, (p, names, nbytes, digest) in enumerate(self._written):
            final = f"{self.prefix}.safetensors" if n == 1 else f"{self.prefix}-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(p, self.dir / final)
            for nm in names:
                self.location[nm] = final
            files[final] = {"bytes": nbytes, "sha256": digest}
        return files

    def abort(self) -> None:
        """Remove spill and partial files (on error)."""
        if self._spill_f is not None:
            self._spill_f.close()
            self._spill_f = None
        for p in [self._spill] + [w[0] for w in self._written]:
            if p is not None and p.exists():
                p.unlink()

