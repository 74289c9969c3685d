"""Baselines at the same parameter count: layer dropping by Block Influence (ShortGPT) and the untrained SVD init.

Block Influence of block i (ShortGPT, Men et al. 2024): BI_i = 1 − mean over tokens of cos(x_i, x_{i+1}), the
cosine between the block's input and output hidden states on calibration text. Blocks are dropped in order of
increasing BI until the model has at most the target number of parameters (whole blocks cannot hit it exactly:
the exact count is reported).

Healed layer drop (beyond ShortGPT, which does not train): the dropped model's remaining block weights are trained by
the same distillation as the DeltaLLM deltas (same text, token budget, schedule and teacher; every block weight at
one learning rate, as `--block-lr` trains them beside the deltas). Gromov et al. 2024 heal dropped layers with
QLoRA; full-weight training is the stronger form and the fair rival for DeltaLLM trained with `block_lr`.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from torch import nn

from deltapack.errors import BudgetError, InputError
from deltapack.share.model import apply_plan, finalize
from deltapack.share.plan import SharePlan, find_layers, unique_param_count
from deltapack.share.train import TrainConfig, train_deltas

log = logging.getLogger(__name__)


@torch.no_grad()
def block_influence(model: nn.Module, windows: torch.Tensor, batch: int = 8) -> list[float]:
    """BI per block (higher = the block changes its input more)."""
    _, layers = find_layers(model)
    sums = [0.0] * len(layers)
    count = 0
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(i):
        def fn(mod, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, (tuple, list)) else output
            captured[i] = (x, y)

        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    model.eval()
    try:
        for s in range(0, len(windows), batch):
            ids = windows[s : s + batch].to(device)
            captured.clear()
            model(input_ids=ids, use_cache=False)
            for i, (x, y) in captured.items():
                sums[i] += float((1 - F.cosine_similarity(x.float(), y.float(), dim=-1)).sum())
            count += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return [v / max(count, 1) for v in sums]


def drop_layers(model: nn.Module, drop: list[int]) -> nn.Module:
    """Remove blocks in place and renumber the rest (attention layer_idx, config) so caching and generate work."""
    path, layers = find_layers(model)
    keep = [layer for i, layer in enumerate(layers) if i not in set(drop)]
    new = nn.ModuleList(keep)
    model.set_submodule(path, new)
    for i, layer in enumerate(new):
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = i
    cfg = model.config
    cfg.num_hidden_layers = len(new)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [t for i, t in enumerate(cfg.layer_types) if i not in set(drop)]
    return model


def layer_drop_model(model: nn.Module, windows: torch.Tensor, max_params: int, batch: int = 8) -> tuple[nn.Module, dict]:
    """A copy of `model` with the lowest-BI blocks dropped until it has ≤ max_params unique parameters."""
    bi = block_influence(model, windows, batch)
    _, layers = find_layers(model)
    sizes = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    total = unique_param_count(model)
    order = sorted(range(len(bi)), key=lambda i: bi[i])
    drop: list[int] = []
    for i in order:
        if total <= max_params:
            break
        drop.append(i)
        total -= sizes[i]
    if total > max_params:
        raise BudgetError("dropping every block does not reach the target size")
    out = drop_layers(copy.deepcopy(model), sorted(drop))
    assert unique_param_count(out) == total
    return out, {"block_influence": bi, "dropped": sorted(drop), "drop_order": drop, "params": total}


def svd_init_model(model: nn.Module, plan: SharePlan) -> nn.Module:
    """A copy of `model` with the plan applied and the deltas left at their truncated-SVD initialisation."""
    return finalize(apply_plan(copy.deepcopy(model), plan, keep_original=False))


def heal_layer_drop(dropped: nn.Module, original: nn.Module, windows: torch.Tensor, cfg: TrainConfig, *, lr: float,
                    progress: bool = True, ckpt_dir=None, resume: bool = False, ckpt_meta: dict | None = None) -> dict:
    """Train every block weight of `dropped` (in place) at `lr` by distillation from the frozen `original`, with
    `cfg`'s budget and schedule (module docstring); checkpoints and resume as train_deltas (`ckpt_meta`: e.g. the
    dropped blocks, which a resumed run must share). Returns train_deltas' summary."""
    if lr <= 0:
        raise InputError(f"healing needs a learning rate > 0, got {lr}")
    run = cfg.model_copy(update={"block_lr": lr, "local_steps": 0, "train_norms": False})
    return train_deltas(dropped, None, windows, run, progress=progress, teacher=original, ckpt_dir=ckpt_dir,
                        resume=resume, ckpt_meta=ckpt_meta)
