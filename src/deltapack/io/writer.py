"""Atomic directory creation and bounded-size safetensors shard writing.

Everything deltapack writes goes to a sibling temp directory that is renamed into place only once complete, so a
crash never leaves a directory that looks finished. Shards are flushed when they reach `max_shard_bytes`, so peak
memory is one shard buffer however large the model is; each shard's sha256 is computed from the bytes as written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from deltapack.errors import InputError

log = logging.getLogger(__name__)


class AtomicDir:
    """`with AtomicDir(out, overwrite) as tmp:` write into tmp; on success tmp is renamed to out, on error removed."""

    def __init__(self, out: str | os.PathLike, overwrite: bool = False):
        self.out = Path(out).resolve()
        self.overwrite = overwrite
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        if self.out.exists() and not self.overwrite:
            raise InputError(f"output {self.out} already exists (pass --overwrite to replace it)")
        if self.out.exists() and not self.out.is_dir():
            raise InputError(f"output {self.out} exists and is not a directory")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        os.chmod(self.tmp, 0o755)  # mkdtemp makes 0700; the result is an ordinary directory
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
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


class ShardedSafetensorsWriter:
    """Collect tensors and flush them into `prefix-0000K.safetensors` shards of at most `max_shard_bytes`.

    Shard names are final only at `close()` (HF style `-0000K-of-0000N`), when the total count is known.
    """

    def __init__(self, directory: Path, prefix: str, max_shard_bytes: int = 2 << 30, metadata: dict | None = None):
        self.dir = Path(directory)
        self.prefix = prefix
        self.max = max_shard_bytes
        self.metadata = {k: str(v) for k, v in (metadata or {}).items()}
        self._buf: dict[str, torch.Tensor] = {}
        self._buf_bytes = 0
        self._written: list[tuple[Path, list[str], int, str]] = []  # temp path, names, bytes, sha256
        self.location: dict[str, str] = {}  # tensor name -> final file name

    def add(self, name: str, t: torch.Tensor) -> None:
        self.add_group({name: t})

    def add_group(self, tensors: dict[str, torch.Tensor]) -> None:
        """Add tensors that must land in the same shard (the parts of one compressed tensor)."""
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if self._buf and self._buf_bytes + nbytes > self.max:
            self._flush()
        for name, t in tensors.items():
            if name in self._buf or name in self.location:
                raise ValueError(f"duplicate tensor name {name}")
            self._buf[name] = t.detach().contiguous().cpu()
            self.location[name] = ""
        self._buf_bytes += nbytes

    def _flush(self) -> None:
        if not self._buf:
            return
        data = st_save(self._buf, metadata=self.metadata or None)
        p = self.dir / f".{self.prefix}-{len(self._written):05d}.partial"
        write_bytes_atomic(p, data)
        self._written.append((p, list(self._buf), len(data), hashlib.sha256(data).hexdigest()))
        self._buf, self._buf_bytes = {}, 0

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
