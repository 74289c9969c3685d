"""CUDA-graph decode of the wrapped model: static KV cache, static slot ids, one graph replay per decode step.

The engine's decode step runs the wrapped transformers model eagerly and rebuilds its KV cache every step; on a
7B model that is ~100 ms of Python and launch overhead per step, far above the ~5 ms of reading the weights. This
module runs the same wrapped model (`deltapack.serve.model`: base module + per-token tenant deltas through the kernel
backend) with everything a step needs in static buffers, so the whole step can be captured once and replayed:

  * transformers' StaticCache (keys/values preallocated to `max_len`, written in place at its own device-side
    position counter), a prepared 4-D attention mask (B, 1, 1, max_len) and the position ids, both recomputed
    inside the graph from that counter and each row's left padding;
  * the tenant slot of every row in a static device tensor; the kernels group tokens by tenant on the device
    (`deltapack.kernels.triton.token_blocks`), so no host sync happens inside the step;
  * greedy sampling inside the graph: the argmax is written back into the input buffer and into `tokens`.

`StaticDecoder` serves one batch whose rows start together (left-padded prompts, as `generate` does); rows may belong
to any mix of tenants and the base (slot -1). The batch composition is fixed for a capture (`set_batch`), which lets
the kernels size their launch grids exactly; a new composition means a new capture. On the CPU (tests) the same
step runs eagerly.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext

import torch

from deltapack.errors import InputError
from deltapack.kernels import TokenSlots
from deltapack.serve.model import BatchContext, DeltaState, cache_kwarg
from deltapack.serve.sampling import to_device

log = logging.getLogger(__name__)


def most_rows_per_tenant(row_slots: list[int]) -> int:
    """Most rows any one tenant has (0 when every row is the base's, slot -1)."""
    counts: dict[int, int] = {}
    for s in row_slots:
        if s >= 0:
            counts[s] = counts.get(s, 0) + 1
    return max(counts.values(), default=0)


class StaticBatch(BatchContext):
    """A BatchContext over a static slot-id buffer: every forward gets a fresh TokenSlots (so per-forward kernel
    data, e.g. token blocks, is computed inside a captured graph) on the same device tensor."""

    def __init__(self, row_slots: list[int], slot_ids: torch.Tensor, groups, block_t: int | None):
        self.row_slots = list(row_slots)
        self.device = slot_ids.device
        self.any = any(s >= 0 for s in self.row_slots)
        self._tokens: dict[int, TokenSlots] = {}
        self._slot_ids = slot_ids
        self._groups = groups
        self._block_t = block_t
        self.merged = None

    def tokens(self, num_tokens: int) -> TokenSlots:
        ts = self._tokens.get(num_tokens)
        if ts is None:
            if num_tokens != self._slot_ids.numel():
                raise RuntimeError(f"static batch of {self._slot_ids.numel()} rows got {num_tokens} tokens")
            ts = TokenSlots(self._slot_ids, self._groups)
            if self._block_t is not None:
                ts.triton_block_t = self._block_t  # tokens of one tenant per kernel program
            self._tokens[num_tokens] = ts
        return ts


class StaticDecoder:
    """Greedy decoding of a batch of rows with static buffers; `graph=True` (default on CUDA) replays a captured
    step. `model` is a wrapped causal LM (ModelRunner.model), `state` its DeltaState (ModelRunner.state)."""

    def __init__(self, model, state: DeltaState, *, batch: int, max_len: int, graph: bool | None = None):
        from transformers import StaticCache

        self.model = model
        self.cache_kw = cache_kwarg(model)
        self.state = state
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.batch, self.max_len = int(batch), int(max_len)
        self.graph_enabled = self.device.type == "cuda" if graph is None else bool(graph)
        if self.graph_enabled and self.device.type != "cuda":
            raise InputError("CUDA graphs need a CUDA model")
        dev = self.device
        self.cache = StaticCache(config=model.config, max_cache_len=self.max_len)
        self.ids = torch.zeros(self.batch, 1, dtype=torch.long, device=dev)
        self.slot_ids = torch.full((self.batch,), -1, dtype=torch.long, device=dev)
        self.pad = torch.zeros(self.batch, dtype=torch.long, device=dev)
        self.mask = torch.zeros(self.batch, 1, 1, self.max_len, dtype=torch.bool, device=dev)
        self.pos = torch.zeros(self.batch, 1, dtype=torch.long, device=dev)
        self.tokens = torch.zeros(self.batch, self.max_len, dtype=torch.long, device=dev)  # generated, by position
        self._arange = torch.arange(self.max_len, device=dev)
        self.row_slots = [-1] * self.batch
        self._groups = None
        self._block_t: int | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self.prompt_len = 0
        self.merged = None  # a MergedEntry every row's tenant owns (set_merged), else the kernels

    # ---- batch set-up -------------------------------------------------------------------------------------------
    def set_batch(self, row_slots: list[int]) -> None:
        """Tenant slot of every row (-1 = base). Drops a captured graph (the launch grids depend on it)."""
        if len(row_slots) != self.batch:
            raise InputError(f"{len(row_slots)} row slots for a batch of {self.batch}")
        self.row_slots = [int(s) for s in row_slots]
        if self.merged is not None and any(s != self.merged.slot for s in self.row_slots):
            self.merged = None  # a merged copy serves its own tenant's rows only
        ts = TokenSlots.from_rows(self.row_slots, 1, self.device)
        self.slot_ids.copy_(ts.slot_ids)
        self._groups = ts.groups()
        self._block_t = max(1, most_rows_per_tenant(self.row_slots))
        self._graph = None

    def set_merged(self, entry) -> None:
        """Run the following prefills and steps on `entry`'s merged weights (None: the kernels). Every row must be
        the entry's tenant. Drops a captured graph (it holds the other weights' pointers)."""
        if entry is not None and any(s != entry.slot for s in self.row_slots):
            raise InputError(f"merged weights of slot {entry.slot} for rows of slots {sorted(set(self.row_slots))}")
        self.merged = entry
        self._graph = None

    def _context(self, static: bool = True) -> BatchContext:
        ctx = (StaticBatch(self.row_slots, self.slot_ids, self._groups, self._block_t) if static
               else BatchContext(self.row_slots, self.device))  # prefill: (B, P) tokens, eager
        ctx.merged = self.merged
        return ctx

    @contextmanager
    def _batch(self, ctx: BatchContext):
        self.state.ctx = ctx
        try:
            yield
        finally:
            self.state.ctx = None

    def _position(self) -> torch.Tensor:
        """Device-side count of cached positions (the next write index), shared by all cache layers."""
        return self.cache.layers[0].cumulative_length

    def _reset_cache(self) -> None:
        for lay in self.cache.layers:
            if getattr(lay, "is_initialized", False):
                lay.keys.zero_()
                lay.values.zero_()
                lay.cumulative_length.zero_()

    # ---- prefill and steps -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], row_slots: list[int] | None = None) -> None:
        """Run the left-padded prompts (eagerly) into the static cache; the next decode step generates token 1."""
        if len(prompts) != self.batch:
            raise InputError(f"{len(prompts)} prompts for a batch of {self.batch}")
        if row_slots is not None:
            self.set_batch(row_slots)
        P = max(len(p) for p in prompts)
        if P >= self.max_len:
            raise InputError(f"prompts of {P} tokens leave no room in a cache of {self.max_len}")
        self._reset_cache()
        ids = torch.zeros(self.batch, P, dtype=torch.long)
        pad = torch.zeros(self.batch, dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, P - len(p) :] = torch.tensor(p, dtype=torch.long)
            pad[b] = P - len(p)
        ids, pad = ids.to(self.device), pad.to(self.device)
        self.pad.copy_(pad)
        q = torch.arange(P, device=self.device)
        keys = self._arange[None, None, :]  # (1, 1, max_len)
        mask = (keys <= q[None, :, None]) & (keys >= pad[:, None, None])  # (B, P, max_len): causal, past the padding
        pos = (q[None, :] - pad[:, None]).clamp(min=0)
        with self._batch(self._context(static=False)):
            out = self.model(input_ids=ids, attention_mask=mask[:, None], position_ids=pos, **{self.cache_kw: self.cache},
                             use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1, :].argmax(-1)
        self.ids.copy_(nxt[:, None])
        self.tokens.zero_()
        self.tokens[:, P] = nxt
        self.prompt_len = P

    def _step_body(self) -> None:
        L = self._position().clone()  # the new token's cache index (the cache advances its counter in place)
        valid = (self._arange[None, :] <= L) & (self._arange[None, :] >= self.pad[:, None])
        self.mask.copy_(valid[:, None, None, :])
        self.pos.copy_((L - self.pad)[:, None])
        with self._batch(self._context()):
            out = self.model(input_ids=self.ids, attention_mask=self.mask, position_ids=self.pos,
                             **{self.cache_kw: self.cache}, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1, :].argmax(-1)
        self.ids.copy_(nxt[:, None])
        col = torch.clamp(L + 1, max=self.max_len - 1).view(1)
        self.tokens.index_copy_(1, col, nxt[:, None])

    @torch.inference_mode()
    def capture(self, warmup: int = 2) -> None:
        """Warm up (compiles kernels, builds launch tables) and capture one decode step. The cache position and the
        input tokens are restored afterwards, so capturing does not advance the generation."""
        if not self.graph_enabled:
            return
        saved_len = [lay.cumulative_length.clone() for lay in self.cache.layers]
        saved_ids, saved_tokens = self.ids.clone(), self.tokens.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(max(1, warmup)):
                self._step_body()
        torch.cuda.current_stream(self.device).wait_stream(side)
        for lay, n in zip(self.cache.layers, saved_len):
            lay.cumulative_length.copy_(n)
        self.ids.copy_(saved_ids)
        self.tokens.copy_(saved_tokens)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step_body()
        self._graph = graph

    @torch.inference_mode()
    def step(self) -> None:
        """One decode step for every row (graph replay when captured)."""
        if self._graph is not None:
            self._graph.replay()
        else:
            self._step_body()

    def generate(self, prompts: list[list[int]], row_slots: list[int], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuation of each prompt (row b as tenant slot row_slots[b])."""
        self.prefill(prompts, row_slots)
        if self.prompt_len + max_new_tokens > self.max_len:
            raise InputError(f"{self.prompt_len} + {max_new_tokens} tokens exceed the cache of {self.max_len}")
        if self.graph_enabled and self._graph is None and max_new_tokens > 1:
            self.capture()
        for _ in range(max_new_tokens - 1):
            self.step()
        P = self.prompt_len
        return self.tokens[:, P : P + max_new_tokens].tolist()




# ---- the engine's running batch in static buffers ------------------------------------------------------------------
VIEW_STEP = 256  # attention reads the cache up to a multiple of this (graphs are captured per view length)
TOKEN_BUCKETS = (1, 2, 4, 8, 16)  # most tokens of one tenant in a step, rounded up: one graph per bucket
COMPACT_AT = 128  # move the rows' KV to the front once every running row starts at least this many columns in


def _view_cache(config, max_len: int):
    """A StaticCache whose update returns the cache up to its `view_len` columns: a step's attention reads only the
    columns in use (rounded up to VIEW_STEP), not the whole static length."""
    from transformers import StaticCache

    class ViewStaticCache(StaticCache):
        view_len = max_len

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            k, v = super().update(key_states, value_states, layer_idx, *args, **kwargs)
            return k[:, :, : self.view_len], v[:, :, : self.view_len]

    return ViewStaticCache(config=config, max_cache_len=max_len)


def _token_bucket(n: int) -> int:
    for b in TOKEN_BUCKETS:
        if n <= b:
            return b
    return TOKEN_BUCKETS[-1]


class GraphBatch:
    """The engine's running rows in static buffers, decoded one step at a time by CUDA-graph replay.

    Rows live in `rows` fixed slots of one KV cache (transformers' StaticCache, `max_len` columns). Every step writes
    column `col` of every slot (one shared write column: the cache's own counter) and advances it; each slot keeps
    its own RoPE position and a per-column validity mask, so requests join and leave between steps at any column:
      * a prefilled request (`add`) copies its prompt's KV into a free slot's columns [col - n, col);
      * a finished request (`keep`) frees its slot; nothing moves;
      * when every running request starts COMPACT_AT columns in, or the cache is full, the used columns move to the
        front (one copy, rare: each move frees at least COMPACT_AT columns).
    Attention reads the cache up to the next multiple of VIEW_STEP past `col`, so a step costs what its longest row
    needs, not the static length.

    Graphs: one per (most tokens of one tenant in the step, rounded to TOKEN_BUCKETS; view length), captured on first
    use. The step reads the rows' tenant slots from a device tensor, and the kernels size their grids from a bound
    instead of the batch's composition (`deltapack.kernels.triton`), so a graph serves every mix of tenants: the
    engine's batch changes every few steps, a recapture each time would cost more than it saves. Input embeddings
    (with their per-tenant deltas) are computed outside the graph. Anything that needs the host's view of the batch
    inside the forward (a tenant replacing a whole tensor, vocabulary growth) runs the same step eagerly instead, as
    does everything on the CPU; so do resident-set changes until the next capture (graphs are dropped whenever a
    layer's deltas change).
    """

    def __init__(self, runner, *, rows: int, max_len: int, graphs: bool | None = None):
        self.runner = runner
        model = runner.model
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.B, self.L = int(rows), int(max_len)
        if self.L <= COMPACT_AT:
            raise InputError(f"a static KV cache needs more than {COMPACT_AT} columns, got {self.L}")
        self.graphs = (self.device.type == "cuda") if graphs is None else bool(graphs)
        if self.graphs and self.device.type != "cuda":
            raise InputError("CUDA graphs need a CUDA model")
        dev = self.device
        self.cache = _view_cache(model.config, self.L)
        hidden = model.get_input_embeddings().weight.shape[1]
        self.embeds = torch.zeros(self.B, 1, hidden, dtype=self.dtype, device=dev)
        self.pos = torch.zeros(self.B, 1, dtype=torch.long, device=dev)
        self.slot_ids = torch.full((self.B,), -1, dtype=torch.long, device=dev)
        self.valid = torch.zeros(self.B, self.L, dtype=torch.bool, device=dev)
        self.col = 0  # host copy of the write column
        self.rows: list = []  # running requests, in the engine's order
        self.index: list[int] = []  # their slots
        self.start = [0] * self.B  # first column of each slot's request
        self.next_pos = [0] * self.B
        self.row_slots = [-1] * self.B  # tenant slot of each cache slot (-1: base, or free)
        # (bucket, view) -> graph on the kernels; (bucket, view, slot, serial) -> graph on a merged entry's weights
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._graph_entries: dict[tuple, object] = {}  # merged graphs' entries, kept alive while their graph exists
        self._pool = None
        self._signature = None  # versions of the resident deltas the graphs (and _can_graph) were made for
        self._can_graph = False
        self.captures = 0
        self.eager_steps = 0
        self.compactions = 0
        self._init_cache()

    # ---- set-up --------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _init_cache(self) -> None:
        """Allocate the static layers (transformers allocates on first write) with one throw-away step of the base."""
        self._set_col(0)
        self._forward(BatchContext([-1] * self.B, self.device), self.L)
        self._set_col(0)
        self.valid.zero_()
        kinds = {type(lay).__name__ for lay in self.cache.layers}
        if kinds != {"StaticLayer"}:
            raise InputError(f"static decoding supports full-attention caches only (got {sorted(kinds)})")

    @torch.inference_mode()  # the counters were made under inference mode (the first write allocates them)
    def _set_col(self, col: int) -> None:
        for lay in self.cache.layers:
            if getattr(lay, "is_initialized", False):
                lay.cumulative_length.fill_(col)
        self.col = col

    def __len__(self) -> int:
        return len(self.rows)

    @torch.inference_mode()
    def clear(self) -> None:
        self.rows, self.index = [], []
        self.row_slots = [-1] * self.B
        self._set_col(0)
        self.valid.zero_()

    # ---- rows joining and leaving -------------------------------------------------------------------------------
    @torch.inference_mode()
    def _compact(self, force: bool = False) -> None:
        """Move the running rows' columns to the front when that frees at least COMPACT_AT columns (or, forced,
        any)."""
        s = min((self.start[i] for i in self.index), default=self.col)
        if s == 0 or (s < COMPACT_AT and not force):
            return
        n = self.col - s
        for lay in self.cache.layers:
            lay.keys[:, :, :n] = lay.keys[:, :, s : self.col].clone()
            lay.values[:, :, :n] = lay.values[:, :, s : self.col].clone()
        self.valid[:, :n] = self.valid[:, s : self.col].clone()
        self.valid[:, n:] = False
        for i in self.index:
            self.start[i] -= s
        self._set_col(n)
        self.compactions += 1

    @torch.inference_mode()
    def add(self, keys, values, mask, next_pos, rows: list) -> None:
        """Prefilled requests: per layer (n, heads, P, dim) keys/values left-padded to P with `mask` (n, P), the
        next position of each, and the requests. Each takes a free slot."""
        free = sorted(set(range(self.B)) - set(self.index))
        if len(rows) > len(free):
            raise RuntimeError(f"{len(rows)} requests for {len(free)} free rows of the static batch")
        lengths = mask.sum(1).tolist()
        need = max(lengths)
        if self.col + 1 >= self.L or self.col < need:
            self._compact(force=True)
        if self.col < need:  # room for the prompt in front of the write column; the skipped columns stay invalid
            self._set_col(need)
        if need >= self.L:
            raise InputError(f"a prompt of {need} tokens does not fit a static cache of {self.L} columns")
        P = mask.shape[1]
        positions = next_pos.tolist()
        for j, (r, n) in enumerate(zip(rows, lengths)):
            i = free[j]
            c0 = self.col - n
            for lay, k, v in zip(self.cache.layers, keys, values):
                lay.keys[i, :, c0 : self.col] = k[j, :, P - n :]
                lay.values[i, :, c0 : self.col] = v[j, :, P - n :]
            self.valid[i].zero_()
            self.valid[i, c0 : self.col] = True
            self.start[i] = c0
            self.next_pos[i] = int(positions[j])
            self.row_slots[i] = r.slot
            self.rows.append(r)
            self.index.append(i)

    def keep(self, idx: list[int]) -> None:
        for j in set(range(len(self.rows))) - set(idx):
            self.row_slots[self.index[j]] = -1
        self.rows = [self.rows[j] for j in idx]
        self.index = [self.index[j] for j in idx]
        if not self.rows:
            self.clear()

    # ---- one decode step ------------------------------------------------------------------------------------------
    def _graphable(self) -> bool:
        """Whether this step can replay a graph. Checked against the resident deltas when they change (their
        versions): a change also drops the graphs, whose launch tables moved."""
        st = self.runner.state
        signature = tuple((k, lay.version) for k, lay in st.layers.items())
        if signature != self._signature:
            self._graphs.clear()
            self._graph_entries.clear()
            self._signature = signature
            self._can_graph = (self.graphs and getattr(st.kernels, "capturable", False) and not any(
                lay.replace_slots or (lay.max_extra_rows and key != self.runner.embed_key)
                for key, lay in st.layers.items() if lay.count))
        return self._can_graph

    def _compiled(self) -> bool:
        """No kernel variant is still compiling in the background (deltapack.kernels.compile): until then steps run
        eagerly, each launch on Triton or, while its variant compiles, on the torch path (which needs the host's
        view of the batch, so it cannot be captured)."""
        return getattr(self.runner.state.kernels, "capturable_now", True)

    def _blocking(self):
        """Context in which missing kernel variants compile before launching (graph capture)."""
        comp = getattr(self.runner.state.kernels, "compiler", None)
        return comp.blocking() if comp is not None else nullcontext()

    def _forward(self, ctx: BatchContext, view: int) -> torch.Tensor:
        """The step's forward over the static buffers (captured in graphs as is): last-position logits (B, W)."""
        # this step's column (the cache advances it in place; before the first write it still lives on the CPU)
        c = self.cache.layers[0].cumulative_length.clone().to(self.device)
        self.valid.index_fill_(1, c.view(1), True)  # free slots too: an all-masked row would give NaNs
        self.cache.view_len = view
        self.runner.state.ctx = ctx
        try:
            out = self.runner.model(inputs_embeds=self.embeds, attention_mask=self.valid[:, None, None, :view],
                                    position_ids=self.pos, **{self.runner.cache_kw: self.cache}, use_cache=True,
                                    logits_to_keep=1)
        finally:
            self.runner.state.ctx = None
            self.cache.view_len = self.L
        return out.logits[:, -1, :]

    def forget_merged(self, live_serials: set[int]) -> None:
        """Drop the graphs captured on merged entries no longer live (dropped or rebuilt): a graph replays the
        pointers it was captured with, so one on freed weights must never run again."""
        for key in [k for k in self._graphs if len(k) == 4 and k[3] not in live_serials]:
            del self._graphs[key]
            self._graph_entries.pop(key, None)

    def _graph(self, bucket: int, view: int, merged=None) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        key = (bucket, view) if merged is None else (bucket, view, merged.slot, merged.serial)
        hit = self._graphs.get(key)
        if hit is not None:
            return hit

        def context() -> StaticBatch:
            # a fresh one per forward: the kernels cache per-forward data (token blocks) on its TokenSlots, and
            # those must be computed inside the graph; blocks cached by the warm-up would be baked in as pointers
            # to eager memory that is freed (and reused) once the warm-up's context goes
            ctx = StaticBatch(self.row_slots, self.slot_ids, None, bucket)
            ctx.any = bucket > 0
            ctx.merged = merged
            return ctx

        saved_valid = self.valid[:, self.col].clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with self._blocking(), torch.cuda.stream(side):  # warm-up (compiles this bucket's kernels); undone below
            for _ in range(2):
                self._forward(context(), view)
                self._set_col(self.col)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.valid[:, self.col] = saved_valid
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with self._blocking(), torch.cuda.graph(graph, pool=self._pool):
            logits = self._forward(context(), view)
        self._graphs[key] = (graph, logits)
        if merged is not None:
            self._graph_entries[key] = merged
        self.captures += 1
        return graph, logits

    @torch.inference_mode()
    def _dry_step(self, bucket: int, view: int) -> None:
        """One eager step exactly as bucket's graph would run it (no host groups, the bucket's block size), undone
        afterwards: the launches ask for their kernel variants, which compile in the background meanwhile."""
        saved_valid = self.valid[:, self.col].clone()
        ctx = StaticBatch(self.row_slots, self.slot_ids, None, bucket)
        ctx.any = bucket > 0
        self._forward(ctx, view)
        self._set_col(self.col)
        self.valid[:, self.col] = saved_valid

    @torch.inference_mode()
    def warmup(self, slots: list[int], capture: bool = True) -> int:
        """Capture the graph of every token bucket (first view length) before serving, with a stand-in batch of
        tenant `slots`: Triton compiles each bucket's kernels on first use, minutes on a cold cache, which would
        otherwise land on the first requests. capture=False: run each bucket's step once eagerly instead, so that
        its kernel variants are queued for background compilation (the graphs come later, once they are ready).
        Returns the number of graphs captured. Only on an empty batch."""
        if self.rows or not self._graphable():
            return 0
        before = self.captures
        for bucket in (0,) + (TOKEN_BUCKETS if slots else ()):
            rows = [-1] * self.B
            for i in range(min(self.B, bucket)):
                rows[i] = slots[0]
            for i, s in enumerate(slots[1:], start=bucket):  # the other tenants, one row each
                if i < self.B:
                    rows[i] = s
            self.row_slots = rows
            self.slot_ids.copy_(torch.tensor(rows, dtype=torch.long))
            if capture:
                self._graph(bucket, min(self.L, VIEW_STEP))
            else:
                self._dry_step(bucket, min(self.L, VIEW_STEP))
        self.clear()
        return self.captures - before

    @torch.inference_mode()
    def step(self, runner, last_ids: list[int], slots: list[int], merged=None) -> torch.Tensor:
        """One decode step of every running row: the logits of its next token, (len(rows), W). `merged`: a
        MergedEntry whose tenant owns every running row (the engine's guarantee; free slots compute garbage that
        is never read): the step runs on its weights, from its own graphs (one per bucket and view, captured on
        first use and dropped with the entry, `forget_merged`)."""
        if merged is not None and any(s != merged.slot for s in slots):
            raise RuntimeError(f"merged weights of slot {merged.slot} for a step of slots {sorted(set(slots))}")
        if self.col + 1 >= self.L or min(self.start[i] for i in self.index) >= COMPACT_AT:
            self._compact(force=self.col + 1 >= self.L)
        if self.col >= self.L:
            raise RuntimeError(f"static KV cache of {self.L} columns is full")
        dev = self.device
        ids = [runner.pad_id] * self.B
        pos = [0] * self.B
        for i, t in zip(self.index, last_ids):
            ids[i] = int(t)
            pos[i] = self.next_pos[i]
        for i, s in zip(self.index, slots):
            self.row_slots[i] = s
        # pinned non-blocking copies (to_device): a pageable copy makes the host wait for the device on every one
        ids_t = to_device(ids, dev).view(self.B, 1)
        eager_ctx = BatchContext(self.row_slots, dev)
        runner.state.ctx = eager_ctx  # the embedding's deltas, on the host's view of the batch
        try:
            self.embeds.copy_(runner.model.get_input_embeddings()(ids_t))
        finally:
            runner.state.ctx = None
        self.pos.copy_(to_device(pos, dev).view(self.B, 1))
        self.slot_ids.copy_(to_device(self.row_slots, dev))
        view = min(self.L, -(-(self.col + 1) // VIEW_STEP) * VIEW_STEP)
        if self._graphable() and self._compiled():
            most = most_rows_per_tenant(self.row_slots)
            graph, logits = self._graph(_token_bucket(most) if most else 0, view, merged)
            graph.replay()
        else:
            eager_ctx.merged = merged
            logits = self._forward(eager_ctx, view)
            self.eager_steps += 1
        self.col += 1
        for i in self.index:
            self.next_pos[i] += 1
        # the rows' slots without a blocking copy: a pageable one would hold the host until the forward just queued
        # has run, and the engine fills the grammar masks on the host meanwhile
        return logits.index_select(0, to_device(self.index, dev))


__all__ = ["GraphBatch", "StaticBatch", "StaticDecoder", "most_rows_per_tenant"]
