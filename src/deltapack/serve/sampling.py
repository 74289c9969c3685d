"""Sampling parameters and next-token selection for a batch of rows (greedy rows in one argmax, sampled rows each
with their own seeded generator so a request's output depends on its seed only, not on its batch neighbours)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # <= 0: off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # generated tokens: chosen logprob + this many alternatives
    prompt_logprobs: int | None = None  # prompt tokens (echo): same, computed in the prefill

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1

    def make_generator(self, device: torch.device) -> torch.Generator | None:
        if self.greedy:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        return g


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """fp32 logits of one row (V,) -> tempered logits with everything outside top-k / nucleus top-p at -inf."""
    x = logits / max(temperature, 1e-6)
    if 0 < top_k < x.shape[0]:
        kth = torch.topk(x, top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_x, -1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop_sorted = (torch.cumsum(probs, -1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return x


def select_tokens(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None], vocab: list[int]
) -> list[int]:
    """logits (B, W) of the last position of each row; `vocab[b]` = row b's vocabulary size (columns past it, e.g.
    another tenant's added tokens, are never chosen)."""
    B, W = logits.shape
    x = logits.float()
    if any(v < W for v in vocab):
        col = torch.arange(W, device=x.device)
        lim = torch.tensor(vocab, device=x.device)
        x = x.masked_fill(col[None, :] >= lim[:, None], float("-inf"))
    out = x.argmax(-1).tolist()
    for b, (p, g) in enumerate(zip(params, generators)):
        if p.greedy:
            continue
        probs = torch.softmax(filter_logits(x[b], p.temperature, p.top_k, p.top_p), -1)
        out[b] = int(torch.multinomial(probs, 1, generator=g).item())
    return out


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
