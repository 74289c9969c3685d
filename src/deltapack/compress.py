"""compress: fine-tune − base → a delta directory at a target TRUE ratio.

Plan first, then execute tensor by tensor (mergekit's shape):
  1. open both checkpoints lazily and check they belong together (architecture, names, shapes);
  2. planning pass: read each tensor pair once, drop equal tensors, gather per-tensor statistics, and compute the base
     fingerprint from the bytes read;
  3. budget: (dense bf16 bytes of the changed tensors) / ratio, less the metadata this directory will need, split over
     tensors by the method's allocator; an unreachable ratio fails here, before any work;
  4. execute: encode each tensor, stream its parts into bounded shards of a temp directory;
  5. manifest + card last, checksums of what was written, the true ratio measured on disk, then rename into place.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from deltapack import __version__
from deltapack.errors import BudgetError, DeltapackError, MismatchError
from deltapack.format.codecs import as_2d, get_codec
from deltapack.format.directory import dir_bytes
from deltapack.format.manifest import MANIFEST_NAME, Manifest, ModelRef, TensorEntry, part_key
from deltapack.io.sources import TOKENIZER_FILES, ModelSource, open_model
from deltapack.io.writer import AtomicDir, ShardedSafetensorsWriter, write_bytes_atomic
from deltapack.methods.base import DeltaMethod, Encoded, TensorJob, TensorStat, get_method

log = logging.getLogger(__name__)

RATIO_SLACK = 1.01  # aim this far above the target so metadata estimates never push the true ratio under it
EMBED_KEYS = ("embed_tokens", "wte", "word_embeddings", "tok_embeddings", "embed_in")
HEAD_KEYS = ("lm_head", "embed_out", "output.weight")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeltapackError("--device cuda asked for, but no CUDA device is available")
    return torch.device(device)


def tensor_kind(name: str, shape: tuple[int, ...]) -> str:
    if len(shape) < 2:
        return "vector"
    if any(k in name for k in EMBED_KEYS):
        return "embedding"
    if any(k in name for k in HEAD_KEYS):
        return "lm_head"
    return "linear" if len(shape) == 2 else "other"


@dataclass
class CompressContext:
    """Shared state a method may use while encoding (device, sources, calibration)."""

    device: torch.device
    base: ModelSource
    finetuned: ModelSource
    method: DeltaMethod
    calib_path: str | None = None
    progress: bool = True
    stats: dict[str, TensorStat] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)  # method-owned scratch (e.g. calibration statistics)

    def calibration_texts(self) -> list[str]:
        if "calib_texts" not in self.cache:
            from deltapack.calib.data import load_calibration_texts

            self.cache["calib_texts"] = load_calibration_texts(self.calib_path)
        return self.cache["calib_texts"]

    def calibration_batches(self, seq_len: int, n_seqs: int) -> torch.Tensor:
        """(n, seq_len) token ids from the calibration text, tokenized with the fine-tune's tokenizer. A checkpoint
        without a tokenizer (test models) gets seeded random ids, unless the user passed --calib."""
        key = f"calib_ids:{seq_len}:{n_seqs}"
        if key not in self.cache:
            from deltapack.calib.data import token_batches

            try:
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(str(self.finetuned.path))
            except Exception as e:
                if self.calib_path:
                    raise DeltapackError(f"--calib given but the fine-tune has no usable tokenizer: {e}") from e
                tok = None
            if tok is None:
                vocab = int(self.finetuned.config().get("vocab_size", 256))
                log.warning("no tokenizer next to the fine-tune: calibrating on seeded random token ids")
                ids = torch.randint(0, vocab, (n_seqs, seq_len), generator=torch.Generator().manual_seed(0))
                src = "random-token-ids"
            else:
                ids = token_batches(tok, self.calibration_texts(), seq_len, n_seqs)
                src = self.calib_path or "default:stdlib-docstrings"
            self.cache[key] = ids
            self.cache["calibration_record"] = {"source": str(src), "n_seqs": int(ids.shape[0]), "seq_len": seq_len, "tokens": int(ids.numel())}
        return self.cache[key]


@dataclass
class _Plan:
    changed: list[str]
    unchanged: list[str]
    new_in_ft: list[str]
    removed: list[str]
    base_rows: dict[str, int]
    fingerprint: str
    stats: dict[str, TensorStat]


def check_pair(base: ModelSource, ft: ModelSource) -> None:
    bc, fc = base.config(), ft.config()
    bt, ftt = bc.get("model_type"), fc.get("model_type")
    if bt and ftt and bt != ftt:
        raise MismatchError(f"architectures differ: base is {bt!r}, fine-tune is {ftt!r}")
    common = set(base.keys()) & set(ft.keys())
    if not common:
        raise MismatchError("base and fine-tune share no tensor names: not the same architecture")
    if len(common) < 0.5 * len(ft.keys()):
        raise MismatchError(
            f"only {len(common)} of the fine-tune's {len(ft.keys())} tensors exist in the base: wrong base?"
        )
    for n in sorted(common):
        bs, fs = base.meta(n).shape, ft.meta(n).shape
        if bs == fs:
            continue
        grown = len(bs) == 2 and len(fs) == 2 and bs[1] == fs[1] and fs[0] > bs[0]
        if grown and tensor_kind(n, fs) in ("embedding", "lm_head"):
            continue
        raise MismatchError(f"shape mismatch for {n}: base {list(bs)} vs fine-tune {list(fs)} (wrong base?)")


def tensor_digest(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256()
    if t.numel():
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes())
    return h.hexdigest()


def combine_fingerprint(digests: dict[str, str], metas: dict[str, tuple]) -> str:
    h = hashlib.sha256()
    for n in sorted(digests):
        dtype, shape = metas[n]
        h.update(f"{n}|{dtype}|{list(shape)}|{digests[n]}\n".encode())
    return "sha256:" + h.hexdigest()


def base_fingerprint(src: ModelSource, progress: bool = False) -> str:
    """Full-content fingerprint of a checkpoint, streamed tensor by tensor."""
    digests, metas = {}, {}
    for n, t in tqdm(src.iter_tensors(), total=len(src.keys()), desc="fingerprint", disable=not progress, leave=False):
        digests[n] = tensor_digest(t)
        metas[n] = (str(t.dtype).replace("torch.", ""), tuple(t.shape))
    return combine_fingerprint(digests, metas)


def _plan(base: ModelSource, ft: ModelSource, device: torch.device, progress: bool) -> _Plan:
    check_pair(base, ft)
    bk, fk = set(base.keys()), set(ft.keys())
    changed, unchanged, base_rows, stats = [], [], {}, {}
    digests, metas = {}, {}
    common = sorted(bk & fk)
    ft_iter = None
    for n, b in tqdm(base.iter_tensors(), total=len(bk), desc="plan", disable=not progress, leave=False):
        digests[n] = tensor_digest(b)
        metas[n] = (str(b.dtype).replace("torch.", ""), tuple(b.shape))
        if n not in fk:
            continue
        f = ft.get(n)
        if b.shape == f.shape and b.dtype == f.dtype and torch.equal(b, f):
            unchanged.append(n)
            continue
        changed.append(n)
        fs = tuple(f.shape)
        if b.shape != f.shape:
            base_rows[n] = b.shape[0]
        rows = base_rows.get(n, fs[0] if fs else 1)
        if f.is_floating_point() and b.is_floating_point():
            d = f[:rows].to(device, torch.float32) - b.to(device, torch.float32)
            sq = float((d * d).sum())
        else:
            sq = 0.0
        shape2 = as_2d(fs)
        if n in base_rows:
            shape2 = (rows, shape2[1])
        stats[n] = TensorStat(n, shape2, tensor_kind(n, fs), _numel(fs) * 2, sq)
    del ft_iter
    new_in_ft = sorted(fk - bk)
    for n in new_in_ft:
        fs = ft.meta(n).shape
        stats[n] = TensorStat(n, as_2d(fs), tensor_kind(n, fs), _numel(fs) * 2, 0.0)
    return _Plan(
        sorted(changed), sorted(unchanged), new_in_ft, sorted(bk - fk), base_rows,
        combine_fingerprint(digests, metas), stats,
    )


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _aux_files(base: ModelSource, ft: ModelSource) -> tuple[dict[str, Path], dict[str, str]]:
    """Config files of the fine-tune always travel (small); tokenizer files only when they differ from the base's."""
    fa, ba = ft.aux_files(), base.aux_files()
    store, where = {}, {}
    for name, p in fa.items():
        if name in ("config.json", "generation_config.json"):
            store[name], where[name] = p, "delta"
    tok_names = [n for n in TOKENIZER_FILES if n in fa or n in ba]
    same = bool(tok_names) and all(n in fa and n in ba and fa[n].read_bytes() == ba[n].read_bytes() for n in tok_names)
    for n in tok_names:
        if n not in fa:
            continue
        if same:
            where[n] = "base"
        else:
            store[n], where[n] = fa[n], "delta"
    return store, where


def _estimate_overhead(names: list[str], method: DeltaMethod, aux_bytes: int) -> int:
    per_tensor = sum(
        len(n) * (1 + method.parts_per_tensor) + 420 + 90 * method.parts_per_tensor + getattr(method, "params_bytes", 120)
        for n in names
    )
    return per_tensor + 3000 + aux_bytes


def _card(m: Manifest, true_ratio: float) -> str:
    return (
        f"# deltapack delta\n\nFine-tune `{m.finetuned.id}` stored as a `{m.method}` delta against base "
        f"`{m.base.id}` ({len(m.tensors)} tensors, true ratio {true_ratio:.1f}x).\n\n"
        f"Rebuild: `deltapack merge BASE THIS_DIR -o OUT`. Check: `deltapack verify BASE THIS_DIR`.\n"
    )


def compress(
    base: str | os.PathLike,
    finetuned: str | os.PathLike,
    out: str | os.PathLike,
    *,
    method: str = "lowrank",
    ratio: float | None = None,
    params: dict | None = None,
    calib: str | None = None,
    device: str = "auto",
    overwrite: bool = False,
    max_shard_bytes: int = 1 << 30,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> Path:
    """Compress `finetuned` against `base` into the delta directory `out`. Returns the directory path."""
    m = get_method(method, params)
    if m.lossless:
        if ratio is not None and ratio > 1.0:
            raise BudgetError(f"{method} is lossless and cannot reach a {ratio:g}x ratio; drop --ratio or pick a lossy method")
        ratio = None
    else:
        ratio = 16.0 if ratio is None else float(ratio)
        if not ratio > 1.0 or ratio != ratio or ratio == float("inf"):
            raise BudgetError(f"ratio must be a finite number above 1, got {ratio}")
    if m.needs_calibration and not calib:
        log.info("%s needs calibration data: using the built-in default corpus", method)
    if calib and not Path(calib).is_file():
        raise DeltapackError(f"calibration file not found: {calib}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise DeltapackError(f"output {out} already exists (pass --overwrite to replace it)")

    dev = resolve_device(device)
    bsrc = open_model(base, trust_remote_code=trust_remote_code)
    fsrc = open_model(finetuned, trust_remote_code=trust_remote_code)
    plan = _plan(bsrc, fsrc, dev, progress)
    todo = plan.changed + plan.new_in_ft
    if not todo:
        raise MismatchError("the fine-tune is identical to the base: nothing to compress")

    store_aux, aux_where = _aux_files(bsrc, fsrc)
    aux_bytes = sum(p.stat().st_size for p in store_aux.values())

    # ---- budget ----------------------------------------------------------------------------------------------
    stats = plan.stats
    dense_total = sum(stats[n].dense_bytes for n in todo)
    fixed: dict[str, int] = {}  # tensors kept dense bf16 whatever the method: 1-D, non-float, new tensors, new rows
    matrices = []
    for n in todo:
        s = stats[n]
        if s.kind == "vector" or n in plan.new_in_ft or not fsrc.meta(n).dtype.is_floating_point:
            fixed[n] = s.dense_bytes
        else:
            matrices.append(s)
            if n in plan.base_rows:
                fixed[n + "::new_rows"] = (fsrc.meta(n).shape[0] - plan.base_rows[n]) * s.shape[1] * 2
    budgets: dict[str, int] = {}
    if ratio is not None:
        target_bytes = dense_total / ratio
        overhead = _estimate_overhead(todo, m, aux_bytes)
        avail = int(target_bytes / RATIO_SLACK - overhead - sum(fixed.values()))
        need = sum(m.min_bytes(s.shape) for s in matrices)
        if avail < need:
            best = dense_total / max(1, need + overhead + sum(fixed.values()))
            if best < ratio * 0.97:
                raise BudgetError(
                    f"ratio {ratio:g}x is not reachable with {method}: its smallest delta here is about "
                    f"{best:.1f}x (dense tensors, metadata and per-tensor minimums included)"
                )
            log.warning("%s: %gx is just past reach; storing the smallest delta (about %.2fx)", method, ratio, best)
            avail = need
        budgets = m.allocate(matrices, avail)

    ctx = CompressContext(dev, bsrc, fsrc, m, calib, progress, stats)
    if hasattr(m, "prepare"):
        m.prepare(ctx, matrices)  # e.g. layer-by-layer calibration statistics

    created = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    with AtomicDir(out, overwrite=overwrite) as tmp:
        writer = ShardedSafetensorsWriter(tmp, "delta", max_shard_bytes, metadata={"format": "deltapack"})
        entries: dict[str, TensorEntry] = {}
        held: dict[str, Encoded] = {}
        pbar = tqdm(todo, desc=f"compress [{method}]", disable=not progress)
        for n in pbar:
            enc, new_rows = _encode_one(n, m, ctx, plan, budgets, fixed)
            if m.has_refine and enc.method is None:
                held[n] = (enc, new_rows)  # type: ignore[assignment]
                continue
            entries[n] = _write_entry(writer, n, enc, new_rows, fsrc, stats[n], plan, m)
        if held:
            refined = m.refine({k: v[0] for k, v in held.items()}, ctx)  # type: ignore[index]
            for n, (_, new_rows) in held.items():  # type: ignore[misc]
                entries[n] = _write_entry(writer, n, refined[n], new_rows, fsrc, stats[n], plan, m)
        files = writer.close()
        for n, e in entries.items():
            # a tensor whose budget bought nothing (e.g. rank 0) has no parts and decodes to zeros
            e.file = writer.location[part_key(n, e.parts[0])] if e.parts else ""
        hf_dir = tmp / "hf"
        if store_aux:
            hf_dir.mkdir()
            for name, p in store_aux.items():
                shutil.copyfile(p, hf_dir / name)
        manifest = Manifest(
            deltapack_version=__version__,
            created=created,
            method=method,
            method_params=m.describe_params(),
            target_ratio=ratio,
            base=ModelRef(id=bsrc.model_id, revision=bsrc.revision, fingerprint=plan.fingerprint, structure=bsrc.structure_hash()),
            finetuned=ModelRef(id=fsrc.model_id, revision=fsrc.revision),
            tensors=dict(sorted(entries.items())),
            removed=plan.removed,
            unchanged=len(plan.unchanged),
            files=files,
            aux=aux_where,
            calibration=ctx.cache.get("calibration_record"),
        )
        # the card states the true ratio, which depends on the card's own size: two passes settle it
        card_path = tmp / "README.md"
        write_bytes_atomic(card_path, _card(manifest, 0.0).encode())
        write_bytes_atomic(tmp / MANIFEST_NAME, manifest.dumps().encode())
        for _ in range(2):
            true_ratio = manifest.dense_delta_bytes / dir_bytes(tmp)
            write_bytes_atomic(card_path, _card(manifest, true_ratio).encode())
        true_ratio = manifest.dense_delta_bytes / dir_bytes(tmp)
        if ratio is not None and true_ratio < ratio * 0.97:
            raise BudgetError(
                f"{method} reached only {true_ratio:.2f}x on disk against a {ratio:g}x target "
                "(per-tensor minimums or metadata too large for this model)"
            )
        log.info("wrote %s: %d tensors, true ratio %.2fx", out, len(entries), true_ratio)
    return Path(out)


def _encode_one(n: str, m: DeltaMethod, ctx: CompressContext, plan: _Plan, budgets, fixed) -> tuple[Encoded, Any]:
    from deltapack.methods.raw import exact_dense

    dev = ctx.device
    f = ctx.finetuned.get(n)
    b = ctx.base.get(n) if n not in plan.new_in_ft else None
    rows = plan.base_rows.get(n)
    new_rows = None
    if rows is not None:
        new_rows = f[rows:].to(torch.bfloat16) if f.is_floating_point() else f[rows:]
        f = f[:rows]
    shape2 = as_2d(tuple(f.shape))
    f2 = f.reshape(shape2).to(dev)
    b2 = b.reshape(shape2).to(dev) if b is not None else None
    delta = f2.float() - (b2.float() if b2 is not None else 0.0)
    job = TensorJob(n, shape2, delta, budgets.get(n, 0), ctx.stats[n].kind, b2, f2)
    if n in fixed or m.lossless:
        enc = exact_dense(job) if (m.lossless or not f.is_floating_point()) else Encoded(
            "dense", {}, {"values": delta.to(torch.bfloat16).cpu()}
        )
        if not m.lossless:
            enc.method = "dense"
        return enc, new_rows
    enc = m.encode(job, ctx)
    if enc.nbytes() > job.budget_bytes * 1.02 + 64:
        log.warning("%s: %s stored %d bytes over a %d-byte budget", n, m.name, enc.nbytes(), job.budget_bytes)
    return enc, new_rows


def _write_entry(writer, n, enc: Encoded, new_rows, fsrc: ModelSource, stat: TensorStat, plan: _Plan, m) -> TensorEntry:
    parts = dict(enc.parts)
    if new_rows is not None:
        parts["new_rows"] = new_rows
    codec = get_codec(enc.codec)
    payload = sum(t.numel() * t.element_size() for k, t in parts.items() if k in codec.payload_parts or k == "new_rows")
    total = sum(t.numel() * t.element_size() for t in parts.values())
    writer.add_group({part_key(n, k): v for k, v in parts.items()})
    meta = fsrc.meta(n)
    return TensorEntry(
        shape=list(meta.shape),
        dtype=str(meta.dtype).replace("torch.", ""),
        codec=enc.codec,
        params=enc.params,
        parts=list(parts),
        file="",
        dense_bytes=stat.dense_bytes,
        payload_bytes=payload,
        side_bytes=total - payload,
        base_rows=plan.base_rows.get(n),
        in_base=n not in plan.new_in_ft,
        method=enc.method,
    )
