"""Python API: the same operations as the CLI.

    from deltapack import api
    api.compress(base, finetuned, "delta/", method="delta-come", ratio=16)
    api.merge(base, "delta/", "rebuilt/")
    api.inspect("delta/")          # dict: per-tensor codec, bits/element, true and nominal ratio
    api.verify(base, "delta/")     # dict: checksums, base fingerprint
    model, tok = api.load_merged(base, "delta/")   # in memory, no dense copy on disk
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from tqdm.auto import tqdm

from deltapack.compress import base_fingerprint, combine_fingerprint, compress, tensor_digest  # noqa: F401
from deltapack.errors import FormatError, MismatchError
from deltapack.format.codecs import get_codec
from deltapack.format.directory import DeltaDir, read_nofollow
from deltapack.format.manifest import AUX_NAMES, HF_DIR
from deltapack.io.sources import TOKENIZER_FILES, ModelSource, open_model
from deltapack.io.writer import AtomicDir, TensorSpec, guard_output, write_weights

log = logging.getLogger(__name__)


def _check_base(delta: DeltaDir, base: ModelSource) -> None:
    man = delta.manifest
    want = man.base.structure
    if want and base.structure_hash() != want:
        raise MismatchError(
            f"this delta was made against a different base ({man.base.id}): tensor names/shapes differ"
        )
    # the structure hash says the base is right; these say the manifest agrees with it (a format v1 manifest has no
    # digest, and a tensor the base lacks would otherwise be skipped by merge without a word)
    for n in man.removed:
        if n not in base:
            raise FormatError(f"the delta removes {n[:200]!r}, which the base does not have")
    for n, te in man.tensors.items():
        if te.in_base != (n in base):
            raise FormatError(f"the delta stores {n[:200]!r} as {'a change to' if te.in_base else 'new beside'} the "
                              f"base, which {'lacks' if te.in_base else 'has'} it")
        if te.in_base:
            rows = te.base_rows if te.base_rows is not None else (te.shape[0] if te.shape else None)
            want_shape = tuple(te.shape) if rows is None else (rows, *te.shape[1:])
            if tuple(base.meta(n).shape) != want_shape:
                raise FormatError(f"{n[:200]}: base shape {list(base.meta(n).shape)} differs from the "
                                  f"{list(want_shape)} the delta expects")


def merged_specs(base: ModelSource, delta: DeltaDir, merge_dtype: torch.dtype | None = None) -> list[TensorSpec]:
    """(name, dtype, shape) of every tensor of the rebuilt fine-tune, known before anything is decoded: the base's
    tensors the fine-tune kept (sorted by name), then the tensors it added; floating ones in `merge_dtype` if given
    (what MergedTensors with the same merge_dtype returns)."""
    if merge_dtype is not None:
        return [(n, merge_dtype if dt.is_floating_point else dt, shape) for n, dt, shape in merged_specs(base, delta)]
    man = delta.manifest
    removed = set(man.removed)
    specs: list[TensorSpec] = []
    for n in base.keys():
        if n in removed:
            continue
        te = man.tensors.get(n)
        if te is not None:
            specs.append((n, getattr(torch, te.dtype), tuple(te.shape)))
        else:
            m = base.meta(n)
            specs.append((n, m.dtype, tuple(m.shape)))
    specs += [(n, getattr(torch, te.dtype), tuple(te.shape)) for n, te in man.tensors.items() if not te.in_base]
    return specs


class MergedTensors:
    """Fine-tune tensors by name, in any order, one at a time: base tensor (read by byte range) + decoded delta.
    With `merge_dtype`, every floating tensor comes out in that dtype, changed ones summed without rounding to the
    fine-tune's dtype first.

    `finish()` reads whatever base tensors were not asked for and raises MismatchError if the base's content
    fingerprint differs from the one recorded; callers write to temp paths and call it before committing."""

    def __init__(self, base: ModelSource, delta: DeltaDir, *, verify_base: bool = True,
                 merge_dtype: torch.dtype | None = None):
        _check_base(delta, base)
        self.base, self.delta, self.verify_base, self.merge_dtype = base, delta, verify_base, merge_dtype
        self._digests: dict[str, str] = {}
        self._metas: dict[str, tuple[str, tuple[int, ...]]] = {}

    def _base_tensor(self, n: str) -> torch.Tensor:
        b = self.base.get(n)
        if self.verify_base:
            self._digests[n] = tensor_digest(b)
            self._metas[n] = (str(b.dtype).replace("torch.", ""), tuple(b.shape))
        return b

    def __call__(self, n: str) -> torch.Tensor:
        te = self.delta.manifest.tensors.get(n)
        if te is not None:
            dtype = self.merge_dtype if getattr(torch, te.dtype).is_floating_point else None
            return self.delta.merge_tensor(n, self._base_tensor(n) if te.in_base else None, dtype)
        b = self._base_tensor(n)
        return b.to(self.merge_dtype) if self.merge_dtype is not None and b.is_floating_point() else b

    def finish(self) -> None:
        man = self.delta.manifest
        if not (self.verify_base and man.base.fingerprint):
            return
        for n in self.base.keys():
            if n not in self._digests:
                self._base_tensor(n)  # removed tensors count in the fingerprint too
        if combine_fingerprint(self._digests, self._metas) != man.base.fingerprint:
            raise MismatchError(f"base weights differ from the base this delta was made against ({man.base.id})")


def iter_merged(base: ModelSource, delta: DeltaDir, *, progress: bool = False, verify_base: bool = True,
                merge_dtype: torch.dtype | None = None):
    """Yield (name, fine-tune tensor) for every tensor of the fine-tune, streaming. Raises MismatchError at the end
    if the base's content fingerprint differs from the one recorded (callers write to temp paths first)."""
    merged = MergedTensors(base, delta, verify_base=verify_base, merge_dtype=merge_dtype)
    specs = merged_specs(base, delta, merge_dtype)
    for n, _, _ in tqdm(specs, desc="merge", disable=not progress):
        yield n, merged(n)
    merged.finish()


def merge(
    base: str | os.PathLike,
    delta: str | os.PathLike,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = 2 << 30,
    progress: bool = True,
    verify_base: bool = True,
    dtype: torch.dtype | None = None,
) -> Path:
    """Rebuild the fine-tune as an HF checkpoint directory (safetensors shards + config + tokenizer). Shard headers
    are planned from the manifest, then each tensor is merged and written straight into place: memory stays a few
    tensors whatever the model and shard sizes.

    `dtype` (e.g. torch.float32) writes every floating tensor in that dtype, the changed ones as base + delta summed
    without rounding to the fine-tune's dtype; config.json's dtype says so. Default: the fine-tune's own dtypes."""
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"merge dtype must be a floating dtype, not {dtype}")
    guard_output(out, base, delta)
    d = DeltaDir.open(delta)
    d.check()
    bsrc = open_model(base)
    merged = MergedTensors(bsrc, d, verify_base=verify_base, merge_dtype=dtype)
    with AtomicDir(out, overwrite=overwrite, inputs=(base, delta, bsrc.path)) as tmp:
        write_weights(tmp, merged_specs(bsrc, d, dtype), merged, max_shard_bytes=max_shard_bytes, desc="merge",
                      progress=progress)
        merged.finish()
        _copy_aux(d, bsrc, tmp)
        if dtype is not None:
            _set_config_dtype(tmp / "config.json", dtype)
    return Path(out)


def _set_config_dtype(path: Path, dtype: torch.dtype) -> None:
    """transformers reads `dtype` (newer) or `torch_dtype` (older) for dtype="auto": both must name what was written."""
    if not path.is_file():
        return
    cfg = json.loads(path.read_text())
    name = str(dtype).replace("torch.", "")
    cfg["torch_dtype"] = name
    if "dtype" in cfg:
        cfg["dtype"] = name
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def _copy_aux(d: DeltaDir, bsrc: ModelSource, dest: Path) -> None:
    base_aux = bsrc.aux_files()
    for name, where in d.manifest.aux.items():
        if name not in AUX_NAMES or Path(name).name != name:  # the manifest checks this; a write must never rely on it alone
            raise FormatError(f"auxiliary file name {name[:200]!r} is not allowed")
        if where == "delta":
            try:
                data = read_nofollow(d.path / HF_DIR / name)
            except OSError:
                raise FormatError(f"auxiliary file {name} (delta) is missing or not a plain file") from None
            fe = d.manifest.hf_files.get(name)
            if fe is not None and hashlib.sha256(data).hexdigest() != fe.sha256:
                raise FormatError(f"checksum mismatch in {HF_DIR}/{name}: the delta is corrupt")
            (dest / name).write_bytes(data)
            continue
        src = base_aux.get(name)
        if src is None or not Path(src).is_file():
            raise FormatError(f"auxiliary file {name} ({where}) is missing")
        shutil.copyfile(src, dest / name)
    # a base tokenizer the fine-tune did not list (e.g. GGUF-derived base) still makes the checkpoint usable
    if not any(n in d.manifest.aux for n in TOKENIZER_FILES):
        for name in TOKENIZER_FILES:
            if name in base_aux:
                shutil.copyfile(base_aux[name], dest / name)
    if "config.json" not in d.manifest.aux and "config.json" in base_aux:
        shutil.copyfile(base_aux["config.json"], dest / "config.json")


def merged_state_dict(base: str | os.PathLike | ModelSource, delta: str | os.PathLike | DeltaDir, *, verify_base=True,
                      merge_dtype: torch.dtype | None = None):
    """name -> tensor of the rebuilt fine-tune, as `merge` writes it: in the fine-tune's dtypes, or with `merge_dtype`
    every floating tensor in that dtype (float32: base + delta unrounded, as `merge --dtype float32`)."""
    bsrc = base if isinstance(base, ModelSource) else open_model(base)
    d = delta if isinstance(delta, DeltaDir) else DeltaDir.open(delta)
    d.check()
    return dict(iter_merged(bsrc, d, verify_base=verify_base, merge_dtype=merge_dtype))


def load_merged(
    base: str | os.PathLike,
    delta: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    verify_base: bool = True,
):
    """(model, tokenizer) of the rebuilt fine-tune, built in memory: no dense copy is written to disk."""
    from transformers import AutoConfig, AutoTokenizer

    bsrc = open_model(base)
    d = DeltaDir.open(delta)
    sd = merged_state_dict(bsrc, d, verify_base=verify_base)
    cfg_dir = d.path / "hf" if (d.path / "hf" / "config.json").exists() else bsrc.path
    config = AutoConfig.from_pretrained(str(cfg_dir))
    tok = _load_tokenizer(d, bsrc)
    model = model_from_state_dict(config, sd, device=device, dtype=dtype, share=True)  # sd is ours alone
    return model, tok


def _load_tokenizer(d: DeltaDir, bsrc: ModelSource):
    """The fine-tune's tokenizer: its files as the manifest places them, each from hf/ or from the base."""
    import tempfile

    from transformers import AutoTokenizer

    places = {n: w for n, w in d.manifest.aux.items() if n in TOKENIZER_FILES}
    if not any(w == "delta" for w in places.values()):
        return AutoTokenizer.from_pretrained(str(bsrc.path))
    if all(w == "delta" for w in places.values()):
        return AutoTokenizer.from_pretrained(str(d.path / HF_DIR))
    with tempfile.TemporaryDirectory(prefix="deltapack-tok-") as tmp:
        _copy_aux(d, bsrc, Path(tmp))  # checksummed copies of the delta's files, the rest from the base
        return AutoTokenizer.from_pretrained(tmp)


def _no_init():
    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
    except ImportError:  # pragma: no cover - older transformers
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            import contextlib

            return contextlib.nullcontext()
    return no_init_weights()


def model_from_state_dict(config, sd: dict, *, device="cpu", dtype=None, share: bool = False):
    """Build a causal LM from a config and a full state dict, on `device`, skipping random initialisation.
    `share`: on the CPU, tensors already in the model's dtype become its parameters (no copy; the caller gives up
    the dict's tensors)."""
    dtype = dtype or next(iter(sd.values())).dtype
    return model_from_tensors(config, list(sd), sd.__getitem__, device=device, dtype=dtype, share=share)


def model_from_tensors(config, names: list[str], get, *, device="cpu", dtype: torch.dtype, share: bool = True):
    """Build a causal LM from a config and its tensors read one at a time (`get(name)`, e.g. a ModelSource's), on
    `device`, skipping random initialisation. Only one tensor is held outside the model at a time: loading a whole
    state dict first held a second copy of the model in host memory (13.5 GB for a 7B model, the peak of a 7B
    `auto` run). `share` (for tensors nobody else holds, e.g. freshly read): on the CPU a tensor already in the
    model's dtype becomes the parameter itself, no copy."""
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    with _no_init(), torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    targets = model.state_dict(keep_vars=True)  # name -> the Parameter / persistent buffer (tied ones shared)
    unexpected = [n for n in names if n not in targets]
    loaded, taken = set(), set()  # taken: storages already made a parameter (one tensor given for two names)
    from deltapack.compress.plan import prefetched

    wanted = [n for n in names if n in targets]
    with torch.no_grad():
        # the next tensor is read in a thread while this one is copied to the device (a 7B model's load into the GPU
        # was a read and a copy of 13.5 GB in turn, twice in every `auto` run: the teacher, then the student)
        for n, t in prefetched(wanted, get):
            dst = targets[n]
            if tuple(t.shape) != tuple(dst.shape):
                raise FormatError(f"rebuilt weights do not fit the config: {n} is {tuple(t.shape)}, the model "
                                  f"expects {tuple(dst.shape)}")
            t = t.to(dst.dtype)
            if (share and device.type == "cpu" and t.device.type == "cpu" and t.is_contiguous()
                    and t.untyped_storage().data_ptr() not in taken):
                dst.data = t  # the tensor read becomes the parameter: no second copy
                taken.add(t.untyped_storage().data_ptr())
            else:
                dst.copy_(t)
            del t
            loaded.add(n)
    model.tie_weights()
    tied = {n for n in targets if n not in loaded and "lm_head" in n and getattr(config, "tie_word_embeddings", False)}
    missing = [n for n in targets if n not in loaded and n not in tied]
    if missing or unexpected:
        raise FormatError(f"rebuilt weights do not fit the config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()


def inspect(delta: str | os.PathLike) -> dict:
    d = DeltaDir.open(delta)
    man = d.manifest
    rows = []
    for n, te in man.tensors.items():
        numel = 1
        for s in te.shape:
            numel *= s
        stored = te.payload_bytes + te.side_bytes
        p = te.params
        detail = {}
        if te.codec == "factors":
            detail = {"rank": sum(g["rank"] for g in p.get("groups", [])), "bits": sorted({g["bits"] for g in p.get("groups", [])})}
        elif te.codec == "sparse":
            detail = {k: round(p[k], 4) if isinstance(p[k], float) else p[k]
                      for k in ("keep_prob", "group_size", "keep", "bits") if k in p}
        elif te.codec == "deltadq":  # rows < rows_hi keep one more per group: the mean kept share is exact
            g, m = p.get("g", 1), te.shape[0] if te.shape else 1
            kept = (p.get("keep", 0) * m + min(p.get("rows_hi", 0), m)) / max(1, g * m)
            detail = {"group": g, "kept": round(kept, 4), "bits": p.get("bits"), "scale": p.get("scale")}
        elif te.codec == "sign":
            detail = {"planes": p.get("planes", 1), "scale": p.get("scale")}
        rows.append(
            {
                "name": n,
                "shape": te.shape,
                "codec": te.codec,
                "method": te.method or man.method,
                "detail": detail,
                "stored_bytes": stored,
                "payload_bytes": te.payload_bytes,
                "bits_per_element": 8 * stored / max(1, numel),
                "ratio": te.dense_bytes / max(1, stored),
            }
        )
    total = d.total_bytes()
    return {
        "path": str(d.path),
        "method": man.method,
        "method_params": man.method_params,
        "target_ratio": man.target_ratio,
        "base": man.base.model_dump(),
        "finetuned": man.finetuned.model_dump(),
        "tensors": rows,
        "changed_tensors": len(man.tensors),
        "unchanged_tensors": man.unchanged,
        "dense_delta_bytes": man.dense_delta_bytes,
        "total_bytes": total,
        "true_ratio": man.dense_delta_bytes / max(1, total),
        "nominal_ratio": d.nominal_ratio(),
        "format_version": man.format_version,
    }


def verify(base: str | os.PathLike | None, delta: str | os.PathLike, *, progress: bool = False) -> dict:
    """Checks the manifest (strict fields, digest: at open), the checksums of every shard and hf/ file, that every
    tensor decodes to finite numbers and, when a base is given, that the delta fits it (names, shapes) and the base's
    structure and full-content fingerprint."""
    d = DeltaDir.open(delta, check_sizes=False)
    man = d.manifest
    bad = d.verify_checksums()
    report = {"delta": str(d.path), "format_version": man.format_version, "manifest_digest": man.digest is not None,
              "files": len(man.files), "hf_files": len(man.hf_files), "bad_files": bad, "checksums_ok": not bad}
    bsrc = open_model(base) if base is not None else None
    struct_ok = bsrc is not None and (not man.base.structure or bsrc.structure_hash() == man.base.structure)
    if struct_ok:
        _check_base(d, bsrc)
    decode_ok = False
    if not bad:
        d.check_layout()
        for n in tqdm(man.tensors, desc="decode", disable=not progress, leave=False):
            _prove_decodes(d, n, bsrc if struct_ok else None)
        decode_ok = True
    report["decode_ok"] = decode_ok
    if bsrc is not None:
        report["base_structure_ok"] = struct_ok
        if struct_ok:
            fp = base_fingerprint(bsrc, progress=progress)
            report["base_fingerprint"] = fp
            report["base_fingerprint_ok"] = fp == man.base.fingerprint
        else:
            report["base_fingerprint_ok"] = False
    report["ok"] = report["checksums_ok"] and decode_ok and report.get("base_fingerprint_ok", True)
    return report


def _prove_decodes(d: DeltaDir, n: str, bsrc: ModelSource | None) -> None:
    """Decode tensor `n` (raises FormatError if it does not decode or holds NaN/inf). Codecs storing bits against
    the base rebuild against the base when it is given and fits, else against zeros (which still proves every
    stored frame decodes)."""
    te = d.manifest.tensors[n]
    codec = get_codec(te.codec)
    if not codec.needs_base:
        d.decode(n)
        return
    if bsrc is not None and te.in_base:
        b = bsrc.get(n)
        d.rebuild(n, b[: te.base_rows] if te.base_rows is not None else b)
        return
    parts = d.parts(n)
    parts.pop("new_rows", None)
    shape = list(te.shape)
    if te.base_rows is not None:
        shape[0] = te.base_rows
    codec.rebuild(te.params, parts, tuple(shape), None)


def save_json(obj, path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(obj, indent=1))
