"""`delta_config.json`: the manifest of a delta directory, as typed pydantic models (spec: docs/format.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deltapack import FORMAT_NAME, FORMAT_VERSION
from deltapack.errors import FormatError

MANIFEST_NAME = "delta_config.json"
PART_SEP = "::"


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bytes: int
    sha256: str


class ModelRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    revision: str | None = None
    fingerprint: str | None = None  # sha256 over every tensor's name, dtype, shape and bytes (base only)
    structure: str | None = None  # sha256 over names, shapes and dtypes: the cheap first check


class TensorEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shape: list[int]  # fine-tune's shape
    dtype: str  # fine-tune's dtype, e.g. "bfloat16"
    codec: str
    params: dict = Field(default_factory=dict)
    parts: list[str]  # stored as "<tensor>::<part>"
    file: str
    dense_bytes: int  # bf16 bytes of this tensor's dense delta (the ratio's numerator)
    payload_bytes: int  # codes / values / factors
    side_bytes: int  # scales, zeros, anything else stored
    base_rows: int | None = None  # vocabulary growth: the codec covers rows [0, base_rows); "new_rows" holds the rest
    in_base: bool = True  # False: tensor absent from the base (treated as zeros)
    method: str | None = None  # set when it differs from the manifest's method (e.g. a tensor kept dense)
    entropy: dict[str, dict] = Field(default_factory=dict)  # part -> zstd record (format/entropy.py); omitted if empty


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["deltapack"] = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    deltapack_version: str
    created: str
    method: str
    method_params: dict = Field(default_factory=dict)
    target_ratio: float | None = None
    base: ModelRef
    finetuned: ModelRef
    tensors: dict[str, TensorEntry]
    removed: list[str] = Field(default_factory=list)  # in the base, absent from the fine-tune
    unchanged: int = 0  # tensors equal in base and fine-tune (not stored)
    files: dict[str, FileEntry] = Field(default_factory=dict)
    aux: dict[str, str] = Field(default_factory=dict)  # "config.json": "delta" | "base"
    calibration: dict | None = None

    @property
    def dense_delta_bytes(self) -> int:
        return sum(t.dense_bytes for t in self.tensors.values())

    def uses_v2(self) -> bool:
        """Whether a version-1 reader would misread this manifest: entropy-coded parts or the lossless codec."""
        return any(t.entropy or t.codec == "lossless" for t in self.tensors.values())

    def dumps(self) -> str:
        d = self.model_dump(exclude_defaults=False)
        for t in d["tensors"].values():
            if not t["entropy"]:  # a version-1 reader forbids unknown keys: write the key only where it is used
                del t["entropy"]
        # the oldest version whose readers can read this directory
        d["format_version"] = min(self.format_version, FORMAT_VERSION if self.uses_v2() else 1)
        # compact: at 128x on small models every byte of metadata counts against the ratio
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def load(cls, path: Path) -> "Manifest":
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError as e:
            raise FormatError(f"{path} not found: not a deltapack delta directory") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FormatError(f"{path} is not valid JSON (truncated or corrupt): {e}") from e
        if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
            raise FormatError(f"{path} is not a deltapack manifest")
        v = raw.get("format_version")
        if not isinstance(v, int) or v > FORMAT_VERSION:
            raise FormatError(f"{path} has format version {v}; this deltapack reads up to {FORMAT_VERSION}")
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            first = e.errors()[0]
            raise FormatError(f"{path} is malformed at {'.'.join(map(str, first['loc']))}: {first['msg']}") from e


def part_key(tensor: str, part: str) -> str:
    return f"{tensor}{PART_SEP}{part}"
