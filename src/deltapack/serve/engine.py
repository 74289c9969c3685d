"""The serving engine: continuous batching over one base model with per-row tenants.

One engine thread loops:
  1. take new requests and aborts (from HTTP threads),
  2. admit waiting requests while the batch has room and their tenant can be made device-resident (tiers),
  3. prefill the admitted prompts (left-padded, in chunks bounded by --max-prefill-tokens), sample their first
     token, and merge their KV cache rows into the running batch,
  4. run one decode step for every running row: one forward of the base model for the whole batch, each row's
     tenant delta applied by the kernels; sample; stream tokens; drop finished rows.
Requests thus join and leave between decode steps; the prompt is never run again after its prefill. The running
batch's KV cache is one of two kinds (`--decode`, `choose_decode`): `GraphBatch` (deltapack.serve.fastpath: fixed
slots of a static cache, each step a CUDA-graph replay; `static` is the same stepped eagerly) or `BatchKV` (dynamic:
per layer (B, heads, L, head_dim), left-padded, with the attention mask and per-row positions, handed to
transformers as a DynamicCache each step). While rows decode, new requests may wait briefly to share one prefill
(`prefill_delay_s`).
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
from deltapack.serve.sampling import RowError, SamplingParams, prompt_logprobs, select_tokens, token_logprobs
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
    matcher: object | None = None  # structured output: this request's grammar state (xgrammar GrammarMatcher)
    first_token_at: float | None = None
    last_token_at: float | None = None
    acquired: bool = False
    done: bool = False
    # this request's (generated tokens counter, inter-token latency histogram): prometheus' labels() lookup, taken
    # once instead of at every token of every row
    metric_children: tuple | None = None

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

    def clear(self) -> None:
        self.__init__()

    def forget_merged(self, live_serials: set[int]) -> None:
        """Nothing to drop: eager steps hold no pointers to merged weights."""

    def step(self, runner, last_ids: list[int], slots: list[int], merged=None) -> torch.Tensor:
        """One decode step of every row (eager, the cache rebuilt as a DynamicCache): next-token logits (B, W).
        `merged`: a MergedEntry whose tenant owns every row (deltapack.serve.merged)."""
        dev = runner.device
        ids = torch.tensor([[t] for t in last_ids], dtype=torch.long, device=dev)
        mask = torch.cat([self.mask, torch.ones(len(self.rows), 1, dtype=self.mask.dtype, device=dev)], 1)
        logits, cache = runner.forward(ids, mask, self.next_pos[:, None], self.cache(), slots, 1, merged=merged)
        self.keys, self.values = BatchKV.tensors_of(cache)
        self.mask = mask
        self.next_pos = self.next_pos + 1
        return logits[:, -1, :]

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


DECODE_MODES = ("auto", "graph", "static", "dynamic")
STATIC_KV_SHARE = 0.5  # auto picks graph decoding when its static KV cache takes at most this share of free memory


def static_kv_len(runner) -> int:
    """Columns of the static KV cache: the longest request plus room to run before the rows are moved to the front."""
    from deltapack.serve.fastpath import COMPACT_AT

    return int(runner.max_model_len) + COMPACT_AT + 1


def static_kv_bytes(runner, rows: int) -> int:
    cfg = runner.config
    heads = getattr(cfg, "num_attention_heads", 1)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    item = torch.empty((), dtype=runner.dtype).element_size()
    return rows * static_kv_len(runner) * runner.num_layers * 2 * kv_heads * head_dim * item


def choose_decode(runner, max_batch: int, mode: str) -> str:
    """The decode mode: graph (static rows, CUDA-graph steps), static (static rows, eager steps: the same
    bookkeeping, for CPUs and debugging) or dynamic (the cache rebuilt each step). auto: graph on a CUDA device with
    capturable kernels (triton) when the static cache fits in STATIC_KV_SHARE of free memory, else dynamic."""
    if mode not in DECODE_MODES:
        raise DeltapackError(f"unknown decode mode {mode!r}; choose from {', '.join(DECODE_MODES)}")
    cuda = runner.device.type == "cuda"
    if mode == "graph" and not cuda:
        raise DeltapackError("--decode graph needs a CUDA device")
    if mode != "auto":
        return mode
    if not cuda or not getattr(runner.state.kernels, "capturable", False):
        return "dynamic"
    need = static_kv_bytes(runner, max_batch)
    free, _ = torch.cuda.mem_get_info(runner.device)
    if need > STATIC_KV_SHARE * free:
        log.warning("decode: dynamic (a static KV cache of %d rows x %d columns needs %.1f GB, %.1f GB free): lower "
                    "--max-model-len or --max-batch for CUDA-graph decoding", max_batch, static_kv_len(runner),
                    need / 1e9, free / 1e9)
        return "dynamic"
    return "graph"


class Engine:
    def __init__(
        self,
        runner,
        tiers: DeltaTiers,
        *,
        max_batch: int = 16,
        max_prefill_tokens: int = 4096,
        metrics=None,
        decode: str = "auto",
        prefill_batch: int = 8,
        prefill_delay_s: float | None = None,
    ):
        if max_batch < 1:
            raise DeltapackError("--max-batch must be at least 1")
        self.runner = runner
        self.tiers = tiers
        self.max_batch = max_batch
        self.max_prefill_tokens = max(1, max_prefill_tokens)
        self.metrics = metrics
        self.decode_mode = choose_decode(runner, max_batch, decode)
        # while rows are decoding, new requests wait for company: up to prefill_delay_s, or until prefill_batch of
        # them can join at once. A prefill forward costs nearly the same for one prompt as for eight (launch-bound:
        # bench/results/serving.json, notes.trace.costs.prefill_s) and stalls every running row, so admitting the
        # row or two a full batch frees per step one prefill at a time spends most of the engine's time in
        # prefills. Graph mode only by default: there the decode step is cheap enough for the prefill to dominate.
        self.prefill_batch = max(1, prefill_batch)
        self.prefill_delay_s = (0.25 if self.decode_mode == "graph" else 0.0) if prefill_delay_s is None else prefill_delay_s
        self.batch = self._new_batch()
        self.waiting: list[GenRequest] = []
        self._inbox: deque[GenRequest] = deque()
        self._aborts: set[str] = set()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.max_tenants_in_step = 0
        # where the engine thread's time goes (seconds; prefill forwards, decode steps with their sampling). decode_s
        # splits into launching the step (host work until the forward is queued, or the whole forward where launches
        # wait, as on a CPU), waiting for its tokens (the device still running it; grammar masks fill meanwhile) and
        # accepting them (streaming, stop checks, finishing rows): whether the host or the device bounds a step
        self.busy = {"prefill_s": 0.0, "prefill_forwards": 0, "decode_s": 0.0, "decode_launch_s": 0.0,
                     "decode_wait_s": 0.0, "decode_accept_s": 0.0}
        self.last_error: str | None = None
        # merged copies of hot tenants' weights (deltapack.serve.merged), held by the tiers; None: off
        self.merged = getattr(tiers, "merged", None)
        self._merged_version = -1
        if self.merged is not None and self.decode_mode == "dynamic" and runner.device.type == "cuda":
            self.merged.extra_reserve = static_kv_bytes(runner, max_batch)  # the dynamic KV cache may grow this far
        self._masks = None  # structured output: the engine thread's GrammarMasks (persistent buffers), made on first use

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
            # a row whose request finished has answered its client but leaves the batch only after the step ends
            running = [r for r in self.batch.rows if not r.done]
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
                self.batch.clear()
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
            if self.merged is not None:
                self._tick_merged()
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

    def _prefill_now(self) -> bool:
        """Admit now, or let the waiting requests gather (see prefill_delay_s)?"""
        if not self.waiting or not self.batch.rows or self.prefill_delay_s <= 0:
            return True
        # as many as prefill_batch can join at once (waiting, and rows free for them; a full batch frees a row or
        # two per step, and admitting those one prefill at a time is exactly the stall to avoid), or one waited long
        room = self.max_batch - len(self.batch.rows)
        if min(len(self.waiting), room) >= self.prefill_batch:
            return True
        return room > 0 and time.monotonic() - min(r.arrival for r in self.waiting) >= self.prefill_delay_s

    def _admit(self) -> list[GenRequest]:
        if not self._prefill_now():
            return []
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
            try:
                self._start(r)
            except Exception as e:  # this request's own setup failed: it alone fails, and gives its pin back
                log.exception("request %s could not start", r.request_id)
                self._fail(r, 500, f"internal error starting the request: {e.__class__.__name__}: {e}")
                continue
            admitted.append(r)
        with self._cv:
            self.waiting = keep
        return admitted

    def _start(self, r: GenRequest) -> None:
        p = r.params
        r.generator = p.make_generator(self.runner.device)
        if r.tokenizer is not None:
            r.text = TextStream(r.tokenizer, r.prompt_ids, p.stop, p.skip_special_tokens, p.include_stop_str_in_output)
        if p.grammar is not None:
            from deltapack.serve.grammar import new_matcher

            r.matcher = new_matcher(p.grammar)

    def _chunks(self, reqs: list[GenRequest]) -> list[list[GenRequest]]:
        """Prefill groups: bounded padded size; prompts needing every position's logits grouped apart (their
        logits are (B, L, vocab) and get a smaller budget); a hot tenant's prompts apart from a mixed group where
        the measured costs say its merged copy pays for the extra forward (MergedWeights.prefill_split)."""
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
        if self.merged is not None and self.merged.enabled:  # a hot tenant's rows apart, on its merged copy
            split = []
            for chunk in out:
                t = self.merged.prefill_split([r.tenant for r in chunk], [len(r.prompt_ids) for r in chunk])
                if t is None:
                    split.append(chunk)
                else:
                    split += [[r for r in chunk if r.tenant is t], [r for r in chunk if r.tenant is not t]]
            out = split
        return out

    def _tick_merged(self) -> None:
        """Between steps: let the merged store merge / drop (memory, hotness), then forget graphs of dropped entries."""
        try:
            self.merged.tick()
        except Exception:  # a merge must never take the server down: kernels only from here on
            log.exception("merged weights failed; switching them off")
            for slot in list(self.merged.entries):
                self.merged.drop_slot(slot, "failed")
            self.merged.budget = 0
        if self.merged.version != self._merged_version:
            self._merged_version = self.merged.version
            self.batch.forget_merged(self.merged.live_serials())

    def _merged_choice(self, phase: str, rows: list[GenRequest], size: int):
        """The merged entry this forward runs on (one tenant owns every row, the measured costs favour it), or None;
        and the forward counts towards the tenants' hotness."""
        if self.merged is None or not self.merged.enabled:
            return None
        tenants = [r.tenant for r in rows]
        self.merged.observe(tenants, phase, size)
        return self.merged.choose(phase, tenants, size)

    def _merged_record(self, phase: str, rows: list[GenRequest], size: int, entry, seconds: float) -> None:
        if self.merged is not None and self.merged.enabled:
            self.merged.record(phase, [r.tenant for r in rows], size, entry, seconds)

    def _prefill(self, admitted: list[GenRequest]) -> None:
        t0 = time.perf_counter()
        for chunk in self._chunks(admitted):
            self.busy["prefill_forwards"] += 1
            size = len(chunk) * max(len(r.prompt_ids) for r in chunk)  # padded tokens
            merged = self._merged_choice("prefill", chunk, size)
            try:
                t1 = time.perf_counter()
                self._prefill_chunk(chunk, merged)
                self._merged_record("prefill", chunk, size, merged, time.perf_counter() - t1)
            except Exception as e:
                log.exception("prefill failed")
                # the forward is shared: run the prompts that have seen nothing yet one by one, so that a prompt
                # that breaks it fails alone
                retry = [r for r in chunk if not r.done and not r.output_ids] if len(chunk) > 1 else []
                for r in chunk:
                    if not r.done and r not in retry:
                        self._fail(r, 500, f"internal error in prefill: {e.__class__.__name__}: {e}")
                for r in retry:
                    try:
                        self._prefill_chunk([r])
                    except Exception as e1:
                        log.exception("prefill of %s failed", r.request_id)
                        if not r.done:
                            self._fail(r, 500, f"internal error in prefill: {e1.__class__.__name__}: {e1}")
        self.busy["prefill_s"] += time.perf_counter() - t0

    def _prefill_chunk(self, rows: list[GenRequest], merged=None) -> None:
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
        logits, cache = runner.forward(ids, mask, pos, DynamicCache(), [r.slot for r in rows], 0 if full else 1,
                                       merged=merged)
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
        live_rows = [rows[b] for b in live]
        toks, errors = select_tokens(last[live], live_rows, self._fill_masks(live_rows))
        cont = [b for i, (b, tok) in enumerate(zip(live, toks)) if not self._accept(rows[b], tok, last[b], errors.get(i))]
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

    def warm_up(self, slots: list[int], *, prefills: bool = True, capture: bool = True) -> int:
        """Before serving or while serving, with tenant `slots` resident: run stand-in prefills of 1 to
        prefill_batch prompts of a few lengths (Triton compiles a kernel variant per launch shape class on first
        use, seconds each, which would otherwise stall the first real prefills), then capture the decode graphs
        (graph mode; GraphBatch.warmup; capture=False: one eager step per graph instead, which queues its variants
        for background compilation). Each forward takes the tiers lock on its own, so requests interleave. Returns
        the number of graphs captured."""
        from transformers.cache_utils import DynamicCache

        runner = self.runner
        if slots and prefills:
            n = 1
            while n <= self.prefill_batch:
                for length in (32, 128, 512):
                    if n * length > self.max_prefill_tokens or length >= runner.max_model_len:
                        continue
                    ids = torch.full((n, length), 3, dtype=torch.long, device=runner.device)
                    mask = torch.ones(n, length, dtype=torch.long, device=runner.device)
                    pos = torch.arange(length, device=runner.device).expand(n, length)
                    with self.tiers.lock:
                        runner.forward(ids, mask, pos, DynamicCache(), [slots[i % len(slots)] for i in range(n)], 1)
                n *= 2
        warm = getattr(self.batch, "warmup", None)
        if warm is None:
            return 0
        with self.tiers.lock:
            with self._cv:
                if self.batch.rows:  # requests are decoding: their steps capture the graphs when needed
                    return 0
            return warm(slots, capture=capture)

    def _new_batch(self):
        if self.decode_mode == "dynamic":
            return BatchKV()
        from deltapack.serve.fastpath import GraphBatch

        return GraphBatch(self.runner, rows=self.max_batch, max_len=static_kv_len(self.runner),
                          graphs=self.decode_mode == "graph")

    def _decode(self) -> None:
        t0 = time.perf_counter()
        rows = self.batch.rows
        slots = [r.slot for r in rows]
        merged = self._merged_choice("decode", rows, len(rows))
        captures = getattr(self.batch, "captures", 0)
        last = self.batch.step(self.runner, [r.output_ids[-1] for r in rows], slots, merged=merged)
        t_launched = time.perf_counter()
        # on CUDA the forward is only queued: the grammar masks are filled on the host meanwhile (they depend on the
        # tokens accepted last step only). Nothing before this point may wait for the device (no .item(), .tolist()
        # or pageable host->device copy after the launch), or the fill runs after the forward instead of beside it.
        masks = self._fill_masks(rows)
        self.steps += 1
        tenants = len(set(slots))
        self.max_tenants_in_step = max(self.max_tenants_in_step, tenants)
        if self.metrics:
            self.metrics.batch_tenants.observe(tenants)
            self.metrics.batch_size.observe(len(rows))
        toks, errors = select_tokens(last, rows, masks)  # waits for the step's forward
        t_tokens = time.perf_counter()
        if getattr(self.batch, "captures", 0) == captures:  # a step that captured a graph measures the capture
            self._merged_record("decode", rows, len(rows), merged, t_tokens - t0)
        keep = [b for b, (r, tok) in enumerate(zip(rows, toks)) if not self._accept(r, tok, last[b], errors.get(b))]
        if len(keep) < len(rows):
            self._set_rows(keep)
        t1 = time.perf_counter()
        self.busy["decode_s"] += t1 - t0
        self.busy["decode_launch_s"] += t_launched - t0
        self.busy["decode_wait_s"] += t_tokens - t_launched
        self.busy["decode_accept_s"] += t1 - t_tokens

    def _fill_masks(self, rows: list[GenRequest]):
        """The rows' grammar masks filled on the host (a GrammarMasks), or None when no row is constrained. A
        matcher that fails to fill fails its row only (select_tokens reports it)."""
        if not any(r.matcher is not None for r in rows):
            return None
        if self._masks is None:
            from deltapack.serve.grammar import GrammarMasks

            self._masks = GrammarMasks(self.runner.device)
        return self._masks.fill(rows)

    def _accept(self, r: GenRequest, tok: int, logits_row: torch.Tensor, error: RowError | None) -> bool:
        """A row's sampled token (or its sampling error): True when the request is finished. Whatever goes wrong
        with one row fails that request only (and releases its pin); the others go on."""
        if error is not None:
            self._fail(r, error.status, error.message, error.type)
            return True
        try:
            return self._append_token(r, tok, logits_row)
        except Exception as e:
            log.exception("request %s failed after sampling", r.request_id)
            self._fail(r, 500, f"internal error: {e.__class__.__name__}: {e}")
            return True

    def _append_token(self, r: GenRequest, tok: int, logits_row: torch.Tensor) -> bool:
        """Record a sampled token, stream it; True when the request is finished."""
        now = time.monotonic()
        r.output_ids.append(tok)
        if self.metrics:
            if r.metric_children is None:
                r.metric_children = (self.metrics.generation_tokens.labels(r.model), self.metrics.itl.labels(r.model))
            tokens, itl = r.metric_children
            tokens.inc()
            if r.first_token_at is None:
                self.metrics.ttft.labels(r.model).observe(now - r.arrival)
            else:
                itl.observe(now - (r.last_token_at or now))
        if r.first_token_at is None:
            r.first_token_at = now
        r.last_token_at = now
        lp = alts = None
        if r.params.logprobs is not None:
            lp, alts = token_logprobs(logits_row, tok, r.params.logprobs, r.vocab)
        p = r.params
        reason = None
        text = ""
        if r.matcher is not None:
            if not r.matcher.accept_token(tok):
                raise RuntimeError(f"the grammar refused token {tok}, which its own mask allowed")
            if r.matcher.is_terminated():
                reason = "stop"  # the structured output is complete (the grammar accepted a stop token)
        may_stop = len(r.output_ids) >= p.min_tokens
        if reason is None and ((tok in r.eos_ids and not p.ignore_eos) or tok in p.stop_token_ids):
            reason = "stop"
        elif reason is None and r.text is not None:
            text, stopped = r.text.push(tok, may_stop)
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
