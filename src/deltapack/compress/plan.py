"""Step 1 of compress: plan. Open the checkpoints lazily, check they belong together, read each base tensor once
(with every fine-tune's matching tensor) to split changed from unchanged, gather per-tensor statistics and the base
fingerprint; then the byte budget per tensor, the method's `prepare` hook, and the split into units."""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import math
import pickle
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm.auto import tqdm

from deltapack.compress.context import CompressContext, add_phase, phase
from deltapack.errors import BudgetError, DeltapackError, InputError, MismatchError
from deltapack.format.codecs import as_2d
from deltapack.io.sources import TOKENIZER_FILES, ModelSource
from deltapack.methods.base import DeltaMethod, TensorStat, get_method

log = logging.getLogger("deltapack.compress")

# Budgets count bytes as stored on disk, after the write-time entropy stage: each method's `encode_coded`
# (methods/base.py) spends what zstd will save on a bigger stored budget, so the true ratio lands on the target
# instead of 10-50% above it with the quality of the nominal budget (bench/results/ratio_exact_cpu.json).
RATIO_SLACK = 1.01  # aim this far above the target so metadata estimates never push the true ratio under it
EMBED_KEYS = ("embed_tokens", "wte", "word_embeddings", "tok_embeddings", "embed_in")
HEAD_KEYS = ("lm_head", "embed_out", "output.weight")
PICKLE_PROTOCOL = 5
SPILL_MIN_BYTES = 1 << 16  # per-unit state below this stays in the plan file
PLAN_PREFETCH = 3  # plan pass: tensors read ahead (by one thread) of the one on the device
PLAN_HASHERS = 1  # plan pass: threads hashing (sha256 runs ~1-2 GB/s per thread) and comparing tensors already read


def tensor_kind(name: str, shape: tuple[int, ...]) -> str:
    if len(shape) < 2:
        return "vector"
    if any(k in name for k in EMBED_KEYS):
        return "embedding"
    if any(k in name for k in HEAD_KEYS):
        return "lm_head"
    return "linear" if len(shape) == 2 else "other"


# ---- 1. plan ----------------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    changed: list[str]
    unchanged: list[str]
    new_in_ft: list[str]
    removed: list[str]
    base_rows: dict[str, int]
    fingerprint: str
    stats: dict[str, TensorStat]

    @property
    def todo(self) -> list[str]:
        return self.changed + self.new_in_ft


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
        # hash the tensor's memory in place (no bytes copy: that would double the peak for a large tensor)
        h.update(t.reshape(-1).view(torch.uint8).numpy() if t.dtype != torch.bool else t.reshape(-1).numpy())
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


def prefetched(names: list[str], load: Callable[[str], Any], waited: list[float] | None = None) -> Iterator[tuple[str, Any]]:
    """(name, load(name)) in order; the next name loads in a background thread while the caller works on this one
    (reads release the GIL), so disk and compute overlap at the cost of one more item in memory. `waited`: a
    one-element list the seconds spent waiting for a load are added to."""
    if not names:
        return
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(load, names[0])
        for i, n in enumerate(names):
            t0 = time.perf_counter()
            item = fut.result()
            if waited is not None:
                waited[0] += time.perf_counter() - t0
            fut = pool.submit(load, names[i + 1]) if i + 1 < len(names) else None
            yield n, item
            del item


def _read_then_check(names: list[str], load: Callable[[str], Any], check: Callable[[Any], Any],
                     waited: list[float]) -> Iterator[tuple[str, Any]]:
    """(name, check(load(name))) in order, as a pipeline: one thread reads ahead (PLAN_PREFETCH items), PLAN_HASHERS
    threads run `check` on items already read, the caller works on the oldest. `waited`: seconds the caller spent
    waiting, added to waited[0]."""
    if not names:
        return
    ahead = max(1, PLAN_PREFETCH)
    with concurrent.futures.ThreadPoolExecutor(1) as reader, \
            concurrent.futures.ThreadPoolExecutor(max(1, PLAN_HASHERS)) as checkers:
        def submit(n: str):
            read = reader.submit(load, n)
            return checkers.submit(lambda: check(read.result()))

        futs = [submit(n) for n in names[:ahead]]
        for i, n in enumerate(names):
            t0 = time.perf_counter()
            item = futs[i].result()
            waited[0] += time.perf_counter() - t0
            futs[i] = None  # type: ignore[call-overload]  # drop the future's reference to the item
            if i + ahead < len(names):
                futs.append(submit(names[i + ahead]))
            yield n, item
            del item


def _file_order(src: ModelSource) -> list[str]:
    """Names in storage order (file, then name): what a sequential read of the checkpoint looks like."""
    index = getattr(src, "_index", {})
    return sorted(src.keys(), key=lambda n: (str(index.get(n, "")), n))


def plan_pass(base: ModelSource, fts: list[ModelSource], device: torch.device, progress: bool) -> list[Plan]:
    """One read of every base tensor serves every fine-tune: per fine-tune, the changed/unchanged split and the
    statistics the allocator needs; the base fingerprint from the same bytes. Memory: one base tensor and the
    fine-tunes' matching tensors, 1 + PLAN_PREFETCH times (the next ones load, hash and compare in background threads
    while this one's squared norm is taken on the device), plus the fp32 difference on the device."""
    for ft in fts:
        check_pair(base, ft)
    bk = set(base.keys())
    fks = [set(ft.keys()) for ft in fts]
    acc = [{"changed": [], "unchanged": [], "base_rows": {}, "stats": {}} for _ in fts]
    digests, metas = {}, {}
    hash_times: list[float] = []  # list.append is atomic across threads

    def load(n: str):
        return base.get(n), [ft.get(n) if n in fk else None for ft, fk in zip(fts, fks)]

    def check(loaded):
        # sha256 of the base and the equality tests, off the main thread: they allocate nothing (one reader thread
        # owns every tensor buffer, so the allocator's per-thread arenas do not multiply)
        b, fs_loaded = loaded
        t0 = time.perf_counter()
        digest = tensor_digest(b)
        hash_times.append(time.perf_counter() - t0)
        same = [f is not None and b.shape == f.shape and b.dtype == f.dtype and torch.equal(b, f) for f in fs_loaded]
        return b, fs_loaded, digest, same

    order = _file_order(base)
    waited = [0.0]
    items = _read_then_check(order, load, check, waited)
    for n, (b, fs_loaded, digest, same) in tqdm(items, total=len(order), desc="plan", disable=not progress, leave=False):
        digests[n] = digest
        metas[n] = (str(b.dtype).replace("torch.", ""), tuple(b.shape))
        f = b_dev = None
        for ft, fk, a, f, unchanged in zip(fts, fks, acc, fs_loaded, same):
            if n not in fk:
                continue
            if unchanged:
                a["unchanged"].append(n)
                continue
            a["changed"].append(n)
            fs = tuple(f.shape)
            if b.shape != f.shape:
                a["base_rows"][n] = b.shape[0]
            rows = a["base_rows"].get(n, fs[0] if fs else 1)
            if f.is_floating_point() and b.is_floating_point():
                # copy in the stored dtype and widen on the device: half the bytes over PCIe, no CPU conversion
                if b_dev is None:
                    b_dev = b.to(device).float()
                d = f[:rows].to(device).float() - b_dev
                sq = float((d * d).sum())
                del d
            else:
                sq = 0.0
            shape2 = as_2d(fs)
            if n in a["base_rows"]:
                shape2 = (rows, shape2[1])
            a["stats"][n] = TensorStat(n, shape2, tensor_kind(n, fs), _numel(fs) * 2, sq)
            if not math.isfinite(sq):  # rare: find out which side, for the error prepare_finetune gives
                a["stats"][n].extras["nonfinite"] = _nonfinite_source(b, f[:rows])
        del b, fs_loaded, f, b_dev
    add_phase("plan.wait_read", waited[0])
    add_phase("plan.hash_busy", sum(hash_times))  # thread-seconds of sha256, overlapped with the rest
    fingerprint = combine_fingerprint(digests, metas)
    plans = []
    for ft, fk, a in zip(fts, fks, acc):
        new_in_ft = sorted(fk - bk)
        for n in new_in_ft:
            fs = ft.meta(n).shape
            a["stats"][n] = TensorStat(n, as_2d(fs), tensor_kind(n, fs), _numel(fs) * 2, 0.0)
        plans.append(
            Plan(sorted(a["changed"]), sorted(a["unchanged"]), new_in_ft, sorted(bk - fk), a["base_rows"], fingerprint, a["stats"])
        )
    return plans


def _nonfinite_source(b: torch.Tensor, f: torch.Tensor) -> str:
    """Why a tensor's delta is not finite, in words: NaN/inf values in the fine-tune or the base, or a difference
    that overflows float32."""
    bad_f = int((~torch.isfinite(f)).sum())
    bad_b = int((~torch.isfinite(b)).sum())
    if bad_f:
        return f"the fine-tune has {bad_f} NaN/inf value(s)" + (f" (the base {bad_b})" if bad_b else "")
    if bad_b:
        return f"the base has {bad_b} NaN/inf value(s)"
    return "fine-tune minus base overflows float32"


def refuse_nonfinite(plan: Plan, lossless: bool, method_name: str) -> None:
    """A lossy delta of a tensor with NaN/inf values cannot rebuild it (and such a checkpoint is usually broken):
    refused, naming the tensors. `lossless` stores the exact bits, so it keeps them, with a warning."""
    bad = {n: s.extras["nonfinite"] for n, s in plan.stats.items() if "nonfinite" in s.extras}
    if not bad:
        return
    listed = "; ".join(f"{n}: {why}" for n, why in list(bad.items())[:5])
    if len(bad) > 5:
        listed += f"; and {len(bad) - 5} more"
    if lossless:
        log.warning("%d tensor(s) with non-finite values, stored bit-exact: %s", len(bad), listed)
        return
    raise InputError(f"{len(bad)} tensor(s) have non-finite values, which a lossy delta ({method_name}) cannot "
                     f"represent: {listed}. Check the checkpoint, or keep it exactly with --method lossless")


def plan_one(base: ModelSource, ft: ModelSource, device: torch.device, progress: bool) -> Plan:
    return plan_pass(base, [ft], device, progress)[0]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _aux_files(base: ModelSource, ft: ModelSource) -> tuple[dict[str, Path], dict[str, str]]:
    """Config files of the fine-tune always travel (small); each tokenizer file only when it differs from the base's
    (a re-saved tokenizer_config.json must not drag a byte-identical 3.5 MB tokenizer.json along)."""
    fa, ba = ft.aux_files(), base.aux_files()
    store, where = {}, {}
    for name, p in fa.items():
        if name in ("config.json", "generation_config.json"):
            store[name], where[name] = p, "delta"
    for n in TOKENIZER_FILES:
        if n not in fa:
            continue
        if n in ba and fa[n].read_bytes() == ba[n].read_bytes():
            where[n] = "base"
        else:
            store[n], where[n] = fa[n], "delta"
    return store, where


def _estimate_overhead(names: list[str], method: DeltaMethod, aux_bytes: int) -> int:
    per_tensor = sum(
        len(n) * (1 + method.parts_per_tensor) + 420 + 90 * method.parts_per_tensor + getattr(method, "params_bytes", 120)
        for n in names
    )
    return per_tensor + 3000 + aux_bytes + 100  # + the manifest digest (format 2)


def check_settings(method: str, ratio: float | None, params: dict | None, calib: str | None) -> tuple[DeltaMethod, float | None]:
    """Validate method, knobs, ratio and calibration file before any model is opened."""
    m = get_method(method, params)
    if m.lossless:
        if ratio is not None and ratio > 1.0:
            raise BudgetError(f"{method} is lossless: its size is what the exact bits take, not a {ratio:g}x target; "
                              "drop --ratio or pick a lossy method")
        ratio = None
    else:
        ratio = 16.0 if ratio is None else float(ratio)
        if not ratio > 1.0 or ratio != ratio or ratio == float("inf"):
            raise BudgetError(f"ratio must be a finite number above 1, got {ratio}")
    if m.needs_calibration and not calib:
        log.info("%s needs calibration data: using the built-in default corpus", method)
    if calib and not Path(calib).is_file():
        raise DeltapackError(f"calibration file not found: {calib}")
    return m, ratio


# ---- units ------------------------------------------------------------------------------------------------------------
@dataclass
class Unit:
    index: int
    key: str
    names: list[str]


_LAYER_RE = re.compile(r"^(.*?\.\d+)\.")


def unit_key(name: str, kind: str) -> str:
    """Tensors of one decoder layer share a unit (the first dotted component that is a number closes the key:
    `model.layers.12`); an embedding or head is its own unit; the remaining small tensors share one."""
    m = _LAYER_RE.match(name)
    if m:
        return m.group(1)
    if kind in ("embedding", "lm_head", "linear", "other"):
        return name
    return "rest"


def make_units(todo: list[str], stats: dict[str, TensorStat]) -> list[Unit]:
    """Deterministic partition of `todo` into units, in the order of their first tensor; inside a unit, `todo`
    order (which is the order a unit encodes in)."""
    by_key: dict[str, list[str]] = {}
    for n in todo:
        by_key.setdefault(unit_key(n, stats[n].kind), []).append(n)
    return [Unit(i, k, ns) for i, (k, ns) in enumerate(by_key.items())]


def encode_order(names: list[str], new_in_ft: set[str]) -> list[str]:
    """`todo` order: tensors present in the base by name, then new tensors by name."""
    return sorted(names, key=lambda n: (n in new_in_ft, n))


# ---- 1b. budget + prepare -----------------------------------------------------------------------------------------
@dataclass
class Prepared:
    """Everything encode and assemble need for one fine-tune. `common` and `unit_caches` are pickles: each unit
    unpickles its own copy (fresh method object, budgets and cache), so units share no mutable state."""

    method_name: str
    ratio: float | None
    calib: str | None
    plan: Plan
    todo: list[str]
    units: list[Unit]
    store_aux: dict[str, str]  # file name -> path to copy into the delta's hf/
    aux_where: dict[str, str]
    common: bytes  # pickle of {"method", "budgets", "fixed", "cache"}
    # per unit, the per-tensor cache entries sliced to its tensors: a pickle, None (spilled), or under keep_live the
    # dict itself (handed to the unit's job once, then dropped)
    unit_caches: list[bytes | dict | None]
    heal: Any = None  # calib.heal.HealConfig: train the float parts against the fine-tune before writing


def prepare_finetune(
    m: DeltaMethod,
    method_name: str,
    ratio: float | None,
    calib: str | None,
    bsrc: ModelSource,
    fsrc: ModelSource,
    plan: Plan,
    dev: torch.device,
    progress: bool,
    spill: Callable[[int, bytes], None] | None = None,
    keep_live: bool = False,
    heal: Any = None,
) -> Prepared:
    """Budget per tensor, the method's `prepare` hook, and the split of its state into units. `spill(index, blob)`
    takes the per-unit state of units whose slice is large (calibration statistics) out of memory, e.g. to disk;
    those units' `unit_caches` entry is then None and the caller supplies the blob to `unit_job`.

    `keep_live` (one process, each unit encoded once: `compress`): the per-unit slices stay the objects themselves
    instead of pickles. Each slice goes to exactly one unit, so this is the same state without copying it twice
    (a 7B's calibration Hessians are ~22 GB: seconds of pickling and the memory of a second copy)."""
    todo = plan.todo
    if not todo:
        raise MismatchError("the fine-tune is identical to the base: nothing to compress")
    refuse_nonfinite(plan, m.lossless, method_name)
    store_aux, aux_where = _aux_files(bsrc, fsrc)
    aux_bytes = sum(p.stat().st_size for p in store_aux.values())

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
        overhead = _estimate_overhead(todo, m, aux_bytes + 110 * len(store_aux))  # hf/ files and their checksums
        avail = int(target_bytes / RATIO_SLACK - overhead - sum(fixed.values()))
        need = sum(m.min_bytes(s.shape) for s in matrices)
        if avail < need:
            best = dense_total / max(1, need + overhead + sum(fixed.values()))
            if best < ratio * 0.97:
                raise BudgetError(
                    f"ratio {ratio:g}x is not reachable with {method_name}: its smallest delta here is about "
                    f"{best:.1f}x (dense tensors, metadata and per-tensor minimums included)"
                )
            log.warning("%s: %gx is just past reach; storing the smallest delta (about %.2fx)", method_name, ratio, best)
            avail = need
        budgets = m.allocate(matrices, avail)

    ctx = CompressContext(dev, bsrc, fsrc, m, calib, progress, stats, in_process=keep_live)
    if hasattr(m, "prepare"):
        with phase("prepare.method", dev):
            m.prepare(ctx, matrices)  # e.g. layer-by-layer calibration statistics

    t_state = time.perf_counter()
    units = make_units(todo, stats)
    # cache entries keyed by tensor name (calibration statistics, cached spectra) are sliced per unit; the rest
    # (token ids, records, method-wide choices) is common
    all_names = set(bsrc.keys()) | set(fsrc.keys())
    sliced = [
        k for k, v in ctx.cache.items()
        if isinstance(v, dict) and v and all(isinstance(x, str) for x in v) and any(x in all_names for x in v)
    ]
    in_units = set(todo)
    # a sliced entry's keys that belong to no unit (e.g. statistics of unchanged tensors) stay visible to every unit
    common_cache = {
        k: ({n: x for n, x in v.items() if n not in in_units} if k in sliced else v) for k, v in ctx.cache.items()
    }
    # method and budgets in ONE pickle: a method may keep the budget dict by reference (delta-come does)
    common = pickle.dumps({"method": m, "budgets": budgets, "fixed": fixed, "cache": common_cache}, PICKLE_PROTOCOL)
    unit_caches: list[bytes | dict | None] = []
    for u in units:
        # entries are popped as they are pickled: calibration statistics are held once, never twice
        piece = {k: {n: ctx.cache[k].pop(n) for n in u.names if n in ctx.cache[k]} for k in sliced}
        if keep_live:
            unit_caches.append(piece)
            continue
        blob = pickle.dumps(piece, PICKLE_PROTOCOL)
        del piece
        if spill is not None and len(blob) > SPILL_MIN_BYTES:
            spill(u.index, blob)
            unit_caches.append(None)
        else:
            unit_caches.append(blob)
    add_phase("prepare.unit_state", time.perf_counter() - t_state)
    return Prepared(
        method_name, ratio, calib, plan, todo, units, {k: str(v) for k, v in store_aux.items()}, aux_where, common,
        unit_caches, heal,
    )


