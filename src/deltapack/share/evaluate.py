"""Perplexity and KL to the original model on token windows (shared by the plan criterion, training and the bench)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids.to(_device(model)), use_cache=False).logits


@torch.no_grad()
def teacher_logprobs(model: nn.Module, windows: torch.Tensor, batch: int) -> list[torch.Tensor]:
    """Log-probabilities of `model` on each batch of windows (kept in bf16 to halve memory)."""
    out = []
    for i in range(0, len(windows), batch):
        out.append(F.log_softmax(logits_of(model, windows[i : i + batch]).float(), -1).to(torch.bfloat16))
    return out


def token_kl(student_logits: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher ‖ student), fp32."""
    s = F.log_softmax(student_logits.float(), -1)
    t = teacher_logp.float()
    return (t.exp() * (t - s)).sum(-1).mean()


@torch.no_grad()
def batched_kl(model: nn.Module, windows: torch.Tensor, teacher: list[torch.Tensor], batch: int) -> float:
    total, n = 0.0, 0
    for j, i in enumerate(range(0, len(windows), batch)):
        ids = windows[i : i + batch]
        total += float(token_kl(logits_of(model, ids), teacher[j].to(_device(model)))) * ids.numel()
        n += ids.numel()
    return total / max(n, 1)


@torch.no_grad()
def evaluate(model: nn.Module, windows: torch.Tensor, teacher: nn.Module | None = None, batch: int = 8) -> dict:
    """{"ppl", "kl"}: perplexity of next-token prediction and mean token KL(teacher ‖ model) on `windows`."""
    model.eval()
    nll, kl, n = 0.0, 0.0, 0
    for i in range(0, len(windows), batch):
        ids = windows[i : i + batch].to(_device(model))
        logits = logits_of(model, ids).float()
        nll += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
        n += ids[:, 1:].numel()
        if teacher is not None:
            t = F.log_softmax(logits_of(teacher, ids).float(), -1)
            kl += float(token_kl(logits, t)) * ids.numel()
    out = {"ppl": math.exp(nll / max(n, 1))}
    if teacher is not None:
        out["kl"] = kl / max(len(windows) * windows.shape[1], 1)
    return out
