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
from contextlib import contextmanager

import torch

from deltapack.errors import InputError
from deltapack.kernels import TokenSlots
from deltapack.serve.model import BatchContext, DeltaState

log = logging.getLogger(__name__)


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

    # ---- batch set-up -------------------------------------------------------------------------------------------
    def set_batch(self, row_slots: list[int]) -> None:
        """Tenant slot of every row (-1 = base). Drops a captured graph (the launch grids depend on it)."""
        if len(row_slots) != self.batch:
            raise InputError(f"{len(row_slots)} row slots for a batch of {self.batch}")
        self.row_slots = [int(s) for s in row_slots]
        ts = TokenSlots.from_rows(self.row_slots, 1, self.device)
        self.slot_ids.copy_(ts.slot_ids)
        self._groups = ts.groups()
        counts: dict[int, int] = {}
        for s in self.row_slots:
            if s >= 0:
                counts[s] = counts.get(s, 0) + 1
        self._block_t = max(counts.values(), default=1)
        self._graph = None

    def _context(self, static: bool = True) -> BatchContext:
        if static:
            return StaticBatch(self.row_slots, self.slot_ids, self._groups, self._block_t)
        return BatchContext(self.row_slots, self.device)  # prefill: (B, P) tokens, eager

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
            out = self.model(input_ids=ids, attention_mask=mask[:, None], position_ids=pos, past_key_values=self.cache,
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
                             past_key_values=self.cache, use_cache=True, logits_to_keep=1)
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


__all__ = ["StaticBatch", "StaticDecoder"]
