"""Registered deltas ("tenants") and the memory tiers they live in.

Tiers, fastest first:
  device  packed deltas on the compute device, installed in a slot the kernels index; byte budget --gpu-delta-bytes
          (on a CPU-only server the device is the CPU: same tier logic and accounting, the move is free)
  host    packed deltas in CPU memory, LRU, byte budget --cpu-delta-bytes (skips unpacking on the next promotion)
  disk    the delta directory itself; every registered tenant is always there (a peft LoRA adapter directory is
          first stored exactly as a delta, codec `lora`, in the server's scratch directory: `import_lora`)

A request needs its tenant on the device tier. `acquire` promotes it (disk -> pack -> device, or host -> device),
evicting least-recently-used device tenants that no running request pins (they drop to the host tier, or to disk
when the host tier is full). When the device budget is pinned by running requests the new request waits.
Counters: loads[tier] = deltas brought into a tier (disk reads for host, promotions for device), hits[tier] =
acquisitions served from that tier without a disk read, evictions[tier] = deltas pushed out of a tier.

All mutation happens under `lock` (the engine holds it around each step, so the kernels never see a half-installed
tenant); registration does its slow part (checksums, packing) outside it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deltapack.errors import DeltapackError, FormatError, InputError, MismatchError
from deltapack.format.codecs import get_codec
from deltapack.format.directory import DeltaDir
from deltapack.import_lora import is_peft_adapter
from deltapack.io.sources import TOKENIZER_FILES
from deltapack.kernels import PackedDelta
from deltapack.serve.locks import FairRLock

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/+-]{0,127}$")
# config keys that do not change what a forward computes (training knobs, bookkeeping, token ids, vocabulary size:
# vocabulary growth is served; tie_word_embeddings is resolved per tenant)
_BENIGN_CONFIG_KEYS = {
    "vocab_size", "tie_word_embeddings", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
    "architectures", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "use_cache", "initializer_range", "attention_dropout", "hidden_dropout", "embd_pdrop", "resid_pdrop",
    "output_attentions", "output_hidden_states", "return_dict", "torchscript", "id2label", "label2id",
    "problem_type", "task_specific_params", "finetuning_task", "max_position_embeddings", "quantization_config",
    "chat_template", "pretraining_tp",
}


class ConflictError(DeltapackError):
    """A delta of that name is already loaded."""


class TooLargeError(DeltapackError):
    """A delta does not fit the device tier's budget at all."""


@dataclass
class Tenant:
    name: str
    path: Path
    delta: DeltaDir
    placements: dict[str, list[tuple[str, bool]]]  # tensor name -> [(site key, replace)]
    vocab_size: int
    eos_ids: set[int]
    tokenizer: object | None
    disk_bytes: int
    created: int = field(default_factory=lambda: int(time.time()))
    tier: str = "disk"
    packed: dict[str, PackedDelta] | None = None  # by tensor name, on the tier's device
    nbytes: int = 0
    slot: int | None = None
    pins: int = 0
    removed: bool = False
    imported: Path | None = None  # a peft adapter's delta, written by this server into its scratch space


def _all_finite(t: torch.Tensor) -> bool:
    # one reduction pass, no bool tensor of t's size (isfinite(t).all() is ~7x slower on a CPU): min and max
    # propagate NaN, and reach +-inf when any element is infinite
    lo, hi = torch.aminmax(t.reshape(-1))
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _check_finite(name: str, tname: str, p: PackedDelta) -> None:
    """Refuse a delta holding NaN or inf: served, it turns its tenant's logits into NaN (and each row that uses it)."""
    for t in list(p.tensors.values()) + ([p.extra_rows] if p.extra_rows is not None else []):
        if t.is_floating_point() and t.numel() and not _all_finite(t):
            raise FormatError(f"delta {name}: tensor {tname} holds non-finite values (NaN or inf) once decoded; refusing to serve it")


PACK_STATS = {"device_fallbacks": 0}  # tensors a work device had no memory to pack (pack_tensor), process-wide


def pack_tensor(d: DeltaDir, tname: str, dtype: torch.dtype, kernels, device, base_source=None,
                label: str | None = None, work_device=None) -> PackedDelta | None:
    """One tensor of a delta whose shards `d` holds verified (load_verified), packed for `kernels` in `dtype` on
    `device`. A lossless tensor (bits against the base) needs the base's tensor: None without `base_source`.
    `label`: the delta's name in errors (default: its directory).

    `work_device`: where the packing itself runs; default the host. On a GPU, the parts go there and every tensor
    of the layout is made there (the packers follow their inputs' device), then the layout moves to `device`: on the
    host, a sparse delta's seeded masks hash every element of its matrices, 70-140 s per 7B delta on two cores
    (bench/results/serving_pack_cpu_7b_layer.json). Lossless tensors (decoded against the base) pack on the host,
    and so does a tensor the device has no memory for (counted in PACK_STATS, logged)."""
    te = d.entry(tname)
    shape = list(te.shape)
    if te.base_rows is not None:
        shape[0] = te.base_rows
    if len(shape) > 2:
        raise FormatError(f"delta {label or d.path}: {tname} has {len(shape)} dimensions; only matrices and vectors "
                          "are served")
    codec, params = te.codec, te.params
    if get_codec(codec).needs_base:
        if base_source is None:
            return None
        # bits against the base (lossless): the float delta from the base tensor we serve, kept dense
        base = base_source.get(tname) if te.in_base else None
        full = d.decode(tname, base=base)  # zstd contexts are per thread (format/entropy.py)
        parts = {"values": full[: shape[0]].reshape(shape)}
        new_rows = full[shape[0]:] if te.base_rows is not None else None
        codec, params = "dense", {}
        work_device = None
    else:
        parts = d.parts(tname)
        new_rows = parts.pop("new_rows", None)
    p = None
    if work_device is not None and torch.device(work_device).type != "cpu":
        try:
            p = kernels.pack(codec, params, {k: v.to(work_device) for k, v in parts.items()}, tuple(shape),
                             dtype=dtype, device=device)
        except torch.OutOfMemoryError:
            PACK_STATS["device_fallbacks"] += 1
            log.warning("delta %s: no memory on %s to pack %s there; packed on the host", label or d.path,
                        work_device, tname)
    if p is None:
        # thread-safe in every backend (the Triton one locks only its launch masks): deltas pack in parallel
        p = kernels.pack(codec, params, parts, tuple(shape), dtype=dtype, device=device)
    if new_rows is not None:
        p.extra_rows = new_rows.to(dtype).reshape(-1, shape[1]).to(device)
    return p


@dataclass
class Prepacked:
    """A delta packed before the served model exists (the server's start: beside the base load). Only packing that
    needs no base tensor; every check against the base is still made when it is registered."""

    dtype: torch.dtype
    kernels: object
    packed: dict[str, PackedDelta | None]  # by tensor name; None: needs the base (packed at registration)
    seconds: float


def prepack(path: str | Path, dtype: torch.dtype, kernels, work_device=None) -> Prepacked:
    """Read, verify (sha256 of every shard) and pack a delta's tensors into host memory, without the served model
    (the packing itself on `work_device`, see pack_tensor)."""
    t0 = time.perf_counter()
    d = DeltaDir.open(path)
    d.check(shards=False)
    d.load_verified()
    try:
        packed = {tname: pack_tensor(d, tname, dtype, kernels, "cpu", work_device=work_device)
                  for tname in d.manifest.tensors}
    finally:
        d.drop_verified()
    return Prepacked(dtype, kernels, packed, time.perf_counter() - t0)


def start_prepacks(paths: list[str | Path], dtype: torch.dtype, kernels,
                   workers: int | None = None, work_device=None) -> dict[str, Future]:
    """`prepack` every delta in background threads (reads, hashing, decoding and packing release the GIL; default
    one thread per 4 CPU cores, torch's own ops use several): {resolved path: future}, for
    DeltaTiers.use_prepacked. peft adapters are left out (they are converted at registration)."""
    todo = [str(Path(p).resolve()) for p in paths if not is_peft_adapter(p)]
    if not todo:
        return {}
    n = workers if workers is not None else (os.cpu_count() or 1) // 4
    pool = ThreadPoolExecutor(max(1, min(n, len(todo))), thread_name_prefix="deltapack-prepack")
    futures = {p: pool.submit(prepack, p, dtype, kernels, work_device) for p in dict.fromkeys(todo)}
    pool.shutdown(wait=False)  # the threads end with their work; the futures keep the results
    return futures


def _config_diff(base: dict, tenant: dict) -> list[str]:
    keys = (set(base) | set(tenant)) - _BENIGN_CONFIG_KEYS
    return sorted(k for k in keys if base.get(k) != tenant.get(k) and not k.startswith("_"))


class DeltaTiers:
    def __init__(self, runner, *, device_bytes: int, host_bytes: int, base_name: str = "base",
                 pack_device: torch.device | None = None):
        self.runner = runner
        self.pack_device = pack_device  # where deltas are packed (pack_tensor's work_device); None: the host
        self.base_name = base_name
        self.budget = {"device": int(device_bytes), "host": int(host_bytes)}
        self.lock = FairRLock()  # the engine takes it every step; admin calls must still get their turn
        self.tenants: dict[str, Tenant] = {}
        self.device_lru: OrderedDict[str, Tenant] = OrderedDict()
        self.host_lru: OrderedDict[str, Tenant] = OrderedDict()
        self.loads = {"device": 0, "host": 0}
        self.hits = {"device": 0, "host": 0}
        self.evictions = {"device": 0, "host": 0}
        self._free_slots: list[int] = []
        self._next_slot = 0
        self._base_fingerprint: str | None = None
        self._fingerprint_future: Future | None = None  # set by use_fingerprint: computed while the base loads
        self._fingerprint_lock = threading.Lock()  # deltas prepared in parallel hash the base once
        self._scratch: Path | None = None  # where imported peft adapters are stored as deltas while registered
        self._scratch_lock = threading.Lock()
        self._prepacked: dict[str, Future] = {}  # set by use_prepacked: deltas packed while the base loaded
        # where registration time goes (seconds summed over deltas; /health's startup notes)
        self.timings = {"verify_s": 0.0, "fingerprint_wait_s": 0.0, "pack_s": 0.0, "prepack_s": 0.0,
                        "prepack_wait_s": 0.0}
        self._timings_lock = threading.Lock()
        # merged copies of hot tenants' weights (deltapack.serve.merged.MergedWeights), set by build_server: their
        # memory is reported beside the tiers', and a tenant leaving the device tier drops its copy
        self.merged = None

    def _time(self, key: str, seconds: float) -> None:
        with self._timings_lock:
            self.timings[key] = round(self.timings[key] + seconds, 4)

    def use_fingerprint(self, fut: Future) -> None:
        """The served base's fingerprint, being computed elsewhere (build_server hashes it in a thread while the
        base loads): the first delta that needs it waits for it instead of reading the whole base again."""
        self._fingerprint_future = fut

    def base_fingerprint(self) -> str:
        with self._fingerprint_lock:
            if self._base_fingerprint is None:
                t0 = time.perf_counter()
                fut, self._fingerprint_future = self._fingerprint_future, None
                if fut is not None:
                    try:
                        self._base_fingerprint = fut.result()
                    except Exception as e:  # the background read failed: hash it here, reporting any error anew
                        log.warning("background base fingerprint failed (%s): computing it again", e)
                if self._base_fingerprint is None:
                    from deltapack.compress import base_fingerprint

                    self._base_fingerprint = base_fingerprint(self.runner.source)
                self._time("fingerprint_wait_s", time.perf_counter() - t0)
            return self._base_fingerprint

    # ---- registration -------------------------------------------------------------------------------------------
    def use_prepacked(self, futures: dict[str, Future]) -> None:
        """Deltas being packed already (start_prepacks, before the served model existed): registering one of these
        paths takes its packed tensors instead of packing again, once every check against the base has passed."""
        self._prepacked.update(futures)

    def _take_prepacked(self, path: Path) -> Prepacked | None:
        fut = self._prepacked.pop(str(path.resolve()), None)
        if fut is None:
            return None
        t0 = time.perf_counter()
        try:
            pre = fut.result()
        except Exception:  # packed again at registration, which raises the error where it belongs
            return None
        finally:
            self._time("prepack_wait_s", time.perf_counter() - t0)
        self._time("prepack_s", pre.seconds)
        r = self.runner
        if pre.dtype != r.dtype or pre.kernels is not r.state.kernels:
            return None
        return pre

    def prepare(self, name: str, path: str | Path, *, verify_base: bool = True) -> Tenant:
        """Validate a delta against the served base and pack it (slow part of a load; no lock held)."""
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise InputError(f"bad delta name {name!r}: 1-128 characters of letters, digits and ._:@/+-")
        if name == self.base_name:
            raise ConflictError(f"{name!r} is the base model's name")
        imported = None
        if is_peft_adapter(path):  # a peft LoRA adapter: stored exactly as a delta in this server's scratch space
            imported = self._import_lora(path)
        try:
            t = self._prepare(name, imported or path, verify_base=verify_base)
        except BaseException:
            if imported is not None:
                shutil.rmtree(imported.parent, ignore_errors=True)
            raise
        if imported is not None:
            t.path, t.imported = Path(path).resolve(), imported
        return t

    def _import_lora(self, path: str | Path) -> Path:
        from deltapack.import_lora import import_lora

        with self._scratch_lock:  # deltas may be prepared in parallel (register_many)
            if self._scratch is None:
                self._scratch = Path(tempfile.mkdtemp(prefix="deltapack-lora-"))
        out = Path(tempfile.mkdtemp(dir=self._scratch)) / "delta"
        # the served base is the base by construction; its fingerprint is not needed (peft adapters carry none)
        try:
            import_lora(path, self.runner.path, out, base_source=self.runner.source, fingerprint=False)
        except BaseException:
            shutil.rmtree(out.parent, ignore_errors=True)
            raise
        return out

    def close(self) -> None:
        """Remove the scratch copies of imported LoRA adapters."""
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def _prepare(self, name: str, path: str | Path, *, verify_base: bool) -> Tenant:
        t0 = time.perf_counter()
        d = DeltaDir.open(path)
        d.check(shards=False)  # the shards are checked once, as they are read for packing (_pack: load_verified)
        self._time("verify_s", time.perf_counter() - t0)
        man = d.manifest
        r = self.runner
        if man.base.structure and r.source.structure_hash() != man.base.structure:
            raise MismatchError(f"delta {name} was made against a different base ({man.base.id}): tensor names/shapes differ")
        if verify_base and man.base.fingerprint:
            if self.base_fingerprint() != man.base.fingerprint:
                raise MismatchError(f"delta {name}: the served base's weights differ from the base it was made against ({man.base.id})")
        if man.removed:
            raise MismatchError(f"delta {name} drops tensors of the base ({', '.join(man.removed[:3])}): cannot be served on it")
        for tname, te in man.tensors.items():  # a "new" tensor the base has would replace the base's weight outright
            if te.in_base != (tname in r.source):
                raise FormatError(f"delta {name}: {tname[:200]} is stored as {'a change to' if te.in_base else 'new beside'} "
                                  f"the base, which {'lacks' if te.in_base else 'has'} it")
        tcfg = {}
        hf = d.path / "hf"
        if man.aux.get("config.json") == "delta" and (hf / "config.json").is_file():
            try:
                tcfg = json.loads((hf / "config.json").read_text())
            except json.JSONDecodeError as e:
                raise FormatError(f"delta {name}: hf/config.json is not valid JSON: {e}") from e
            diff = _config_diff(r.source.config(), tcfg)
            if diff:
                raise MismatchError(f"delta {name}: the fine-tune's architecture differs from the base in {', '.join(diff[:5])}")
        tied = bool(tcfg.get("tie_word_embeddings", r.tied)) if tcfg else r.tied
        placements, vocab = self._place(name, d, tied)
        tok = r.tokenizer
        if any(man.aux.get(n) == "delta" for n in TOKENIZER_FILES):
            from deltapack.serve.model import load_tokenizer

            tok = load_tokenizer(hf) or r.tokenizer
        from deltapack.serve.model import eos_token_ids

        eos = eos_token_ids(hf, tcfg, tok) if tcfg else set(r.eos_ids)
        t = Tenant(name, d.path.resolve(), d, placements, vocab, eos or set(r.eos_ids), tok, d.total_bytes())
        pre = self._take_prepacked(d.path)
        if pre is not None and all(pre.packed.get(n) is not None for n in placements):
            t.packed = {tname: self._placed(t, tname, pre.packed[tname]) for tname in placements}
        else:
            t.packed = self._pack(t, "cpu")
        t.nbytes = sum(p.nbytes() for p in t.packed.values())
        if t.nbytes > self.budget["device"]:
            raise TooLargeError(
                f"delta {name} needs {t.nbytes} bytes packed, more than the device tier's budget of {self.budget['device']} (--gpu-delta-bytes)"
            )
        return t

    def _place(self, name: str, d: DeltaDir, tied: bool) -> tuple[dict[str, list[tuple[str, bool]]], int]:
        """Map every delta tensor onto the wrapped model's sites; check shapes."""
        r = self.runner
        out: dict[str, list[tuple[str, bool]]] = {}
        vocab = r.vocab_size
        for tname, te in d.manifest.tensors.items():
            site = r.sites.get(tname)
            if site is None:
                raise MismatchError(f"delta {name}: tensor {tname} has no place in the base model (not a linear, embedding or norm parameter)")
            shape = list(te.shape)
            if te.base_rows is not None:
                if site.kind not in ("embedding", "linear") or site.role != "weight" or te.base_rows != site.shape[0]:
                    raise MismatchError(f"delta {name}: {tname} grows rows {te.base_rows} -> {shape[0]} where the base has {list(site.shape)}")
                shape[0] = te.base_rows
            if tuple(shape) != tuple(site.shape):
                raise MismatchError(f"delta {name}: {tname} has shape {list(te.shape)}, the base {list(site.shape)}")
            replace = (not te.in_base) and site.present
            out[tname] = [(tname, replace)]
            if tname == r.embed_key:
                if te.base_rows is not None:
                    vocab = te.shape[0]
                if tied and r.tied and r.head_key not in d.manifest.tensors:
                    out[tname].append((r.head_key, replace))  # the tenant's head is its (changed) embedding
        if r.tied and not tied and r.head_key not in d.manifest.tensors:
            raise MismatchError(f"delta {name}: the fine-tune unties its output head but stores none")
        if r.head_key in d.manifest.tensors and d.manifest.tensors[r.head_key].base_rows is not None:
            vocab = max(vocab, d.manifest.tensors[r.head_key].shape[0])
        return out, vocab

    def _pack(self, t: Tenant, device) -> dict[str, PackedDelta]:
        """Pack every tensor from shard bytes read once and checked against their sha256 (`load_verified`): a delta
        evicted to the disk tier and rewritten there since is refused on its next promotion, never served."""
        t0 = time.perf_counter()
        t.delta.load_verified()
        self._time("verify_s", time.perf_counter() - t0)
        t0 = time.perf_counter()
        try:
            return self._pack_verified(t, device)
        finally:
            t.delta.drop_verified()
            self._time("pack_s", time.perf_counter() - t0)

    def _pack_verified(self, t: Tenant, device) -> dict[str, PackedDelta]:
        r = self.runner
        packed: dict[str, PackedDelta] = {}
        for tname in t.placements:
            packed[tname] = self._placed(t, tname, pack_tensor(t.delta, tname, r.dtype, r.state.kernels, device,
                                                             r.source, label=t.name, work_device=self.pack_device))
        return packed

    @staticmethod
    def _placed(t: Tenant, tname: str, p: PackedDelta) -> PackedDelta:
        """A packed tensor made ready for its sites: whether it replaces the base's weight, and finite."""
        p.replace = any(rep for _, rep in t.placements[tname])
        _check_finite(t.name, tname, p)
        return p

    def add(self, t: Tenant) -> None:
        with self.lock:
            if t.name in self.tenants:
                raise ConflictError(f"a delta named {t.name!r} is already loaded")
            self.tenants[t.name] = t
            self.loads["host"] += 1
            self._put_host(t)

    def register(self, name: str, path: str | Path, *, verify_base: bool = True) -> Tenant:
        with self.lock:
            if name in self.tenants:
                raise ConflictError(f"a delta named {name!r} is already loaded")
        t = self.prepare(name, path, verify_base=verify_base)
        try:
            self.add(t)
        except ConflictError:
            if t.imported is not None:
                shutil.rmtree(t.imported.parent, ignore_errors=True)
            raise
        log.info("loaded delta %s from %s (%d bytes packed)", name, t.path, t.nbytes)
        return t

    def register_many(self, items: list[tuple[str, str | Path]], *, verify_base: bool = True,
                      workers: int | None = None) -> list[Tenant]:
        """`register` for several deltas (the server's start): prepared in parallel threads (reads, checksums,
        decoding and packing release the GIL), added in the given order. The first failure in that order is raised
        (after every preparation ended); nothing is added then."""
        seen: set[str] = set()
        with self.lock:
            for name, _ in items:
                if name in self.tenants or name in seen:
                    raise ConflictError(f"a delta named {name!r} is already loaded")
                seen.add(name)
        if not items:
            return []
        n = workers or min(len(items), os.cpu_count() or 1, 8)
        with ThreadPoolExecutor(max(1, n), thread_name_prefix="deltapack-load") as pool:
            futs = [pool.submit(self.prepare, name, path, verify_base=verify_base) for name, path in items]
        prepared: list[Tenant] = []
        error: BaseException | None = None
        for f in futs:
            e = f.exception()
            if e is not None:
                error = error or e
            else:
                prepared.append(f.result())
        if error is not None:
            for t in prepared:
                if t.imported is not None:
                    shutil.rmtree(t.imported.parent, ignore_errors=True)
            raise error
        for t in prepared:
            self.add(t)
            log.info("loaded delta %s from %s (%d bytes packed)", t.name, t.path, t.nbytes)
        return prepared

    def remove(self, name: str) -> Tenant:
        with self.lock:
            t = self.tenants.pop(name, None)
            if t is None:
                raise KeyError(name)
            t.removed = True
            if t.pins == 0:
                self._drop(t)
            return t

    # ---- tiers ----------------------------------------------------------------------------------------------------
    def set_budget(self, tier: str, nbytes: int) -> None:
        """Change a tier's byte budget, evicting least-recently-used unpinned deltas until it fits."""
        with self.lock:
            self.budget[tier] = int(nbytes)
            if tier == "device":
                for t in list(self.device_lru.values()):
                    if self.tier_bytes("device") <= self.budget["device"]:
                        break
                    if t.pins == 0:
                        self._evict_device(t)
            else:
                while self.tier_bytes("host") > self.budget["host"] and self.host_lru:
                    _, old = self.host_lru.popitem(last=False)
                    self.evictions["host"] += 1
                    self._to_disk(old)

    def tier_bytes(self, tier: str) -> int:
        if tier == "device":
            return sum(t.nbytes for t in self.device_lru.values())
        if tier == "host":
            return sum(t.nbytes for t in self.host_lru.values())
        return sum(t.disk_bytes for t in self.tenants.values())

    def resident(self, tier: str) -> int:
        if tier == "device":
            return len(self.device_lru)
        if tier == "host":
            return len(self.host_lru)
        return len(self.tenants)

    def acquire(self, t: Tenant) -> bool:
        """Make `t` device-resident and pin it. False: no room now (the device budget is pinned by running work)."""
        with self.lock:
            if t.removed:
                raise KeyError(t.name)
            if t.tier == "device":
                self.hits["device"] += 1
                self.device_lru.move_to_end(t.name)
                t.pins += 1
                return True
            if t.nbytes > self.budget["device"]:
                raise TooLargeError(f"delta {t.name} ({t.nbytes} bytes) exceeds the device tier budget {self.budget['device']}")
            if not self._make_room(t.nbytes):
                return False
            if t.tier == "host":
                self.hits["host"] += 1
                del self.host_lru[t.name]
                packed = t.packed
            else:
                self.loads["host"] += 1  # read from disk and unpacked on the host on the way up
                packed = self._pack(t, "cpu")
                t.nbytes = sum(p.nbytes() for p in packed.values())
            dev = self.runner.device
            t.packed = {k: p.to(dev) for k, p in packed.items()}
            t.slot = self._alloc_slot()
            self._install(t)
            t.tier = "device"
            self.device_lru[t.name] = t
            self.loads["device"] += 1
            t.pins += 1
            return True

    def release(self, t: Tenant) -> None:
        with self.lock:
            t.pins = max(0, t.pins - 1)
            if t.removed and t.pins == 0:
                self._drop(t)

    def _make_room(self, need: int) -> bool:
        used = self.tier_bytes("device")
        if used + need <= self.budget["device"]:
            return True
        victims = []
        for name, v in self.device_lru.items():  # least recently used first
            if used + need <= self.budget["device"]:
                break
            if v.pins == 0:
                victims.append(v)
                used -= v.nbytes
        if used + need > self.budget["device"]:
            return False
        for v in victims:
            self._evict_device(v)
        return True

    def _install(self, t: Tenant) -> None:
        assert t.packed is not None and t.slot is not None
        for tname, places in t.placements.items():
            for key, _ in places:
                self.runner.layer(key).set(t.slot, t.packed[tname])

    def _uninstall(self, t: Tenant) -> None:
        if t.slot is None:
            return
        if self.merged is not None:  # before the slot's deltas go: a merged copy never outlives its delta
            self.merged.drop_slot(t.slot, "unloaded")
        for places in t.placements.values():
            for key, _ in places:
                self.runner.layer(key).set(t.slot, None)
        self._free_slots.append(t.slot)
        t.slot = None

    def _alloc_slot(self) -> int:
        if self._free_slots:
            self._free_slots.sort()
            return self._free_slots.pop(0)
        s = self._next_slot
        self._next_slot += 1
        return s

    def _evict_device(self, v: Tenant) -> None:
        self._uninstall(v)
        self.device_lru.pop(v.name, None)
        self.evictions["device"] += 1
        v.packed = {k: p.to("cpu") for k, p in (v.packed or {}).items()}
        v.tier = "host"
        self._put_host(v)
        log.debug("evicted %s from the device tier", v.name)

    def _put_host(self, t: Tenant) -> None:
        """Keep `t`'s packed delta in the host tier if the budget allows (evicting LRU host entries), else disk."""
        if t.removed or t.nbytes > self.budget["host"]:
            self._to_disk(t)
            return
        while self.tier_bytes("host") + t.nbytes > self.budget["host"] and self.host_lru:
            _, old = self.host_lru.popitem(last=False)
            self.evictions["host"] += 1
            self._to_disk(old)
        t.tier = "host"
        self.host_lru[t.name] = t

    def _to_disk(self, t: Tenant) -> None:
        self.host_lru.pop(t.name, None)
        t.packed = None
        t.tier = "disk"

    def _drop(self, t: Tenant) -> None:
        if t.tier == "device":
            self._uninstall(t)
            self.device_lru.pop(t.name, None)
        self._to_disk(t)
        if t.imported is not None:
            shutil.rmtree(t.imported.parent, ignore_errors=True)

    def snapshot(self) -> dict:
        with self.lock:
            return {
                "registered": len(self.tenants),
                "resident": {k: self.resident(k) for k in ("device", "host", "disk")},
                "bytes": {k: self.tier_bytes(k) for k in ("device", "host", "disk")},
                "budget": dict(self.budget),
                "loads": dict(self.loads),
                "hits": dict(self.hits),
                "evictions": dict(self.evictions),
                "tenants": {
                    n: {"tier": t.tier, "bytes": t.nbytes, "slot": t.slot, "pins": t.pins} for n, t in self.tenants.items()
                },
                "merged": self.merged.snapshot() if self.merged is not None else None,
            }

