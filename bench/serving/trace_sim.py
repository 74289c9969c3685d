"""Trace simulation: many tenants, Zipf popularity, Poisson arrivals, served two ways with per-step costs measured on
the GPU (`Costs`), so both systems see the same requests and the same hardware.

  deltapack  every tenant resident (compressed); continuous batching: between decode steps the waiting requests are
             admitted up to the batch limit and prefilled together; each decode step of B rows with k distinct
             tenants costs decode(B, k).
  swap       one merged full model on the GPU at a time; the oldest waiting request's tenant is served next with all
             its waiting requests as one static batch (up to the batch limit): swap its weights in from pinned CPU
             memory if another tenant's are loaded (swap_s), prefill (as the base: prefill_base), decode until the
             batch is done; then the next.

Metrics: throughput = generated tokens / (last completion - first arrival); TTFT = first token - arrival; ITL = gaps
between a request's consecutive tokens. Deterministic for a seed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field


@dataclass
class Costs:
    """Measured seconds. decode_base[B] per decode step of the base (or one merged model) at batch B; decode_extra[k]
    the extra time of a step whose rows hold k distinct tenants (measured at the largest batch, interpolated in k);
    prefill[B] for B prompts of `prompt_len` tokens with their deltas; prefill_base[B] the same without deltas (a
    merged model; None: use prefill); swap_s to load one merged model."""

    decode_base: dict[int, float]
    decode_extra: dict[int, float]
    prefill: dict[int, float]
    swap_s: float
    prefill_base: dict[int, float] | None = None

    @staticmethod
    def _interp(table: dict[int, float], x: float) -> float:
        keys = sorted(table)
        if x <= keys[0] or len(keys) == 1:
            return table[keys[0]]
        for a, b in zip(keys, keys[1:]):
            if x <= b:
                return table[a] + (table[b] - table[a]) * (x - a) / (b - a)
        a, b = keys[-2], keys[-1]  # extrapolate linearly past the largest measured point
        return table[b] + (table[b] - table[a]) * (x - b) / (b - a)

    def decode(self, batch: int, tenants: int) -> float:
        return self._interp(self.decode_base, batch) + (self._interp(self.decode_extra, tenants) if tenants else 0.0)

    @classmethod
    def from_json(cls, c: dict) -> "Costs":
        """From serving.json's notes.trace.costs (JSON round trips turn the int keys into strings)."""

        def keyed(d):
            return {int(k): float(v) for k, v in d.items()}

        return cls(keyed(c["decode_base_s"]), keyed(c["decode_extra_s"]), keyed(c["prefill_s"]), float(c["swap_s"]),
                   keyed(c["prefill_base_s"]) if c.get("prefill_base_s") else None)

    def at_bound(self, ratio: float, batch: int) -> "Costs":
        """The same engine if every decode step ran at issue 26's bound, base step x (1 + k/R): the delta bytes of k
        tenants read at the base's rate (R: the tenants' measured compression of the linear weights)."""
        b_full = self.decode(batch, 0)
        return Costs(self.decode_base, {k: b_full * k / ratio for k in self.decode_extra}, self.prefill, self.swap_s,
                     self.prefill_base)

    def prefill_s(self, n: int) -> float:
        return self._interp(self.prefill, n)

    def prefill_merged_s(self, n: int) -> float:
        return self._interp(self.prefill_base or self.prefill, n)


@dataclass
class Request:
    rid: int
    tenant: int
    arrival: float
    out_len: int
    tokens: list[float] = field(default_factory=list)  # emission time of each generated token


def make_trace(n_requests: int, tenants: int, rate: float, out_len: int, zipf_s: float = 1.0, seed: int = 0) -> list[Request]:
    rnd = random.Random(seed)
    weights = [1.0 / (i + 1) ** zipf_s for i in range(tenants)]
    t = 0.0
    out = []
    for i in range(n_requests):
        t += rnd.expovariate(rate)
        out.append(Request(i, rnd.choices(range(tenants), weights)[0], t, out_len))
    return out


def fresh_copies(reqs: list[Request]) -> list[Request]:
    """The requests again, without token times (each system serves its own copy)."""
    return [Request(r.rid, r.tenant, r.arrival, r.out_len) for r in reqs]


def simulate_deltapack(trace: list[Request], costs: Costs, max_batch: int) -> list[Request]:
    reqs = fresh_copies(trace)
    pending = sorted(reqs, key=lambda r: r.arrival)
    i, clock = 0, 0.0
    waiting: list[Request] = []
    running: list[Request] = []
    while i < len(pending) or waiting or running:
        while i < len(pending) and pending[i].arrival <= clock:
            waiting.append(pending[i])
            i += 1
        if not running and not waiting:
            clock = pending[i].arrival
            continue
        room = max_batch - len(running)
        if waiting and room > 0:  # admit and prefill between steps; the prefill yields each prompt's first token
            batch, waiting = waiting[:room], waiting[room:]
            clock += costs.prefill_s(len(batch))
            for r in batch:
                r.tokens.append(clock)
            running += [r for r in batch if r.out_len > 1]
            continue
        k = len({r.tenant for r in running})
        clock += costs.decode(len(running), k)
        for r in running:
            r.tokens.append(clock)
        running = [r for r in running if len(r.tokens) < r.out_len]
    return reqs


def simulate_swap(trace: list[Request], costs: Costs, max_batch: int) -> list[Request]:
    reqs = fresh_copies(trace)
    pending = sorted(reqs, key=lambda r: r.arrival)
    i, clock, loaded = 0, 0.0, None
    waiting: list[Request] = []
    while i < len(pending) or waiting:
        while i < len(pending) and pending[i].arrival <= clock:
            waiting.append(pending[i])
            i += 1
        if not waiting:
            clock = pending[i].arrival
            continue
        tenant = waiting[0].tenant  # the oldest request's tenant, with all its waiting requests
        batch = [r for r in waiting if r.tenant == tenant][:max_batch]
        ids = {id(r) for r in batch}
        waiting = [r for r in waiting if id(r) not in ids]
        if loaded != tenant:
            clock += costs.swap_s
            loaded = tenant
        clock += costs.prefill_merged_s(len(batch))
        for r in batch:
            r.tokens.append(clock)
        live = [r for r in batch if r.out_len > 1]
        while live:
            clock += costs.decode(len(live), 0)
            for r in live:
                r.tokens.append(clock)
            live = [r for r in live if len(r.tokens) < r.out_len]
    return reqs


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


def metrics(system: str, reqs: list[Request]) -> dict:
    first = min(r.arrival for r in reqs)
    last = max(r.tokens[-1] for r in reqs)
    tokens = sum(len(r.tokens) for r in reqs)
    ttft = [r.tokens[0] - r.arrival for r in reqs]
    itl = [b - a for r in reqs for a, b in zip(r.tokens, r.tokens[1:])]
    return {
        "system": system,
        "throughput": tokens / (last - first),
        "ttft_p50": _pct(ttft, 50), "ttft_p99": _pct(ttft, 99),
        "itl_p50": _pct(itl, 50), "itl_p99": _pct(itl, 99),
    }


def capacity_rps(costs: Costs, max_batch: int, tenants_per_step: int, out_len: int) -> float:
    """Requests per second deltapack sustains with full batches (decode-bound estimate)."""
    step = costs.decode(max_batch, tenants_per_step)
    return max_batch / (step * out_len + costs.prefill_s(max_batch))


def expected_distinct(tenants: int, batch: int, zipf_s: float = 1.0) -> float:
    w = [1.0 / (i + 1) ** zipf_s for i in range(tenants)]
    tot = sum(w)
    return sum(1 - (1 - x / tot) ** batch for x in w)


__all__ = ["Costs", "Request", "make_trace", "simulate_deltapack", "simulate_swap", "metrics", "capacity_rps",
           "expected_distinct"]
