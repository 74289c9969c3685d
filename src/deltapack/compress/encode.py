"""Step 2 of compress: encode, unit by unit (a unit = one decoder layer's tensors, one embedding/head, or the small
rest). Each unit is a pure function of the plan and its tensors; its results go to `WORK/unit-XXXX.safetensors` +
`unit-XXXX.json` (the JSON, written last and atomically, marks it finished)."""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from deltapack.compress.context import CompressContext, add_phase, phase
from deltapack.compress.plan import Plan, Prepared, Unit, encode_order, prefetched
from deltapack.errors import DeltapackError
from deltapack.format.codecs import as_2d
from deltapack.format.manifest import part_key
from deltapack.io.sources import ModelSource
from deltapack.io.writer import StreamingShardWriter, write_json_atomic
from deltapack.methods.base import PENDING_CODEC, DeltaMethod, Encoded, TensorJob

log = logging.getLogger("deltapack.compress")

UNIT_FILE = "unit-{:04d}"  # + .safetensors / .json inside a work directory


# ---- 2. encode ----------------------------------------------------------------------------------------------------
@dataclass
class UnitJob:
    """One unit of one fine-tune, ready to encode: its own copy of the plan state."""

    unit: Unit
    ft: ModelSource
    plan: Plan
    method: DeltaMethod
    budgets: dict[str, int]
    fixed: dict[str, int]
    cache: dict[str, Any]
    work: Path  # where unit results go
    calib: str | None = None
    label: str = ""  # fine-tune name, for logs


def unit_job(prep: Prepared, unit_index: int, ft: ModelSource, work: Path, unit_cache: bytes | None = None, label: str = "") -> UnitJob:
    state = pickle.loads(prep.common)
    cache = state["cache"]
    blob = unit_cache if unit_cache is not None else prep.unit_caches[unit_index]
    if blob is None:
        raise DeltapackError(f"unit {unit_index}: its spilled state was not supplied")
    if isinstance(blob, dict):  # keep_live: the slice itself, used by this one job; the plan lets go of it
        piece = blob
        prep.unit_caches[unit_index] = None
    else:
        piece = pickle.loads(blob)
    for k, v in piece.items():
        cache[k] = {**cache.get(k, {}), **v}
    return UnitJob(
        prep.units[unit_index], ft, prep.plan, state["method"], state["budgets"], state["fixed"], cache, Path(work),
        prep.calib, label,
    )


def unit_done(work: Path, index: int) -> bool:
    return (Path(work) / (UNIT_FILE.format(index) + ".json")).is_file()


def encode_units(
    jobs: list[UnitJob],
    base: ModelSource,
    device: torch.device,
    *,
    progress: bool = False,
    on_tensor: Callable[[], None] | None = None,
    log_path: Path | None = None,
) -> list[tuple[str, int]]:
    """Encode units (of one or several fine-tunes) and write their results. Tensors are visited in `todo` order and
    each base tensor is read once for every job that needs it. Returns [(label, unit index)] written."""
    new_names = set()
    for j in jobs:
        new_names |= set(j.plan.new_in_ft)
    names = encode_order(sorted({n for j in jobs for n in j.unit.names}), new_names)
    ctxs, writers, records = [], [], []
    for j in jobs:
        j.work.mkdir(parents=True, exist_ok=True)
        ctxs.append(CompressContext(device, base, j.ft, j.method, j.calib, progress, j.plan.stats, j.cache))
        writers.append(StreamingShardWriter(j.work, UNIT_FILE.format(j.unit.index), 1 << 62))
        records.append({})
    members = [set(j.unit.names) for j in jobs]

    def load(n: str):
        users = [i for i, mem in enumerate(members) if n in mem]
        return users, (base.get(n) if n not in new_names else None), [ctxs[i].finetuned.get(n) for i in users]

    waited = [0.0]
    try:
        for n, (users, b, fts_loaded) in prefetched(names, load, waited=waited):
            f = None
            for i, f in zip(users, fts_loaded):
                j = jobs[i]
                enc, new_rows = _encode_one(n, j.method, ctxs[i], j.plan, j.budgets, j.fixed, b, f)
                parts = dict(enc.parts)
                if new_rows is not None:
                    parts["new_rows"] = new_rows
                with phase("encode.write_units"):
                    writers[i].add_group({part_key(n, k): v for k, v in parts.items()})
                records[i][n] = {"codec": enc.codec, "params": enc.params, "parts": list(enc.parts), "method": enc.method,
                                 "new_rows": new_rows is not None}
                del enc, parts, new_rows
                if on_tensor:
                    on_tensor()
            del b, fts_loaded, f
    except BaseException:
        for w in writers:
            w.abort()
        raise
    add_phase("encode.wait_read", waited[0])
    done = []
    for j, ctx, w, rec in zip(jobs, ctxs, writers, records):
        files = w.close()
        stem = UNIT_FILE.format(j.unit.index)
        meta = {
            "key": j.unit.key,
            "names": j.unit.names,
            "file": f"{stem}.safetensors" if files else None,
            "tensors": rec,
            "calibration_record": ctx.cache.get("calibration_record"),
        }
        write_json_atomic(j.work / f"{stem}.json", meta, compact=True)  # last: marks the unit finished
        done.append((j.label, j.unit.index))
        if log_path is not None:
            append_line(log_path, f"encode {j.label} {j.unit.index} {j.unit.key} pid={os.getpid()}")
    return done


def append_line(path: Path, line: str) -> None:
    # one write() of a short line with O_APPEND: lines of concurrent workers do not interleave
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def _encode_one(n: str, m: DeltaMethod, ctx: CompressContext, plan: Plan, budgets, fixed, base_tensor=None,
                ft_tensor=None) -> tuple[Encoded, Any]:
    from deltapack.format.codec_lossless import encode_bits

    dev = ctx.device
    f = ft_tensor if ft_tensor is not None else ctx.finetuned.get(n)
    b = None
    if n not in plan.new_in_ft:
        b = base_tensor if base_tensor is not None else ctx.base.get(n)
    rows = plan.base_rows.get(n)
    new_rows = None
    if rows is not None:
        # added vocabulary rows have no base: bf16 for lossy methods, the fine-tune's own dtype for lossless ones
        new_rows = f[rows:].to(torch.bfloat16) if f.is_floating_point() and not m.lossless else f[rows:]
        f = f[:rows]
    shape2 = as_2d(tuple(f.shape))
    if m.lossless or not f.is_floating_point():
        # exact bits against the base, on the CPU (an integer difference: no float delta, no device round trip);
        # a lossy method's non-float tensors are stored this way too
        with phase("encode.method", dev):
            if m.lossless:
                job = TensorJob(n, shape2, torch.empty(0), 0, ctx.stats[n].kind,
                                b.reshape(shape2) if b is not None else None, f.reshape(shape2))
                return m.encode(job, ctx), new_rows
            params, parts = encode_bits(f, b)
        return Encoded("lossless", params, parts, "lossless"), new_rows
    with phase("encode.to_device", dev):
        f2 = f.reshape(shape2).to(dev)
        b2 = b.reshape(shape2).to(dev) if b is not None else None
        delta = f2.float() - (b2.float() if b2 is not None else 0.0)
    job = TensorJob(n, shape2, delta, budgets.get(n, 0), ctx.stats[n].kind, b2, f2)
    if n in fixed:
        return Encoded("dense", {}, {"values": delta.to(torch.bfloat16).cpu()}, "dense"), new_rows
    with phase("encode.method", dev):
        enc = m.encode_coded(job, ctx)  # the budget counts bytes after the entropy stage (base.py encode_coded)
    stored = enc.coded_bytes if enc.coded_bytes is not None else enc.nbytes()
    if enc.codec != PENDING_CODEC and stored > job.budget_bytes * 1.02 + 64:
        log.warning("%s: %s stored %d bytes over a %d-byte budget", n, m.name, stored, job.budget_bytes)
    return enc, new_rows


