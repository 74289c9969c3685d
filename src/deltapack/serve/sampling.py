"""Sampling parameters and next-token selection for a batch of rows.

Every logits processor runs on the batch's logits, touching only the rows that asked for it (a grammar mask, logit
bias, allowed tokens, min_tokens, repetition / presence / frequency penalties), then greedy rows take one argmax
and sampled rows draw from their own seeded generator, so a request's output depends on its seed only, never on its
batch neighbours. A row whose logits are not finite, or whose processors leave no token allowed, fails alone
(`select_tokens` returns its error): it never fails the other rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from deltapack.serve.grammar import GrammarMasks

SAMPLING_EPS = 1e-5  # temperatures below this are greedy (as vLLM): dividing by them only overflows


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # <= 0: off
    min_p: float = 0.0  # drop tokens whose probability is below min_p x the most likely token's (0: off)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # generated tokens: chosen logprob + this many alternatives
    prompt_logprobs: int | None = None  # prompt tokens (echo): same, computed in the prefill
    presence_penalty: float = 0.0  # OpenAI: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtracted per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # CTRL / transformers: logits of prompt and generated tokens / p (x p if < 0)
    logit_bias: dict[int, float] = field(default_factory=dict)
    allowed_token_ids: list[int] | None = None
    min_tokens: int = 0  # EOS and stop_token_ids are masked, stop strings not checked, before this many tokens
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    grammar: object | None = None  # a compiled grammar (deltapack.serve.grammar); each request gets its own matcher

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS or self.top_k == 1

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    def make_generator(self, device: torch.device) -> torch.Generator | None:
        if self.greedy:
            return None
        g = torch.Generator(device=device)
        # torch takes any seed in [-2**63, 2**64): the API admits int64 (as vLLM), checked before a request is queued
        g.manual_seed(self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        return g


class Row(Protocol):
    """What `select_tokens` reads of a running request (deltapack.serve.engine.GenRequest)."""

    params: SamplingParams
    generator: torch.Generator | None
    vocab: int
    prompt_ids: list[int]
    output_ids: list[int]
    eos_ids: set[int]
    matcher: object | None


class RowError(Exception):
    """A failure of one row's sampling: `status` is the HTTP status its client gets."""

    def __init__(self, status: int, message: str, type_: str = "server_error"):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float = 0.0) -> torch.Tensor:
    """fp32 logits of one row (V,) -> tempered logits with everything outside min-p / top-k / nucleus top-p at -inf.
    The most likely token always stays, whatever the thresholds round to."""
    x = logits / max(temperature, SAMPLING_EPS)
    best = int(x.argmax())
    if min_p > 0.0:
        probs = torch.softmax(x, -1)
        x = x.masked_fill(probs < min_p * probs[best], float("-inf"))
    if 0 < top_k < x.shape[0]:
        kth = torch.topk(x, top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_x, -1)
        # drop a token when the mass before it already reaches top_p
        drop_sorted = (torch.cumsum(probs, -1) - probs) >= top_p
        drop_sorted[0] = False
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return x


def _stop_ids(r: Row) -> list[int]:
    ids = set(r.params.stop_token_ids)
    if not r.params.ignore_eos:
        ids |= r.eos_ids
    return sorted(i for i in ids if 0 <= i < r.vocab)


def to_device(values: list[int], device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A small host list as a device tensor without stalling the host: a plain .to(cuda) from pageable memory
    waits for all the work queued before it (the forward), a pinned non-blocking copy is queued behind it."""
    t = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _constrained(rows: list[Row]) -> bool:
    return any(getattr(r, "matcher", None) is not None for r in rows)


def process_logits(x: torch.Tensor, rows: list[Row], masks: GrammarMasks | None = None, first: int = 0) -> None:
    """Apply every row's logits processors to fp32 logits x (B, W) in place, each only on the rows that asked.
    masks: grammar masks already filled for the batch whose rows first .. first + B - 1 are x's rows (the engine
    fills them while the forward runs); None: rows with a matcher are filled here."""
    B, W = x.shape
    vocab = [r.vocab for r in rows]
    if any(v < W for v in vocab):  # columns past a row's vocabulary (another tenant's added tokens) are never chosen
        col = torch.arange(W, device=x.device)
        lim = to_device(vocab, x.device)
        x.masked_fill_(col[None, :] >= lim[:, None], float("-inf"))
    if masks is None and _constrained(rows):
        from deltapack.serve.grammar import default_masks

        masks = default_masks(x.device).fill(rows)
        if masks.errors:
            raise next(iter(masks.errors.values()))
        first = 0
    if masks is not None:
        masks.apply(x, first)
    for b, r in enumerate(rows):
        p = r.params
        if p.allowed_token_ids is not None:
            keep = torch.full((W,), float("-inf"), device=x.device)
            keep[torch.tensor(p.allowed_token_ids, device=x.device)] = 0.0
            x[b] += keep
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=x.device)
            x[b, ids] += torch.tensor(list(p.logit_bias.values()), device=x.device, dtype=x.dtype)
        if p.min_tokens and len(r.output_ids) < p.min_tokens:
            stop = _stop_ids(r)
            if stop:
                x[b, torch.tensor(stop, device=x.device)] = float("-inf")
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(r.prompt_ids) | set(r.output_ids)), device=x.device)
            v = x[b, seen]
            x[b, seen] = torch.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
        if (p.presence_penalty != 0.0 or p.frequency_penalty != 0.0) and r.output_ids:
            counts = torch.bincount(torch.tensor(r.output_ids, device=x.device), minlength=W)[:W].to(x.dtype)
            x[b] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(x.dtype)


def select_tokens(logits: torch.Tensor, rows: list[Row], masks: GrammarMasks | None = None) -> tuple[list[int], dict[int, RowError]]:
    """logits (B, W) of the last position of each row -> (token per row, {row index: error} for rows that failed;
    their token is -1). A failure is confined to its row. masks: the rows' grammar masks, already filled (the
    engine fills them while the forward runs); None: filled here when a row has a matcher."""
    if masks is None and _constrained(rows):
        from deltapack.serve.grammar import default_masks

        masks = default_masks(logits.device).fill(rows)
    x = logits.float()  # a copy for bf16/fp16 logits; for fp32 ones the processors below must not touch the caller's
    if x.data_ptr() == logits.data_ptr():
        x = x.clone()
    errors: dict[int, RowError] = {}
    if masks is not None:  # a matcher that could not fill its mask: that row fails, unmasked rows never get sampled
        for b, e in masks.errors.items():
            errors[b] = RowError(500, f"internal error in the grammar: {e.__class__.__name__}: {e}")
    try:
        process_logits(x, rows, masks)
    except Exception as e:  # one row's processor failed: redo them row by row to find it, the others go on
        x = logits.float().clone()
        found = False
        for b, r in enumerate(rows):
            if b in errors:
                continue
            try:
                process_logits(x[b : b + 1], [r], masks, b)
            except Exception as e_row:
                errors[b] = RowError(500, f"internal error while sampling: {e_row.__class__.__name__}: {e_row}")
                found = True
        if not found:
            raise e
    # one device->host copy for the argmax and both row checks (on a GPU each .tolist() is a sync)
    out, bad_nan, none_left = torch.stack([x.argmax(-1), torch.isnan(x).any(-1), torch.isneginf(x).all(-1)]).tolist()
    for b, r in enumerate(rows):
        if b in errors:
            out[b] = -1
            continue
        if bad_nan[b]:
            errors[b] = RowError(500, "the model produced non-finite logits for this request (a broken delta?)")
        elif none_left[b]:
            errors[b] = RowError(400, "no token is allowed: the request's constraints (grammar, allowed_token_ids, "
                                      "min_tokens, logit_bias) exclude every token", "invalid_request_error")
        elif not r.params.greedy:
            try:
                p = r.params
                probs = torch.softmax(filter_logits(x[b], p.temperature, p.top_k, p.top_p, p.min_p), -1)
                out[b] = int(torch.multinomial(probs, 1, generator=r.generator).item())
            except Exception as e:
                errors[b] = RowError(500, f"internal error while sampling: {e.__class__.__name__}: {e}")
        if b in errors:
            out[b] = -1
    return out, errors


def token_logprobs(logits_row: torch.Tensor, token: int, top: int, vocab: int) -> tuple[float, list[tuple[int, float]]]:
    """Log-probability of `token` under the raw (untempered) distribution, and the `top` most likely tokens."""
    lp = torch.log_softmax(logits_row[:vocab].float(), -1)
    alts: list[tuple[int, float]] = []
    if top > 0:
        v, i = torch.topk(lp, min(top, lp.shape[0]))
        alts = list(zip(i.tolist(), v.tolist()))
    return float(lp[token]), alts


def prompt_logprobs(logits: torch.Tensor, ids: list[int], top: int, vocab: int) -> tuple[list[float | None], list[list[tuple[int, float]] | None]]:
    """logits (L, W) of a prompt's positions, ids its L tokens. Entry i scores token i given tokens < i; the first
    token has no score (None), as in OpenAI's echo output."""
    L = len(ids)
    chosen: list[float | None] = [None]
    tops: list[list[tuple[int, float]] | None] = [None]
    if L < 2:
        return chosen, tops
    lp = torch.log_softmax(logits[: L - 1, :vocab].float(), -1)  # (L-1, V): position i-1 predicts token i
    tgt = torch.tensor(ids[1:], device=lp.device)
    chosen += lp.gather(1, tgt[:, None]).view(-1).tolist()
    if top > 0:
        v, i = torch.topk(lp, min(top, lp.shape[1]), dim=-1)
        tops += [list(zip(ii, vv)) for ii, vv in zip(i.tolist(), v.tolist())]
    else:
        tops += [[] for _ in range(L - 1)]
    return chosen, tops
