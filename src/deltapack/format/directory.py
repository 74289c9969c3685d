"""Reading a delta directory: manifest, checksums, per-tensor parts, decoding, and the true on-disk ratio."""

from __future__ import annotations

import hashlib
import math
import os
import stat
from pathlib import Path

import torch

from deltapack.errors import FormatError, InputError
from deltapack.format.codecs import FLOAT, U8, as_2d, decode_entry, get_codec
from deltapack.format.entropy import decode_part
from deltapack.format.manifest import DIGEST_VERSION, HF_DIR, MANIFEST_NAME, TEMP_DIR_RE, Manifest, TensorEntry, part_key
from deltapack.io.safetensors_file import DTYPES, SafetensorsFile


def dir_bytes(path: Path) -> int:
    """Bytes of every file in the directory tree: what the true ratio divides by."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.lstat(os.path.join(root, f)).st_size  # a symlink counts as itself, never as its target
    return total


def _check_tree(p: Path, m: Manifest) -> None:
    """No symlink anywhere in the delta directory; (version 3) hf/ holds only the files the manifest checksums."""
    listed = set(m.hf_files)
    for root, dirs, files in os.walk(p):
        for n in dirs + files:
            if os.path.islink(os.path.join(root, n)):
                rel = os.path.relpath(os.path.join(root, n), p)
                raise FormatError(f"{rel[:200]!r} in the delta directory is a symlink: refused (a delta's files must be inside it)")
        if Path(root) == p / HF_DIR and m.format_version >= DIGEST_VERSION:
            extra = sorted(set(files) - listed)
            if extra or dirs:
                raise FormatError(f"{HF_DIR}/ holds {(extra + dirs)[0][:200]!r}, which the manifest does not list")


def sha256_file(p: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def _regular_file(p: Path) -> os.stat_result | None:
    """lstat of a plain file (not a symlink, not a directory), else None."""
    try:
        st = os.lstat(p)
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def read_nofollow(p: Path, limit: int | None = None) -> bytes:
    """A file's bytes, refusing a symlink at the last component (O_NOFOLLOW): checked and read are the same file."""
    fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        return f.read() if limit is None else f.read(limit)


def sha256_nofollow(p: Path, chunk: int = 1 << 22) -> str:
    fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    h = hashlib.sha256()
    with os.fdopen(fd, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


class DeltaDir:
    """A delta directory opened for reading. `DeltaDir.open(path)` validates the manifest (strict types, digest), that
    every file it names is a plain file inside the directory of the listed size, and that the stored parts are the
    ones the codec parameters imply (names, dtypes, element counts): nothing outside the directory is ever read."""

    def __init__(self, path: Path, manifest: Manifest):
        self.path = path
        self.manifest = manifest
        self._headers: dict[str, SafetensorsFile] = {}  # file name -> parsed header (tensors are read by byte range)
        self._verified: dict[str, torch.Tensor] | None = None  # file name -> bytes checked against their sha256

    @classmethod
    def open(cls, path: str | os.PathLike, *, check_sizes: bool = True) -> "DeltaDir":
        p = Path(path)
        if not p.is_dir():
            raise FormatError(f"delta directory not found: {p}")
        if TEMP_DIR_RE.match(p.resolve().name):
            raise FormatError(f"{p} is the temp directory of an unfinished or interrupted run, not a delta")
        m = Manifest.load(p / MANIFEST_NAME)
        _check_tree(p, m)
        d = cls(p, m)
        for name, fe in m.files.items():
            st = _regular_file(p / name)
            if st is None:
                raise FormatError(f"delta file {name} is missing or not a plain file (symlinks are refused)")
            if check_sizes and st.st_size != fe.bytes:
                raise FormatError(f"delta file {name} has {st.st_size} bytes, manifest says {fe.bytes} (truncated?)")
        if m.hf_files or any(w == "delta" for w in m.aux.values()):
            try:
                hst = os.lstat(p / HF_DIR)
            except OSError:
                hst = None
            if hst is None or not stat.S_ISDIR(hst.st_mode):
                raise FormatError(f"the delta's {HF_DIR}/ folder is missing or not a plain directory (symlinks are refused)")
            for name, where in m.aux.items():
                if where != "delta":
                    continue
                st = _regular_file(p / HF_DIR / name)
                if st is None:
                    raise FormatError(f"auxiliary file {HF_DIR}/{name} is missing or not a plain file (symlinks are refused)")
                fe = m.hf_files.get(name)
                if check_sizes and fe is not None and st.st_size != fe.bytes:
                    raise FormatError(f"auxiliary file {HF_DIR}/{name} has {st.st_size} bytes, manifest says {fe.bytes}")
        if check_sizes:
            d.check_layout()
        return d

    def check_layout(self) -> None:
        """The stored tensors are exactly the parts the manifest's codec parameters imply: every part present with
        the right kind of dtype and element count, byte counts as recorded, no stored tensor left unaccounted for."""
        m = self.manifest
        seen: dict[str, set[str]] = {f: set() for f in m.files}
        for tname, te in m.tensors.items():
            shape = list(te.shape)
            if te.base_rows is not None:
                shape[0] = te.base_rows
            shape2 = as_2d(shape)
            try:
                layout = dict(get_codec(te.codec).layout(te.params, shape2))
            except FormatError as e:
                raise FormatError(f"tensor {tname}: {e}") from None
            if te.base_rows is not None:
                layout["new_rows"] = (FLOAT, (te.shape[0] - te.base_rows) * shape2[1])
            if set(te.parts) != set(layout):
                raise FormatError(f"tensor {tname}: parts {sorted(te.parts)} differ from the {sorted(layout)} its "
                                  f"{te.codec} parameters imply")
            if not te.parts:
                continue
            h = self._header(te.file)
            total = payload = 0
            payload_parts = get_codec(te.codec).payload_parts
            for part, (kind, count) in layout.items():
                key = part_key(tname, part)
                e = h.entries.get(key)
                if e is None:
                    raise FormatError(f"{te.file} has no tensor {key}")
                dt = DTYPES.get(e[0], (None,))[0]
                numel = math.prod(e[1])
                rec = te.entropy.get(part)
                if rec is not None:  # zstd-coded: the stored blob is bytes; the record says what it decodes to
                    if dt != torch.uint8 or numel != sum(rec["frames"]):
                        raise FormatError(f"{key}: the stored zstd data does not match its entropy record")
                    dt, numel = getattr(torch, rec["dtype"]), math.prod(rec["shape"])
                if dt is None or (kind == U8 and dt != torch.uint8) or (kind == FLOAT and not dt.is_floating_point):
                    raise FormatError(f"{key} is stored as {e[0] if rec is None else rec['dtype']}, not as the codec's {kind}")
                if count is not None and numel != count:
                    raise FormatError(f"{key} holds {numel} elements, its parameters imply {count}")
                nb = e[3] - e[2]
                total += nb
                payload += nb if part in payload_parts or part == "new_rows" else 0
                seen[te.file].add(key)
            if total != te.payload_bytes + te.side_bytes or payload != te.payload_bytes:
                raise FormatError(f"tensor {tname}: stored parts take {total} bytes ({payload} payload), the manifest "
                                  f"says {te.payload_bytes + te.side_bytes} ({te.payload_bytes})")
        for f, keys in seen.items():
            extra = set(self._header(f).entries) - keys
            if extra:
                raise FormatError(f"{f} holds {len(extra)} tensors the manifest does not list (e.g. {sorted(extra)[0][:200]})")

    def _header(self, name: str) -> SafetensorsFile:
        h = self._headers.get(name)
        if h is None:
            try:
                h = self._headers[name] = SafetensorsFile(self.path / name)
            except InputError as e:
                raise FormatError(f"delta file {name} is truncated or corrupt: {e}") from None
        return h

    # ---- integrity ---------------------------------------------------------------------------------------------
    def verify_checksums(self, shards: bool = True) -> list[str]:
        """Returns the names of files (shards and hf/ files) whose sha256 differs from the manifest (empty = good).
        `shards=False`: the hf/ files only, for a reader that checks each shard as it reads it (load_verified)."""
        bad = []
        listed = [(n, self.path / n, fe) for n, fe in self.manifest.files.items()] if shards else []
        listed += [(f"{HF_DIR}/{n}", self.path / HF_DIR / n, fe) for n, fe in self.manifest.hf_files.items()]
        for name, f, fe in listed:
            st = _regular_file(f)
            try:
                ok = st is not None and st.st_size == fe.bytes and sha256_nofollow(f) == fe.sha256
            except OSError:
                ok = False
            if not ok:
                bad.append(name)
        return bad

    def check(self, shards: bool = True) -> None:
        bad = self.verify_checksums(shards)
        if bad:
            raise FormatError(f"checksum mismatch in {', '.join(bad)}: the delta is corrupt")

    def load_verified(self) -> None:
        """Read every shard into memory and check it against its sha256; `parts` then reads those checked bytes, so
        what is decoded is what was verified (a file rewritten on disk after `check` cannot slip in)."""
        out: dict[str, torch.Tensor] = {}
        for name, fe in self.manifest.files.items():
            try:
                data = read_nofollow(self.path / name, fe.bytes + 1)
            except OSError:
                data = b""
            if len(data) != fe.bytes or hashlib.sha256(data).hexdigest() != fe.sha256:
                raise FormatError(f"checksum mismatch in {name}: the delta is corrupt (changed on disk?)")
            out[name] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        self._verified = out

    def drop_verified(self) -> None:
        self._verified = None

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
            h = self._header(te.file)
            buf = self._verified.get(te.file) if self._verified is not None else None
            for part in te.parts:
                key = part_key(name, part)
                if key not in h.entries:
                    raise FormatError(f"{te.file} has no tensor {key}")
                t = h.get(key) if buf is None else _from_buffer(h, key, buf)
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
        if d.is_floating_point() and not bool(torch.isfinite(d).all()):
            raise FormatError(f"tensor {name} decodes to non-finite values (NaN or inf): the delta is corrupt")
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


def _from_buffer(h: SafetensorsFile, key: str, buf: torch.Tensor) -> torch.Tensor:
    """Tensor `key` of a verified in-memory shard (same layout checks as SafetensorsFile.get)."""
    dtype_name, shape, a, b = h.entries[key]
    dtype = DTYPES.get(dtype_name, (None,))[0]
    if dtype is None:
        raise InputError(f"unsupported safetensors dtype {dtype_name} for {key}")
    raw = buf[h.data_start + a : h.data_start + b].clone()
    return raw.view(dtype).reshape(shape)
