"""The serving engine: continuous batching over one base model with per-row tenants.

One engine thread loops:
  1. take new requests and aborts (from HTTP threads),
  2. admit waiting requests while the batch has room and their tenant can be made device-resident (tiers),
  3. prefill the admitted prompts (left-padded, in chunks bounded by --max-prefill-tokens), sample their first
     token, and merge their KV cache rows into the running batch,
  4. run one decode step for every running row: one forward of the base model for the whole batch, each row's
     tenant delta applied by the kernels; sample; stream tokens; drop finished rows.
Requests thus join and leave between decode steps. The KV cache of the running batch is kept by the engine
(`BatchKV`: per layer (B, heads, L, head_dim), left-padded, with the attention mask and per-row positions) and
handed to transformers as a DynamicCache for each step; the prompt is never run again after its prefill.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from deltapack.errors import DeltapackError
from deltapack.serve.sampling import SamplingParams, prompt_logprobs, select_tokens, token_logprobs
from deltapack.serve.text import TextStream
from deltapack.serve.tiers import DeltaTiers, Tenant, TooLargeError

log = logging.getLogger(__name__)

TRIM_EVERY_S = 10.0
_malloc_trim = None


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc malloc_trim). KV caches and activations of changing shapes
    fragment the heap; without this a long-running CPU server's RSS creeps although nothing is leaked."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


# ---- events sent to a request's consumer ----------------------------------------------------------------------------
@dataclass
class PromptEvent:
    token_logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None]


@dataclass
class TokenEvent:
    token_id: int
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class FinishEvent:
    reason: str  # "stop" | "length" | "abort"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class ErrorEvent:
    status: int
    message: str
    type: str = "server_error"
    code: str | None = None


@dataclass
class GenRequest:
    request_id: str
    model: str
    tenant: Tenant | None
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[object], None]
    tokenizer: object | None = None
    vocab: int = 0
    eos_ids: set[int] = field(default_factory=set)
    arrival: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    text: TextStream | None = None
    generator: torch.Generator | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    acquired: bool = False
    done: bool = False

    @property
    def slot(self) -> int:
        return -1 if self.tenant is None or self.tenant.slot is None else self.tenant.slot


def _pad_left(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    extra = length - t.shape[dim]
    if extra <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t.new_zeros(shape), t], dim)


class BatchKV:
    """KV cache, attention mask and next position of every running row (left-padded to a common length)."""

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.mask: torch.Tensor | None = None  # (B, L) long
        self.next_pos: torch.Tensor | None = None  # (B,) long
        self.rows: list[GenRequest] = []

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def length(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def cache(self):
        from transformers.cache_utils import DynamicCache, DynamicLayer

        cache = DynamicCache()
        layers = []
        for k, v in zip(self.keys, self.values):
            lay = DynamicLayer()
            lay.dtype, lay.device = k.dtype, k.device
            lay.keys, lay.values = k, v
            lay.is_initialized = True
            layers.append(lay)
        cache.layers = layers
        return cache

    @staticmethod
    def tensors_of(cache) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return [lay.keys for lay in cache.layers], [lay.values for lay in cache.layers]

    def add(self, keys, values, mask, next_pos, rows: list[GenRequest]) -> None:
        if not self.rows:
            self.keys, self.values, self.mask, self.next_pos, self.rows = list(keys), list(values), mask, next_pos, list(rows)
            return
        L = max(self.length, mask.shape[1])
        self.keys = [torch.cat([_pad_left(a, L, 2), _pad_left(b, L, 2)], 0) for a, b in zip(self.keys, keys)]
        self.values = [torch.cat([_pad_left(a, L, 2), _pad_left(b, L, 2)], 0) for a, b in zip(self.values, values)]
        self.mask = torch.cat([_pad_left(self.mask, L, 1), _pad_left(mask, L, 1)], 0)
        self.next_pos = torch.cat([self.next_pos, next_pos], 0)
        self.rows += rows

    def keep(self, idx: list[int]) -> None:
        if not idx:
            self.__init__()
            return
        if len(idx) == len(self.rows):
            return
        sel = torch.tensor(idx, device=self.mask.device)
        mask = self.mask.index_select(0, sel)
        used = torch.nonzero(mask.sum(0)).view(-1)
        start = int(used[0]) if used.numel() else 0  # drop leading columns that are padding for every row left
        self.keys = [k.index_select(0, sel)[:, :, start:].contiguous() for k in self.keys]
        self.values = [v.index_select(0, sel)[:, :, start:].contiguous() for v in self.values]
        self.mask = mask[:, start:].contiguous()
        self.next_pos = self.next_pos.index_select(0, sel)
        self.rows = [self.rows[i] for i in idx]


class Engine:
    def __init__(
        self,
        runner,
        tiers: DeltaTiers,
        *,
        max_batch: int = 16,
        max_prefill_tokens: int = 4096,
        metrics=None,
    ):
        if max_batch < 1:
            raise DeltapackError("--max-batch must be at least 1")
        self.runner = runner
        self.tiers = tiers
        self.max_batch = max_batch
        self.max_prefill_tokens = max(1, max_prefill_tokens)
        self.metrics = metrics
        self.batch = BatchKV()
        self.waiting: list[GenRequest] = []
        self._inbox: deque[GenRequest] = deque()
        self._aborts: set[str] = set()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.max_tenants_in_step = 0
        self.last_error: str | None = None

    # ---- public API (any thread) --------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="deltapack-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, req: GenRequest) -> None:
        with self._cv:
            self._inbox.append(req)
            self._cv.notify()

    def abort(self, request_id: str) -> None:
        with self._cv:
            self._aborts.add(request_id)
            self._cv.notify()

    def snapshot(self) -> dict:
        with self._cv:
            waiting = list(self.waiting) + list(self._inbox)
            running = list(self.batch.rows)
        return {
            "running": len(running),
            "waiting": len(waiting),
            "running_models": {r.model for r in running if r.tenant is not None},
            "waiting_models": {r.model for r in waiting if r.tenant is not None},
            "max_batch": self.max_batch,
            "steps": self.steps,
        }

    # ---- engine thread --------------------------------------------------------------------------------------------
    def _run(self) -> None:
        last_trim = time.monotonic()
        while True:
            with self._cv:
                while not (self._inbox or self._aborts or self.waiting or self.batch.rows or self._stopping):
                    self._cv.wait(timeout=0.5)
                if self._stopping:
                    break
            try:
                self.step()
            except Exception as e:  # never let one bad step kill the server: fail what was in flight, go on
                log.exception("engine step failed")
                self.last_error = f"{e.__class__.__name__}: {e}"
                for r in list(self.batch.rows):
                    self._fail(r, 500, f"internal error: {self.last_error}")
                self.batch = BatchKV()
            if self.waiting and not self.batch.rows:
                time.sleep(0.002)  # everything waits on a tier that running work pins; do not spin
            if time.monotonic() - last_trim > TRIM_EVERY_S:
                release_free_memory()
                last_trim = time.monotonic()
        for r in list(self.batch.rows) + self.waiting + list(self._inbox):
            self._fail(r, 503, "server shutting down")

    def step(self) -> None:
        with self._cv:
            self.waiting.extend(self._inbox)
            self._inbox.clear()
            aborts, self._aborts = self._aborts, set()
        with self.tiers.lock:
            if aborts:
                self._apply_aborts(aborts)
            admitted = self._admit()
            if admitted:
                self._prefill(admitted)
            if self.batch.rows:
                self._decode()

    def _apply_aborts(self, ids: set[str]) -> None:
        keep_w = []
        for r in self.waiting:
            if r.request_id in ids:
                self._finish(r, "abort")
            else:
                keep_w.append(r)
        with self._cv:
            self.waiting = keep_w
        if any(r.request_id in ids for r in self.batch.rows):
            keep = []
            for i, r in enumerate(self.batch.rows):
                if r.request_id in ids:
                    self._finish(r, "abort")
                else:
                    keep.append(i)
            self._set_rows(keep)

    def _set_rows(self, keep: list[int]) -> None:
        with self._cv:
            self.batch.keep(keep)

    def _admit(self) -> list[GenRequest]:
        room = self.max_batch - len(self.batch.rows)
        admitted, keep = [], []
        blocked = False
        for r in self.waiting:
            if len(admitted) >= room:
                keep.append(r)
                continue
            t = r.tenant
            if t is not None:
                if t.removed:
                    self._fail(r, 404, f"The model `{r.model}` does not exist (unloaded).", "not_found_error", "model_not_found")
                    continue
                if blocked and t.tier != "device":
                    keep.append(r)  # a load is already waiting for room: only already-resident tenants pass it
                    continue
                try:
                    ok = self.tiers.acquire(t)
                except KeyError:
                    self._fail(r, 404, f"The model `{r.model}` does not exist (unloaded).", "not_found_error", "model_not_found")
                    continue
                except TooLargeError as e:
                    self._fail(r, 507, str(e))
                    continue
                except (DeltapackError, OSError) as e:
                    self._fail(r, 500, f"cannot load delta {r.model}: {e}")
                    continue
                if not ok:
                    blocked = True
                    keep.append(r)
                    continue
                r.acquired = True
            r.generator = r.params.make_generator(self.runner.device)
            if r.tokenizer is not None:
                r.text = TextStream(r.tokenizer, r.prompt_ids, r.params.stop)
            admitted.append(r)
        with self._cv:
            self.waiting = keep
        return admitted

    def _chunks(self, reqs: list[GenRequest]) -> list[list[GenRequest]]:
        """Prefill groups: bounded padded size; prompts needing every position's logits grouped apart (their
        logits are (B, L, vocab) and get a smaller budget)."""
        full_budget = max(64, (1 << 26) // max(1, self.runner.vocab_size))
        out: list[list[GenRequest]] = []
        for need_full in (False, True):
            group = [r for r in reqs if (r.params.prompt_logprobs is not None) == need_full]
            budget = min(self.max_prefill_tokens, full_budget) if need_full else self.max_prefill_tokens
            cur: list[GenRequest] = []
            longest = 0
            for r in sorted(group, key=lambda r: len(r.prompt_ids)):
                n = len(r.prompt_ids)
                if cur and (len(cur) + 1) * max(longest, n) > budget:
                    out.append(cur)
                    cur, longest = [], 0
                cur.append(r)
                longest = max(longest, n)
            if cur:
                out.append(cur)
        return out

    def _prefill(self, admitted: list[GenRequest]) -> None:
        for chunk in self._chunks(admitted):
            try:
                self._prefill_chunk(chunk)
            except Exception as e:
                log.exception("prefill failed")
                for r in chunk:
                    if not r.done:
                        self._fail(r, 500, f"internal error in prefill: {e.__class__.__name__}: {e}")

    def _prefill_chunk(self, rows: list[GenRequest]) -> None:
        from transformers.cache_utils import DynamicCache

        runner = self.runner
        dev = runner.device
        B = len(rows)
        L = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((B, L), runner.pad_id, dtype=torch.long)
        mask = torch.zeros(B, L, dtype=torch.long)
        for b, r in enumerate(rows):
            n = len(r.prompt_ids)
            ids[b, L - n :] = torch.tensor(r.prompt_ids, dtype=torch.long)
            mask[b, L - n :] = 1
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        full = any(r.params.prompt_logprobs is not None for r in rows)
        ids, mask, pos = ids.to(dev), mask.to(dev), pos.to(dev)
        logits, cache = runner.forward(ids, mask, pos, DynamicCache(), [r.slot for r in rows], 0 if full else 1)
        for b, r in enumerate(rows):
            if self.metrics:
                self.metrics.prompt_tokens.labels(r.model).inc(len(r.prompt_ids))
            if r.params.prompt_logprobs is not None:
                n = len(r.prompt_ids)
                chosen, tops = prompt_logprobs(logits[b, L - n :], r.prompt_ids, r.params.prompt_logprobs, r.vocab)
                r.emit(PromptEvent(chosen, tops))
        last = logits[:, -1, :]
        live = [b for b, r in enumerate(rows) if r.params.max_tokens > 0]
        for b, r in enumerate(rows):
            if r.params.max_tokens <= 0:
                self._finish(r, "length")
        if not live:
            return
        toks = select_tokens(last[live], [rows[b].params for b in live], [rows[b].generator for b in live], [rows[b].vocab for b in live])
        cont = [b for b, tok in zip(live, toks) if not self._append_token(rows[b], tok, last[b])]
        if not cont:
            return
        keys, values = BatchKV.tensors_of(cache)
        sel = torch.tensor(cont, device=dev)
        with self._cv:
            self.batch.add(
                [k.index_select(0, sel) for k in keys],
                [v.index_select(0, sel) for v in values],
                mask.index_select(0, sel),
                mask.sum(1).index_select(0, sel),
                [rows[b] for b in cont],
            )

    def _decode(self) -> None:
        bt = self.batch
        rows = bt.rows
        dev = self.runner.device
        ids = torch.tensor([[r.output_ids[-1]] for r in rows], dtype=torch.long, device=dev)
        mask = torch.cat([bt.mask, torch.ones(len(rows), 1, dtype=bt.mask.dtype, device=dev)], 1)
        slots = [r.slot for r in rows]
        logits, cache = self.runner.forward(ids, mask, bt.next_pos[:, None], bt.cache(), slots, 1)
        bt.keys, bt.values = BatchKV.tensors_of(cache)
        bt.mask = mask
        bt.next_pos = bt.next_pos + 1
        self.steps += 1
        tenants = len(set(slots))
        self.max_tenants_in_step = max(self.max_tenants_in_step, tenants)
        if self.metrics:
            self.metrics.batch_tenants.observe(tenants)
            self.metrics.batch_size.observe(len(rows))
        last = logits[:, -1, :]
        toks = select_tokens(last, [r.params for r in rows], [r.generator for r in rows], [r.vocab for r in rows])
        keep = [b for b, (r, tok) in enumerate(zip(rows, toks)) if not self._append_token(r, tok, last[b])]
        if len(keep) < len(rows):
            self._set_rows(keep)

    def _append_token(self, r: GenRequest, tok: int, logits_row: torch.Tensor) -> bool:
        """Record a sampled token, stream it; True when the request is finished."""
        now = time.monotonic()
        r.output_ids.append(tok)
        if self.metrics:
            self.metrics.generation_tokens.labels(r.model).inc()
            if r.first_token_at is None:
                self.metrics.ttft.labels(r.model).observe(now - r.arrival)
            else:
                self.metrics.itl.labels(r.model).observe(now - (r.last_token_at or now))
        if r.first_token_at is None:
            r.first_token_at = now
        r.last_token_at = now
        lp = alts = None
        if r.params.logprobs is not None:
            lp, alts = token_logprobs(logits_row, tok, r.params.logprobs, r.vocab)
        p = r.params
        reason = None
        text = ""
        if (tok in r.eos_ids and not p.ignore_eos) or tok in p.stop_token_ids:
            reason = "stop"
        elif r.text is not None:
            text, stopped = r.text.push(tok)
            if stopped:
                reason = "stop"
        if reason is None and (len(r.output_ids) >= p.max_tokens or len(r.prompt_ids) + len(r.output_ids) >= self.runner.max_model_len):
            reason = "length"
        if reason is not None and r.text is not None:
            text += r.text.flush()
        r.emit(TokenEvent(tok, text, lp, alts))
        if reason is not None:
            self._finish(r, reason)
            return True
        return False

    def _release(self, r: GenRequest) -> None:
        if r.acquired and r.tenant is not None:
            self.tiers.release(r.tenant)
            r.acquired = False

    def _finish(self, r: GenRequest, reason: str) -> None:
        if r.done:
            return
        r.done = True
        self._release(r)
        if self.metrics:
            self.metrics.request_success.labels(r.model, reason).inc()  # vLLM counts aborts here too
            if reason != "abort":
                self.metrics.e2e.labels(r.model).observe(time.monotonic() - r.arrival)
        r.emit(FinishEvent(reason, len(r.prompt_ids), len(r.output_ids)))

    def _fail(self, r: GenRequest, status: int, message: str, type_: str = "server_error", code: str | None = None) -> None:
        if r.done:
            return
        r.done = True
        self._release(r)
        r.emit(ErrorEvent(status, message, type_, code))
