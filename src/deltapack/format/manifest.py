"""`delta_config.json`: the manifest of a delta directory, as typed pydantic models (spec: docs/format.md).

Everything a reader does with a delta follows from the manifest, so it is validated strictly before any file is
touched: every field typed (strict: "0.2" is not a number), ranges checked, duplicate JSON keys refused, file names
plain names inside the directory (no "/", "..", absolute paths or hidden files), `aux` names from a fixed list, and
(format version 3) a `digest` over the whole manifest, which itself lists sha256 checksums of the shards and of the
`hf/` files. Codec parameters are checked per codec against the tensor's shape (`codecs.Codec.layout`) when the
directory is opened, where the stored part sizes are known too (`directory.DeltaDir.open`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from deltapack import FORMAT_NAME, FORMAT_VERSION
from deltapack.errors import FormatError

log = logging.getLogger(__name__)

MANIFEST_NAME = "delta_config.json"
PART_SEP = "::"
HF_DIR = "hf"
MAX_MANIFEST_BYTES = 256 << 20  # a 70B delta's manifest is a few MB; anything far larger is not ours
MAX_NUMEL = 1 << 40  # per tensor: far above any real checkpoint, far below what would overflow int64 byte counts
# files `merge` takes from the delta's hf/ or the base (io.sources.CONFIG_FILES + TOKENIZER_FILES): a fixed list, so
# a manifest can never make merge write a file of its choosing
AUX_NAMES = frozenset({
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
})
# dtypes a fine-tune tensor can have (what safetensors stores)
TENSOR_DTYPES = frozenset({
    "float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "int64", "int32", "int16", "int8",
    "uint8", "uint16", "uint32", "uint64", "bool",
})
FLOAT_DTYPES = frozenset({"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"})
SHARD_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.safetensors$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
HASH_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_CTRL_RE = re.compile(r"[\x00-\x1f\x7f]")
# a temp directory of AtomicDir (io.writer): an unfinished run, never a delta
DIGEST_VERSION = 3  # the first format version with `digest` and `hf_files` (older ones load with a warning)
TEMP_DIR_RE = re.compile(r"^\..+\.(tmp|old)-[^/]*$")


def safe_file_name(name: str, what: str) -> str:
    """A shard name: one plain path component ending in .safetensors. Never resolved, never echoed as a path."""
    if not isinstance(name, str) or not SHARD_RE.match(name) or ".." in name:
        raise ValueError(f"{what} {_short(name)} is not a plain .safetensors file name inside the delta directory")
    return name


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


def tensor_name_ok(name) -> bool:
    return isinstance(name, str) and 0 < len(name) <= 1024 and PART_SEP not in name and not _CTRL_RE.search(name)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class FileEntry(_Strict):
    bytes: int = Field(ge=0)
    sha256: str

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        if not SHA256_RE.match(v):
            raise ValueError("must be 64 lowercase hex digits")
        return v


class ModelRef(_Strict):
    id: str = Field(max_length=4096)
    revision: str | None = Field(None, max_length=4096)
    fingerprint: str | None = None  # sha256 over every tensor's name, dtype, shape and bytes (base only)
    structure: str | None = None  # sha256 over names, shapes and dtypes: the cheap first check

    @field_validator("fingerprint", "structure")
    @classmethod
    def _hash(cls, v: str | None) -> str | None:
        if v is not None and not HASH_RE.match(v):
            raise ValueError("must be 'sha256:' and 64 lowercase hex digits")
        return v


class TensorEntry(_Strict):
    shape: list[int] = Field(max_length=8)  # fine-tune's shape
    dtype: str  # fine-tune's dtype, e.g. "bfloat16"
    codec: str
    params: dict = Field(default_factory=dict)
    parts: list[str]  # stored as "<tensor>::<part>"
    file: str
    dense_bytes: int = Field(ge=0)  # bf16 bytes of this tensor's dense delta (the ratio's numerator)
    payload_bytes: int = Field(ge=0)  # codes / values / factors
    side_bytes: int = Field(ge=0)  # scales, zeros, anything else stored
    base_rows: int | None = Field(None, ge=0)  # vocabulary growth: the codec covers rows [0, base_rows); "new_rows" the rest
    in_base: bool = True  # False: tensor absent from the base (treated as zeros)
    method: str | None = Field(None, max_length=64)  # set when it differs from the manifest's method (e.g. kept dense)
    entropy: dict[str, dict] = Field(default_factory=dict)  # part -> zstd record (format/entropy.py); omitted if empty

    @model_validator(mode="after")
    def _consistent(self) -> "TensorEntry":
        if any(s < 0 for s in self.shape):
            raise ValueError(f"shape {self.shape} has a negative dimension")
        numel = math.prod(self.shape)
        if numel > MAX_NUMEL:
            raise ValueError(f"shape {self.shape} is implausibly large")
        if self.dtype not in TENSOR_DTYPES:
            raise ValueError(f"dtype {_short(self.dtype)} is not one of {sorted(TENSOR_DTYPES)}")
        if self.codec not in ("dense", "lossless") and self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"a {self.dtype} tensor can only be stored dense, not with codec {_short(self.codec)}")
        if self.dense_bytes != 2 * numel:
            raise ValueError(f"dense_bytes {self.dense_bytes} is not 2 bytes x {numel} elements")
        if len(set(self.parts)) != len(self.parts):
            raise ValueError("parts are listed twice")
        for p in self.parts:
            if not p or not re.match(r"^[A-Za-z0-9_.]{1,32}$", p):
                raise ValueError(f"part name {_short(p)} is not a plain part name")
        for part, rec in self.entropy.items():
            _check_entropy_record(part, rec, self.parts)
        if not self.parts and self.file:  # with parts, the manifest checks `file` is one of its listed files
            raise ValueError("a tensor without parts names no file")
        if self.base_rows is not None:
            if not self.shape or not 0 < self.base_rows < self.shape[0] or not self.in_base:
                raise ValueError(f"base_rows {self.base_rows} must lie in (0, {self.shape[0] if self.shape else 0}) "
                                 "for a tensor of the base")
            if "new_rows" not in self.parts:
                raise ValueError("vocabulary growth (base_rows) needs a new_rows part")
        elif "new_rows" in self.parts:
            raise ValueError("a new_rows part without base_rows")
        return self


def _check_entropy_record(part: str, rec, parts: list[str]) -> None:
    """An entropy-stage record (format/entropy.py): {coder: "zstd", dtype, shape, planes, frames}, strictly typed."""
    if part not in parts:
        raise ValueError(f"entropy record for {_short(part)}, which is not one of the parts")
    ok = (isinstance(rec, dict) and set(rec) == {"coder", "dtype", "shape", "planes", "frames"} and rec["coder"] == "zstd"
          and rec["dtype"] in TENSOR_DTYPES and type(rec["planes"]) is bool
          and isinstance(rec["shape"], list) and len(rec["shape"]) <= 8
          and all(type(x) is int and x >= 0 for x in rec["shape"]) and math.prod(rec["shape"]) <= MAX_NUMEL
          and isinstance(rec["frames"], list) and all(type(x) is int and x >= 0 for x in rec["frames"]))
    if not ok:
        raise ValueError(f"entropy record of part {_short(part)} is malformed")


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise FormatError(f"duplicate key {_short(k)} in the manifest (an edited or corrupt file)")
        out[k] = v
    return out


def _reject_constant(c: str):
    raise FormatError(f"{c} is not a number the manifest may hold")


def manifest_digest(raw: dict) -> str:
    """sha256 over the canonical JSON of every manifest key but `digest` itself (sorted keys, compact, ASCII)."""
    body = {k: v for k, v in raw.items() if k != "digest"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


class Manifest(_Strict):
    format: Literal["deltapack"] = FORMAT_NAME
    format_version: int = Field(FORMAT_VERSION, ge=1)
    deltapack_version: str = Field(max_length=64)
    created: str = Field(max_length=64)
    method: str = Field(max_length=64)
    method_params: dict = Field(default_factory=dict)
    target_ratio: float | None = None
    base: ModelRef
    finetuned: ModelRef
    tensors: dict[str, TensorEntry]
    removed: list[str] = Field(default_factory=list)  # in the base, absent from the fine-tune
    unchanged: int = Field(0, ge=0)  # tensors equal in base and fine-tune (not stored)
    files: dict[str, FileEntry] = Field(default_factory=dict)
    hf_files: dict[str, FileEntry] = Field(default_factory=dict)  # v3: checksums of hf/ (what `aux: delta` names)
    aux: dict[str, Literal["delta", "base"]] = Field(default_factory=dict)  # "config.json": "delta" | "base"
    calibration: dict | None = None
    digest: str | None = None  # v3: manifest_digest() of everything else

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        if self.target_ratio is not None and not (math.isfinite(self.target_ratio) and self.target_ratio > 0):
            raise ValueError(f"target_ratio {self.target_ratio} must be a positive number")
        for n in self.tensors:
            if not tensor_name_ok(n):
                raise ValueError(f"tensor name {_short(n)} is not a valid tensor name")
        for n in self.removed:
            if not tensor_name_ok(n):
                raise ValueError(f"removed name {_short(n)} is not a valid tensor name")
        if len(set(self.removed)) != len(self.removed):
            raise ValueError("removed lists a tensor twice")
        both = set(self.removed) & set(self.tensors)
        if both:
            raise ValueError(f"{_short(sorted(both)[0])} is both stored and removed")
        for n in self.files:
            safe_file_name(n, "file")
        for n, te in self.tensors.items():
            if te.parts and te.file not in self.files:
                raise ValueError(f"tensor {_short(n)} points to unlisted file {_short(te.file)}")
        for n in set(self.aux) | set(self.hf_files):
            if n not in AUX_NAMES:
                raise ValueError(f"auxiliary file {_short(n)} is not one of {sorted(AUX_NAMES)}")
        if self.format_version >= DIGEST_VERSION:
            if not self.tensors:
                raise ValueError("a delta stores at least one tensor")
            if not self.base.structure:  # the fingerprint may be left out on purpose (import-lora --no-fingerprint)
                raise ValueError("base.structure is required (it is the wrong-base check)")
            stored = {n for n, w in self.aux.items() if w == "delta"}
            if stored != set(self.hf_files):
                raise ValueError("hf_files must list exactly the aux files stored in the delta (aux: delta)")
        return self

    @property
    def dense_delta_bytes(self) -> int:
        return sum(t.dense_bytes for t in self.tensors.values())

    def raw(self) -> dict:
        """The manifest as JSON data, with its digest (version 3) computed over everything else."""
        d = self.model_dump(exclude_defaults=False, exclude={"digest"})
        for t in d["tensors"].values():
            if not t["entropy"]:  # written only where used (bytes count against the ratio)
                del t["entropy"]
        if self.format_version >= DIGEST_VERSION:
            d["digest"] = manifest_digest(d)
        return d

    def uses_v2(self) -> bool:
        """Whether a version-1 reader would misread this manifest: entropy-coded parts or the lossless codec."""
        return any(t.entropy or t.codec == "lossless" for t in self.tensors.values())

    def dumps(self) -> str:
        # compact: at 128x on small models every byte of metadata counts against the ratio
        return json.dumps(self.raw(), separators=(",", ":"), allow_nan=False)

    @classmethod
    def load(cls, path: Path) -> "Manifest":
        path = Path(path)
        try:
            if path.is_symlink() or not path.is_file():
                raise FileNotFoundError(path)
            data = path.read_bytes() if path.stat().st_size <= MAX_MANIFEST_BYTES else None
        except FileNotFoundError as e:
            raise FormatError(f"{path} not found: not a deltapack delta directory") from e
        except OSError as e:
            raise FormatError(f"{path} cannot be read: {e.strerror}") from e
        if data is None:
            raise FormatError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes: not a deltapack manifest")
        return cls.parse(data, path)

    @classmethod
    def parse(cls, data: bytes, label: str | Path = MANIFEST_NAME) -> "Manifest":
        try:
            raw = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant)
        except FormatError as e:
            raise FormatError(f"{label}: {e}") from None
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise FormatError(f"{label} is not valid JSON (truncated or corrupt): {str(e)[:200]}") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
            raise FormatError(f"{label} is not a deltapack manifest")
        v = raw.get("format_version")
        if type(v) is not int or v < 1 or v > FORMAT_VERSION:
            raise FormatError(f"{label} has format version {_short(v)}; this deltapack reads 1 to {FORMAT_VERSION}")
        if v >= DIGEST_VERSION:
            want = raw.get("digest")
            try:
                got = manifest_digest(raw)
            except (TypeError, ValueError) as e:
                raise FormatError(f"{label} holds values no manifest may hold: {e}") from None
            if want != got:
                raise FormatError(f"{label} does not match its digest: the manifest was edited or is corrupt")
        elif "digest" in raw or "hf_files" in raw:
            raise FormatError(f"{label} is format version {v} but carries version {DIGEST_VERSION} fields")
        try:
            m = cls.model_validate(raw)
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(_short(x) if not isinstance(x, int) else str(x) for x in first["loc"])
            raise FormatError(f"{label} is malformed at {loc}: {first['msg']}") from None
        if v >= DIGEST_VERSION and not m.base.fingerprint:
            log.warning("%s records no base fingerprint: a base with the same tensor names and shapes but other "
                        "weights is not detected", label)
        if v < DIGEST_VERSION:
            unchecked = ["the manifest itself and the hf/ files are not covered by checksums (edits go undetected)"]
            if not (m.base.fingerprint and m.base.structure):
                unchecked.append("the base fingerprint or structure is missing (a wrong base is not detected)")
            log.warning("%s is format version %d: %s; re-create the delta with this deltapack to protect it",
                        label, v, "; ".join(unchecked))
        return m


def part_key(tensor: str, part: str) -> str:
    return f"{tensor}{PART_SEP}{part}"
