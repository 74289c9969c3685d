"""Metrics on an in-memory causal LM: exact-match accuracy (batched greedy decoding), KL to a reference model, and
perplexity.

- Exact match: prompts are batched by length, left-padded, and decoded greedily for up to `max_new_tokens` tokens
  (default: the longest answer of the task in tokens + 8, so a model that rambles is cut early and scored wrong);
  decoding stops at the end-of-sequence / end-of-turn tokens. See deltapack.eval.tasks for the match rule.
- KL: teacher forcing on prompt + reference answer (+ EOS). At every position that predicts a completion token,
  KL(p_ref || p_model) of the two next-token distributions (fp32 log-softmax over the full vocabulary); the result is
  the mean over all those positions of all examples (token-weighted), in nats.
- Perplexity: the text is tokenized once and cut into consecutive non-overlapping windows of `seq_len` tokens; each
  window is scored independently (its first token has no context and is not predicted). ppl = exp(total NLL / number
  of predicted tokens).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from deltapack.errors import InputError
from deltapack.eval.tasks import Example, answer_matches, completion_ids, encode_example, prompt_ids, use_chat

log = logging.getLogger(__name__)


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (better than p ± 1.96·se at the small n and the
    proportions near 0 or 1 that task accuracies have)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def stop_token_ids(model, tok) -> list[int]:
    """End-of-sequence ids: the tokenizer's, the generation config's, and known end-of-turn tokens in the vocab."""
    ids: list[int] = []
    if tok.eos_token_id is not None:
        ids.append(int(tok.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]:
        if e is not None:
            ids.append(int(e))
    vocab = tok.get_vocab()
    for t in END_OF_TURN_TOKENS:
        if t in vocab:
            ids.append(int(vocab[t]))
    return sorted(set(ids))


def pad_id(tok, stops: Sequence[int]) -> int:
    if tok.pad_token_id is not None:
        return int(tok.pad_token_id)
    return int(stops[0]) if stops else 0


@torch.no_grad()
def greedy_generate(
    model, tok, prompts: Sequence[list[int]], *, max_new_tokens: int, batch_size: int = 32, progress: bool = False
) -> list[list[int]]:
    """Greedy completions (token ids, stop token excluded) of tokenized prompts, batched with left padding."""
    from transformers import GenerationConfig

    dev = model_device(model)
    stops = stop_token_ids(model, tok)
    pid = pad_id(tok, stops)
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pid, eos_token_id=stops or None,
        bos_token_id=getattr(model.generation_config, "bos_token_id", None) if hasattr(model, "generation_config") else None,
    )
    # longest first: similar lengths share a batch (less padding); the first batch shows the peak memory at once
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    stop_set = set(stops)
    for s in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress, leave=False):
        idx = order[s : s + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pid, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            p = prompts[i]
            if p:
                ids[r, width - len(p) :] = torch.tensor(p, dtype=torch.long)
                mask[r, width - len(p) :] = 1
        gen = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), generation_config=gen_cfg)
        for r, i in enumerate(idx):
            seq = gen[r, width:].tolist()
            cut = next((k for k, t in enumerate(seq) if t in stop_set), len(seq))
            out[i] = seq[:cut]
    return out


@dataclass
class ExactMatch:
    accuracy: float
    correct: int
    total: int
    max_new_tokens: int
    predictions: list[str] = field(default_factory=list)
    per_item: list[bool] = field(default_factory=list)  # right or wrong, in example order (paired comparisons)

    def summary(self, keep_predictions: int = 0) -> dict:
        return {
            "accuracy": self.accuracy, "correct": self.correct, "total": self.total,
            "max_new_tokens": self.max_new_tokens, "predictions": self.predictions[:keep_predictions],
        }


def auto_max_new_tokens(tok, examples: Sequence[Example], margin: int = 8, cap: int = 512) -> int:
    longest = max(len(completion_ids(tok, e.answer)) for e in examples)
    return min(cap, longest + margin)


def exact_match(
    model, tok, examples: Sequence[Example], *, max_new_tokens: int | None = None, batch_size: int = 32,
    first_line: bool = False, chat: bool | None = None, progress: bool = False,
) -> ExactMatch:
    """Greedy-decode every prompt and score it against its answer with the documented match rule."""
    if not examples:
        raise InputError("no examples to evaluate")
    chat = use_chat(tok, chat)
    mnt = max_new_tokens or auto_max_new_tokens(tok, examples)
    prompts = [prompt_ids(tok, e.prompt, chat) for e in examples]
    gens = greedy_generate(model, tok, prompts, max_new_tokens=mnt, batch_size=batch_size, progress=progress)
    preds = [tok.decode(g, skip_special_tokens=True) for g in gens]
    per_item = [bool(answer_matches(p, e.answer, first_line)) for p, e in zip(preds, examples)]
    correct = sum(per_item)
    return ExactMatch(correct / len(examples), correct, len(examples), mnt, preds, per_item)


def _right_padded(seqs: Sequence[list[int]], pid: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pid, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[r, : len(s)] = 1
    return ids, mask


@dataclass
class KLResult:
    kl: float  # mean nats per completion token
    tokens: int
    max_token_kl: float

    def summary(self) -> dict:
        return {"kl": self.kl, "tokens": self.tokens, "max_token_kl": self.max_token_kl}


@torch.no_grad()
def kl_to_reference(
    model, reference, tok, examples: Sequence[Example], *, batch_size: int = 16, chat: bool | None = None,
    progress: bool = False,
) -> KLResult:
    """Mean over completion-token positions of KL(reference || model), teacher-forced on prompt + answer."""
    if not examples:
        raise InputError("no examples to compute KL on")
    chat = use_chat(tok, chat)
    dev_m, dev_r = model_device(model), model_device(reference)
    pid = pad_id(tok, stop_token_ids(model, tok))
    pairs = [encode_example(tok, e, chat) for e in examples]
    total, count, worst = 0.0, 0, 0.0
    for s in tqdm(range(0, len(pairs), batch_size), desc="kl", disable=not progress, leave=False):
        chunk = pairs[s : s + batch_size]
        seqs = [p + c for p, c in chunk]
        ids, mask = _right_padded(seqs, pid)
        # logits at position t predict token t+1: the completion tokens are predicted from len(p)-1 .. len(p+c)-2
        rows, cols = [], []
        for r, (p, c) in enumerate(chunk):
            start = max(len(p) - 1, 0)
            for t in range(start, len(p) + len(c) - 1):
                rows.append(r)
                cols.append(t)
        lm = model(input_ids=ids.to(dev_m), attention_mask=mask.to(dev_m)).logits
        lr = reference(input_ids=ids.to(dev_r), attention_mask=mask.to(dev_r)).logits
        if lm.shape[-1] != lr.shape[-1]:
            raise InputError(f"model and reference vocabularies differ ({lm.shape[-1]} vs {lr.shape[-1]})")
        r_i, c_i = torch.tensor(rows), torch.tensor(cols)
        log_m = F.log_softmax(lm[r_i.to(dev_m), c_i.to(dev_m)].float(), -1)
        log_r = F.log_softmax(lr[r_i.to(dev_r), c_i.to(dev_r)].float(), -1).to(log_m.device)
        kl = (log_r.exp() * (log_r - log_m)).sum(-1).clamp_min(0.0)  # clamp: fp rounding can give -1e-9
        total += float(kl.sum())
        count += kl.numel()
        worst = max(worst, float(kl.max()))
        del lm, lr, log_m, log_r
    return KLResult(total / max(1, count), count, worst)


@dataclass
class Perplexity:
    ppl: float
    nll: float  # mean nats per predicted token
    tokens: int  # predicted tokens
    seq_len: int

    def summary(self) -> dict:
        return {"ppl": self.ppl, "nll": self.nll, "tokens": self.tokens, "seq_len": self.seq_len}


@torch.no_grad()
def perplexity(
    model, tok, text: str, *, seq_len: int = 512, batch_size: int = 4, max_tokens: int | None = None,
    progress: bool = False,
) -> Perplexity:
    """Perplexity of `text` over non-overlapping `seq_len`-token windows (see the module docstring)."""
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    if max_tokens is not None:
        ids = ids[:max_tokens]
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit:
        seq_len = min(seq_len, int(limit))
    windows = [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise InputError("perplexity text is shorter than two tokens")
    dev = model_device(model)
    nll, count = 0.0, 0
    for s in tqdm(range(0, len(windows), batch_size), desc="ppl", disable=not progress, leave=False):
        chunk = windows[s : s + batch_size]
        ids_t, mask = _right_padded(chunk, 0)
        logits = model(input_ids=ids_t.to(dev), attention_mask=mask.to(dev)).logits.float()
        target = ids_t[:, 1:].to(dev)
        valid = mask[:, 1:].to(dev).bool()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
        nll += float(loss.view_as(target)[valid].sum())
        count += int(valid.sum())
        del logits
    mean = nll / count
    return Perplexity(math.exp(mean), mean, count, seq_len)
