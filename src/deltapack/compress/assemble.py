"""Step 3 of compress: assemble. The optional whole-model `refine` pass, then every tensor's parts streamed into
bounded shards of a temp directory (hashed as written), manifest + card last, the true ratio measured on disk."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import torch
from tqdm.auto import tqdm

from deltapack import __version__
from deltapack.compress.context import CompressContext, created_stamp, phase
from deltapack.compress.encode import UNIT_FILE
from deltapack.compress.plan import Plan, Prepared
from deltapack.errors import BudgetError, DeltapackError
from deltapack.format.codecs import get_codec
from deltapack.format.directory import dir_bytes
from deltapack.format.entropy import encode_parts
from deltapack.format.manifest import HF_DIR, MANIFEST_NAME, FileEntry, Manifest, ModelRef, TensorEntry, part_key
from deltapack.io.safetensors_file import SafetensorsFile
from deltapack.io.sources import ModelSource
from deltapack.io.writer import StreamingShardWriter, write_bytes_atomic
from deltapack.methods.base import PENDING_CODEC, DeltaMethod, Encoded, TensorStat

log = logging.getLogger("deltapack.compress")


def _card(m: Manifest, true_ratio: float) -> str:
    return (
        f"# deltapack delta\n\nFine-tune `{m.finetuned.id}` stored as a `{m.method}` delta against base "
        f"`{m.base.id}` ({len(m.tensors)} tensors, true ratio {true_ratio:.1f}x).\n\n"
        f"Rebuild: `deltapack merge BASE THIS_DIR -o OUT`. Check: `deltapack verify BASE THIS_DIR`.\n"
    )


# ---- 3. assemble ----------------------------------------------------------------------------------------------------
class UnitResults:
    """Read access to the finished units of one fine-tune's work directory."""

    def __init__(self, prep: Prepared, work: Path):
        self.work = Path(work)
        self.meta: dict[str, dict] = {}  # tensor -> record (+ "file")
        self.calibration_record = None
        for u in prep.units:
            p = self.work / (UNIT_FILE.format(u.index) + ".json")
            if not p.is_file():
                raise DeltapackError(f"unit {u.index} ({u.key}) has no result in {self.work}: run unfinished")
            meta = json.loads(p.read_text())
            if meta.get("names") != u.names:
                raise DeltapackError(f"unit {u.index} in {self.work} was made by another plan; restart the run")
            for n, rec in meta["tensors"].items():
                self.meta[n] = dict(rec, file=meta["file"])
            if self.calibration_record is None:
                self.calibration_record = meta.get("calibration_record")
        self._files: dict[str, SafetensorsFile] = {}

    def load(self, n: str) -> tuple[Encoded, torch.Tensor | None]:
        rec = self.meta[n]
        parts: dict[str, torch.Tensor] = {}
        new_rows = None
        if rec["parts"] or rec["new_rows"]:
            f = self._files.get(rec["file"])
            if f is None:
                f = self._files[rec["file"]] = SafetensorsFile(self.work / rec["file"])
            parts = {k: f.get(part_key(n, k)) for k in rec["parts"]}
            if rec["new_rows"]:
                new_rows = f.get(part_key(n, "new_rows"))
        return Encoded(rec["codec"], rec["params"], parts, rec["method"]), new_rows


def assemble(
    prep: Prepared,
    bsrc: ModelSource,
    fsrc: ModelSource,
    work: Path,
    tmp: Path,
    *,
    device: torch.device,
    max_shard_bytes: int,
    progress: bool,
    created: str | None = None,
    out_label: str | os.PathLike = "",
) -> float:
    """Write the delta directory's contents into `tmp` (an AtomicDir temp) from the unit results in `work`; a
    `work` inside `tmp` is removed before the ratio is measured. Returns the true ratio."""
    res = UnitResults(prep, work)
    state = pickle.loads(prep.common)
    m: DeltaMethod = state["method"]
    ctx = CompressContext(device, bsrc, fsrc, m, prep.calib, progress, prep.plan.stats, state["cache"])
    refined: dict[str, Encoded] = {}
    if m.has_refine:
        held = {n: res.load(n)[0] for n in prep.todo if res.meta[n]["method"] is None}
        if held:
            with phase("assemble.refine", device):
                refined = m.refine(held, ctx)
            del held
    heal_record = None
    if prep.heal is not None:
        from deltapack.calib.heal import heal

        current = {n: refined[n] if n in refined else res.load(n)[0] for n in prep.todo}
        with phase("assemble.heal", device):
            healed, heal_record = heal(current, ctx, prep.heal, fit=ctx.cache.get("auto:fit"))
        # what heal changed wins; everything else keeps refine's choice (heal returns `current` unchanged when it did
        # not help: dropping refined entries then left auto's provisional encodings to be written)
        refined = refined | {n: e for n, e in healed.items() if e is not current[n]}
        del current, healed
    ctx.cache.pop("auto:fit", None)  # auto's teacher (model + log-probs): not needed for writing
    writer = StreamingShardWriter(tmp, "delta", max_shard_bytes, metadata={"format": "deltapack"})
    entries: dict[str, TensorEntry] = {}
    try:
        for n in tqdm(prep.todo, desc="assemble", disable=not progress, leave=False):
            enc, new_rows = res.load(n)
            if n in refined:
                enc = refined.pop(n)
            if enc.codec == PENDING_CODEC:
                raise DeltapackError(f"{n}: {prep.method_name} left a provisional encoding that its refine pass did not resolve")
            entries[n] = _write_entry(writer, n, enc, new_rows, fsrc, prep.plan.stats[n], prep.plan, m.entropy_stage)
        files = writer.close()
    except BaseException:
        writer.abort()
        raise
    for n, e in entries.items():
        # a tensor whose budget bought nothing (e.g. rank 0) has no parts and decodes to zeros
        e.file = writer.location[part_key(n, e.parts[0])] if e.parts else ""
    if Path(work).resolve().parent == Path(tmp).resolve():
        shutil.rmtree(work)
    hf_files: dict[str, FileEntry] = {}
    if prep.store_aux:
        hf_dir = tmp / HF_DIR
        hf_dir.mkdir()
        for name, p in prep.store_aux.items():
            data = Path(p).read_bytes()  # hashed as written: the manifest covers hf/ too
            write_bytes_atomic(hf_dir / name, data)
            hf_files[name] = FileEntry(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    plan = prep.plan
    manifest = Manifest(
        deltapack_version=__version__,
        created=created or created_stamp(),
        method=prep.method_name,
        method_params=m.describe_params(),
        target_ratio=prep.ratio,
        base=ModelRef(id=bsrc.model_id, revision=bsrc.revision, fingerprint=plan.fingerprint, structure=bsrc.structure_hash()),
        finetuned=ModelRef(id=fsrc.model_id, revision=fsrc.revision),
        tensors=dict(sorted(entries.items())),
        removed=plan.removed,
        unchanged=len(plan.unchanged),
        files=files,
        hf_files=dict(sorted(hf_files.items())),
        aux=prep.aux_where,
        calibration=_calibration_record(ctx.cache.get("calibration_record") or res.calibration_record, heal_record),
    )
    # the card states the true ratio, which depends on the card's own size: two passes settle it. The manifest is
    # written last (its size known beforehand), so a directory with a manifest has everything else.
    card_path = tmp / "README.md"
    manifest_bytes = manifest.dumps().encode()
    write_bytes_atomic(card_path, _card(manifest, 0.0).encode())
    for _ in range(2):
        true_ratio = manifest.dense_delta_bytes / (dir_bytes(tmp) + len(manifest_bytes))
        write_bytes_atomic(card_path, _card(manifest, true_ratio).encode())
    write_bytes_atomic(tmp / MANIFEST_NAME, manifest_bytes)
    true_ratio = manifest.dense_delta_bytes / dir_bytes(tmp)
    if prep.ratio is not None and true_ratio < prep.ratio * 0.97:
        raise BudgetError(
            f"{prep.method_name} reached only {true_ratio:.2f}x on disk against a {prep.ratio:g}x target "
            "(per-tensor minimums or metadata too large for this model)"
        )
    if prep.ratio is not None and true_ratio > prep.ratio * 1.05:
        # budgets count bytes after entropy coding; a method spends zstd's saving only while more stored bytes buy
        # something (e.g. deltadq at 4 bits keeps every value of a mostly-zero delta)
        log.warning("%s: %.2fx on disk against a %gx target: the method could not spend the whole budget",
                    prep.method_name, true_ratio, prep.ratio)
    log.info("wrote %s: %d tensors, true ratio %.2fx", out_label, len(entries), true_ratio)
    return true_ratio


def _calibration_record(record: dict | None, heal_record: dict | None) -> dict | None:
    if heal_record is None:
        return record
    slim = {k: v for k, v in heal_record.items() if k != "losses"}  # the loss curve is for logs, not the manifest
    return dict(record or {}, heal=slim)


def _write_entry(writer, n, enc: Encoded, new_rows, fsrc: ModelSource, stat: TensorStat, plan: Plan,
                 entropy: bool = True) -> TensorEntry:
    parts = dict(enc.parts)
    if new_rows is not None:
        parts["new_rows"] = new_rows
    codec = get_codec(enc.codec)
    coded: dict[str, dict] = {}
    if entropy and not codec.entropy_coded:
        parts, coded = encode_parts(parts)  # zstd per part where it saves; readers decode it back (DeltaDir.parts)
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
        entropy=coded,
    )
