"""compress: fine-tune − base → a delta directory at a target TRUE ratio.

Three steps, shared by `deltapack compress` (one fine-tune, in this process) and `deltapack compress-many` (many
fine-tunes, units spread over a process pool or a Ray cluster), so both write the same bytes by construction:

  1. plan (global, per fine-tune): open the checkpoints lazily, check they belong together; one pass reads each
     base tensor once and, for every fine-tune, the matching tensor: equal tensors are dropped, per-tensor
     statistics gathered, the base fingerprint hashed from the bytes read. Then the budget: (dense bf16 bytes of the
     changed tensors) / ratio, less the metadata the directory will need, split over tensors by the method's
     allocator (an unreachable ratio fails here, before any work), and the method's `prepare` hook (e.g.
     calibration statistics). The result, `Prepared`, is split into a common part and one slice per unit.
  2. encode, unit by unit (a unit = one decoder layer's tensors, or one embedding/head, or the small rest): a pure
     function of the plan and the unit's tensors. Each unit starts from a fresh copy of the plan's state (method
     object, budgets, calibration cache), so no state flows between units and their order or placement cannot
     change the bytes. Results go to `WORK/unit-XXXX.safetensors` + `unit-XXXX.json` (the JSON, written last and
     atomically, marks the unit finished: an interrupted run resumes from there).
  3. assemble: the optional whole-model `refine` pass, then every tensor's parts streamed into bounded shards of a
     temp directory (hashed as written), manifest + card last, the true ratio measured on disk, rename into place.

Memory: a few tensors (plus the method's own state: calibration statistics, which `prepare` collects layer by layer,
and, for methods with `refine`, the encoded tensors it needs at once — BitDelta's scale distillation holds every
sign plane, 1/16 of the model in bf16). Tensors are read by byte range (`io.safetensors_file`), never whole shards.

Determinism: CPU reductions depend on the thread count, so the plan and every unit run with the same number of
torch threads: `DELTAPACK_THREADS` if set, else torch's default in the process that starts the run.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import datetime as _dt
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm.auto import tqdm

from deltapack import __version__
from deltapack.errors import BudgetError, DeltapackError, MismatchError
from deltapack.format.codecs import as_2d, get_codec
from deltapack.format.directory import dir_bytes
from deltapack.format.manifest import MANIFEST_NAME, Manifest, ModelRef, TensorEntry, part_key
from deltapack.io.sources import TOKENIZER_FILES, ModelSource, open_model
from deltapack.io.safetensors_file import SafetensorsFile
from deltapack.io.writer import AtomicDir, StreamingShardWriter, write_bytes_atomic, write_json_atomic
from deltapack.methods.base import DeltaMethod, Encoded, TensorJob, TensorStat, get_method

log = logging.getLogger(__name__)

RATIO_SLACK = 1.01  # aim this far above the target so metadata estimates never push the true ratio under it
EMBED_KEYS = ("embed_tokens", "wte", "word_embeddings", "tok_embeddings", "embed_in")
HEAD_KEYS = ("lm_head", "embed_out", "output.weight")
UNIT_FILE = "unit-{:04d}"  # + .safetensors / .json inside a work directory
PICKLE_PROTOCOL = 5
SPILL_MIN_BYTES = 1 << 16  # per-unit state below this stays in the plan file
PLAN_PREFETCH = 3  # plan pass: tensors read ahead (by one thread) of the one on the device
PLAN_HASHERS = 1  # plan pass: threads hashing (sha256 runs ~1-2 GB/s per thread) and comparing tensors already read


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


def encode_threads() -> int:
    """Torch threads for planning and encoding (see the module docstring: results depend on it)."""
    v = os.environ.get("DELTAPACK_THREADS", "").strip()
    if v:
        try:
            n = int(v)
        except ValueError:
            raise DeltapackError(f"DELTAPACK_THREADS must be a positive integer, got {v!r}") from None
        if n < 1:
            raise DeltapackError(f"DELTAPACK_THREADS must be a positive integer, got {v!r}")
        return n
    return torch.get_num_threads()


@contextlib.contextmanager
def pinned_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def created_stamp() -> str:
    """The manifest's `created`: now (UTC), or SOURCE_DATE_EPOCH when set (reproducible builds)."""
    sde = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if sde.isdigit():
        t = _dt.datetime.fromtimestamp(int(sde), _dt.timezone.utc)
    else:
        t = _dt.datetime.now(_dt.timezone.utc)
    return t.replace(microsecond=0).isoformat()


# ---- phase timing (benchmarks) -------------------------------------------------------------------------------------
class PhaseTimes(dict):
    """{phase: seconds}, plus `spans`: (phase, start, end) perf_counter times of the top-level phases."""

    def __init__(self):
        super().__init__()
        self.spans: list[tuple[str, float, float]] = []


_PHASES: contextvars.ContextVar[PhaseTimes | None] = contextvars.ContextVar("deltapack_phases", default=None)


@contextlib.contextmanager
def record_phases() -> Iterator[PhaseTimes]:
    """Seconds per phase of the compress runs inside the block, as {phase: seconds} ("plan", "prepare", "encode",
    "assemble"; sub-phases as "encode.quantize_a" etc., including methods' own). For benchmarks: while recording,
    phase edges synchronise the CUDA device so its queued work is charged to the phase that queued it."""
    d = PhaseTimes()
    token = _PHASES.set(d)
    try:
        yield d
    finally:
        _PHASES.reset(token)


def add_phase(name: str, seconds: float) -> None:
    d = _PHASES.get()
    if d is not None:
        d[name] = d.get(name, 0.0) + seconds


@contextlib.contextmanager
def phase(name: str, device: torch.device | None = None):
    """Charge the block's wall time to `name` when phases are being recorded (no cost otherwise)."""
    d = _PHASES.get()
    if d is None:
        yield
        return
    _sync(device)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        _sync(device)
        t1 = time.perf_counter()
        d[name] = d.get(name, 0.0) + t1 - t0
        if "." not in name:
            d.spans.append((name, t0, t1))


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


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
    # method-owned scratch (e.g. calibration statistics). After `prepare`, a top-level entry that is a dict keyed by
    # tensor names is split per unit (each unit sees its own tensors' items); anything else is copied to every unit.
    # Keep per-tensor state in that shape, so a worker loads only its unit's share.
    cache: dict[str, Any] = field(default_factory=dict)
    # True when the state `prepare` leaves in `cache` is consumed by this same process (`compress`), never pickled to
    # another: device tensors may then stay on the device
    in_process: bool = False

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


# ---- 1. plan ----------------------------------------------------------------------------------------------------------
@dataclass
class _Plan:
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


def plan_pass(base: ModelSource, fts: list[ModelSource], device: torch.device, progress: bool) -> list[_Plan]:
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
            _Plan(sorted(a["changed"]), sorted(a["unchanged"]), new_in_ft, sorted(bk - fk), a["base_rows"], fingerprint, a["stats"])
        )
    return plans


def _plan(base: ModelSource, ft: ModelSource, device: torch.device, progress: bool) -> _Plan:
    return plan_pass(base, [ft], device, progress)[0]


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


def check_settings(method: str, ratio: float | None, params: dict | None, calib: str | None) -> tuple[DeltaMethod, float | None]:
    """Validate method, knobs, ratio and calibration file before any model is opened."""
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
    plan: _Plan
    todo: list[str]
    units: list[Unit]
    store_aux: dict[str, str]  # file name -> path to copy into the delta's hf/
    aux_where: dict[str, str]
    common: bytes  # pickle of {"method", "budgets", "fixed", "cache"}
    # per unit, the per-tensor cache entries sliced to its tensors: a pickle, None (spilled), or under keep_live the
    # dict itself (handed to the unit's job once, then dropped)
    unit_caches: list[bytes | dict | None]


def prepare_finetune(
    m: DeltaMethod,
    method_name: str,
    ratio: float | None,
    calib: str | None,
    bsrc: ModelSource,
    fsrc: ModelSource,
    plan: _Plan,
    dev: torch.device,
    progress: bool,
    spill: Callable[[int, bytes], None] | None = None,
    keep_live: bool = False,
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
        overhead = _estimate_overhead(todo, m, aux_bytes)
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
        unit_caches,
    )


# ---- 2. encode ----------------------------------------------------------------------------------------------------
@dataclass
class UnitJob:
    """One unit of one fine-tune, ready to encode: its own copy of the plan state."""

    unit: Unit
    ft: ModelSource
    plan: _Plan
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
            _append_line(log_path, f"encode {j.label} {j.unit.index} {j.unit.key} pid={os.getpid()}")
    return done


def _append_line(path: Path, line: str) -> None:
    # one write() of a short line with O_APPEND: lines of concurrent workers do not interleave
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def _encode_one(n: str, m: DeltaMethod, ctx: CompressContext, plan: _Plan, budgets, fixed, base_tensor=None,
                ft_tensor=None) -> tuple[Encoded, Any]:
    from deltapack.methods.raw import exact_dense

    dev = ctx.device
    f = ft_tensor if ft_tensor is not None else ctx.finetuned.get(n)
    b = None
    if n not in plan.new_in_ft:
        b = base_tensor if base_tensor is not None else ctx.base.get(n)
    rows = plan.base_rows.get(n)
    new_rows = None
    if rows is not None:
        new_rows = f[rows:].to(torch.bfloat16) if f.is_floating_point() else f[rows:]
        f = f[:rows]
    shape2 = as_2d(tuple(f.shape))
    with phase("encode.to_device", dev):
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
    with phase("encode.method", dev):
        enc = m.encode(job, ctx)
    if enc.nbytes() > job.budget_bytes * 1.02 + 64:
        log.warning("%s: %s stored %d bytes over a %d-byte budget", n, m.name, enc.nbytes(), job.budget_bytes)
    return enc, new_rows


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
    writer = StreamingShardWriter(tmp, "delta", max_shard_bytes, metadata={"format": "deltapack"})
    entries: dict[str, TensorEntry] = {}
    try:
        for n in tqdm(prep.todo, desc="assemble", disable=not progress, leave=False):
            enc, new_rows = res.load(n)
            if n in refined:
                enc = refined.pop(n)
            entries[n] = _write_entry(writer, n, enc, new_rows, fsrc, prep.plan.stats[n], prep.plan)
        files = writer.close()
    except BaseException:
        writer.abort()
        raise
    for n, e in entries.items():
        # a tensor whose budget bought nothing (e.g. rank 0) has no parts and decodes to zeros
        e.file = writer.location[part_key(n, e.parts[0])] if e.parts else ""
    if Path(work).resolve().parent == Path(tmp).resolve():
        shutil.rmtree(work)
    if prep.store_aux:
        hf_dir = tmp / "hf"
        hf_dir.mkdir()
        for name, p in prep.store_aux.items():
            shutil.copyfile(p, hf_dir / name)
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
        aux=prep.aux_where,
        calibration=ctx.cache.get("calibration_record") or res.calibration_record,
    )
    # the card states the true ratio, which depends on the card's own size: two passes settle it
    card_path = tmp / "README.md"
    write_bytes_atomic(card_path, _card(manifest, 0.0).encode())
    write_bytes_atomic(tmp / MANIFEST_NAME, manifest.dumps().encode())
    for _ in range(2):
        true_ratio = manifest.dense_delta_bytes / dir_bytes(tmp)
        write_bytes_atomic(card_path, _card(manifest, true_ratio).encode())
    true_ratio = manifest.dense_delta_bytes / dir_bytes(tmp)
    if prep.ratio is not None and true_ratio < prep.ratio * 0.97:
        raise BudgetError(
            f"{prep.method_name} reached only {true_ratio:.2f}x on disk against a {prep.ratio:g}x target "
            "(per-tensor minimums or metadata too large for this model)"
        )
    log.info("wrote %s: %d tensors, true ratio %.2fx", out_label, len(entries), true_ratio)
    return true_ratio


def _write_entry(writer, n, enc: Encoded, new_rows, fsrc: ModelSource, stat: TensorStat, plan: _Plan) -> TensorEntry:
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


# ---- the one-fine-tune driver ---------------------------------------------------------------------------------------
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
    m, ratio = check_settings(method, ratio, params, calib)
    out = Path(out)
    if out.exists() and not overwrite:
        raise DeltapackError(f"output {out} already exists (pass --overwrite to replace it)")

    dev = resolve_device(device)
    bsrc = open_model(base, trust_remote_code=trust_remote_code)
    fsrc = open_model(finetuned, trust_remote_code=trust_remote_code)
    with pinned_threads(encode_threads()):
        with phase("plan", dev):
            plan = _plan(bsrc, fsrc, dev, progress)
        with phase("prepare", dev):
            prep = prepare_finetune(m, method, ratio, calib, bsrc, fsrc, plan, dev, progress, keep_live=True)
        created = created_stamp()
        with AtomicDir(out, overwrite=overwrite) as tmp:
            work = tmp / ".work"
            pbar = tqdm(total=len(prep.todo), desc=f"compress [{method}]", disable=not progress)
            t0 = time.perf_counter()
            with phase("encode", dev):
                for u in prep.units:
                    encode_units([unit_job(prep, u.index, fsrc, work)], bsrc, dev, on_tensor=lambda: pbar.update(1))
            pbar.close()
            log.debug("encoded %d units in %.1f s", len(prep.units), time.perf_counter() - t0)
            with phase("assemble", dev):
                assemble(prep, bsrc, fsrc, work, tmp, device=dev, max_shard_bytes=max_shard_bytes,
                         progress=progress, created=created, out_label=out)
    return Path(out)

