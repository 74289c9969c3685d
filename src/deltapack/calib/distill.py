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
    params = dict(student.named_parameters())
    trainable: dict[str, tuple] = {}
    for name, enc in encoded.items():
        if name not in params:
            continue  # e.g. a tied lm_head: the embedding entry carries it
        w = params[name]
        if enc.codec == "sign" and w.dim() == 2 and tuple(w.shape) == tuple(ctx.stats[name].shape):
            planes = sign_planes(enc, tuple(w.shape), dev).to(torch.int8)  # (k, m, n) of +-1: half of bf16
            s0 = enc.parts["scale"].to(dev).float()  # (k, 1 or m)
            theta = torch.zeros_like(s0, requires_grad=True)
            trainable[name] = (planes, s0, theta)
    if not trainable:
        return encoded
    # dense-stored tensors (norms) are applied as fixed deltas so the student is the full compressed model
    with torch.no_grad():
        for name, enc in encoded.items():
            if enc.codec == "dense" and name in params and params[name].numel() == enc.parts["values"].numel():
                params[name].add_(enc.parts["values"].to(dev, dtype).view_as(params[name]))
    held_out = torch.arange(min(8, ids.shape[0]))

    def student_logits(batch):
        override = {
            name: params[name] + ((s0 * (1 + th)).to(dtype).unsqueeze(-1) * planes).sum(0)
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
