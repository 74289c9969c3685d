"""Merged weights of hot tenants (issue 26): a forward whose rows all belong to one tenant reads no delta at all.

The delta kernels add a tenant's delta on top of the base's GEMMs, so a decode step costs at least the base's bytes
plus every present tenant's packed bytes (the 1/(1+k/R) bound). When a single tenant owns every row of a forward
(k = 1 decode, its prefill chunks) that tenant's linear weights can instead be kept merged, W_base + dW in the model
dtype: the forward then runs the base-shaped GEMMs on the merged weights, exactly the base's work, and beats the
bound. The cost is memory: a full copy of the tenant's changed linear weights (about the base's linear bytes).

`MergedWeights` (one per server, held by the tiers) keeps such copies:
  * built from the same packed deltas the kernels read (`deltapack.kernels.schedule.dense_delta`, summed with the
    base weight in float32, rounded once to the model dtype), a few sites per engine step so that a merge never
    stalls the running batch for long; an entry is used only once complete, and every site records the
    PackedDelta it came from, which the layer checks before using the copy (`MergedEntry.weight`);
  * hotness from recent forwards: per tenant, a decayed count of forwards it had to itself plus its share of the
    rows of mixed prefill chunks (half-life HALF_LIFE_FORWARDS forwards); the hottest tenant above MIN_SOLO_SCORE is
    merged when memory allows; an entry whose score cools below COOL_SCORE is dropped, as is one the measured costs
    keep skipping;
  * memory: `budget` bytes (None = auto: limited by free device memory only) and, on a GPU, never more than the free
    memory minus what other work may still claim (the device tier's unused budget, the dynamic KV cache's worst case,
    HEADROOM_BYTES); an allocation failure while building drops the entry and backs off;
  * the choice per forward comes from measured costs (`StepCosts`): wall seconds of the engine's forwards per
    (phase, path, size bucket); merged is used where it measured cheaper than the kernel path at that size, each
    path sampled PROBES times first and the loser re-measured every REPROBE_EVERY choices;
  * a mixed prefill chunk holding a merged tenant's prompts is split when the measured costs say its rows on the
    copy plus the rest beat the mixed chunk (`prefill_split`, called by the engine when it forms chunks).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from deltapack.kernels import PackedDelta
from deltapack.kernels.schedule import dense_delta

log = logging.getLogger(__name__)

HALF_LIFE_FORWARDS = 64  # hotness halves after this many forwards without the tenant alone in one
MIN_SOLO_SCORE = 4.0  # decayed solo forwards (or shares of mixed prefill chunks) before a copy is worth making
COOL_SCORE = 0.25  # a merged tenant whose score falls below this has cooled down: its copy is dropped
PROBES = 3  # measurements of a path before its cost is trusted
REPROBE_EVERY = 64  # choices between re-measurements of the path currently losing
SKIPS_TO_EVICT = 16  # an entry the measured costs skipped this often (and 4x more often than used) is dropped
BACKOFF_FORWARDS = 256  # after a failed build (allocation), no new merge for this many forwards
SITES_PER_TICK = 32  # sites merged per engine step (7B: 225 sites, a merge spreads over ~8 steps)
HEADROOM_BYTES = 1 << 30  # device memory always left for activations, graphs, the dense path's scratch buffer
PATH_KERNELS, PATH_MERGED, PATH_BASE = "kernels", "merged", "base"
PATH_MIXED = "mixed"  # a prefill forward whose rows belong to several tenants (or tenants and the base)


def size_bucket(n: int) -> int:
    """Sizes (rows of a decode step, padded tokens of a prefill) rounded up to a power of two: costs are kept per
    bucket, so a measurement at 60 rows informs a step of 64."""
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def merged_weight(base_w: torch.Tensor, p: PackedDelta, dtype: torch.dtype) -> torch.Tensor:
    """W_base + dW (or dW alone for a tensor that replaces the base's) from the packed delta the kernels read: the
    sum in float32, rounded once to `dtype`. (out, in), on base_w's device."""
    d = dense_delta(p).to(device=base_w.device, dtype=torch.float32)
    if tuple(d.shape) != tuple(base_w.shape):
        raise ValueError(f"delta of shape {tuple(d.shape)} for a weight of shape {tuple(base_w.shape)}")
    if p.replace:
        return d.to(dtype)
    w = base_w.to(torch.float32, copy=True)  # copy: .float() of an fp32 weight would be the base itself
    w += d
    return w.to(dtype)


@dataclass
class MergedEntry:
    """One tenant's merged linear weights, by site key (`<module>.weight`)."""

    name: str
    slot: int
    serial: int  # unique per build: graphs captured on this entry's tensors are keyed by it
    nbytes: int  # reserved for the whole entry from the start of its build
    todo: list[str] = field(default_factory=list)  # sites still to merge
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    sources: dict[str, PackedDelta] = field(default_factory=dict)  # the packed delta each weight was built from
    build_s: float = 0.0
    used: int = 0  # forwards run on it
    skipped: int = 0  # forwards the measured costs sent to the kernels instead

    @property
    def complete(self) -> bool:
        return not self.todo

    def weight(self, key: str, packed: PackedDelta | None) -> torch.Tensor | None:
        """The merged weight of site `key`, only if it was built from `packed` (the delta now in this tenant's slot):
        a copy never outlives the delta it came from."""
        if self.todo or packed is None:
            return None
        w = self.weights.get(key)
        return w if w is not None and self.sources.get(key) is packed else None


class StepCosts:
    """Measured seconds per (phase, path, size bucket): an exponential moving average and a sample count."""

    def __init__(self, alpha: float = 0.25):
        self.alpha = alpha
        self.ema: dict[tuple[str, str, int], float] = {}
        self.count: dict[tuple[str, str, int], int] = {}

    def record(self, phase: str, path: str, size: int, seconds: float) -> None:
        key = (phase, path, size_bucket(size))
        old = self.ema.get(key)
        self.ema[key] = seconds if old is None else old + self.alpha * (seconds - old)
        self.count[key] = self.count.get(key, 0) + 1

    def get(self, phase: str, path: str, size: int) -> tuple[float | None, int]:
        key = (phase, path, size_bucket(size))
        return self.ema.get(key), self.count.get(key, 0)

    def merged_cost(self, phase: str, size: int) -> float | None:
        """Merged forwards, measured; before any, a forward of the base alone at that size (the same GEMMs, so the
        same bytes): an estimate for deciding whether a merge is worth its memory, never for the per-step choice."""
        m, n = self.get(phase, PATH_MERGED, size)
        if n >= PROBES:
            return m
        b, nb = self.get(phase, PATH_BASE, size)
        return b if nb >= PROBES else None

    def summary(self) -> dict:
        return {f"{ph} {path} {b}": {"ms": round(v * 1e3, 3), "n": self.count[(ph, path, b)]}
                for (ph, path, b), v in sorted(self.ema.items())}


class MergedWeights:
    """Merged copies of the hottest tenants' linear weights, within a memory budget (module docstring)."""

    def __init__(self, runner, tiers, *, budget: int | None = None, sites_per_tick: int = SITES_PER_TICK,
                 clock: Callable[[], float] = time.perf_counter):
        from deltapack.serve.model import DeltaLinear

        self.runner = runner
        self.tiers = tiers
        self.budget = budget  # bytes; None: auto (free device memory decides), 0: off
        self.sites_per_tick = max(1, int(sites_per_tick))
        self.clock = clock
        self.linear = {m.wkey: m for m in runner.model.modules() if isinstance(m, DeltaLinear)}
        self.entries: dict[int, MergedEntry] = {}  # by slot
        self.scores: dict[str, float] = {}  # tenant name -> decayed solo forwards + shares of mixed prefills
        self.solo_size: dict[str, tuple[str, int]] = {}  # tenant name -> (phase, size) its rows ran or would run at
        self.costs = StepCosts()
        self.extra_reserve = 0  # bytes other work may still claim on the device (the engine: a dynamic KV cache)
        self.version = 0  # changes whenever an entry becomes usable or is dropped
        self.forwards = 0
        self.merges = 0
        self.evictions: dict[str, int] = {"cool": 0, "slower": 0, "room": 0, "unloaded": 0, "failed": 0}
        self.merged_forwards = 0
        self._serial = 0
        self._choices = 0
        self._blocked_until = 0
        self._decay = 0.5 ** (1.0 / HALF_LIFE_FORWARDS)

    # ---- memory -------------------------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self.budget != 0

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def reserve_bytes(self) -> int:
        """Device memory other work may still claim: the device tier's unused budget, the engine's extra reserve
        (a dynamic KV cache's worst case) and HEADROOM_BYTES."""
        t = self.tiers
        unused = max(0, t.budget["device"] - t.tier_bytes("device"))
        return unused + int(self.extra_reserve) + HEADROOM_BYTES

    def fits(self, need: int, freeing: int = 0) -> bool:
        """Room for `need` more bytes (after dropping entries of `freeing` bytes)?"""
        if not self.enabled:
            return False
        if self.budget is not None and self.nbytes - freeing + need > self.budget:
            return False
        dev = self.runner.device
        if dev.type == "cuda":
            free, _ = torch.cuda.mem_get_info(dev)
            if need + self._build_temp() > free + freeing - self.reserve_bytes():
                return False
        return True

    def _build_temp(self) -> int:
        """Transient bytes of merging the largest site (two float32 copies)."""
        return max((8 * m.base.weight.numel() for m in self.linear.values()), default=0)

    def sites_of(self, slot: int) -> list[str]:
        """The linear sites where the tenant in `slot` has a matrix delta (those its merged copy covers)."""
        out = []
        for key in self.linear:
            lay = self.runner.state.layers.get(key)
            p = lay.get(slot) if lay is not None else None
            if p is not None and p.kind != "vector" and len(p.shape) == 2:
                out.append(key)
        return out

    def entry_bytes(self, slot: int) -> int:
        item = torch.empty((), dtype=self.runner.dtype).element_size()
        return sum(self.linear[k].base.weight.numel() * item for k in self.sites_of(slot))

    # ---- hotness --------------------------------------------------------------------------------------------------
    def observe(self, tenants: list, phase: str, size: int) -> None:
        """One forward ran with these rows' tenants (Tenant or None = base): decay every score and count a solo
        forward for a tenant that owned every row."""
        self.forwards += 1
        for name in list(self.scores):
            v = self.scores[name] * self._decay
            if v < 1e-3:
                del self.scores[name]
            else:
                self.scores[name] = v
        solo = sole_tenant(tenants)
        if solo is not None:
            self.scores[solo.name] = self.scores.get(solo.name, 0.0) + 1.0
            self.solo_size[solo.name] = (phase, size)
        elif phase == "prefill" and tenants:
            # a mixed prefill chunk: each tenant's share of its rows counts too, since prefill_split can run those
            # rows on a copy. Counting solo forwards alone, no tenant of the 64-tenant trace ever became hot (H100,
            # 2026-12-08: 0 merges), as every forward there is shared. Mixed decode steps never count: a copy cannot
            # serve a step it shares with other tenants
            rows: dict[int, list] = {}
            for t in tenants:
                if t is not None:
                    rows.setdefault(id(t), [t, 0])[1] += 1
            for t, n in rows.values():
                share = n / len(tenants)
                self.scores[t.name] = self.scores.get(t.name, 0.0) + share
                # the size its rows would run at, split off (a solo forward's own size is better evidence)
                self.solo_size.setdefault(t.name, (phase, max(1, round(size * share))))

    # ---- per-forward choice ---------------------------------------------------------------------------------------
    def usable_entry(self, tenant) -> MergedEntry | None:
        """The tenant's merged copy if complete and still its own (a slot reused by another tenant is not)."""
        e = self.entries.get(tenant.slot)
        return e if e is not None and e.complete and e.name == tenant.name else None

    def choose(self, phase: str, tenants: list, size: int) -> MergedEntry | None:
        """The merged entry this forward runs on, or None (kernel path): only when one tenant owns every row and
        its copy is complete, and then as the measured costs say."""
        solo = sole_tenant(tenants)
        if solo is None or solo.slot is None:
            return None
        e = self.usable_entry(solo)
        if e is None:
            return None
        mm, mn = self.costs.get(phase, PATH_MERGED, size)
        km, kn = self.costs.get(phase, PATH_KERNELS, size)
        self._choices += 1
        if mn < PROBES:
            return e
        if kn < PROBES:
            return None
        loser_is_merged = mm >= km
        if self._choices % REPROBE_EVERY == 0:  # conditions change (tenant mix, KV length): measure the loser again
            return e if loser_is_merged else None
        if loser_is_merged:
            e.skipped += 1
            return None
        return e

    def record(self, phase: str, tenants: list, size: int, entry: MergedEntry | None, seconds: float) -> None:
        """Wall seconds of one forward (phase "decode": rows = size; "prefill": padded tokens = size)."""
        if entry is not None:
            entry.used += 1
            self.merged_forwards += 1
            self.costs.record(phase, PATH_MERGED, size, seconds)
        elif not any(t is not None for t in tenants):
            self.costs.record(phase, PATH_BASE, size, seconds)
        elif sole_tenant(tenants) is not None:  # only a single tenant's forwards compare with a merged one
            self.costs.record(phase, PATH_KERNELS, size, seconds)
        elif phase == "prefill":  # what a mixed prefill chunk costs: whether splitting one off pays (prefill_split)
            self.costs.record(phase, PATH_MIXED, size, seconds)

    def prefill_split(self, tenants: list, lengths: list[int]):
        """The tenant whose rows a mixed prefill chunk should run as a forward of their own, on its merged copy, or
        None. Prefill chunks are formed by size, so a hot tenant's prompts usually share one with other tenants'
        and never meet its copy. Decided from measured costs: split when (the tenant's rows on the cheaper of its
        copy and its kernels) + (the other rows) measured cheaper than the mixed chunk, each at its padded size;
        while the copy's prefill is not yet measured PROBES times at that size, split to measure it. A mixed size
        not yet measured keeps the chunk whole (it is measured as it runs)."""
        if not self.enabled or len(tenants) < 2 or sole_tenant(tenants) is not None:
            return None

        def padded(ls: list[int]) -> int:
            return len(ls) * max(ls) if ls else 0

        def measured(path: str, size: int) -> float | None:
            v, n = self.costs.get("prefill", path, size)
            return v if n >= PROBES else None

        whole = measured(PATH_MIXED, padded(lengths))
        best, best_gain = None, 0.0
        for t in {id(t): t for t in tenants if t is not None}.values():
            if self.usable_entry(t) is None:
                continue
            own = [n for u, n in zip(tenants, lengths) if u is t]
            rest_t = [u for u in tenants if u is not t]
            rest = [n for u, n in zip(tenants, lengths) if u is not t]
            m, k = measured(PATH_MERGED, padded(own)), measured(PATH_KERNELS, padded(own))
            if m is None:
                gain = math.inf  # probe the copy's prefill at this size
            else:
                rest_path = (PATH_BASE if all(u is None for u in rest_t) else
                             PATH_KERNELS if sole_tenant(rest_t) is not None else PATH_MIXED)
                r = measured(rest_path, padded(rest))
                if whole is None or r is None:
                    continue
                gain = whole - (min(m, k) if k is not None else m) - r
            if gain > best_gain:
                best, best_gain = t, gain
        return best

    # ---- merging and eviction (engine thread, tiers lock held) --------------------------------------------------
    def tick(self) -> None:
        """Between engine steps: drop cooled or unhelpful entries, continue a build, or start the hottest one."""
        if not self.enabled:
            return
        for slot, e in list(self.entries.items()):
            if not e.complete:
                continue
            if self.scores.get(e.name, 0.0) < COOL_SCORE:
                self.drop_slot(slot, "cool")
            elif e.skipped >= SKIPS_TO_EVICT and e.skipped > 4 * e.used:
                self.drop_slot(slot, "slower")
        building = next((e for e in self.entries.values() if not e.complete), None)
        if building is not None:
            self._build(building)
            return
        if self.forwards >= self._blocked_until:
            self._start_hottest()

    def _start_hottest(self) -> None:
        resident = {t.name: t for t in self.tiers.device_lru.values() if t.slot is not None and not t.removed}
        merged_names = {e.name for e in self.entries.values()}
        ranked = sorted(((v, n) for n, v in self.scores.items() if n in resident and n not in merged_names), reverse=True)
        for score, name in ranked:
            if score < MIN_SOLO_SCORE:
                return
            t = resident[name]
            phase, size = self.solo_size.get(name, ("decode", 1))
            m, k = self.costs.merged_cost(phase, size), self.costs.get(phase, PATH_KERNELS, size)
            if m is not None and k[1] >= PROBES and m >= k[0]:
                continue  # measured: at this tenant's size merged weights would not be faster
            sites = self.sites_of(t.slot)
            if not sites:
                continue
            need = self.entry_bytes(t.slot)
            # colder entries make room (hysteresis: only for a tenant at least twice as hot)
            victims = sorted((self.scores.get(e.name, 0.0), s) for s, e in self.entries.items())
            victims = [s for v, s in victims if 2 * v < score]
            freeing, chosen = 0, []
            while not self.fits(need, freeing) and victims:
                s = victims.pop(0)
                chosen.append(s)
                freeing += self.entries[s].nbytes
            if not self.fits(need, freeing):
                continue
            for s in chosen:
                self.drop_slot(s, "room")
            self._serial += 1
            e = MergedEntry(name, t.slot, self._serial, need, todo=sites)
            self.entries[t.slot] = e
            log.info("merging %s (%d sites, %.2f GB; hotness %.1f)", name, len(sites), need / 1e9, score)
            self._build(e)
            return

    def _build(self, e: MergedEntry) -> None:
        t0 = self.clock()
        layers = self.runner.state.layers
        try:
            with torch.inference_mode():
                for _ in range(min(self.sites_per_tick, len(e.todo))):
                    key = e.todo[0]
                    p = layers[key].get(e.slot)
                    if p is None:  # the slot changed under the build (never under the tiers lock): give up
                        raise RuntimeError(f"slot {e.slot} has no delta at {key} any more")
                    e.weights[key] = merged_weight(self.linear[key].base.weight, p, self.runner.dtype)
                    e.sources[key] = p
                    e.todo.pop(0)
        except (RuntimeError, ValueError) as ex:  # torch.cuda.OutOfMemoryError is a RuntimeError
            log.warning("merging %s failed (%s): kernels only for it; no merge for %d forwards", e.name, ex,
                        BACKOFF_FORWARDS)
            self.drop_slot(e.slot, "failed")
            self._blocked_until = self.forwards + BACKOFF_FORWARDS
            return
        e.build_s += self.clock() - t0
        if e.complete:
            self.merges += 1
            self.version += 1
            log.info("merged %s in %.2f s of engine time (%.2f GB)", e.name, e.build_s, e.nbytes / 1e9)

    def drop_slot(self, slot: int | None, reason: str = "unloaded") -> None:
        """Drop the entry of `slot` (its tenant left the device tier, cooled down, or memory is needed)."""
        e = self.entries.pop(slot, None) if slot is not None else None
        if e is None:
            return
        self.evictions[reason] = self.evictions.get(reason, 0) + 1
        self.version += 1
        # the weights are freed with the entry's last reference: a CUDA graph captured on them keeps the entry until
        # the engine's next step forgets that graph (GraphBatch.forget_merged), so no replay can read freed memory
        log.info("dropped the merged copy of %s (%s)", e.name, reason)

    def live_serials(self) -> set[int]:
        return {e.serial for e in self.entries.values() if e.complete}

    def snapshot(self) -> dict:
        return {
            "budget_bytes": self.budget,
            "bytes": self.nbytes,
            "tenants": {e.name: {"slot": e.slot, "bytes": e.nbytes, "complete": e.complete, "used": e.used,
                                 "skipped": e.skipped, "build_s": round(e.build_s, 4),
                                 "hotness": round(self.scores.get(e.name, 0.0), 2)} for e in self.entries.values()},
            "merges": self.merges,
            "evictions": dict(self.evictions),
            "merged_forwards": self.merged_forwards,
            "costs": self.costs.summary(),
        }


def sole_tenant(tenants: list):
    """The one tenant owning every row (Tenant), or None (base rows, several tenants, no rows)."""
    first = None
    for t in tenants:
        if t is None:
            return None
        if first is None:
            first = t
        elif t is not first:
            return None
    return first


__all__ = ["MergedWeights", "MergedEntry", "StepCosts", "merged_weight", "sole_tenant", "size_bucket"]
