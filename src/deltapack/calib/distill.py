"""BitDelta scale distillation: train only the sign planes' scales so the compressed model's next-token
distributions match the fine-tune's (KL) on calibration text.

Deviation from the paper, on purpose: we train a relative multiplier per scale (s = s0·(1+θ)) rather than the raw
scale, so one learning rate works whatever the delta's magnitude (raw scales of real deltas are ~1e-4..1e-3,
comparable to Adam's per-step move at the paper's lr 1e-4).

Memory: the fine-tune (teacher) is needed only for its next-token log-probabilities on the fixed calibration
batches, so they are computed once (stored in fp16: ~0.3 GB for 32 x 128 tokens of a 32k vocabulary) and the teacher
is freed before training; the sign planes are kept as int8 (+-1). A 7B run held teacher, student, bf16 planes and the
per-step weights at once (57 GB peak on the H100, bench/results/quality.json timing).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from deltapack.errors import DeltapackError

log = logging.getLogger(__name__)


def _load(path, device, dtype):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
    except Exception as e:
        raise DeltapackError(f"scale distillation needs a transformers-loadable model at {path}: {e}") from e


@torch.no_grad()
def _teacher_logprobs(teacher, ids: torch.Tensor, batch: int) -> torch.Tensor:
    """Next-token log-probabilities of the teacher on every calibration sequence, fp16 (its 10-bit mantissa keeps
    the likely tokens' log-probs to ~1e-5; the range holds any log-prob), then the teacher is released."""
    out = torch.cat([F.log_softmax(teacher(ids[i:i + batch]).logits.float(), -1).half() for i in range(0, len(ids), batch)])
    del teacher
    if ids.device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _grow_vocabulary(student, ctx, dev, dtype) -> dict[str, torch.Tensor]:
    """The student's parameters, its embedding (and head) first grown to the fine-tune's vocabulary where the
    fine-tune added tokens: the calibration text may use the new ids, and the teacher's log-probs cover them. The new
    rows are the fine-tune's own, which the delta stores exactly (`new_rows`), so they are fixed, as in the merge."""
    params = dict(student.named_parameters())
    ft_names = set(ctx.finetuned.keys())
    grown = {n: ctx.finetuned.meta(n).shape[0] for n, p in params.items()
             if n in ft_names and p.dim() == 2 and ctx.finetuned.meta(n).shape[0] > p.shape[0]}
    if not grown:
        return params
    base_rows = {n: params[n].shape[0] for n in grown}
    student.resize_token_embeddings(max(grown.values()))
    params = dict(student.named_parameters())
    with torch.no_grad():
        for n, rows in base_rows.items():
            if n in params and params[n].shape[0] == grown[n]:
                params[n][rows:] = ctx.finetuned.get(n)[rows:].to(dev, dtype)
    for p in student.parameters():
        p.requires_grad_(False)
    log.info("scale distillation: vocabulary grown to %d for the fine-tune's new tokens", max(grown.values()))
    return params


def distill_scales(method, encoded: dict, ctx) -> dict:
    from deltapack.methods.bitdelta import sign_planes

    dev = ctx.device
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    steps, bs, seq = method.distill_steps, method.distill_batch, method.distill_seq_len
    ids = ctx.calibration_batches(seq, max(bs * 8, 32)).to(dev)
    teacher_logp = _teacher_logprobs(_load(ctx.finetuned.path, dev, dtype), ids, bs)  # the teacher is gone after this
    student = _load(ctx.base.path, dev, dtype)
    for p in student.parameters():
        p.requires_grad_(False)
    params = _grow_vocabulary(student, ctx, dev, dtype)
    trainable: dict[str, tuple] = {}
    for name, enc in encoded.items():
        if name not in params:
            continue  # e.g. a tied lm_head: the embedding entry carries it
        w, shape = params[name], tuple(ctx.stats[name].shape)  # a grown tensor's code covers its base rows only
        if enc.codec == "sign" and w.dim() == 2 and w.shape[1] == shape[1] and w.shape[0] >= shape[0]:
            planes = sign_planes(enc, shape, dev).to(torch.int8)  # (k, m, n) of +-1: half of bf16
            s0 = enc.parts["scale"].to(dev).float()  # (k, 1 or m)
            theta = torch.zeros_like(s0, requires_grad=True)
            trainable[name] = (planes, s0, theta)
    if not trainable:
        return encoded
    # dense-stored tensors (norms) are applied as fixed deltas so the student is the full compressed model
    with torch.no_grad():
        for name, enc in encoded.items():
            if enc.codec == "dense" and name in params:
                values, w = enc.parts["values"], params[name]
                if values.numel() == w.numel():
                    w.add_(values.to(dev, dtype).view_as(w))
                elif w.dim() == 2 and values.numel() % w.shape[1] == 0 and values.numel() < w.numel():  # grown
                    rows = values.numel() // w.shape[1]  # the code covers the base rows
                    w[:rows].add_(values.to(dev, dtype).view(rows, w.shape[1]))
    held_out = torch.arange(min(8, ids.shape[0]))

    def with_delta(w: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return w + delta if delta.shape[0] == w.shape[0] else torch.cat([w[: delta.shape[0]] + delta, w[delta.shape[0]:]])

    def student_logits(batch):
        override = {
            name: with_delta(params[name], ((s0 * (1 + th)).to(dtype).unsqueeze(-1) * planes).sum(0))
            for name, (planes, s0, th) in trainable.items()
        }
        return torch.func.functional_call(student, override, (batch,)).logits.float()

    def kl_to_teacher(rows: torch.Tensor):
        batch, t_logp = ids[rows], teacher_logp[rows].float()
        return F.kl_div(F.log_softmax(student_logits(batch), -1), t_logp, log_target=True, reduction="batchmean") / batch.shape[1]

    with torch.no_grad():
        kl_before = float(kl_to_teacher(held_out))
    opt = torch.optim.Adam([t[2] for t in trainable.values()], lr=method.distill_lr)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for step in tqdm(range(steps), desc="bitdelta scale distillation", disable=not ctx.progress, leave=False):
        loss = kl_to_teacher(torch.randint(0, ids.shape[0], (bs,), generator=gen).to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        kl_after = float(kl_to_teacher(held_out))
    log.info("scale distillation: KL on held calibration batch %.4g -> %.4g over %d steps", kl_before, kl_after, steps)
    rec = ctx.cache.setdefault("calibration_record", {})
    rec["distill"] = {"steps": steps, "kl_before": kl_before, "kl_after": kl_after}
    out = dict(encoded)
    for name, (_, s0, th) in trainable.items():
        enc = encoded[name]
        parts = dict(enc.parts)
        parts["scale"] = (s0 * (1 + th.detach())).float().cpu()
        out[name] = type(enc)(enc.codec, enc.params, parts, enc.method)
    return out
