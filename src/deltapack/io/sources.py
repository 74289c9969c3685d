"""Lazy, tensor-by-tensor access to model checkpoints.

A `ModelSource` resolves a user's model reference (local HF directory, hub id with `@revision`, GGUF file) to a set
of safetensors shards and serves tensors one at a time, each read by its byte range (`io.safetensors_file`), so peak
memory stays a few tensors however large the model or its shards are. `.bin` checkpoints go through `torch.load(weights_only=True)`, which refuses
pickled code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from deltapack.errors import InputError
from deltapack.io.safetensors_file import DTYPES, SafetensorsFile

log = logging.getLogger(__name__)

HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$")
# Files that travel with a checkpoint and define how to use it (not weights).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
CONFIG_FILES = ("config.json", "generation_config.json")


@dataclass
class TensorMeta:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class ModelSource:
    """A checkpoint whose tensors are read lazily. Construct with `open_model`."""

    ref: str  # what the user typed
    path: Path  # local directory holding the files
    model_id: str  # hub id or a path-like label
    revision: str | None
    weight_files: list[Path]
    _index: dict[str, Path] = field(default_factory=dict)  # tensor name -> file
    _meta: dict[str, TensorMeta] = field(default_factory=dict)
    _bin_cache: dict[Path, dict[str, torch.Tensor]] = field(default_factory=dict)
    _headers: dict[Path, SafetensorsFile] = field(default_factory=dict)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_bin_cache"] = {}  # mapped tensors do not travel to worker processes; headers are small and do
        return state

    # ---- discovery ---------------------------------------------------------------------------------------------
    def _scan(self) -> None:
        for f in self.weight_files:
            if f.suffix == ".safetensors":
                h = self._header(f)
                for k, (dtype_name, shape, _, _) in h.entries.items():
                    dtype = DTYPES.get(dtype_name, (None,))[0]
                    if dtype is None:
                        raise InputError(f"unsupported safetensors dtype {dtype_name} for {k} in {f}")
                    self._index[k] = f
                    self._meta[k] = TensorMeta(k, shape, dtype)
            else:
                for k, t in self._load_bin(f).items():
                    self._index[k] = f
                    self._meta[k] = TensorMeta(k, tuple(t.shape), t.dtype)

    def _header(self, f: Path) -> SafetensorsFile:
        h = self._headers.get(f)
        if h is None:
            h = self._headers[f] = SafetensorsFile(f)
        return h

    def _load_bin(self, f: Path) -> dict[str, torch.Tensor]:
        if f not in self._bin_cache:
            try:
                # weights_only refuses any pickle that is not plain tensors/containers: no code runs.
                sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise InputError(f"refusing to load {f}: not a plain-tensor checkpoint ({e.__class__.__name__})") from e
            if not isinstance(sd, dict):
                raise InputError(f"{f} does not hold a state dict")
            self._bin_cache.clear()  # keep one .bin file mapped at a time
            self._bin_cache[f] = sd
        return self._bin_cache[f]

    # ---- tensor access -----------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return sorted(self._meta)

    def meta(self, name: str) -> TensorMeta:
        return self._meta[name]

    def __contains__(self, name: str) -> bool:
        return name in self._meta

    def get(self, name: str) -> torch.Tensor:
        f = self._index.get(name)
        if f is None:
            raise KeyError(name)
        if f.suffix == ".safetensors":
            return self._header(f).get(name)
        return self._load_bin(f)[name].clone()

    def iter_tensors(self, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield tensors grouped by file: one file's pages are read together (and one .bin is loaded once)."""
        names = self.keys() if names is None else names
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self._index[n], []).append(n)
        for ns in by_file.values():
            for n in ns:
                yield n, self.get(n)

    # ---- non-weight files ----------------------------------------------------------------------------------------
    def config(self) -> dict:
        p = self.path / "config.json"
        if not p.exists():
            return {}
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"{p} is not valid JSON: {e}") from e

    def aux_files(self) -> dict[str, Path]:
        """Config and tokenizer files present next to the weights."""
        out = {}
        for name in CONFIG_FILES + TOKENIZER_FILES:
            p = self.path / name
            if p.is_file():
                out[name] = p
        return out

    def structure_hash(self) -> str:
        """Hash of names, shapes and dtypes: a cheap first check that a delta belongs to this base."""
        h = hashlib.sha256()
        for k in self.keys():
            m = self._meta[k]
            h.update(f"{k}|{list(m.shape)}|{str(m.dtype)}\n".encode())
        return "sha256:" + h.hexdigest()


def _weight_files(d: Path) -> list[Path]:
    idx = d / "model.safetensors.index.json"
    if idx.exists():
        try:
            wm = json.loads(idx.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise InputError(f"{idx} is not a valid safetensors index: {e}") from e
        if not isinstance(wm, dict):
            raise InputError(f"{idx} is not a valid safetensors index: weight_map is not an object")
        for f in wm.values():
            # shard names are plain names next to the index: never a path that leaves the checkpoint
            if not isinstance(f, str) or not f or f in (".", "..") or "/" in f or "\\" in f or "\x00" in f:
                raise InputError(f"{idx} names a shard {str(f)[:100]!r} that is not a plain file name in the checkpoint")
        files = sorted({d / f for f in wm.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise InputError(f"checkpoint {d} is missing shards: {', '.join(missing[:3])}")
        return files
    st = sorted(d.glob("*.safetensors"))
    if st:
        return st
    bins = sorted(d.glob("pytorch_model*.bin"))
    if bins:
        return bins
    raise InputError(f"no weights found in {d} (expected *.safetensors or pytorch_model*.bin)")


def parse_hub_ref(ref: str) -> tuple[str, str | None]:
    repo, _, rev = ref.partition("@")
    return repo, (rev or None)


def open_model(ref: str | os.PathLike, *, trust_remote_code: bool = False) -> ModelSource:
    """Resolve a model reference. Local directory, `.gguf` file, or hub id `org/name[@revision]`."""
    ref_s = str(ref)
    p = Path(ref_s).expanduser()
    if p.is_dir():
        src = ModelSource(ref_s, p.resolve(), str(p.resolve()), None, _weight_files(p))
        src._scan()
        _check_remote_code(src, trust_remote_code)
        return src
    if p.suffix == ".gguf":
        if not p.is_file():
            raise InputError(f"GGUF file not found: {p}")
        from deltapack.io.gguf import gguf_to_safetensors_dir

        d = gguf_to_safetensors_dir(p)
        src = ModelSource(ref_s, d, f"gguf:{p.name}", _file_digest(p)[:16], _weight_files(d))
        src._scan()
        return src
    if p.exists():
        raise InputError(f"{p} is neither a checkpoint directory nor a .gguf file")
    if HUB_ID_RE.match(ref_s):
        repo, rev = parse_hub_ref(ref_s)
        d = _snapshot(repo, rev)
        src = ModelSource(ref_s, d, repo, rev or _resolved_revision(d), _weight_files(d))
        src._scan()
        _check_remote_code(src, trust_remote_code)
        return src
    raise InputError(f"model not found: {ref_s!r} is not a local directory, a .gguf file or a hub id (org/name[@rev])")


def _snapshot(repo: str, revision: str | None) -> Path:
    """Download (or find in the HF cache) the files deltapack needs. Honours HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - a hard dependency
        raise InputError("huggingface_hub is required for hub ids") from e
    patterns = ["*.safetensors", "*.safetensors.index.json", *CONFIG_FILES, *TOKENIZER_FILES]
    try:
        path = snapshot_download(repo_id=repo, revision=revision, allow_patterns=patterns)
    except Exception as e:
        raise InputError(f"cannot fetch {repo}@{revision or 'main'} from the hub: {e.__class__.__name__}: {e}") from e
    return Path(path)


def _resolved_revision(d: Path) -> str | None:
    # HF cache layout: .../snapshots/<commit-sha>/
    return d.name if d.parent.name == "snapshots" else None


def _check_remote_code(src: ModelSource, trust_remote_code: bool) -> None:
    cfg = src.config()
    if cfg.get("auto_map") and not trust_remote_code:
        log.warning(
            "%s declares custom code (auto_map); deltapack reads its tensors only and never runs that code "
            "unless --trust-remote-code is given",
            src.ref,
        )


def _file_digest(p: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()
