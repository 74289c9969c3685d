"""Reading a delta directory: manifest, checksums, per-tensor parts, decoding, and the true on-disk ratio."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from deltapack.errors import FormatError, InputError
from deltapack.format.codecs import decode_entry, get_codec
from deltapack.format.entropy import decode_part
from deltapack.format.manifest import MANIFEST_NAME, Manifest, TensorEntry, part_key
from deltapack.io.safetensors_file import SafetensorsFile


def dir_bytes(path: Path) -> int:
    """Bytes of every file in the directory tree: what the true ratio divides by."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total


def sha256_file(p: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


class DeltaDir:
    """A delta directory opened for reading. `DeltaDir.open(path)` validates the manifest and that files exist."""

    def __init__(self, path: Path, manifest: Manifest):
        self.path = path
        self.manifest = manifest
        self._headers: dict[str, SafetensorsFile] = {}  # file name -> parsed header (tensors are read by byte range)

    @classmethod
    def open(cls, path: str | os.PathLike, *, check_sizes: bool = True) -> "DeltaDir":
        p = Path(path)
        if not p.is_dir():
            raise FormatError(f"delta directory not found: {p}")
        m = Manifest.load(p / MANIFEST_NAME)
        d = cls(p, m)
        for name, fe in m.files.items():
            f = p / name
            if not f.is_file():
                raise FormatError(f"delta file missing: {name}")
            if check_sizes and f.stat().st_size != fe.bytes:
                raise FormatError(f"delta file {name} has {f.stat().st_size} bytes, manifest says {fe.bytes} (truncated?)")
        for tname, te in m.tensors.items():
            if te.parts and te.file not in m.files:
                raise FormatError(f"tensor {tname} points to unlisted file {te.file}")
        return d

    # ---- integrity ---------------------------------------------------------------------------------------------
    def verify_checksums(self) -> list[str]:
        """Returns the names of files whose sha256 differs from the manifest (empty list = all good)."""
        bad = []
        for name, fe in self.manifest.files.items():
            f = self.path / name
            if not f.is_file() or f.stat().st_size != fe.bytes or sha256_file(f) != fe.sha256:
                bad.append(name)
        return bad

    def check(self) -> None:
        bad = self.verify_checksums()
        if bad:
            raise FormatError(f"checksum mismatch in {', '.join(bad)}: the delta is corrupt")

    # ---- sizes -------------------------------------------------------------------------------------------------
    def total_bytes(self) -> int:
        return dir_bytes(self.path)

    def true_ratio(self) -> float:
        return self.manifest.dense_delta_bytes / max(1, self.total_bytes())

    def nominal_ratio(self) -> float:
        payload = sum(t.payload_bytes for t in self.manifest.tensors.values())
        return self.manifest.dense_delta_bytes / max(1, payload)

    # ---- tensors -----------------------------------------------------------------------------------------------
    def entry(self, name: str) -> TensorEntry:
        return self.manifest.tensors[name]

    def parts(self, name: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        te = self.manifest.tensors[name]
        if not te.parts:
            return {}
        out = {}
        try:
            h = self._headers.get(te.file)
            if h is None:
                h = self._headers[te.file] = SafetensorsFile(self.path / te.file)
            for part in te.parts:
                key = part_key(name, part)
                if key not in h.entries:
                    raise FormatError(f"{te.file} has no tensor {key}")
                t = h.get(key)
                if part in te.entropy:  # stored zstd-coded (entropy stage): readers see the original tensor
                    t = decode_part(t, te.entropy[part])
                out[part] = t.to(device)
        except InputError as e:
            raise FormatError(f"cannot read parts of {name} from {te.file} (truncated or corrupt): {e}") from e
        return out

    def decode(self, name: str, device: str | torch.device = "cpu", base: torch.Tensor | None = None) -> torch.Tensor:
        """Dense fp32 delta of tensor `name` (shape of the fine-tune; added vocabulary rows included as-is:
        for those rows the base contributes nothing, see `merge_tensor`). Codecs that store bits against the base
        (lossless) need `base` (the base's rows only); their delta is fine-tune − base in fp32 (fp64 for fp32/fp64
        tensors, where fp32 could round)."""
        te = self.manifest.tensors[name]
        if get_codec(te.codec).needs_base:
            ft = self.rebuild(name, base if te.in_base else None).to(device)
            wide = ft.dtype in (torch.float32, torch.float64)
            d = ft.double() if wide else ft.float()
            if base is not None and te.in_base:
                d[: base.shape[0]] -= base.to(device, d.dtype).reshape(base.shape[0], *d.shape[1:])
            return d
        parts = self.parts(name, device)
        new_rows = parts.pop("new_rows", None)
        shape = list(te.shape)
        if te.base_rows is not None:
            shape[0] = te.base_rows
        d = decode_entry(te.codec, te.params, parts, tuple(shape))
        if new_rows is not None:
            d = torch.cat([d.to(torch.float32), new_rows.to(torch.float32).reshape(-1, *shape[1:])], 0)
        return d

    def rebuild(self, name: str, base: torch.Tensor | None) -> torch.Tensor:
        """The fine-tune tensor bit for bit, for codecs that store bits against the base (lossless). `base`: the
        base tensor (its rows only under vocabulary growth), None for a tensor the base does not have."""
        te = self.manifest.tensors[name]
        codec = get_codec(te.codec)
        if not codec.needs_base:
            raise FormatError(f"{name}: codec {te.codec} stores a float delta, not bits against the base")
        if base is None and te.in_base:
            raise FormatError(f"{name}: a {te.codec} delta needs the base tensor to rebuild")
        parts = self.parts(name)
        new_rows = parts.pop("new_rows", None)
        shape = list(te.shape)
        if te.base_rows is not None:
            shape[0] = te.base_rows
        try:
            ft = codec.rebuild(te.params, parts, tuple(shape), base)
        except FormatError as e:
            raise FormatError(f"{name}: {e}") from e
        if new_rows is not None:
            ft = torch.cat([ft, new_rows.to(ft.dtype).reshape(-1, *shape[1:])], 0)
        return ft

    def merge_tensor(self, name: str, base: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Fine-tune tensor = base + delta, in the fine-tune's dtype (or `dtype`: e.g. float32 keeps the sum unrounded)."""
        te = self.manifest.tensors[name]
        dtype = dtype or getattr(torch, te.dtype)
        if base is not None:
            rows = te.base_rows if te.base_rows is not None else te.shape[0]
            if tuple(base.shape) != (rows, *te.shape[1:]):
                raise FormatError(f"{name}: base shape {list(base.shape)} differs from the {[rows, *te.shape[1:]]} "
                                  "the delta expects")
        elif te.base_rows is not None:
            raise FormatError(f"{name}: the delta expects {te.base_rows} base rows, the base has none")
        if get_codec(te.codec).needs_base:  # exact bits: the fine-tune itself, in its dtype
            ft = self.rebuild(name, base)
            return ft if ft.dtype == dtype else ft.to(dtype)
        # parts are read fresh on every call, so the decoded delta is ours to add into: no fp32 copy of the base
        # or of the sum (for a 7B embedding each would be 0.5 GB)
        d = self.decode(name)
        if d.dtype != torch.float64:  # float64: raw's exact deltas of fp32 checkpoints
            d = d.float()
        if base is not None:
            d[: base.shape[0]].add_(base)
        return d.to(dtype)
