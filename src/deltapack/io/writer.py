"""Atomic directory creation and bounded-memory safetensors shard writing.

Everything deltapack writes goes to a sibling temp directory that is renamed into place only once complete, so a
crash never leaves a directory that looks finished. Two shard writers, both holding one tensor at a time whatever
the shard size, both hashing each shard from the bytes as written:
- `PlannedShardWriter`: every tensor's name, dtype and shape is known before the first byte (merge, export): shard
  headers are fixed up front and each tensor goes straight to its place. Each byte is written once.
- `StreamingShardWriter`: tensors are not known in advance (compress): each is spilled to a sidecar file and copied
  into its shard at the shard boundary.
Both lay shards out as `safetensors.torch.save` does (see `io.safetensors_file`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from tqdm import tqdm

from deltapack.errors import InputError
from deltapack.io.safetensors_file import COPY_CHUNK, TORCH_TO_ST, safetensors_header, tensor_bytes_view

log = logging.getLogger(__name__)


def guard_output(out: str | os.PathLike, *inputs: str | os.PathLike | None) -> None:
    """Refuse an output that is, contains or lies inside one of the inputs (with or without --overwrite: replacing
    OUT would delete the input, writing into it would change it). Inputs that are not local paths (hub ids) are
    skipped; symlinks are resolved on both sides."""
    o = Path(out).expanduser().resolve()
    for i in inputs:
        if i is None:
            continue
        p = Path(i).expanduser()
        if not p.exists():
            continue
        r = p.resolve()
        if o == r:
            raise InputError(f"output {out} is the input {i}: refusing to overwrite an input")
        if r.is_relative_to(o):
            raise InputError(f"output {out} contains the input {i}: replacing it would delete that input")
        if o.is_relative_to(r):
            raise InputError(f"output {out} lies inside the input {i}: refusing to write into an input")


_HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def clean_stale_temps(out: Path) -> list[Path]:
    """Temp directories `.NAME.tmp-*` / `.NAME.old-*` that earlier runs writing `out` left behind (killed runs):
    those made on this host by a process that no longer exists are removed; any other is listed in a warning (it
    may belong to a run still going, here or on another host). Returns what was removed."""
    removed, kept = [], []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return removed
    for e in entries:
        n = e.name
        if not (n.startswith(f".{out.name}.tmp-") or n.startswith(f".{out.name}.old-")) or e.is_symlink() or not e.is_dir():
            continue
        rest = n[len(out.name) + 6:].split("-")  # "HOST-PID-random" for temps made by this version
        mine = len(rest) >= 2 and rest[0] == _HOST_TAG and rest[1].isdigit()
        if mine and not _pid_alive(int(rest[1])):
            shutil.rmtree(e, ignore_errors=True)
            removed.append(e)
        else:
            kept.append(e)
    if removed:
        log.warning("removed %d temp director%s left by interrupted runs: %s", len(removed),
                    "y" if len(removed) == 1 else "ies", ", ".join(p.name for p in removed))
    if kept:
        log.warning("temp directories of other or older runs next to %s (remove them if no run is going): %s", out.name,
                    ", ".join(p.name for p in kept))
    return removed


class AtomicDir:
    """`with AtomicDir(out, overwrite) as tmp:` write into tmp; on success tmp is renamed to out, on error removed.

    The temp directory is `.NAME.tmp-HOST-PID-XXXX`: the next run writing NAME removes those of dead processes of
    this host (a run killed with -9 cleans nothing up itself). `inputs`: paths OUT must not be, contain or lie in."""

    def __init__(self, out: str | os.PathLike, overwrite: bool = False, inputs: Sequence[str | os.PathLike | None] = ()):
        self.out = Path(out).resolve()
        self.overwrite = overwrite
        self.inputs = tuple(inputs)
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        guard_output(self.out, *self.inputs)
        if self.out.exists() and not self.overwrite:
            raise InputError(f"output {self.out} already exists (pass --overwrite to replace it)")
        if self.out.exists() and not self.out.is_dir():
            raise InputError(f"output {self.out} exists and is not a directory")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(self.out)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-{_HOST_TAG}-{os.getpid()}-", dir=self.out.parent))
        os.chmod(self.tmp, 0o755)  # mkdtemp makes 0700; the result is an ordinary directory
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{_HOST_TAG}-{os.getpid()}-x")
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False


def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj, *, compact: bool = False) -> None:
    text = json.dumps(obj, separators=(",", ":")) if compact else json.dumps(obj, indent=1)
    write_bytes_atomic(path, (text + "\n").encode())


def shard_file_name(prefix: str, index: int, count: int) -> str:
    """HF style: `model.safetensors` alone, else `model-00001-of-00004.safetensors`."""
    return f"{prefix}.safetensors" if count == 1 else f"{prefix}-{index + 1:05d}-of-{count:05d}.safetensors"


TensorSpec = tuple[str, torch.dtype, Sequence[int]]  # name, dtype, shape


class PlannedShardWriter:
    """Shards of tensors known in advance. `order` says in which order `add` must be called: shard by shard, each
    in safetensors' order (dtype width, then name); `location` maps every name to its final file from the start.

    Tensors are assigned to shards in the order of `specs`, a new shard starting where the next tensor would take
    the current one past `max_shard_bytes` (a tensor larger than that gets a shard of its own)."""

    def __init__(self, directory: Path, prefix: str, specs: Iterable[TensorSpec], max_shard_bytes: int = 2 << 30,
                 metadata: dict | None = None):
        self.dir = Path(directory)
        shards: list[list[tuple[str, str, list[int], int]]] = [[]]
        size = 0
        self._spec: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for name, dtype, shape in specs:
            if name in self._spec:
                raise ValueError(f"duplicate tensor name {name}")
            if dtype not in TORCH_TO_ST:
                raise ValueError(f"{name}: dtype {dtype} cannot be stored in safetensors")
            shape = tuple(int(s) for s in shape)
            self._spec[name] = (dtype, shape)
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, TORCH_TO_ST[dtype], list(shape), nbytes))
            size += nbytes
        if not shards[-1]:
            shards.pop()
        meta = {k: str(v) for k, v in (metadata or {}).items()}
        self.files = [shard_file_name(prefix, i, len(shards)) for i in range(len(shards))]
        self.order: list[str] = []
        self.location: dict[str, str] = {}
        self.total_size = 0  # tensor bytes, as HF's index reports them
        self._shards: list[tuple[bytes, list[str], int]] = []  # header, names in write order, file bytes
        for fname, entries in zip(self.files, shards):
            header, order = safetensors_header(entries, meta)
            names = [entries[i][0] for i in order]
            data = sum(e[3] for e in entries)
            self._shards.append((header, names, len(header) + data))
            self.order += names
            self.total_size += data
            self.location.update(dict.fromkeys(names, fname))
        self._next = 0  # index into order
        self._shard = -1
        self._f = None
        self._hash = None
        self._left = 0  # names still to come in the open shard
        self._digests: list[str] = []

    def _partial(self, i: int) -> Path:
        return self.dir / f".{self.files[i]}.partial"

    def add(self, name: str, t: torch.Tensor) -> None:
        if self._next >= len(self.order):
            raise ValueError(f"{name}: every planned tensor is already written")
        want = self.order[self._next]
        if name != want:
            raise ValueError(f"tensors must come in the planned order: expected {want}, got {name}")
        dtype, shape = self._spec[name]
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(f"{name}: got {t.dtype} {list(t.shape)}, planned {dtype} {list(shape)}")
        if self._f is None:
            self._shard += 1
            header, names, _ = self._shards[self._shard]
            self._f = open(self._partial(self._shard), "wb")
            self._f.write(header)
            self._hash = hashlib.sha256(header)
            self._left = len(names)
        view = tensor_bytes_view(t)
        self._f.write(view)
        self._hash.update(view)
        self._next += 1
        self._left -= 1
        if self._left == 0:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None
            self._digests.append(self._hash.hexdigest())

    def close(self) -> dict[str, dict]:
        """Give the shards their final names; returns {file name: {bytes, sha256}}."""
        if self._next != len(self.order):
            missing = self.order[self._next:]
            raise ValueError(f"{len(missing)} planned tensors were never written (first: {missing[0]})")
        files = {}
        for i, fname in enumerate(self.files):
            os.replace(self._partial(i), self.dir / fname)
            files[fname] = {"bytes": self._shards[i][2], "sha256": self._digests[i]}
        return files

    def abort(self) -> None:
        """Remove partial files (on error)."""
        if self._f is not None:
            self._f.close()
            self._f = None
        for i in range(len(self.files)):
            self._partial(i).unlink(missing_ok=True)

    def index(self) -> dict:
        """The `model.safetensors.index.json` content for these shards."""
        return {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.location.items()))}


def write_weights(directory: Path, specs: Iterable[TensorSpec], tensor: Callable[[str], torch.Tensor], *,
                  max_shard_bytes: int = 2 << 30, desc: str | None = None, progress: bool = False) -> dict[str, dict]:
    """An HF checkpoint's weights: shards of `specs` filled with `tensor(name)` (called once per name, in the
    writer's order, so one tensor is in memory at a time), plus the index file when there is more than one shard."""
    w = PlannedShardWriter(directory, "model", specs, max_shard_bytes, metadata={"format": "pt"})
    try:
        for n in tqdm(w.order, desc=desc, disable=not progress):
            w.add(n, tensor(n))
        files = w.close()
    except BaseException:
        w.abort()
        raise
    if len(files) > 1:
        write_json_atomic(Path(directory) / "model.safetensors.index.json", w.index())
    return files


class StreamingShardWriter:
    """Shards of tensors that are not known in advance (compress: a codec's parts exist only once it has run).

    Each tensor is spilled to a sidecar file as it arrives; at the shard boundary header and data are written (in
    safetensors' order) while being hashed. Peak memory is one tensor plus a copy buffer, whatever the shard size;
    the price is writing each byte twice. Shards are flushed at `max_shard_bytes`; names are final (HF style
    `-0000K-of-0000N`) only at `close()`, when the count is known."""

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
            if t.dtype not in TORCH_TO_ST:
                raise ValueError(f"{name}: dtype {t.dtype} cannot be stored in safetensors")
            view = tensor_bytes_view(t)
            self._offsets.append(self._spill_f.tell())
            self._spill_f.write(view)
            self._entries.append((name, TORCH_TO_ST[t.dtype], list(t.shape), view.nbytes))
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
            final = shard_file_name(self.prefix, i, n)
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

